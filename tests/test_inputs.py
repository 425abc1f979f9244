"""Inputs that used to reach a 500 or a wrong image, and messages that used to mislead. One all-in-one service."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from model.sampling import SamplerPreset, time_grid
from service.http.schemas import MIN_TIMESTEP_SHIFT, FieldError, check_time_grid
from tests.service_harness import make_tiny_bundle, start_service
from tests.test_service import decode_png


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    bundle = make_tiny_bundle(tmp_path_factory.mktemp("bundle"))
    sp = start_service("all", {"LDIT_MODEL_DIR": str(bundle)})
    yield sp.url
    sp.stop()


def post_raw(api: str, text: str, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(f"{api}/generate", content=text.encode(), headers=headers, timeout=30)


def field_error(r: httpx.Response, field: str) -> str:
    """The 422's message for `field` (asserts there is one)."""
    assert r.status_code == 422, (r.status_code, r.text[:300])
    body = r.json()
    assert body["error"] == "invalid_request"
    messages = [d["message"] for d in body["detail"] if d["field"] == field]
    assert messages, body
    return " ".join(messages)


@pytest.mark.parametrize("label", ["²", "٣", "1" * 5000, "1" + "0" * 20])
def test_class_label_strings_of_digits(api, label):
    message = field_error(post_raw(api, json.dumps({"class_label": label, "seed": 1})), "class_label")
    assert len(message) < 400


def test_huge_integers_name_their_field(api):
    huge = "9" * 5000
    r = post_raw(api, f'{{"class_label": {huge}, "seed": 1}}')
    assert "out of range" in field_error(r, "class_label")
    r = post_raw(api, f'{{"class_label": 1, "seed": {huge}}}')
    message = field_error(r, "seed")
    assert "out of range" in message and "5000 digits" in message
    assert "JSON" not in r.json()["message"]


@pytest.mark.parametrize("field", ["cfg_scale", "cfg_interval_start", "timestep_shift"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_say_finite(api, field, value):
    r = post_raw(api, f'{{"class_label": 1, "seed": 1, "{field}": {value}}}')
    message = field_error(r, field)
    assert "finite" in message and "less than" not in message


@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded"])
def test_wrong_content_type_says_which_to_send(api, content_type):
    r = post_raw(api, json.dumps({"class_label": 1, "seed": 1}), content_type)
    assert "content-type: application/json" in field_error(r, "body")
    assert "dictionary" not in r.text


def test_404_echoes_a_bounded_job_id(api):
    r = httpx.get(f"{api}/jobs/{'x' * 5000}")
    assert r.status_code == 404 and len(r.json()["message"]) < 200
    r = httpx.get(f"{api}/jobs/{'y' * 5000}/image")
    assert r.status_code == 404 and len(r.json()["message"]) < 200
    assert "nope" in httpx.get(f"{api}/jobs/nope").json()["message"]


@pytest.mark.parametrize("shift", [1e-8, 1e-7, 1e-4, 0.009])
def test_timestep_shifts_that_break_the_grid_are_refused(api, shift):
    r = httpx.post(f"{api}/generate", json={"class_label": 1, "seed": 1, "timestep_shift": shift}, timeout=30)
    assert str(MIN_TIMESTEP_SHIFT) in field_error(r, "timestep_shift")


def test_small_valid_shift_makes_a_real_image(api):
    r = httpx.post(f"{api}/generate", json={"class_label": 1, "seed": 1, "timestep_shift": 0.1}, timeout=60)
    assert r.status_code == 200, r.text
    assert decode_png(r.content).std() > 1  # not a flat (black) image


def test_every_accepted_shift_has_a_finite_grid_from_0_to_exactly_1():
    shifts = [0.0, MIN_TIMESTEP_SHIFT, 0.05, 0.1, 0.2, 0.3, 0.7, 1.0, 1.5, 3.0, 9.99, 10.0]
    for shift in shifts:
        for steps in (2, 3, 7, 50, 250, 999, 1000):
            check_time_grid(SamplerPreset(num_steps=steps, timestep_shift=shift))  # raises if refused
            grid = time_grid(steps, shift)
            assert bool(np.isfinite(grid.numpy()).all()) and grid[0].item() == 0.0 and grid[-1].item() == 1.0
    for shift in (1e-8, 1e-3):
        with pytest.raises(FieldError):
            check_time_grid(SamplerPreset(num_steps=250, timestep_shift=shift))
