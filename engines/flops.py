"""FLOPs of one LightningDiT forward, two independent ways, for MFU.

* `counted_flops`: torch's FlopCounterMode over a forward on the meta device. No
  memory, no compute (XL/1 builds and runs in about a second), and, unlike a CPU
  forward, attention is counted: on the meta device scaled_dot_product_attention
  runs its math decomposition (two batched matmuls), while the CPU's fused
  attention kernel has no FLOP formula and counted 0 (issue 24: XL/1 lost 8.46
  GFLOP, 3.7%).
* `analytic_flops`: the same total from the layer shapes (2 FLOPs per multiply-add),
  the check that the count is complete.

Elementwise work (norms, RoPE, SiLU, modulation) is not counted by either, as usual
for MFU: it is not tensor-core work.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.lightningdit import LightningDiT


def analytic_flops(cfg: dict) -> dict[str, float]:
    """FLOPs per row (one sample) by part, and their "total", from a LightningDiT config."""
    p, c, d = cfg["patch_size"], cfg["in_channels"], cfg["hidden_size"]
    tokens = (cfg["input_size"] // p) ** 2
    mlp_hidden = int(d * cfg["mlp_ratio"])
    if cfg.get("use_swiglu"):
        hidden = int(2 / 3 * mlp_hidden)
        mlp = 2 * tokens * d * 2 * hidden + 2 * tokens * hidden * d  # w12 (gate and value), w3
    else:
        mlp = 2 * 2 * tokens * d * mlp_hidden  # fc1, fc2
    mods = 4 if cfg.get("wo_shift") else 6
    block_linear = 2 * tokens * d * 3 * d + 2 * tokens * d * d + mlp + 2 * d * mods * d  # qkv, proj, mlp, adaLN
    attention = 2 * 2 * tokens * tokens * d  # q @ k^T and attn @ v, over all heads
    out_channels = c * (2 if cfg.get("learn_sigma") else 1)
    parts = {
        "blocks_linear": cfg["depth"] * block_linear,
        "attention": cfg["depth"] * attention,
        "embed": 2 * tokens * c * p * p * d + 2 * 256 * d + 2 * d * d,  # patch conv, timestep MLP (256 features)
        "final": 2 * d * 2 * d + 2 * tokens * d * p * p * out_channels,  # adaLN, linear
    }
    parts["total"] = float(sum(parts.values()))
    return parts


def counted_flops(cfg: dict, rows: int = 1) -> float:
    """FLOPs of a forward of `rows` rows, counted by FlopCounterMode on the meta device."""
    with torch.device("meta"):
        dit = LightningDiT(**cfg)
    dit = dit.to("meta").eval()  # tables built from numpy (pos_embed, RoPE) start on the CPU
    x = torch.empty(rows, cfg["in_channels"], cfg["input_size"], cfg["input_size"], device="meta")
    t = torch.empty(rows, device="meta")
    y = torch.zeros(rows, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        dit(x, t, y)
    return float(counter.get_total_flops())
