"""PyTorch backend: eager (optionally compiled) modules on CPU or CUDA."""

from __future__ import annotations

import contextlib

import torch

from engines.base import Engine, EngineInfo
from model.bundle import ModelBundle
from model.latents import to_uint8


class TorchEngine(Engine):
    def __init__(self, bundle: ModelBundle, device: str = "cpu", precision: str = "fp32", max_rows: int = 64,
                 compile: bool = False):
        self.dev = torch.device(device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        if self.dev.type == "cpu" and self.dtype == torch.float16:
            raise ValueError("fp16 is not usable on CPU here; use bf16 or fp32")
        self.dit = bundle.dit.to(self.dev).eval()
        self.vae = bundle.vae.to(self.dev).eval()
        self._forward = torch.compile(self.dit, dynamic=True) if compile else self.dit
        self.info = EngineInfo("torch", str(self.dev), precision, max_rows, "compiled" if compile else "eager")

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.dev.type, dtype=self.dtype)

    @torch.inference_mode()
    def velocity(self, x, t, y):
        with self._autocast():
            v = self._forward(x.to(self.dev), t.to(self.dev), y.to(self.dev))
        return v.float()

    @torch.inference_mode()
    def decode(self, z):
        with self._autocast():
            img = self.vae.decode(z.to(self.dev))
        return to_uint8(img.float()).cpu()
