"""The GPU kit's LightningDiT-XL/1 steps (random weights): `xl` (eager, with and without CUDA graphs)
and `xl_compiled` (regional compilation), each configuration measured and saved before the next.

Per configuration: error against eager fp32 at 16 and 64 rows, ms per forward, TFLOP/s, MFU against
the datasheet peak and the fraction of the matmul peak measured in the same step; with CUDA graphs the
cost of every bucket (the curve a timing profile needs); where asked, the 800ep recipe for 32 images
through the serving scheduler and runner (images/s) and a kernel profile. `xl` also measures the
low-precision recipes' errors (engines/lowp_dit.py): bf16 and fp16, with a float32 or a low-precision
residual stream.

The dry run (`--dry-run`) does the same on the CPU with a tiny model: bf16 instead of fp16 (fp16 is
CUDA-only in the torch backend), no CUDA graphs.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.gpu_util import (
    TINY_DIT,
    TINY_VAE,
    bf16_peak_tflops,
    datasheet_peak,
    device_for,
    device_name,
    log,
    rel_err,
    sync,
    time_ms,
    utilisation,
)
from engines.flops import analytic_flops, counted_flops
from engines.lowp_dit import lowp_dit
from engines.random_bundle import perturb_
from engines.torch_backend import DTYPES, TorchEngine
from model.bundle import BundleSpec, ModelBundle
from model.latents import LatentStats
from model.lightningdit import LightningDiT, lightningdit_config
from model.sampling import PRESETS
from model.vavae import VAVAE, VAVAE_CONFIGS


@dataclass(frozen=True)
class Config:
    precision: str
    graphs: bool = False
    compiled: bool = False
    recipe: bool = False  # time the 800ep recipe (about 21 s on the H200: only where it decides something)
    ref_only: bool = False  # fp32 outputs for the error columns, no timing

    @property
    def label(self) -> str:
        return self.precision + "".join(f" {k}" for k in ("graphs", "compiled") if getattr(self, k))


def parse_configs(text: str) -> list[Config]:
    """"fp32,bf16+graphs,fp16+graphs+recipe" -> [Config, ...] (flags: graphs, compiled, recipe, ref)."""
    out = []
    for item in text.split(","):
        precision, *flags = item.strip().split("+")
        unknown = set(flags) - {"graphs", "compiled", "recipe", "ref"}
        if precision not in DTYPES or unknown:
            raise SystemExit(f"bad configuration {item!r}: PRECISION[+graphs][+compiled][+recipe][+ref]")
        out.append(Config(precision, "graphs" in flags, "compiled" in flags, "recipe" in flags, "ref" in flags))
    return out


def xl_bundle(dry: bool) -> ModelBundle:
    """LightningDiT-XL/1 + the f16d32 VA-VAE decoder with random (perturbed) weights, built on the host."""
    cfg = TINY_DIT if dry else lightningdit_config("LightningDiT-XL/1")
    ddconfig = TINY_VAE if dry else VAVAE_CONFIGS["f16d32"]["ddconfig"]
    return random_model_bundle(cfg, ddconfig, "xl-random" if not dry else "tiny-random")


def random_model_bundle(cfg: dict, ddconfig: dict, name: str) -> ModelBundle:
    """A DiT of config `cfg` and a VA-VAE of `ddconfig`, random (perturbed) weights, in memory only."""
    torch.manual_seed(0)
    dit = LightningDiT(**cfg).eval()
    perturb_(dit, 1, big=0.05, small=0.02)
    vae = VAVAE(ddconfig["z_channels"], ddconfig).eval()
    perturb_(vae, 2, big=0.01, small=0.01)
    c = cfg["in_channels"]
    spec = BundleSpec(root=Path(tempfile.gettempdir()), name=name,
                      dit_config=cfg, dit_checkpoint=Path("-"), vae_embed_dim=ddconfig["z_channels"],
                      vae_ddconfig=ddconfig, vae_checkpoint=Path("-"), latent_stats=Path("-"), latent_multiplier=1.0,
                      class_names=[str(i) for i in range(cfg["num_classes"])], presets=dict(PRESETS),
                      default_preset="800ep")
    return ModelBundle(spec, dit, vae, LatentStats(torch.zeros(c), torch.ones(c)))


def recipe_images_per_s(engine, bundle: ModelBundle, images: int, max_rows: int, preset_name: str) -> dict:
    """The full recipe through the serving Scheduler + Runner (step-level batching, decode included)."""
    from service.store.jobs import Job
    from service.worker.runner import Runner
    from service.worker.scheduler import Scheduler

    runner = Runner(engine, bundle.stats, bundle.null_class)
    sched = Scheduler(max_rows, bundle.spec.latent_shape, "step", device=engine.device)
    preset = bundle.spec.presets[preset_name]
    waiting = deque(Job(class_id=i % bundle.spec.num_classes, seed=i, preset=preset, key=str(i),
                        deadline=time.time() + 1e6) for i in range(images))
    done, forwards, rows = 0, 0, 0
    t0 = time.perf_counter()
    while waiting or sched.active:
        sched.admit_waiting(waiting)
        plan = sched.schedule()
        x_next, secs = runner.step(plan)
        forwards += 1
        rows += plan.rows
        finished = sched.commit(plan, x_next, secs)
        if finished:
            imgs, _ = runner.decode([s.x for s in finished])
            done += len(imgs)
    seconds = time.perf_counter() - t0
    return {"images": done, "seconds": round(seconds, 3), "images_per_s": round(done / seconds, 3),
            "forwards": forwards, "mean_rows": round(rows / forwards, 1), "preset": preset_name}


def kernel_category(name: str) -> str:
    """matmul | attention | elementwise/other, from a CUDA kernel's name (cuBLAS, cuDNN, flash, Triton)."""
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "_mm_", "matmul", "wgmma")):
        return "matmul"
    return "elementwise/other"


def top_kernels(engine, inputs, count: int = 15) -> tuple[list[dict], dict]:
    """The device kernels that take the time of three forwards (torch.profiler), largest first, and the
    share of device time by kernel_category."""
    from torch.profiler import ProfilerActivity, profile

    x, t, y = inputs
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.velocity(x, t, y)
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in rows) or 1.0
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    shares = {"matmul": 0.0, "attention": 0.0, "elementwise/other": 0.0}
    for e in rows:
        shares[kernel_category(e.key)] += e.self_device_time_total / total
    top = [{"kernel": e.key[:120], "calls": e.count, "ms_per_forward": round(e.self_device_time_total / 3000, 3),
            "share": round(e.self_device_time_total / total, 3)} for e in rows[:count]]
    return top, {k: round(v, 3) for k, v in shares.items()}


class XlRun:
    """One step's shared state: the model, its inputs, the fp32 reference, the peaks."""

    def __init__(self, a, saver, out: dict):
        self.a, self.saver, self.out = a, saver, out
        self.dev = device_for(a.dry_run)
        t0 = time.perf_counter()
        self.bundle = xl_bundle(a.dry_run)
        cfg = self.bundle.spec.dit_config
        self.flops_row = counted_flops(cfg)  # meta device: attention included (engines/flops.py)
        self.peak = bf16_peak_tflops(self.dev, a.dry_run)
        self.datasheet = datasheet_peak(device_name(self.dev))
        self.max_rows = 8 if a.dry_run else 64
        self.sizes = (2, 8) if a.dry_run else (16, 64)
        g = torch.Generator().manual_seed(7)
        shape = self.bundle.spec.latent_shape
        self.inputs = {rows: (torch.randn(rows, *shape, generator=g).to(self.dev), torch.rand(rows, generator=g).to(self.dev),
                              torch.randint(0, self.bundle.spec.num_classes, (rows,), generator=g).to(self.dev))
                       for rows in self.sizes}
        self.ref: dict[int, torch.Tensor] | None = None
        self.profiled = self.swept = False
        out.update(model=self.bundle.spec.name, params=sum(p.numel() for p in self.bundle.dit.parameters()),
                   gflop_per_row=round(self.flops_row / 1e9, 2),
                   gflop_per_row_analytic=round(analytic_flops(cfg)["total"] / 1e9, 2),
                   bf16_peak_measured_tflops=round(self.peak, 1), bf16_peak_datasheet_tflops=self.datasheet,
                   build_s=round(time.perf_counter() - t0, 1), configs=[])
        saver.save(out)

    def run(self, configs: list[Config]) -> None:
        for c in configs:
            res: dict = {"config": c.label}
            self.out["configs"].append(res)  # filled and saved phase by phase: a cap keeps what was measured
            if c.graphs and self.dev.type != "cuda":
                res["skipped"] = "CUDA graphs need a GPU (dry run)"
            else:
                try:
                    self.config(c, res)
                except Exception as err:  # noqa: BLE001 - one failing configuration must not hide the others
                    traceback.print_exc()
                    res["error"] = f"{type(err).__name__}: {err}"
            self.saver.save(self.out)

    def config(self, c: Config, res: dict) -> None:
        """Most decisive first: ms, MFU and error; the 800ep recipe; the kernel profile; every bucket's cost."""
        dev, a = self.dev, self.a
        t_load = time.perf_counter()
        engine = TorchEngine(self.bundle, str(dev), c.precision, self.max_rows, compile=c.compiled,
                             cuda_graphs=c.graphs)
        try:
            if c.compiled:
                # The first call compiles the block graph (inductor: Triton on CUDA, C++ on the CPU), at the
                # largest row count as in warm-up; with graphs it is the capture of the largest bucket.
                t_first = time.perf_counter()
                with torch.inference_mode():
                    engine.velocity(*(v[:1].expand(self.max_rows, *v.shape[1:]).contiguous()
                                      for v in self.inputs[self.sizes[0]]))
                sync(dev)
                res["compile_s"] = round(time.perf_counter() - t_first, 1)
                log(f"xl {c.label}: compiled in {res['compile_s']} s (first call, {self.max_rows} rows)")
                self.saver.save(self.out)
            engine.warmup()
            sync(dev)
            res["setup_s"] = round(time.perf_counter() - t_load, 1)
            if dev.type == "cuda":
                res["gpu_mem_gib"] = round(torch.cuda.memory_allocated(dev) / 2**30, 2)
            self.forwards(engine, c, res)
            self.saver.save(self.out)
            if c.ref_only:
                return
            if c.recipe:
                preset = "800ep"
                if a.dry_run:
                    self.bundle.spec.presets["800ep-dry"] = PRESETS["800ep"].replace(num_steps=6)
                    preset = "800ep-dry"
                res["recipe"] = recipe_images_per_s(engine, self.bundle, 4 if a.dry_run else 32, self.max_rows, preset)
                self.saver.save(self.out)
            if dev.type == "cuda" and c.precision != "fp32" and not self.profiled:
                res["top_kernels"], res["kernel_shares"] = top_kernels(engine, self.inputs[self.sizes[0]])
                self.profiled = True
                self.saver.save(self.out)
            if c.graphs and not self.swept:  # one cost curve per step is enough (fp16 and bf16 run alike)
                res["sweep_ms"] = self.sweep(engine)
                self.swept = True
            log(f"xl {c.label}: {res}")
        finally:
            if c.precision == "fp32":
                engine.dit.to("cpu")  # the fp32 engine moved the bundle's own module; later configs convert on the host
            engine.close()

    def forwards(self, engine, c: Config, res: dict) -> None:
        """Outputs (and, unless ref_only, timings) at each size; the first eager fp32 run is the reference."""
        is_ref = self.ref is None and c.precision == "fp32" and not c.compiled
        outputs = {}
        for rows in self.sizes:
            x, t, y = self.inputs[rows]
            with torch.inference_mode():
                out = engine.velocity(x, t, y).float()
                entry = {"finite": bool(torch.isfinite(out).all())}
                if not c.ref_only:
                    ms = time_ms(lambda x=x, t=t, y=y: engine.velocity(x, t, y), self.dev,
                                 iters=2 if self.a.dry_run else 10)
                    tflops = self.flops_row * rows / (ms / 1000) / 1e12
                    entry.update(ms=round(ms, 3), tflops=round(tflops, 1),
                                 **utilisation(tflops, self.datasheet, self.peak))
            if is_ref:
                outputs[rows] = out
            elif self.ref is not None:
                entry["rel_err_vs_fp32"] = rel_err(out, self.ref[rows])
            res[f"rows{rows}"] = entry
        if is_ref:
            self.ref = outputs

    def sweep(self, engine) -> dict:
        """ms per forward at every bucket: the cost curve dit_ms(rows) a timing profile holds."""
        out = {}
        x0, t0, y0 = self.inputs[self.sizes[0]]
        for rows in engine.graphs.buckets:
            x, t, y = (v[:1].expand(rows, *v.shape[1:]).contiguous() for v in (x0, t0, y0))
            with torch.inference_mode():
                out[rows] = round(time_ms(lambda x=x, t=t, y=y: engine.velocity(x, t, y), self.dev,
                                          iters=3 if self.a.dry_run else 10), 3)
        return out

    def recipes(self) -> None:
        """Error against fp32 of each low-precision recipe at the largest size: the residual stream in float32
        (the engines' recipe: the eager configurations' own errors) and in the low precision (the old recipe,
        measured here on an eager copy). Decides the default precision (issue 24)."""
        if self.ref is None:
            return
        rows = self.sizes[-1]
        x, t, y = self.inputs[rows]
        errors: dict = {"rows": rows}
        for res in self.out["configs"]:
            precision = res["config"].split()[0]
            if precision != "fp32" and "compiled" not in res["config"] and f"rows{rows}" in res:
                errors.setdefault(f"{precision} fp32 residual", {"rel_err_vs_fp32": res[f"rows{rows}"].get(
                    "rel_err_vs_fp32"), "from": res["config"]})
        for precision in ("fp16", "bf16") if self.dev.type == "cuda" else ("bf16",):
            model = lowp_dit(self.bundle.dit, DTYPES[precision], residual="low").to(self.dev)
            with torch.inference_mode():
                out = model(x, t, y).float()
            errors[f"{precision} low residual"] = {"rel_err_vs_fp32": rel_err(out, self.ref[rows]),
                                                   "finite": bool(torch.isfinite(out).all())}
            del model
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
            self.out["recipes"] = errors
            self.saver.save(self.out)
        log(f"xl recipes: {errors}")


def step_xl(a, saver) -> dict:
    out: dict = {}
    if a.configs:
        configs = parse_configs(a.configs)
    elif a.dry_run:
        configs = parse_configs("fp32,bf16+recipe,bf16+graphs")
    else:
        # fp16 + graphs first (the candidate default: recipe, kernel profile, every bucket's cost), then bf16.
        # Eager without graphs is left out: graphs changed XL/1 by 3% on the H200 (docs/benchmarks.md).
        configs = parse_configs("fp32,fp16+graphs+recipe,bf16+graphs")
    run = XlRun(a, saver, out)
    run.run(configs)
    run.recipes()
    return out


def step_xl_compiled(a, saver) -> dict:
    """Regional compilation (engines.torch_backend.RegionalCompiledDiT) with CUDA graphs per bucket on top (the
    candidate default, compiled on its first call), then without graphs (the same compiled graph, reused),
    against eager fp32. One precision: a second one would compile again. The dry run compiles bf16 on the CPU."""
    out: dict = {}
    half = "bf16" if a.dry_run else "fp16"
    configs = parse_configs(a.configs or ("fp32+ref,bf16+compiled+recipe" if a.dry_run else
                                          f"fp32+ref,{half}+graphs+compiled+recipe,{half}+compiled"))
    XlRun(a, saver, out).run(configs)
    return out
