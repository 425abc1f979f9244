"""The service on the ONNX Runtime backend: artifacts built on first start, same images as torch."""

from __future__ import annotations

import httpx

from model.bundle import load_bundle
from tests.service_harness import make_tiny_bundle, start_service
from tests.test_service import decode_png, psnr, reference


def test_all_in_one_on_onnxruntime(tmp_path):
    bundle_dir = make_tiny_bundle(tmp_path / "bundle")
    engine_dir = tmp_path / "engines"
    env = {"LDIT_MODEL_DIR": str(bundle_dir), "LDIT_BACKEND": "onnxruntime", "LDIT_ENGINE_DIR": str(engine_dir)}
    svc = start_service("all", env)  # embedded Redis; build_engine.py --if-stale runs first
    try:
        assert (engine_dir / "manifest.json").is_file()
        info = httpx.get(f"{svc.url}/v1/model").json()
        assert [w["backend"] for w in info["workers"]] == ["onnxruntime"]  # what the worker runs
        r = httpx.post(f"{svc.url}/generate", json={"class_label": 6, "seed": 21}, timeout=120)
        assert r.status_code == 200, r.text
        want = reference(load_bundle(bundle_dir), [6], [21])[0]
        assert psnr(decode_png(r.content), want) >= 40
    finally:
        assert svc.stop() == 0  # SIGTERM: a clean exit, embedded Redis stopped
