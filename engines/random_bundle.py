"""Random-weight model bundles for tests and benchmarks (no trained checkpoint needed).

A freshly initialised LightningDiT outputs exactly zero (adaLN-Zero), which
would make every parity check pass trivially, so every parameter gets noise,
the way the official fixtures were made (larger on the modulation, final and
embedding layers).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.bundle import write_bundle
from model.latents import LatentStats
from model.lightningdit import RELEASE_OPTIONS, LightningDiT
from model.sampling import SamplerPreset
from model.vavae import VAVAE

# Roughly the shipped demo model: 8x8 latents, f4 VAE -> 32x32 images, 10 classes.
DEMO_DIT = dict(input_size=8, patch_size=1, in_channels=16, hidden_size=192, depth=6, num_heads=6,
                mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=False, **RELEASE_OPTIONS)
DEMO_VAE_DDCONFIG = dict(double_z=True, z_channels=16, resolution=32, in_channels=3, out_ch=3, ch=32,
                         ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
TINY_DIT = dict(DEMO_DIT, in_channels=4, hidden_size=64, depth=2, num_heads=4)
TINY_VAE_DDCONFIG = dict(DEMO_VAE_DDCONFIG, z_channels=4, ch=32, ch_mult=[1, 2], attn_resolutions=[], resolution=16)

DEMO_PRESET = SamplerPreset(num_steps=8, cfg_scale=4.0, cfg_interval_start=0.1, timestep_shift=0.3)


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int, big: float = 0.15, small: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name == "pos_embed":
            continue
        sigma = big if any(k in name for k in ("adaLN", "final_layer.linear", "t_embedder", "y_embedder")) else small
        p.add_(torch.randn(p.shape, generator=g) * sigma)


def make_random_bundle(root: str | Path, dit_config: dict | None = None, vae_ddconfig: dict | None = None,
                       seed: int = 0, name: str = "random-demo") -> Path:
    dit_config = dict(dit_config or DEMO_DIT)
    vae_ddconfig = dict(vae_ddconfig or DEMO_VAE_DDCONFIG)
    torch.manual_seed(seed)
    dit = LightningDiT(**dit_config).eval()
    perturb_(dit, seed + 1)
    vae = VAVAE(vae_ddconfig["z_channels"], vae_ddconfig).eval()
    perturb_(vae, seed + 2, big=0.02, small=0.02)
    c = dit_config["in_channels"]
    g = torch.Generator().manual_seed(seed + 3)
    stats = LatentStats(torch.randn(c, generator=g) * 0.1, 0.5 + torch.rand(c, generator=g))
    classes = [f"class_{i}" for i in range(dit_config["num_classes"])]
    return write_bundle(root, dit, dit_config, vae, stats, name=name, class_names=classes,
                        presets={"demo": DEMO_PRESET}, default_preset="demo")
