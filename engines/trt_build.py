"""Building FP16 TensorRT plans (TensorRT 10), by two routes:

* ONNX route (default): parse the validated ONNX file, set FP16 (or BF16), keep
  the precision-sensitive layers in float32 with OBEY_PRECISION_CONSTRAINTS, one
  optimisation profile over the batch axis, a timing cache reused between builds.
  This is TensorRT 10's weakly typed API (BuilderFlag.FP16, layer precisions),
  which TensorRT 11 removed: the `gpu` extra pins tensorrt below 11.
* Torch-TensorRT route: `torch_tensorrt` converts a low-precision copy of the
  module whose weights are already fp16 with the same fp32 islands as the torch
  backend (`engines.lowp_dit`), with explicit typing: TensorRT follows the
  graph's own dtypes instead of choosing precisions itself.

Which layers stay float32 (see docs/engines.md): every reduction, softmax and
normalisation layer, the pow/sqrt/reciprocal/exp/sin/cos layers, and every layer
that the exporter attributes to a norm module (RMSNorm, GroupNorm) or to the
timestep embedder. In FP16, RMSNorm's x**2 overflows above |x| = 256 and the
mean of squares loses the small terms; GroupNorm's variance the same; softmax
sums need the range. The matmuls and convolutions (all the FLOPs) run in FP16.
The selection is made on the ONNX graph (`select_fp32_nodes`, tested on CPU);
the TensorRT layer types are checked again for layers the parser adds.

The VA-VAE decoder plan is built in fp32 unless fp16/bf16 is asked for
(engines.device.decode_precision).

Only importable pieces run without TensorRT; every function that needs it
imports it lazily and raises EngineError otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from engines.base import EngineError
from engines.trt_version import INSTALL_HINT, version_problem

WORKSPACE_BYTES = 4 << 30
# Module names whose layers keep float32 (suffix of the exporter's scope names).
FP32_SCOPES = ("norm1", "norm2", "norm_final", "q_norm", "k_norm", "norm", "norm_out", "t_embedder")
# ONNX ops that keep float32 wherever they are: reductions, softmax, norms and the
# transcendental ops whose fp16 range or resolution is too small.
FP32_OPS = frozenset({
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceMax", "Softmax", "LogSoftmax",
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization",
    "Pow", "Sqrt", "Reciprocal", "Exp", "Sin", "Cos",
})


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): whether this machine can build TensorRT plans."""
    try:
        import tensorrt
    except ImportError:
        return False, f"the tensorrt Python package is not installed ({INSTALL_HINT})"
    problem = version_problem(tensorrt)
    if problem:
        return False, problem
    if not torch.cuda.is_available():
        return False, f"tensorrt {tensorrt.__version__} is installed but torch sees no CUDA GPU"
    return True, f"tensorrt {tensorrt.__version__} on {torch.cuda.get_device_name(0)}"


def torch_tensorrt_status() -> tuple[bool, str]:
    ok, reason = tensorrt_status()
    if not ok:
        return ok, reason
    try:
        import torch_tensorrt
    except ImportError:
        return False, "the torch_tensorrt package is not installed (pip install torch-tensorrt)"
    return True, f"torch_tensorrt {torch_tensorrt.__version__}"


def node_scopes(node) -> list[str]:
    """The module names an exported node belongs to, innermost last (both exporters' conventions)."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    # dynamo exporter: scopes like ['', 'blocks.0', 'blocks.0.norm1', 'pow_1'];
    # TorchScript exporter: names like /blocks.0/norm1/Pow.
    return [s.strip(" '\"[]").rsplit(".", 1)[-1] for s in scopes.split(",")] + node.name.split("/")


def select_fp32_nodes(nodes) -> set[str]:
    """Names of the ONNX nodes that keep float32: by op type, or by the module they belong to."""
    return {node.name for node in nodes
            if node.op_type in FP32_OPS or any(p in FP32_SCOPES for p in node_scopes(node))}


def fp32_node_names(onnx_path: Path) -> set[str]:
    import onnx

    return select_fp32_nodes(onnx.load(str(onnx_path), load_external_data=False).graph.node)


def _keep_fp32(trt, layer, scoped: set[str]) -> bool:
    lt = trt.LayerType
    if layer.type in (lt.REDUCE, lt.SOFTMAX, lt.NORMALIZATION):
        return True
    # get_layer() hands out the ILayer base; the op lives on the subclass (Polygraphy does the same).
    if layer.type == lt.ELEMENTWISE:
        layer.__class__ = trt.IElementWiseLayer
        if layer.op == trt.ElementWiseOperation.POW:
            return True
    if layer.type == lt.UNARY:
        layer.__class__ = trt.IUnaryLayer
    if layer.type == lt.UNARY and layer.op in (trt.UnaryOperation.SQRT, trt.UnaryOperation.RECIP,
                                               trt.UnaryOperation.EXP, trt.UnaryOperation.SIN,
                                               trt.UnaryOperation.COS):
        return True
    return layer.name in scoped or any(layer.name.startswith(n + "_") for n in scoped if n)


def FLOAT_TYPES(trt) -> tuple:  # noqa: N802 - a constant that needs the lazily imported module
    return tuple(getattr(trt, n) for n in ("float32", "float16", "bfloat16") if hasattr(trt, n))


def _set_fp32_islands(trt, network, scoped: set[str]) -> int:
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not _keep_fp32(trt, layer, scoped):
            continue
        # Only layers computing on floats; shape/index layers keep their int types.
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outs or any(o.dtype not in FLOAT_TYPES(trt) for o in outs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        count += 1
    return count


def _profile_shapes(shape, profile: dict) -> tuple[tuple, tuple, tuple]:
    rest = tuple(int(d) for d in shape[1:])
    if any(d < 0 for d in rest):
        raise EngineError(f"only the batch axis may be dynamic, got {tuple(shape)}")
    return ((profile["min"], *rest), (profile["opt"], *rest), (profile["max"], *rest))


def _config(trt, builder, timing_cache: Path, precision: str):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def build_plan_from_onnx(onnx_path: Path, plan_path: Path, profile: dict, timing_cache: Path,
                         log: Callable[[str], None] = print, precision: str = "fp16") -> dict:
    """Parse `onnx_path`, build a plan (fp16 by default, fp32 islands kept) with one batch profile,
    write it; returns build facts."""
    import tensorrt as trt

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors} "
                          "(try --engine-route torch-tensorrt)")
    islands = _set_fp32_islands(trt, network, fp32_node_names(onnx_path)) if precision != "fp32" else 0
    config = _config(trt, builder, timing_cache, precision)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        opt_profile.set_shape(tensor.name, *_profile_shapes(tensor.shape, profile))
    config.add_optimization_profile(opt_profile)
    log(f"  building {plan_path.name} ({precision}): {network.num_layers} layers, {islands} pinned to fp32, rows "
        f"{profile['min']}/{profile['opt']}/{profile['max']}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build {plan_path.name} (see the TensorRT log above)")
    plan_path.write_bytes(bytes(plan))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"file": plan_path.name, "precision": precision, "layers": network.num_layers, "fp32_layers": islands,
            "build_s": round(time.perf_counter() - t0, 2)}


def build_plan_with_torch_tensorrt(module: torch.nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                                   plan_path: Path, profile: dict, timing_cache: Path,
                                   log: Callable[[str], None] = print, precision: str = "fp32") -> dict:
    """Torch-TensorRT route: torch.export the module, convert it into one serialised plan.

    The module carries its precision in its own weights (a `engines.lowp_dit` copy for
    fp16/bf16, with fp32 islands), and explicit typing makes TensorRT keep those dtypes;
    `precision` only labels the result.
    """
    import torch_tensorrt

    t0 = time.perf_counter()
    device = torch.device("cuda")
    module = module.eval().to(device)
    example = tuple(e.to(device) for e in example)
    rows = torch.export.Dim("rows", min=profile["min"], max=profile["max"])
    program = torch.export.export(module, example, dynamic_shapes={n: {0: rows} for n in input_names})
    inputs = [
        torch_tensorrt.Input(min_shape=(profile["min"], *e.shape[1:]), opt_shape=(profile["opt"], *e.shape[1:]),
                             max_shape=(profile["max"], *e.shape[1:]), dtype=e.dtype, name=n)
        for n, e in zip(input_names, example, strict=True)
    ]
    log(f"  converting {plan_path.name} with torch_tensorrt {torch_tensorrt.__version__} "
        f"({precision} weights, explicit typing)")
    plan = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
        program, arg_inputs=inputs, use_explicit_typing=True, timing_cache_path=str(timing_cache),
    )
    plan_path.write_bytes(bytes(plan))
    return {"file": plan_path.name, "precision": precision, "build_s": round(time.perf_counter() - t0, 2)}
