"""Export the DiT and the VA-VAE decoder to ONNX (dynamic batch) and check them against PyTorch.

Exporter: the torch.export-based one (`torch.onnx.export(dynamo=True)`) at
opset 18 by default. Why (docs/engines.md has the long form): it captures the
model with torch.export, so RoPE's unflatten/stack, RMSNorm's float32 island and
`scaled_dot_product_attention` are decomposed into plain ONNX ops (MatMul,
Softmax, ReduceMean, ...) that ONNX Runtime and every TensorRT 10 parser take;
its graph has a third fewer nodes than the TorchScript exporter's (no
Shape/Gather/Mod chains for the dynamic batch), and the TorchScript exporter is
deprecated. Opset 18 is the lowest opset that exporter targets natively, and
new enough that nothing needs emulation; later opsets add fused Attention /
RMSNormalization ops that older TensorRT parsers reject. `exporter="torchscript"`
stays as a fallback (also dynamic-batch, also validated).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.lightningdit import LightningDiT
from model.vavae import VAVAE

DEFAULT_OPSET = 18
# Largest batch the exported graphs are declared for; the real limit is the
# TensorRT profile. (torch.export needs some upper bound.)
MAX_EXPORT_ROWS = 4096
# Above this many parameter bytes the weights go to an external-data file
# (protobuf's 2 GB limit); the demo and B/1 stay single-file.
EXTERNAL_DATA_BYTES = 1 << 30


class DecoderForExport(nn.Module):
    """VA-VAE decode (post_quant_conv + decoder) as one graph: de-normalised latent -> float image."""

    def __init__(self, vae: VAVAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def dit_example_inputs(dit: LightningDiT, rows: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    s = dit.input_size
    x = torch.randn(rows, dit.in_channels, s, s, generator=g)
    t = torch.rand(rows, generator=g)
    y = torch.randint(0, dit.num_classes + 1, (rows,), generator=g)  # includes the null class
    return x, t, y


def vae_example_inputs(vae: VAVAE, latent_hw: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vae.embed_dim, latent_hw, latent_hw, generator=g),)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def _quiet_loggers():
    # e.g. "torchvision is not installed. Skipping torchvision::nms" on every dynamo export
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_name: str,
    path: Path,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export `module` with a dynamic first (batch) axis shared by every input and the output."""
    module = module.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = _param_bytes(module) > EXTERNAL_DATA_BYTES
    # The exporters are chatty (progress lines, deprecation warnings); the CLI prints its own progress.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_loggers(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            rows = torch.export.Dim("rows", min=1, max=MAX_EXPORT_ROWS)
            program = torch.onnx.export(
                module, example, None, dynamo=True, opset_version=opset, input_names=input_names,
                output_names=[output_name], dynamic_shapes={n: {0: rows} for n in input_names},
                external_data=large, verbose=False,
            )
            program.save(str(path), external_data=large)
        elif exporter == "torchscript":
            axes = {n: {0: "rows"} for n in [*input_names, output_name]}
            torch.onnx.export(
                module, example, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                output_names=[output_name], dynamic_axes=axes,
            )
        else:
            raise ValueError(f"unknown exporter {exporter!r} (dynamo | torchscript)")
    return path


def export_dit(dit: LightningDiT, path: Path, exporter: str = "dynamo", opset: int = DEFAULT_OPSET) -> Path:
    return export_onnx(dit, dit_example_inputs(dit, 2), ["x", "t", "y"], "v", path, exporter, opset)


def export_vae_decoder(vae: VAVAE, latent_hw: int, path: Path, exporter: str = "dynamo",
                       opset: int = DEFAULT_OPSET) -> Path:
    return export_onnx(DecoderForExport(vae), vae_example_inputs(vae, latent_hw, 2), ["z"], "image", path,
                       exporter, opset)


@dataclass
class ParityResult:
    rows: int
    max_abs: float
    max_rel: float  # max |onnx - torch| / max |torch|
    ok: bool

    def line(self) -> str:
        return f"rows={self.rows:<3d} max_abs={self.max_abs:.3e} rel={self.max_rel:.3e} {'ok' if self.ok else 'FAIL'}"


def ort_cpu_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # torch shares the process; spinning ORT threads starve it (measured 9 ms -> 312 ms per torch call).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def validate_onnx(
    module: nn.Module,
    path: Path,
    make_inputs: Callable[[int, int], tuple[torch.Tensor, ...]],
    input_names: list[str],
    batch_sizes: tuple[int, ...] = (1, 3, 8),
    rel_tol: float = 1e-3,
    threads: int | None = None,
) -> list[ParityResult]:
    """Run the ONNX file in ONNX Runtime (CPU) and PyTorch on the same random inputs, per batch size."""
    session = ort_cpu_session(path, threads)
    results = []
    for i, rows in enumerate(batch_sizes):
        inputs = make_inputs(rows, 1000 + i)
        with torch.no_grad():
            ref = module(*inputs).float().numpy()
        got = session.run(None, {n: v.numpy() for n, v in zip(input_names, inputs, strict=True)})[0]
        if got.shape != ref.shape:
            results.append(ParityResult(rows, float("inf"), float("inf"), False))
            continue
        max_abs = float(np.abs(got - ref).max())
        max_rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
        results.append(ParityResult(rows, max_abs, max_rel, bool(np.isfinite(max_rel) and max_rel <= rel_tol)))
    return results
