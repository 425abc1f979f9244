"""`manifest.json`: what a directory of built engine artifacts was built from, and the check that refuses stale ones.

An artifact directory (written by `build_engine.py`) holds ONNX files, optionally
TensorRT plans, and this manifest. A backend loads artifacts only when the
manifest names the same checkpoint files (by SHA-256) and the same DiT/VAE
configuration as the bundle it serves, and, for TensorRT plans, the same GPU
and TensorRT version (a plan is specific to both). See docs/engines.md.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from engines.base import EngineError
from model.bundle import BundleSpec
from model.checkpoints import file_sha256, save_json

MANIFEST_NAME = "manifest.json"
FORMAT = "lightningdit-engines/1"

# File names inside an artifact directory.
DIT_ONNX = "dit.onnx"
VAE_ONNX = "vae_decoder.onnx"
DIT_PLAN = "dit.fp16.plan"
VAE_PLAN = "vae_decoder.fp16.plan"
TIMING_CACHE = "timing.cache"


def bundle_fingerprint(spec: BundleSpec) -> dict:
    """The parts of a bundle that change an engine's numbers: weights (by hash) and model configs."""
    return {
        "name": spec.name,
        "version": spec.version(),
        "dit_checkpoint": {"file": spec.dit_checkpoint.name, "sha256": file_sha256(spec.dit_checkpoint)},
        "vae_checkpoint": {"file": spec.vae_checkpoint.name, "sha256": file_sha256(spec.vae_checkpoint)},
        "dit_config": dict(spec.dit_config),
        "vae": {"embed_dim": spec.vae_embed_dim, "ddconfig": dict(spec.vae_ddconfig)},
    }


def gpu_identity() -> dict | None:
    """Name and compute capability of CUDA device 0, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def runtime_versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("onnx", "onnxruntime", "tensorrt", "torch_tensorrt"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # absent or broken install: recorded as missing, never fatal here
            versions[module] = None
    return versions


def file_entry(path: Path) -> dict:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    manifest = {"format": FORMAT, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest}
    path = Path(out_dir) / MANIFEST_NAME
    save_json(manifest, path)
    return path


def read_manifest(engine_dir: str | Path) -> dict:
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.is_file():
        raise EngineError(f"no {MANIFEST_NAME} in {engine_dir}: build the artifacts with `python build_engine.py`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EngineError(f"{path} is not valid JSON ({err})") from None
    if data.get("format") != FORMAT:
        raise EngineError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}; rebuild with build_engine.py")
    return data


def bundle_mismatches(manifest: dict, spec: BundleSpec) -> list[str]:
    """Human-readable differences between the manifest's bundle and this bundle (empty: same)."""
    built = manifest.get("bundle", {})
    now = bundle_fingerprint(spec)
    problems = []
    for key in ("dit_checkpoint", "vae_checkpoint"):
        old, new = built.get(key, {}).get("sha256"), now[key]["sha256"]
        if old != new:
            problems.append(f"{key} sha256 {str(old)[:12]}… in the manifest, {new[:12]}… in {spec.root}")
    if built.get("dit_config") != now["dit_config"]:
        problems.append("DiT config differs")
    if built.get("vae") != now["vae"]:
        problems.append("VAE config differs")
    return problems


def gpu_mismatches(manifest: dict) -> list[str]:
    """Why this machine cannot run the manifest's TensorRT plans (empty: it can)."""
    trt = manifest.get("tensorrt") or {}
    problems = []
    here = gpu_identity()
    if here is None:
        return ["no CUDA GPU here"]
    built = trt.get("gpu") or {}
    if built.get("name") != here["name"] or built.get("compute_capability") != here["compute_capability"]:
        problems.append(f"plans built on {built.get('name')!r} (sm {built.get('compute_capability')}), "
                        f"this GPU is {here['name']!r} (sm {here['compute_capability']})")
    try:
        import tensorrt

        if trt.get("version") and trt["version"] != tensorrt.__version__:
            problems.append(f"plans built with TensorRT {trt['version']}, this is {tensorrt.__version__}")
    except ImportError:
        problems.append("tensorrt is not installed")
    return problems


def check_artifacts(engine_dir: str | Path, spec: BundleSpec, need_tensorrt: bool = False) -> dict:
    """Read the manifest and refuse (EngineError) artifacts that do not belong to this bundle/GPU."""
    manifest = read_manifest(engine_dir)
    problems = bundle_mismatches(manifest, spec)
    if problems:
        raise EngineError(f"artifacts in {engine_dir} were built from another checkpoint: {'; '.join(problems)}. "
                          "Rebuild with `python build_engine.py`.")
    if need_tensorrt:
        if not manifest.get("tensorrt"):
            reason = manifest.get("tensorrt_skipped") or "not built"
            raise EngineError(f"{engine_dir} holds no TensorRT plans (TensorRT step: {reason}); "
                              "run build_engine.py on a machine with TensorRT and a GPU")
        problems = gpu_mismatches(manifest)
        if problems:
            raise EngineError(f"TensorRT plans in {engine_dir} do not fit this machine: {'; '.join(problems)}. "
                              "Rebuild them here with `python build_engine.py`.")
    return manifest
