"""LightningDiT: a DiT with SwiGLU, RoPE and RMSNorm over VA-VAE latents.

Written from the facts in `shared/reference/LIGHTNINGDIT_FACTS.md` (sections 2.x).
Module and parameter names equal the official ones, so the released checkpoints
load with `load_state_dict(strict=True)`.

Notation in shape comments: N rows, T tokens (= (H/p)*(W/p)), D hidden size,
C latent channels, h heads, d head dim.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------
# Small building blocks
# ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight; the normalisation itself runs in float32 (as the release)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    # x [N, T, D]; shift, scale [N, D] broadcast over tokens
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, row-major (token = row * W/p + col)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, C, H, W] -> [N, T, D]


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of raw t in [0, 1] (not scaled by 1000): cos first, then sin."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        feats = torch.cat([feats, torch.zeros_like(feats[:, :1])], dim=-1)
    return feats  # [N, dim]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.frequency_size))


class LabelEmbedder(nn.Module):
    """Class table with one extra row (index num_classes) for the null label of CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


# ---------------------------------------------------------------------------------
# Position tables
# ---------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # [P, dim]


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """Absolute 2-D table [G*G, dim]: the column coordinate fills the first half."""
    coords = np.arange(grid_size, dtype=np.float32)
    cols, rows = np.meshgrid(coords, coords)  # both [G, G]; cols varies along the last axis
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


class VisionRoPE(nn.Module):
    """2-D rotary embedding on interleaved pairs; the row angle fills the first half of a head."""

    def __init__(self, half_head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, half_head_dim, 2)[: half_head_dim // 2].float() / half_head_dim))
        pos = torch.arange(grid_size) / grid_size * grid_size
        angles = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # [G, half_head_dim]
        g = grid_size
        table = torch.cat(
            [angles[:, None, :].expand(g, g, -1), angles[None, :, :].expand(g, g, -1)], dim=-1
        )  # [G(row), G(col), head_dim]
        self.register_buffer("freqs_cos", table.cos().reshape(g * g, -1))
        self.register_buffer("freqs_sin", table.sin().reshape(g * g, -1))

    @staticmethod
    def rotate_pairs(u: torch.Tensor) -> torch.Tensor:
        # (u0, u1, u2, u3, ...) -> (-u1, u0, -u3, u2, ...)
        pairs = u.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # u [N, h, T, d]; tables [T, d] broadcast over rows and heads
        return u * self.freqs_cos + self.rotate_pairs(u) * self.freqs_sin


# ---------------------------------------------------------------------------------
# Transformer block
# ---------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, use_rmsnorm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim) if use_rmsnorm else nn.LayerNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim) if use_rmsnorm else nn.LayerNorm(self.head_dim)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: VisionRoPE | None) -> torch.Tensor:
        n, t, dim = x.shape
        # qkv outputs are laid out [q | k | v], each [head0 | head1 | ...]
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [N, h, T, d]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=True)
        self.w3 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class GeluMLP(nn.Module):
    """The plain DiT MLP, used only when use_swiglu is off."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class LightningDiTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift):
        super().__init__()
        self.wo_shift = wo_shift
        self.norm1 = make_norm(dim, use_rmsnorm)
        self.attn = Attention(dim, num_heads, use_qknorm, use_rmsnorm)
        self.norm2 = make_norm(dim, use_rmsnorm)
        mlp_hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLU(dim, int(2 / 3 * mlp_hidden)) if use_swiglu else GeluMLP(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (4 if wo_shift else 6) * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: VisionRoPE | None) -> torch.Tensor:
        # x [N, T, D], c [N, D]
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int, use_rmsnorm: bool):
        super().__init__()
        self.norm_final = make_norm(dim, use_rmsnorm)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [N, T, p*p*C]


# ---------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------


class LightningDiT(nn.Module):
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        use_qknorm: bool = False,
        use_swiglu: bool = False,
        use_rope: bool = False,
        use_rmsnorm: bool = False,
        wo_shift: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.use_checkpoint = use_checkpoint
        grid = input_size // patch_size

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A frozen parameter, as in the release: it is stored in the checkpoints.
        self.pos_embed = nn.Parameter(
            torch.from_numpy(sincos_2d(hidden_size, grid)).float().unsqueeze(0), requires_grad=False
        )
        self.feat_rope = VisionRoPE(hidden_size // num_heads // 2, grid) if use_rope else None
        self.blocks = nn.ModuleList(
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def initialize_weights(self) -> None:
        """adaLN-Zero init (only matters for training; checkpoints override it)."""

        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # [N, T, p*p*C] -> [N, C, H, W]
        n, p, c = x.shape[0], self.patch_size, self.out_channels
        g = self.input_size // p
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, g * p, g * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens h [N, T, D] and conditioning c [N, D], the inputs of every block."""
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        return h, c

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block -> velocity [N, C, H, W]."""
        out = self.unpatchify(self.final_layer(h, c))
        if self.learn_sigma:
            out = out[:, : self.in_channels]
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity for latents x [N, C, H, W] at times t [N] (0 = noise, 1 = data), labels y [N]."""
        # embed / blocks / head are separate so that a runtime can run the blocks its own way
        # (engines.torch_backend compiles one block and reuses it for all of them).
        h, c = self.embed(x, t, y)
        for block in self.blocks:
            if self.use_checkpoint and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, c, self.feat_rope, use_reentrant=False)
            else:
                h = block(h, c, self.feat_rope)
        return self.head(h, c)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval=False, cfg_interval_start=0.0):
        """The official batch-doubled CFG call, kept for parity tests.

        x, y are [2B] with y's second half the null class; only x's first half is used;
        guidance touches channels 0..2; skipped when the interval is on and t[0] < start.
        The sampler in `model.sampling` does the same per row without wasted rows.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        guided, rest = out[:, :3], out[:, 3:]
        cond, uncond = guided.chunk(2, dim=0)
        mixed = uncond + cfg_scale * (cond - uncond)
        if cfg_interval and bool(t[0] < cfg_interval_start):
            mixed = cond
        return torch.cat([torch.cat([mixed, mixed], dim=0), rest], dim=1)


# ---------------------------------------------------------------------------------
# Named sizes
# ---------------------------------------------------------------------------------

# depth, hidden, heads
SIZES = {
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "1p0B": (24, 1536, 24),
    "1p6B": (28, 1792, 28),
}

RELEASE_OPTIONS = dict(use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False)

CONFIG_KEYS = (
    "input_size patch_size in_channels hidden_size depth num_heads mlp_ratio class_dropout_prob "
    "num_classes learn_sigma use_qknorm use_swiglu use_rope use_rmsnorm wo_shift"
).split()


def lightningdit_config(name: str, **overrides) -> dict:
    """Config dict of a named size, e.g. 'LightningDiT-XL/1', with the release options."""
    try:
        size, patch = name.removeprefix("LightningDiT-").split("/")
        depth, hidden, heads = SIZES[size]
    except (ValueError, KeyError):
        known = ", ".join(f"LightningDiT-{s}/{p}" for s in SIZES for p in (1, 2))
        raise ValueError(f"unknown LightningDiT size {name!r}; known: {known}") from None
    cfg = dict(
        input_size=16,
        patch_size=int(patch),
        in_channels=32,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=False,
        **RELEASE_OPTIONS,
    )
    unknown = set(overrides) - set(CONFIG_KEYS) - {"use_checkpoint"}
    if unknown:
        raise TypeError(f"unknown LightningDiT config keys: {sorted(unknown)}")
    cfg.update(overrides)
    return cfg


def create_lightningdit(name: str, **overrides) -> LightningDiT:
    """Build a released size by name; defaults match the released 256px model (16x16x32 latents)."""
    return LightningDiT(**lightningdit_config(name, **overrides))
