"""PyTorch backend: eager (optionally compiled) modules on CPU or CUDA.

Precision:
* fp32: the bundle's modules as they are.
* bf16 / fp16: the DiT's weights converted once (`engines.lowp_dit`, float32
  islands for the norms, RoPE and timestep features), on the host before the
  copy to the device, so the fp32 original never occupies device memory. fp16
  only on CUDA. `bf16_mode="autocast"` restores plain autocast for the DiT (for
  comparisons).
* The VAE decoder has its own precision, fp32 unless asked otherwise
  (engines.device.decode_precision); bf16/fp16 decode runs under autocast, which
  keeps GroupNorm and softmax in float32.

On CUDA, `cuda_graphs=True` captures one graph per batch bucket (`batch_buckets`:
1, 2, 4, 8, then every multiple of 8 up to max_rows): a call with R rows is padded
to the next bucket, replayed, and the first R rows returned, so the launch overhead
of the many small kernels of a small DiT is paid once per bucket instead of per
call. Every bucket is captured by `warmup()`, before the worker reports ready,
largest first, into one memory pool that all buckets share: the largest capture
sizes the pool and the smaller ones reuse its freed blocks, so more buckets cost
their static inputs and outputs only (a few MiB), not another copy of the
activations. Capture runs on a
side stream (non-blocking, so the legacy default stream that the serving loop
uses never synchronises with it) in the thread-local capture mode, so a model
captured by the hot-swap loader thread does not trip over the serving thread's
kernel launches and allocations.

`compile=True` is regional compilation (`RegionalCompiledDiT`): the embedders and
the final layer stay eager, and every transformer block runs through one
inductor graph. All blocks share the block class's code and differ only in
their parameters, which inductor takes as graph inputs, so the graph is built
once for the whole stack (a whole-model compile traces and optimises all
blocks and took longer than the GPU kit's step cap for XL/1). The row count is
an unbacked size, so the same graph serves every bucket, 1 included. It is
bounded by max_rows (`torch._check` in the traced code): without an upper bound
inductor must index every kernel in 64 bits and newer torch refuses cuDNN
attention for the unbounded batch. The first compiled call is at max_rows
(warm-up runs the largest row count first), so what is tuned on that call is
tuned for the size that carries the load. CUDA graphs, when on, are captured per
bucket on top of the compiled blocks.

`close()` drops the graphs, their pool and the modules: a hot swap frees the old
model's device memory when it closes the old engine, without waiting for the
garbage collector (nothing here references the engine back).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch._dynamo.decorators import mark_unbacked

from engines.base import Engine, EngineError, EngineInfo
from engines.lowp_dit import lowp_dit
from model.bundle import ModelBundle
from model.latents import to_uint8

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


BUCKET_STEP = 8


def batch_buckets(max_rows: int, step: int = BUCKET_STEP) -> list[int]:
    """1, 2, 4, 8, then every multiple of `step` up to and including max_rows (which is always one).

    Why not powers of two all the way: above 8 rows a forward's time is linear in rows (XL/1 on the
    H200: 26.2, 50.8, 100.6 ms at 16, 32, 64), so 33 rows padded to 64 cost twice what they need.
    Multiples of 8 waste at most 7 rows (bench/buckets.py measures the choice). `step` 0: powers of
    two all the way (the old policy, kept for that comparison).
    """
    buckets, b = [], 1
    while b < max_rows and (b < step or not step):
        buckets.append(b)
        b *= 2
    if step:
        b = step
        while b < max_rows:
            buckets.append(b)
            b += step
    return [*buckets, max_rows]


def bucket_for(rows: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `rows` (the rows a padded forward computes)."""
    return next(b for b in buckets if b >= rows)


# Largest relative error (max |got - ref| / max |ref|) of a forward against eager fp32 on the same weights:
# fp32 from build_engine's ORT check (--rel-tol), fp16 from its TensorRT smoke test; bf16 keeps 8 bits of
# mantissa (2^-8 = 3.9e-3 per rounding) and its eager forward measured 2.2e-2 on XL/1 (28 blocks) on the H200.
PARITY_REL_TOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


def _block_runner(max_rows: int):
    def run_block(block, h, c, rope):
        # The bound becomes the unbacked size's value range (and a runtime assert): inductor can then
        # prove every index fits 32 bits, and attention backends that refuse an unbounded batch accept it.
        torch._check(h.size(0) <= max_rows)
        return block(h, c, rope)

    return run_block


# Newer torch lets mark_unbacked carry the bound and the size hint inductor tunes for; older only the mark.
_MARK_OPTIONS = {"min", "max", "hint_override"} <= set(inspect.signature(mark_unbacked).parameters)


class RegionalCompiledDiT:
    """The DiT's forward with every transformer block through one compiled graph.

    The block is passed as an argument, so dynamo guards on its class and parameter shapes
    rather than on which block it is: block 0 compiles, blocks 1..depth-1 reuse the graph.
    Every instance's runner shares one code object, so dynamo's cache (kept per code object)
    serves a new engine of the same architecture and max_rows too.
    """

    def __init__(self, dit, max_rows: int, backend: str | object = "inductor"):
        self.dit = dit
        self.max_rows = max_rows
        self.block = torch.compile(_block_runner(max_rows), fullgraph=True, dynamic=False, backend=backend)

    def _mark_rows(self, t: torch.Tensor) -> None:
        # An unbacked row count makes no assumption about its value: a backed (mark_dynamic) size
        # would specialise 1 and compile bucket 1 separately.
        if _MARK_OPTIONS:
            mark_unbacked(t, 0, min=1, max=self.max_rows, hint_override=self.max_rows)
        else:
            mark_unbacked(t, 0)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, c = self.dit.embed(x, t, y)
        self._mark_rows(h)
        self._mark_rows(c)
        for block in self.dit.blocks:
            h = self.block(block, h, c, self.dit.feat_rope)
        return self.dit.head(h, c)


class DitForward:
    """x, t, y -> float32 velocity through the (compiled or eager) DiT, under autocast to
    `autocast_dtype` when given. Its own object, not a bound method of the engine, so the
    CUDA-graph runner that holds it does not hold the engine."""

    def __init__(self, model, device_type: str, autocast_dtype: torch.dtype | None = None):
        self.model, self.device_type, self.autocast_dtype = model, device_type, autocast_dtype

    def __call__(self, x, t, y):
        ctx = (contextlib.nullcontext() if self.autocast_dtype is None
               else torch.autocast(self.device_type, dtype=self.autocast_dtype))
        with ctx:
            return self.model(x, t, y).float()


_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture's warm-up. cuBLAS keeps a workspace (up to 32 MiB on
    Hopper) per (handle, stream) for the life of the process: a fresh stream per capture would add one per
    bucket and per hot swap, memory that no engine's close() can return."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


class CudaGraphRunner:
    """Replays a captured CUDA graph of `fn(x, t, y)` per batch bucket, padding rows to the bucket."""

    def __init__(self, fn, sample_shape: tuple[int, ...], device: torch.device, max_rows: int, null_class: int):
        self.fn, self.shape, self.device = fn, sample_shape, device
        self.buckets = batch_buckets(max_rows)
        self.null_class = null_class
        self.graphs: dict[int, tuple] = {}
        self.pool = None  # one memory pool shared by all buckets' graphs

    def _capture(self, rows: int):
        x = torch.zeros((rows, *self.shape), device=self.device)
        t = torch.zeros(rows, device=self.device)
        y = torch.full((rows,), self.null_class, dtype=torch.long, device=self.device)
        with torch.cuda.device(self.device):
            side = _warmup_stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up outside the graph (lazy inits, autotuning)
                for _ in range(3):
                    self.fn(x, t, y)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self.fn(x, t, y)
        self.pool = graph.pool()
        self.graphs[rows] = (graph, x, t, y, out)

    def capture_all(self) -> None:
        # Largest first: it sizes the shared pool, the smaller captures reuse its freed blocks; and a
        # compiled model's first call (its tuning) is at the size that carries the load.
        for rows in sorted(self.buckets, reverse=True):
            if rows not in self.graphs:
                self._capture(rows)

    def close(self) -> None:
        """Drop every graph, its static tensors and the pool handle (the pool is freed with the last graph)."""
        self.graphs.clear()
        self.pool = None
        self.fn = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        bucket = bucket_for(rows, self.buckets)
        if bucket not in self.graphs:  # only when warmup() was skipped
            self._capture(bucket)
        graph, sx, st, sy, out = self.graphs[bucket]
        sx[:rows].copy_(x)
        st[:rows].copy_(t)
        sy[:rows].copy_(y)
        # Padding rows keep whatever they held: rows are independent, their outputs are dropped.
        graph.replay()
        return out[:rows].clone()


class TorchEngine(Engine):
    def __init__(self, bundle: ModelBundle, device: str = "cpu", precision: str = "fp32", max_rows: int = 64,
                 compile: bool = False, cuda_graphs: bool = False, bf16_mode: str = "weights",
                 decode_precision: str = "fp32"):
        self.dev = torch.device(device)
        if self.dev.type == "cuda" and self.dev.index is None:
            self.dev = torch.device("cuda", torch.cuda.current_device())
        for name, p in (("precision", precision), ("decode precision", decode_precision)):
            if p not in DTYPES:
                raise EngineError(f"unknown {name} {p!r} (fp32 | bf16 | fp16)")
        self.dtype = DTYPES[precision]
        self.decode_dtype = DTYPES[decode_precision]
        if self.dev.type == "cpu" and torch.float16 in (self.dtype, self.decode_dtype):
            raise EngineError("fp16 is not usable on CPU here; use bf16 or fp32")
        if self.dev.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("device cuda requested but torch sees no CUDA device")
        if cuda_graphs and self.dev.type != "cuda":
            raise EngineError("cuda_graphs needs device=cuda")
        self.max_rows = max_rows
        self.latent_shape = tuple(bundle.spec.latent_shape)
        self.null_class = bundle.null_class
        self.autocast_dit = self.dtype != torch.float32 and bf16_mode == "autocast"
        dit = bundle.dit.eval()
        if self.dtype != torch.float32 and not self.autocast_dit:
            dit = lowp_dit(dit, self.dtype)  # converted where the weights are (the host), then moved
        self.dit = dit.to(self.dev)
        self.vae = bundle.vae.to(self.dev).eval()
        compiled = RegionalCompiledDiT(self.dit, max_rows) if compile else self.dit
        self._dit_forward = DitForward(compiled, self.dev.type, self.dtype if self.autocast_dit else None)
        self.graphs = self._make_graphs() if cuda_graphs else None
        self._forward = self.graphs if self.graphs is not None else self._dit_forward
        mode = ("compiled blocks" if compile else "eager") + (", cuda graphs" if cuda_graphs else "")
        if self.dtype != torch.float32:
            mode += ", autocast" if self.autocast_dit else ", converted weights"
        self.compiled = compile
        self.info = EngineInfo("torch", str(self.dev), precision, max_rows, f"torch {torch.__version__}, {mode}",
                               decode_precision=decode_precision)

    def _autocast(self, dtype: torch.dtype):
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.dev.type, dtype=dtype)

    def _make_graphs(self) -> CudaGraphRunner:
        return CudaGraphRunner(self._dit_forward, self.latent_shape, self.dev, self.max_rows, self.null_class)

    def warmup_rows(self) -> list[int]:
        # Graphs exist per bucket. Compiled blocks are one graph for all of them, but each row count's first
        # call still grows the allocator and (on CUDA) picks library kernels: warm every one, the largest
        # first (the first compiled call is the one inductor tunes on). Eager: one call.
        return sorted(batch_buckets(self.max_rows), reverse=True) if self.compiled else [1]

    def close(self) -> None:
        """Release the graphs, their pool and the modules now (a hot swap calls it on the old engine)."""
        if self.dev.type == "cuda" and self._forward is not None:
            torch.cuda.synchronize(self.dev)  # no replay or decode of this engine may still be running
        if self.graphs is not None:
            self.graphs.close()
        self.graphs = self._forward = self._dit_forward = None
        self.dit = self.vae = None
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back, so the memory shows as free at once

    @torch.inference_mode()
    def warmup(self) -> None:
        if self.graphs is not None:
            self.graphs.capture_all()
        super().warmup()

    def computed_rows(self, rows: int) -> int:
        if self.graphs is None:
            return rows
        return sum(bucket_for(n, self.graphs.buckets) for n in self.chunks(rows, self.max_rows))

    @torch.inference_mode()
    def velocity(self, x, t, y):
        if self._forward is None:
            raise EngineError("this engine was closed")
        x, t, y = x.to(self.dev, torch.float32), t.to(self.dev, torch.float32), y.to(self.dev, torch.long)
        if x.shape[0] <= self.max_rows:
            return self._forward(x, t, y)
        m = self.max_rows
        return torch.cat([self._forward(x[i:i + m], t[i:i + m], y[i:i + m]) for i in range(0, x.shape[0], m)])

    def _decode_on_device(self, z) -> torch.Tensor:
        z = z.to(self.dev, torch.float32)
        out = []
        for i in range(0, z.shape[0], self.max_rows):
            with self._autocast(self.decode_dtype):
                img = self.vae.decode(z[i:i + self.max_rows])
            out.append(to_uint8(img.float()))  # on the device: a quarter of float32's bytes cross to the host
        return out[0] if len(out) == 1 else torch.cat(out)

    @torch.inference_mode()
    def decode(self, z):
        return self._decode_on_device(z).cpu()

    @torch.inference_mode()
    def decode_async(self, z):
        if self.dev.type != "cuda":  # the CPU's work is done when decode returns
            return super().decode_async(z)
        images = self.to_host_async(self._decode_on_device(z))
        return images, self.mark()
