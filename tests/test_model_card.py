"""The model card and the rough edges a new user meets: split-mode /v1/model, class names and
synonyms, numeric strings, cache-hit timings, request counts by status class, offline /docs.

Real uvicorn, a real Redis server, API and worker as separate processes configured differently.
"""

from __future__ import annotations

import re

import httpx
import pytest

from model.bundle import read_spec
from model.classes import ClassIndex, UnknownClass
from service.settings import REPO_ROOT
from tests.service_harness import make_tiny_bundle, start_redis, start_service
from tests.test_service import decode_png, scrape


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """The API configured for torch fp32 / 16 rows; the worker really runs bf16 with 8 rows."""
    bundle = make_tiny_bundle(tmp_path_factory.mktemp("bundle"))
    server = start_redis("embedded")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle)}
    api = start_service("api", env)
    worker = start_service("worker", {**env, "LDIT_PRECISION": "bf16", "LDIT_MAX_BATCH_SIZE": "8",
                                      "LDIT_WORKER_NAME": "w-bf16"})
    yield api
    worker.stop()
    api.stop()
    server.stop()


def test_model_card_reports_what_the_worker_runs(split):
    info = httpx.get(f"{split.url}/v1/model").json()
    assert info["api"] == {"model_version": info["version"], "backend": "torch", "precision": "fp32"}
    [w] = info["workers"]
    assert (w["name"], w["backend"], w["precision"], w["device"], w["max_rows"]) == ("w-bf16", "torch", "bf16",
                                                                                       "cpu", 8)
    assert w["model_version"] == info["version"] and 0 <= w["age_s"] < 10
    assert "backend" not in info and "precision" not in info  # no top-level claim the API cannot back


def test_cache_hit_reports_its_own_timings(split):
    body = {"class_label": 4, "seed": 77}
    miss = httpx.post(f"{split.url}/generate", json=body, timeout=60)
    hit = httpx.post(f"{split.url}/generate", json=body, timeout=60)
    assert miss.status_code == hit.status_code == 200 and hit.content == miss.content
    assert miss.headers["X-Cache"] == "miss" and float(miss.headers["X-Compute-Ms"]) > 0
    assert "X-Original-Compute-Ms" not in miss.headers
    assert hit.headers["X-Cache"] == "hit"
    assert (hit.headers["X-Queue-Ms"], hit.headers["X-Compute-Ms"], hit.headers["X-Batch-Size"]) == ("0.0", "0.0", "0")
    for h in ("Queue-Ms", "Compute-Ms", "Batch-Size"):
        assert hit.headers[f"X-Original-{h}"] == miss.headers[f"X-{h}"]
    # an async job answered from the cache says so too
    job = httpx.post(f"{split.url}/jobs", json=body).json()
    st = httpx.get(f"{split.url}{job['status_url']}").json()
    assert st["status"] == "done" and st["cache"] == "hit" and st["compute_ms"] == 0.0
    img = httpx.get(f"{split.url}{job['image_url']}")
    assert img.headers["X-Compute-Ms"] == "0.0" and img.headers["X-Original-Compute-Ms"] == miss.headers["X-Compute-Ms"]


def test_numeric_strings_follow_one_rule_for_seed_and_class(split):
    as_numbers = httpx.post(f"{split.url}/generate", json={"class_label": 2, "seed": 42}, timeout=60)
    as_strings = httpx.post(f"{split.url}/generate", json={"class_label": "2", "seed": "42"}, timeout=60)
    assert as_numbers.status_code == as_strings.status_code == 200
    assert as_strings.content == as_numbers.content and as_strings.headers["X-Seed"] == "42"
    for body, field in (({"class_label": "²", "seed": 1}, "class_label"), ({"class_label": 1, "seed": "²"}, "seed"),
                        ({"class_label": "9" * 5000, "seed": 1}, "class_label"),
                        ({"class_label": 1, "seed": "9" * 5000}, "seed"), ({"class_label": 1, "seed": "-3"}, "seed")):
        r = httpx.post(f"{split.url}/generate", json=body, timeout=10)
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, (body, r.text)
    schema = httpx.get(f"{split.url}/openapi.json").json()["components"]["schemas"]["GenerateRequest"]
    assert {"type": "string", "pattern": "^[0-9]{1,19}$"} in schema["properties"]["seed"]["anyOf"]


def test_unknown_class_lists_every_class_of_a_small_model(split):
    r = httpx.post(f"{split.url}/generate", json={"class_label": "seven", "seed": 1}, timeout=10)
    assert r.status_code == 422
    [d] = r.json()["detail"]
    assert d["field"] == "class_label" and d["closest"] == [f"digit-{i}" for i in range(10)]


def test_requests_are_counted_by_route_and_status_class(split):
    before = scrape(f"{split.url}/metrics")
    assert httpx.post(f"{split.url}/generate", json={"class_label": 1}).status_code == 422
    assert httpx.post(f"{split.url}/generate", content=b"x" * 20000,
                      headers={"content-type": "application/json"}).status_code == 413
    assert httpx.get(f"{split.url}/jobs/nope").status_code == 404
    assert httpx.get(f"{split.url}/no/such/path").status_code == 404
    after = scrape(f"{split.url}/metrics")

    def delta(endpoint, status_class):
        name = f'ldit_http_requests_total{{endpoint="{endpoint}",status_class="{status_class}"}}'
        return after.get(name, 0) - before.get(name, 0)

    assert delta("/generate", "4xx") == 2 and delta("/jobs/{job_id}", "4xx") == 1 and delta("other", "4xx") == 1
    assert delta("/metrics", "2xx") == 1  # the first scrape itself


def test_docs_are_served_from_local_assets(split):
    page = httpx.get(f"{split.url}/docs")
    assert page.status_code == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert urls and all(u.startswith("/") for u in urls), urls  # nothing from a CDN
    js = httpx.get(f"{split.url}/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text[:2000]
    assert httpx.get(f"{split.url}/docs-assets/swagger-ui.css").status_code == 200
    redoc = httpx.get(f"{split.url}/redoc")
    assert redoc.status_code == 200 and "fonts.googleapis" not in redoc.text
    assert all(u.startswith("/") for u in re.findall(r'(?:src|href)="([^"]+)"', redoc.text))


# -- class names without a service -------------------------------------------------------

@pytest.fixture(scope="module")
def imagenet() -> ClassIndex:
    return read_spec(REPO_ROOT / "checkpoints" / "official-xl-800ep").classes


@pytest.mark.parametrize(("label", "cls"), [("tench", 0), ("Tinca tinca", 0), ("  TINCA   tinca ", 0),
                                             ("white shark", 2), ("Carcharodon carcharias", 2), ("207", 207),
                                             ("golden retriever", 207), ("crane", 134), ("crane (machine)", 517),
                                             ("Cardigan Welsh corgi", 264), ("cardigan", 474)])
def test_imagenet_names_and_synonyms_resolve(imagenet, label, cls):
    assert imagenet.resolve(label) == cls


@pytest.mark.parametrize(("label", "first"), [("great white", "great white shark"), ("gldfish", "goldfish"),
                                               ("retriever", "golden retriever"), ("tench fish", "tench")])
def test_imagenet_unknown_names_get_real_suggestions(imagenet, label, first):
    with pytest.raises(UnknownClass) as err:
        imagenet.resolve(label)
    assert err.value.suggestions[0] == first and len(err.value.suggestions) <= 5


def test_a_synonym_of_several_classes_names_them_all():
    index = ClassIndex(["crane", "crane (machine)", "heron"], [["crane"], ["crane (machine)", "derrick"], ["heron"]])
    assert index.resolve("derrick") == 1 and index.resolve("crane") == 0
    shared = ClassIndex(["a", "b"], [["a", "x"], ["b", "x"]])
    with pytest.raises(UnknownClass) as err:
        shared.resolve("x")
    assert err.value.suggestions == ["a", "b"]
    with pytest.raises(UnknownClass):
        shared.resolve("²")  # str.isdigit() says yes; it is not a class id


def test_offline_generate_resolves_classes_like_the_api(tmp_path):
    from model.generate import main

    out = tmp_path / "one.png"
    assert main(["--class", "7", "--seed", "3", "--steps", "3", "--out", str(out)]) == 0
    assert decode_png(out.read_bytes()).shape == (32, 32, 3)
    with pytest.raises(SystemExit):
        main(["--class", "seven", "--seed", "3", "--out", str(out)])
