#!/usr/bin/env python
"""Build the engine artifacts of a model bundle: ONNX (validated) and, with TensorRT and a GPU, FP16 plans.

The DiT plan is FP16 with fp32 islands; the VA-VAE decoder plan is fp32 unless
--decode-precision asks otherwise (decoders of this family overflow in fp16).
Both plans are checked against PyTorch on the GPU before the manifest is
written, and any non-finite output fails the build.

    python build_engine.py                       # the demo bundle -> engines_out/
    python build_engine.py --model-dir DIR --output-dir OUT --max-rows 32
    python build_engine.py --if-stale            # nothing to do when the manifest still fits

Defaults come from engines/build_config.py: the service's variables and defaults
(LDIT_MODEL_DIR, LDIT_ENGINE_DIR, LDIT_MIN_BATCH_SIZE, LDIT_PREFERRED_BATCH_SIZE,
LDIT_MAX_BATCH_SIZE).

Exit codes: 0 = everything built (ONNX + TensorRT plans), or already up to date
with plans; 3 = ONNX only, the TensorRT step was skipped (no tensorrt or no GPU;
the reason is printed and stored in the manifest); 1 = a build or validation
failure; 2 = bad arguments or an unreadable bundle. See docs/engines.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ONNX_ONLY = 0, 1, 2, 3
ONNX_STEPS = 4  # export + validate, for the DiT and the VAE decoder
TRT_STEPS = 3  # a plan for each graph, then the check against PyTorch


class Progress:
    """Numbered steps with elapsed time, flushed at once (builds run for minutes on big models)."""

    def __init__(self, total: int):
        self.total, self.step, self.t0 = total, 0, time.perf_counter()

    def __call__(self, msg: str) -> None:
        self.step += 1
        print(f"[{self.step}/{self.total}] {msg} (t+{time.perf_counter() - self.t0:.1f}s)", flush=True)

    @staticmethod
    def note(msg: str) -> None:
        print(f"      {msg}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from engines.build_config import EngineBuildConfig

    s = EngineBuildConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit codes: 0 all built, 3 ONNX only (TensorRT skipped), 1 failure, 2 usage")
    p.add_argument("--model-dir", type=Path, default=s.model_dir, help=f"model bundle (default {s.model_dir})")
    p.add_argument("--output-dir", type=Path, default=s.engine_dir, help=f"artifact dir (default {s.engine_dir})")
    p.add_argument("--min-rows", type=int, default=s.min_batch_size, help="TensorRT profile min rows")
    p.add_argument("--opt-rows", type=int, default=s.profile_opt_rows, help="TensorRT profile opt rows")
    p.add_argument("--max-rows", type=int, default=s.max_batch_size,
                   help="TensorRT profile max rows (DiT rows after CFG doubling)")
    p.add_argument("--decode-precision", choices=("fp32", "bf16", "fp16"), default=s.decode_precision,
                   help=f"VA-VAE decoder plan precision (default {s.decode_precision}; fp16 only when validated)")
    p.add_argument("--engine-route", choices=("onnx", "torch-tensorrt"), default="onnx",
                   help="how the FP16 plans are made: TensorRT's ONNX parser, or Torch-TensorRT")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo", help="ONNX exporter")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--rel-tol", type=float, default=None, help="ONNX-vs-PyTorch relative tolerance (default 1e-3)")
    p.add_argument("--validate-rows", type=str, default="1,3,8", help="batch sizes validated in ONNX Runtime")
    p.add_argument("--if-stale", action="store_true", help="do nothing when the manifest matches bundle and GPU")
    p.add_argument("--skip-tensorrt", action="store_true", help="ONNX only, even where TensorRT is available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for export/validation")
    args = p.parse_args(argv)
    if args.engine_route == "torch-tensorrt" and args.decode_precision != "fp32":
        p.error("--engine-route torch-tensorrt builds the decoder in fp32 only")
    if not 1 <= args.min_rows <= args.opt_rows <= args.max_rows:
        p.error(f"need 1 <= min-rows <= opt-rows <= max-rows, got {args.min_rows}/{args.opt_rows}/{args.max_rows}")
    try:
        args.validate_rows = tuple(int(v) for v in args.validate_rows.split(","))
    except ValueError:
        p.error("--validate-rows takes comma-separated integers, e.g. 1,3,8")
    return args


def tensorrt_step_status(args) -> tuple[bool, str]:
    from engines.trt_build import tensorrt_status, torch_tensorrt_status

    if args.skip_tensorrt:
        return False, "--skip-tensorrt given"
    return torch_tensorrt_status() if args.engine_route == "torch-tensorrt" else tensorrt_status()


def up_to_date(args, bundle, profile: dict, trt_ok: bool) -> int | None:
    """The exit code to return when the existing artifacts still fit, else None."""
    from engines.base import EngineError
    from engines.manifest import bundle_mismatches, gpu_mismatches, read_manifest

    try:
        manifest = read_manifest(args.output_dir)
    except EngineError as err:
        print(f"--if-stale: rebuilding ({err})")
        return None
    reasons = bundle_mismatches(manifest, bundle.spec)
    built = {k: manifest.get("batch_profile", {}).get(k) for k in ("min", "opt", "max")}
    if built != profile:
        reasons.append(f"batch profile {built} -> {profile}")
    missing = [f for f in manifest.get("files", {}) if not (args.output_dir / f).is_file()]
    if missing:
        reasons.append(f"files missing: {missing}")
    if trt_ok:
        if not manifest.get("tensorrt"):
            reasons.append("TensorRT is available now but the artifacts hold no plans")
        else:
            reasons += gpu_mismatches(manifest)
            built_decode = manifest["tensorrt"].get("vae_precision", "fp16")
            if built_decode != args.decode_precision:
                reasons.append(f"decoder precision {built_decode} -> {args.decode_precision}")
    if reasons:
        print("--if-stale: rebuilding: " + "; ".join(reasons))
        return None
    has_plans = bool(manifest.get("tensorrt"))
    print(f"--if-stale: {args.output_dir} is up to date for {bundle.spec.root} "
          f"({'ONNX + TensorRT' if has_plans else 'ONNX only'}); nothing to do")
    return EXIT_OK if has_plans else EXIT_ONNX_ONLY


def build_tensorrt(args, bundle, profile: dict, progress: Progress) -> dict:
    import tensorrt

    from engines.lowp_dit import lowp_dit
    from engines.manifest import DIT_ONNX, DIT_PLAN, TIMING_CACHE, VAE_ONNX, VAE_PLAN, gpu_identity
    from engines.onnx_export import DecoderForExport, dit_example_inputs, vae_example_inputs
    from engines.trt_build import build_plan_from_onnx, build_plan_with_torch_tensorrt

    out, cache = args.output_dir, args.output_dir / TIMING_CACHE
    plans = {}
    if args.engine_route == "onnx":
        for name, onnx_file, plan, precision in (("dit", DIT_ONNX, DIT_PLAN, "fp16"),
                                                 ("vae_decoder", VAE_ONNX, VAE_PLAN, args.decode_precision)):
            progress(f"building the {precision} TensorRT plan for {name} from {onnx_file}")
            plans[name] = build_plan_from_onnx(out / onnx_file, out / plan, profile, cache, log=progress.note,
                                               precision=precision)
    else:
        hw = bundle.spec.latent_shape[1]
        jobs = (("dit", lowp_dit(bundle.dit.cpu(), torch.float16), dit_example_inputs(bundle.dit, 2),
                 ["x", "t", "y"], DIT_PLAN, "fp16"),
                ("vae_decoder", DecoderForExport(bundle.vae), vae_example_inputs(bundle.vae, hw, 2), ["z"], VAE_PLAN,
                 "fp32"))
        for name, module, example, names, plan, precision in jobs:
            progress(f"building the {precision} TensorRT plan for {name} with Torch-TensorRT")
            plans[name] = build_plan_with_torch_tensorrt(module, example, names, out / plan, profile, cache,
                                                         log=progress.note, precision=precision)
    return {"version": tensorrt.__version__, "precision": "fp16", "vae_precision": plans["vae_decoder"]["precision"],
            "route": args.engine_route, "gpu": gpu_identity(), "plans": plans, "timing_cache": TIMING_CACHE}


# Plan-vs-PyTorch fp32 tolerances, relative to the output's largest magnitude.
PLAN_REL_TOL = {"fp16": 2e-2, "bf16": 5e-2, "fp32": 1e-2}  # fp32 plans may use TF32


def compare_plan(name: str, got: torch.Tensor, ref: torch.Tensor, precision: str) -> float:
    """Relative error of a plan's output against PyTorch; EngineError when non-finite or too far."""
    from engines.base import EngineError

    bad = int((~torch.isfinite(got)).sum())
    if bad:
        raise EngineError(f"the {name} plan produced {bad} non-finite values ({precision}); "
                          "an image decoded from them would come out black")
    rel = float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    Progress.note(f"TensorRT {name} ({precision}) vs PyTorch fp32: rel err {rel:.2e}")
    if not rel < PLAN_REL_TOL[precision]:
        raise EngineError(f"the TensorRT {name} plan disagrees with PyTorch: relative error {rel:.2e} > "
                          f"{PLAN_REL_TOL[precision]:g}")
    return rel


def smoke_test_tensorrt(args, bundle) -> dict:
    """Load the fresh plans through the backend and compare the DiT and the decoder with PyTorch."""
    from engines.onnx_export import dit_example_inputs, vae_example_inputs
    from engines.trt_backend import TrtEngine

    engine = TrtEngine(bundle, args.output_dir, "cuda", args.max_rows)
    try:
        rows = max(args.min_rows, min(args.max_rows, 4))
        x, t, y = (v.cuda() for v in dit_example_inputs(bundle.dit, rows))
        (z,) = (v.cuda() for v in vae_example_inputs(bundle.vae, bundle.spec.latent_shape[1], min(rows, 2)))
        with torch.no_grad():
            ref_v = bundle.dit.cuda()(x, t, y).float()
            ref_img = bundle.vae.cuda().decode(z).float()
            got_v = engine.velocity(x, t, y)
            got_img = engine.vae.run(z)
        return {"dit_rel_err": compare_plan("DiT", got_v, ref_v, "fp16"),
                "vae_rel_err": compare_plan("decoder", got_img, ref_img, engine.info.decode_precision)}
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from engines.artifacts import DEFAULT_REL_TOL, export_and_validate, write_onnx_manifest
    from engines.base import EngineError
    from engines.manifest import MANIFEST_NAME
    from model.bundle import load_bundle
    from model.checkpoints import CheckpointError

    t_start = time.perf_counter()
    profile = {"min": args.min_rows, "opt": args.opt_rows, "max": args.max_rows}
    trt_ok, trt_reason = tensorrt_step_status(args)
    try:
        bundle = load_bundle(args.model_dir)
    except (CheckpointError, FileNotFoundError, OSError) as err:
        print(f"error: cannot load the model bundle {args.model_dir}: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.if_stale:
        code = up_to_date(args, bundle, profile, trt_ok)
        if code is not None:
            return code
    # The steps docs/engines.md lists: 2 graphs x (export, validate), [2 plans, check], manifest.
    steps = ONNX_STEPS + (TRT_STEPS if trt_ok else 0) + 1
    progress = Progress(steps)
    print(f"building engines for {bundle.spec.name} ({args.model_dir}) into {args.output_dir}; "
          f"rows {profile['min']}/{profile['opt']}/{profile['max']}", flush=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    # No manifest while the directory is half rebuilt: backends refuse it instead of mixing versions.
    (args.output_dir / MANIFEST_NAME).unlink(missing_ok=True)
    rel_tol = args.rel_tol if args.rel_tol is not None else DEFAULT_REL_TOL
    try:
        report = export_and_validate(bundle, args.output_dir, args.exporter, args.opset, args.validate_rows,
                                     rel_tol, progress=progress, note=Progress.note)
    except Exception as err:  # an exporter failure is a build failure, reported plainly
        print(f"error: ONNX export failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    if not report.ok:
        print(f"error: ONNX Runtime disagrees with PyTorch beyond relative tolerance {rel_tol:g}", file=sys.stderr)
        return EXIT_FAILED
    tensorrt, skipped = None, None
    if trt_ok:
        try:
            tensorrt = build_tensorrt(args, bundle, profile, progress)
            write_onnx_manifest(bundle, args.output_dir, report, profile, tensorrt=tensorrt,
                                build_seconds=round(time.perf_counter() - t_start, 1))
            progress("checking both TensorRT plans against PyTorch")
            tensorrt["check"] = smoke_test_tensorrt(args, bundle)
        except Exception as err:  # noqa: BLE001 - any failure of the TensorRT step (a converter's
            # UnboundLocalError included) is a build failure with its reason, never a traceback
            (args.output_dir / MANIFEST_NAME).unlink(missing_ok=True)
            kind = "" if isinstance(err, EngineError) else f"{type(err).__name__}: "
            print(f"error: TensorRT build failed: {kind}{err}", file=sys.stderr)
            return EXIT_FAILED
    else:
        skipped = trt_reason
    progress("writing manifest.json")
    write_onnx_manifest(bundle, args.output_dir, report, profile, tensorrt=tensorrt, tensorrt_skipped=skipped,
                        build_seconds=round(time.perf_counter() - t_start, 1))
    if skipped:
        print(f"TensorRT step skipped: {skipped}. ONNX artifacts are in {args.output_dir} "
              f"(exit code {EXIT_ONNX_ONLY}: ONNX only).", flush=True)
        return EXIT_ONNX_ONLY
    print(f"done: ONNX + FP16 TensorRT plans in {args.output_dir}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
