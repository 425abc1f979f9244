"""A low-precision (bf16/fp16) copy of a LightningDiT whose weights are converted once.

Why not autocast: autocast re-casts every fp32 weight to bf16 on every call (on
CPU that is a full pass over the weights per forward, and its cache is dropped
when the context exits), and it leaves activations flipping between fp32 and
bf16 around each elementwise op. Converting the weights once keeps the whole
residual stream in the low dtype. The places where low precision hurts stay
in float32 ("fp32 islands"):

* RMSNorm's normalisation: the model's RMSNorm already computes x/rms(x) in
  float32 and casts back; only the learnable scale multiplies in low precision.
* RoPE: the cos/sin tables stay float32 (bf16 would round the angles' cos/sin to
  8 bits); q/k are rotated in float32 and cast back for attention.
* The timestep features (sin/cos of t) are computed in float32 and cast at the
  embedder's input.

The caller's tensors stay float32 at the boundary: x, t in, velocity out.
"""

from __future__ import annotations

import copy

import torch

from model.lightningdit import LightningDiT


def _cast_input_to_weight(module, args):
    x = args[0]
    return (x.to(module.weight.dtype), *args[1:])


def _cast_output_to_input(module, args, out):
    return out.to(args[0].dtype)


def lowp_dit(dit: LightningDiT, dtype: torch.dtype) -> LightningDiT:
    """A converted copy of `dit` (the original is untouched)."""
    model = copy.deepcopy(dit).eval()
    rope = model.feat_rope
    model.feat_rope = None  # keep its float32 tables out of the cast below
    model.to(dtype)
    if rope is not None:
        model.feat_rope = rope.float()
        rope.register_forward_hook(_cast_output_to_input)
    model.x_embedder.proj.register_forward_pre_hook(_cast_input_to_weight)
    model.t_embedder.mlp[0].register_forward_pre_hook(_cast_input_to_weight)
    return model
