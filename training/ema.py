"""Exponential moving average of model weights (the weights that get shipped)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def create_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of `model`: the EMA starts equal to the initial weights, as the release."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied."""
    model_params = dict(model.named_parameters())
    for name, param in ema.named_parameters():
        param.lerp_(model_params[name].detach().to(param.dtype), 1.0 - decay)
    model_buffers = dict(model.named_buffers())
    for name, buf in ema.named_buffers():
        buf.copy_(model_buffers[name])
