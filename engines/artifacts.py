"""Producing an artifact directory: ONNX export + validation of both graphs, and its manifest.

Used by `build_engine.py` (with progress output and the TensorRT step) and by
`load_engine(backend="onnxruntime", engine_dir=None)` (export to a temp dir).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engines.manifest import (
    DIT_ONNX,
    VAE_ONNX,
    bundle_fingerprint,
    file_entry,
    gpu_identity,
    runtime_versions,
    write_manifest,
)
from engines.onnx_export import (
    DEFAULT_OPSET,
    DecoderForExport,
    ParityResult,
    dit_example_inputs,
    export_dit,
    export_vae_decoder,
    vae_example_inputs,
    validate_onnx,
)
from model.bundle import ModelBundle

# ORT-vs-PyTorch tolerance, relative to the output's largest magnitude. fp32 on
# both sides: observed ~1e-6 (VAE) to ~1e-5 (DiT); 1e-3 leaves room for
# different kernels (MKL vs MLAS) without letting a wrong graph through.
DEFAULT_REL_TOL = 1e-3


@dataclass
class GraphReport:
    name: str
    file: str
    export_s: float
    parity: list[ParityResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.parity) and all(p.ok for p in self.parity)


@dataclass
class OnnxReport:
    exporter: str
    opset: int
    rel_tol: float
    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(g.ok for g in self.graphs)

    def text(self) -> str:
        return "\n".join(f"{g.name}: {p.line()}" for g in self.graphs for p in g.parity)

    def to_dict(self) -> dict:
        return {
            "exporter": self.exporter, "opset": self.opset, "rel_tol": self.rel_tol,
            "validation": {g.name: [vars(p) for p in g.parity] for g in self.graphs},
        }


def export_and_validate(
    bundle: ModelBundle,
    out_dir: Path,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    batch_sizes: tuple[int, ...] = (1, 3, 8),
    rel_tol: float = DEFAULT_REL_TOL,
    progress: Callable[[str], None] = lambda msg: None,
    note: Callable[[str], None] = lambda msg: None,
) -> OnnxReport:
    """Export the DiT and the VAE decoder into out_dir and compare each with PyTorch in ONNX Runtime.

    `progress` announces each of the four steps (export, validate; per graph); `note` gets each
    validation line right after its own step, so it reads under the right header."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dit, vae = bundle.dit.cpu().eval(), bundle.vae.cpu().eval()
    latent_hw = bundle.spec.latent_shape[1]
    report = OnnxReport(exporter, opset, rel_tol)
    jobs = [
        ("dit", DIT_ONNX, dit, lambda p: export_dit(dit, p, exporter, opset),
         lambda n, s: dit_example_inputs(dit, n, s), ["x", "t", "y"]),
        ("vae_decoder", VAE_ONNX, DecoderForExport(vae), lambda p: export_vae_decoder(vae, latent_hw, p, exporter, opset),
         lambda n, s: vae_example_inputs(vae, latent_hw, n, s), ["z"]),
    ]
    for name, fname, module, export, make_inputs, input_names in jobs:
        progress(f"exporting {name} to ONNX ({exporter}, opset {opset})")
        t0 = time.perf_counter()
        export(out_dir / fname)
        graph = GraphReport(name, fname, time.perf_counter() - t0)
        progress(f"validating {name} in ONNX Runtime at batch sizes {list(batch_sizes)}")
        graph.parity = validate_onnx(module, out_dir / fname, make_inputs, input_names, batch_sizes, rel_tol)
        for p in graph.parity:  # under this step's header, not after the last one
            note(f"{name}: {p.line()}")
        report.graphs.append(graph)
    return report


def artifact_files(out_dir: Path) -> dict:
    """Every artifact file (ONNX, external data, plans, timing cache) with hash and size."""
    skip = {"manifest.json"}
    return {p.name: file_entry(p) for p in sorted(Path(out_dir).iterdir()) if p.is_file() and p.name not in skip}


def build_manifest(bundle: ModelBundle, out_dir: Path, report: OnnxReport, profile: dict,
                   tensorrt: dict | None = None, tensorrt_skipped: str | None = None,
                   build_seconds: float | None = None) -> dict:
    spec = bundle.spec
    c, h, w = spec.latent_shape
    s = spec.image_size
    return {
        "bundle": {**bundle_fingerprint(spec), "dir": str(spec.root)},
        "graphs": {
            "dit": {"file": DIT_ONNX, "inputs": {"x": ["rows", c, h, w], "t": ["rows"], "y": ["rows"]},
                    "input_dtypes": {"x": "float32", "t": "float32", "y": "int64"},
                    "output": {"v": ["rows", c, h, w]}, "null_class": spec.num_classes},
            "vae_decoder": {"file": VAE_ONNX, "inputs": {"z": ["rows", spec.vae_embed_dim, h, w]},
                            "output": {"image": ["rows", 3, s, s]},
                            "note": "z is the de-normalised latent; image is float in about [-1, 1]"},
        },
        "onnx": report.to_dict(),
        "batch_profile": {**profile, "unit": "DiT rows after CFG doubling (conditional + unconditional)"},
        "precision": {"onnx": "fp32", "tensorrt": tensorrt.get("precision") if tensorrt else None},
        "tensorrt": tensorrt,
        "tensorrt_skipped": tensorrt_skipped,
        "gpu": gpu_identity(),
        "versions": runtime_versions(),
        "build_seconds": build_seconds,
        "files": artifact_files(out_dir),
    }


def write_onnx_manifest(bundle: ModelBundle, out_dir: Path, report: OnnxReport, profile: dict, **extra) -> Path:
    return write_manifest(out_dir, build_manifest(bundle, out_dir, report, profile, **extra))
