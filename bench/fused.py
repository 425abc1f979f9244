#!/usr/bin/env python
"""Fused (regionally compiled) against eager DiT forward on the CPU, side by side in one run.

    python bench/fused.py                         # B/1 at 256 tokens, 16 and 64 rows (6-10 min on 2 shared cores)
    python bench/fused.py --rows 4 --iters 1      # a quick look
    python bench/fused.py --json bench/out/fused.json

LightningDiT-B/1 at 16x16x32 latents (256 tokens), random (perturbed) weights, through
the torch backend (engines.torch_backend.TorchEngine) with compile off and on: the
compiled one runs every block through one inductor graph (C++ backend here). Printed:

* the CPU and what it offers for bf16 (torch's CPU capability; avx512_bf16 / AMX flags;
  measured fp32 and bf16 GEMM GFLOP/s), so the bf16 numbers can be read for what they are;
* compile time (the first compiled call: tracing, inductor, the C++ build);
* ms per forward at each row count, eager and compiled measured alternately (best of
  --iters), the speedup, GFLOP/s, and max relative error against eager fp32 on the same
  inputs (max |diff| / max |ref|);
* a kernel-level profile (torch.profiler, self CPU time) before (eager) and after
  (compiled): the share of time in matmuls, attention and everything else (elementwise,
  norms, copies; in the compiled forward the fused C++ kernels).

bf16 runs at --rows where the CPU has bf16 matmul hardware (AMX or AVX512-BF16); without
it eager bf16 matmuls run a slow fallback kernel, so bf16 is measured at --bf16-rows-fallback
rows only (default 16: eager bf16 runs about 40 s a forward there) and the output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # first: run as a script, bench/ leads sys.path and bench/engines.py shadows engines/

from bench.common import dit_flops_per_row  # noqa: E402
from bench.gpu_util import rel_err  # noqa: E402
from bench.gpu_xl import random_model_bundle  # noqa: E402
from engines.random_bundle import TINY_VAE_DDCONFIG  # noqa: E402
from engines.torch_backend import PARITY_REL_TOL, TorchEngine  # noqa: E402
from model.lightningdit import lightningdit_config  # noqa: E402

T0 = time.perf_counter()
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def log(msg: str) -> None:
    print(f"[fused {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def cpu_facts() -> dict:
    flags: set[str] = set()
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    present = {f: f in flags for f in (*BF16_FLAGS, "avx512f", "avx2")}
    return {"cpu": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "flags": present,
            "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "bf16_hardware": present["avx512_bf16"] or present["amx_bf16"]}


def gemm_gflops(dtype: torch.dtype, n: int) -> float:
    """n^3 GEMM in nn.Linear's layout (x @ w.T): torch's bf16 CPU fallback is far slower for plain a @ b."""
    x, w = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def inputs(bundle, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, *bundle.spec.latent_shape, generator=g), torch.rand(rows, generator=g),
            torch.randint(0, bundle.null_class + 1, (rows,), generator=g))


def category(op: str) -> str:
    name = op.lower()
    if "attention" in name or "sdpa" in name or "softmax" in name:
        return "attention"
    if any(k in name for k in ("mm", "linear", "matmul", "gemm", "conv")):
        return "matmul"
    return "elementwise/other"


def profile_shares(engine: TorchEngine, bundle, rows: int) -> dict:
    """Share of self CPU time by category over one forward (after a warm call)."""
    from torch.profiler import ProfilerActivity, profile

    x, t, y = inputs(bundle, rows, seed=99)
    engine.velocity(x, t, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.velocity(x, t, y)
    totals: dict[str, float] = {"matmul": 0.0, "attention": 0.0, "elementwise/other": 0.0}
    top = []
    for ev in prof.key_averages():
        us = ev.self_cpu_time_total
        if us <= 0:
            continue
        totals[category(ev.key)] += us
        top.append((us, ev.key))
    whole = sum(totals.values()) or 1.0
    top.sort(reverse=True)
    return {"rows": rows, "ms": round(whole / 1000, 1), **{k: round(v / whole, 3) for k, v in totals.items()},
            "top": [{"op": k[:80], "share": round(us / whole, 3)} for us, k in top[:6]]}


def compare(bundle, precision: str, rows_list: list[int], iters: list[int], refs: dict, flops_row: float,
            profile_rows: int | None) -> dict:
    """Eager and compiled engines of one precision, timed alternately at each row count."""
    eager = TorchEngine(bundle, "cpu", precision, max(rows_list))
    fused = TorchEngine(bundle, "cpu", precision, max(rows_list), compile=True)
    x1, t1, y1 = inputs(bundle, 1, seed=1)
    compile_s, _ = timed(fused.velocity, x1, t1, y1)
    log(f"{precision}: compile (first compiled call, 1 row) {compile_s:.1f} s")
    out: dict = {"precision": precision, "compile_s": round(compile_s, 1), "rows": {}}
    for rows, n in zip(rows_list, iters, strict=True):
        x, t, y = inputs(bundle, rows)
        passes: dict[str, list[float]] = {"eager": [], "compiled": []}
        got = {}
        for i in range(n):
            for label, engine in (("eager", eager), ("compiled", fused)):
                s, got[label] = timed(engine.velocity, x, t, y)
                passes[label].append(s)
                log(f"{precision} {rows} rows {label} pass {i + 1}/{n}: {s * 1000:.0f} ms")
        best = {k: min(v) for k, v in passes.items()}
        if precision == "fp32" and rows not in refs:
            refs[rows] = got["eager"]
        res = {"eager_ms": round(best["eager"] * 1000, 1), "compiled_ms": round(best["compiled"] * 1000, 1),
               "speedup": round(best["eager"] / best["compiled"], 2),
               "eager_gflops": round(flops_row * rows / best["eager"] / 1e9, 1),
               "compiled_gflops": round(flops_row * rows / best["compiled"] / 1e9, 1),
               "passes_ms": {k: [round(v * 1000) for v in vs] for k, vs in passes.items()}}
        if rows in refs:
            res["compiled_rel_err_vs_fp32"] = float(f"{rel_err(got['compiled'], refs[rows]):.2e}")
            res["eager_rel_err_vs_fp32"] = float(f"{rel_err(got['eager'], refs[rows]):.2e}")
            res["within_bound"] = res["compiled_rel_err_vs_fp32"] < PARITY_REL_TOL[precision]
        out["rows"][rows] = res
        log(f"{precision} {rows} rows: {json.dumps(res)}")
    if profile_rows:
        out["profile"] = {"eager": profile_shares(eager, bundle, profile_rows),
                          "compiled": profile_shares(fused, bundle, profile_rows)}
        log(f"{precision} profile at {profile_rows} rows: {json.dumps(out['profile'])}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="LightningDiT-B/1")
    ap.add_argument("--rows", default="16,64", help="row counts (fp32, and bf16 where the CPU has bf16 hardware)")
    ap.add_argument("--iters", default="2,1", help="timed passes per row count (best of), one per --rows entry")
    ap.add_argument("--bf16-rows-fallback", default="16", help="bf16 row counts on a CPU without bf16 hardware "
                    "('' skips bf16 there; avoid 1: eager bf16 takes a far slower GEMM path at one row there)")
    ap.add_argument("--bf16-iters", type=int, default=2, help="timed passes of bf16 on such a CPU")
    ap.add_argument("--profile-rows", type=int, default=16, help="rows of the profiled forward (0: no profile)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LDIT_BENCH_THREADS", "2")))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows_list = [int(r) for r in a.rows.split(",")]
    iters = [int(i) for i in a.iters.split(",")]
    iters = (iters + [iters[-1]] * len(rows_list))[: len(rows_list)]

    facts = cpu_facts()
    log(f"machine: {json.dumps(facts)}")
    facts["gemm_gflops"] = {"fp32_1024": round(gemm_gflops(torch.float32, 1024), 1),
                            "bf16_1024": round(gemm_gflops(torch.bfloat16, 1024), 1)}
    log(f"GEMM GFLOP/s measured now: {facts['gemm_gflops']}")
    if facts["bf16_hardware"]:
        bf16_rows, bf16_iters = rows_list, iters
        bf16_note = "bf16 matmul hardware present: bf16 measured at the same row counts"
    else:
        bf16_rows = [int(r) for r in a.bf16_rows_fallback.split(",") if r]
        bf16_iters = [a.bf16_iters] * len(bf16_rows)
        bf16_note = (f"no bf16 matmul hardware (capability {facts['capability']}, no avx512_bf16/AMX): eager bf16 "
                     f"matmuls run a fallback kernel at {facts['gemm_gflops']['bf16_1024']} GFLOP/s against "
                     f"{facts['gemm_gflops']['fp32_1024']} in fp32 (1024^3, nn.Linear layout), so bf16 is "
                     + (f"measured at {bf16_rows} rows only" if bf16_rows else "skipped")
                     + "; the issue's bf16 target (fused >= 1.6x eager bf16 on AMX) cannot be judged on this CPU")
    log(bf16_note)

    cfg = lightningdit_config(a.model)
    bundle = random_model_bundle(cfg, dict(TINY_VAE_DDCONFIG, z_channels=cfg["in_channels"]), a.model)
    c, h, w = bundle.spec.latent_shape
    flops_row = dit_flops_per_row(bundle)
    tokens = (h // cfg["patch_size"]) * (w // cfg["patch_size"])
    log(f"{a.model}: {sum(p.numel() for p in bundle.dit.parameters()) / 1e6:.1f} M parameters, {tokens} tokens, "
        f"{flops_row / 1e9:.1f} GFLOP per row")

    refs: dict = {}
    result = {"model": a.model, "tokens": tokens, "gflop_per_row": round(flops_row / 1e9, 2), "machine": facts,
              "bf16_note": bf16_note, "precisions": {}}
    result["precisions"]["fp32"] = compare(bundle, "fp32", rows_list, iters, refs, flops_row, a.profile_rows)
    if bf16_rows:
        for rows in bf16_rows:  # eager fp32 references for the bf16 errors
            if rows not in refs:
                refs[rows] = TorchEngine(bundle, "cpu", "fp32", rows).velocity(*inputs(bundle, rows))
        result["precisions"]["bf16"] = compare(bundle, "bf16", bf16_rows, bf16_iters, refs, flops_row,
                                               a.profile_rows if facts["bf16_hardware"] else None)
    result["seconds"] = round(time.perf_counter() - T0, 1)
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
