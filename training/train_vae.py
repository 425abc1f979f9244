"""Train a VA-VAE: reconstruction + KL + the vision-foundation alignment (VF) loss.

    python -m training.train_vae --data digits --out runs/vae
    python -m training.train_vae --data path/to/imagenet_layout --image-size 256 --ch-mult 1 1 2 2 4 ...

Writes <out>/vae.json ({"embed_dim", "ddconfig"}), <out>/vae.safetensors (official
key names: encoder.*, decoder.*, quant_conv.*, post_quant_conv.*; the VF projection
is training-only and not in it), <out>/vae_train.pt (everything, to resume or
inspect) and <out>/reconstructions.png.

LPIPS and the adversarial loss of the release are left out: at the demo's 32x32
digits an L1 + L2 pixel loss already reconstructs the strokes, and both would
need weights or training time the demo does not have.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoints import save_json, save_safetensors, save_torch
from model.latents import to_uint8
from model.vavae import VAVAE
from training.image_grid import save_grid
from training.vf_loss import PatchPCAExtractor, VFLoss, adaptive_weight

log = logging.getLogger("training.train_vae")


@dataclass
class VAETrainConfig:
    data: str = "digits"  # "digits" or an ImageNet-layout folder
    out: str = "runs/vae"
    image_size: int = 32
    embed_dim: int = 4
    ch: int = 32  # GroupNorm(32) needs widths that are multiples of 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # f4
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=list)
    steps: int = 800
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 50
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1e-4  # on per-element means
    vf_weight: float = 0.1  # release: 0.1, times the adaptive weight
    vf_adaptive: bool = True
    vf_adaptive_every: int = 10  # the ratio drifts slowly; recomputing it each step costs a decoder backward
    cos_margin: float = 0.5
    distmat_margin: float = 0.25
    feature_dim: int = 16
    precision: str = "bf16"  # "bf16" autocast or "fp32"
    seed: int = 0

    def ddconfig(self) -> dict:
        return dict(
            double_z=True, z_channels=self.embed_dim, resolution=self.image_size, in_channels=3, out_ch=3,
            ch=self.ch, ch_mult=list(self.ch_mult), num_res_blocks=self.num_res_blocks,
            attn_resolutions=list(self.attn_resolutions), dropout=0.0,
        )


def load_training_images(data: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    if data == "digits":
        from training.demo_data import DIGIT_CLASSES, load_digits_images

        images, labels = load_digits_images(image_size)
        return images, labels, list(DIGIT_CLASSES)
    from training.image_folder import load_image_folder

    return load_image_folder(data, image_size)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over elements of KL(N(mean, exp(logvar)) || N(0, 1))."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def lr_at(step: int, cfg) -> float:
    """Linear warm-up, then cosine decay to a tenth: short runs end on small steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_vae(cfg: VAETrainConfig, progress: bool = True) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    images, _, _ = load_training_images(cfg.data, cfg.image_size)

    vae = VAVAE(cfg.embed_dim, cfg.ddconfig()).train()
    # One feature per latent position: windows of twice the VAE's stride.
    f = vae.downsample_factor
    extractor = PatchPCAExtractor(cfg.feature_dim, patch=2 * f, stride=f)
    extractor.fit(images[torch.randperm(len(images))[:2048]])
    vf = VFLoss(cfg.embed_dim, extractor.dim, cfg.cos_margin, cfg.distmat_margin)
    params = list(vae.parameters()) + list(vf.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)
    last_layer = vae.encoder.conv_out.weight
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    gen = torch.Generator().manual_seed(cfg.seed)
    w_vf = torch.tensor(1.0)
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="vae", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x = images[torch.randint(len(images), (cfg.batch_size,), generator=gen)]
        with autocast:
            mean, logvar = vae.encode_moments(x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
            recon = vae.decode(z).float()
            vf_terms = vf(z, extractor(x))
        rec = cfg.l1_weight * (recon - x).abs().mean() + cfg.l2_weight * F.mse_loss(recon, x)
        kl = kl_to_standard_normal(mean.float(), logvar.float())
        if cfg.vf_adaptive and step % cfg.vf_adaptive_every == 0:
            w_vf = adaptive_weight(rec, vf_terms["vf"], last_layer)
        loss = rec + cfg.kl_weight * kl + cfg.vf_weight * w_vf * vf_terms["vf"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0:
            rate = (step + 1) * cfg.batch_size / (time.time() - start)
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}", vf=f"{vf_terms['vf'].item():.3f}",
                            img_s=f"{rate:.0f}")

    vae.eval()
    with torch.no_grad():
        sample = images[:32]
        recon = vae.decode(vae.encode(sample, sample=False))
        rec_l1 = (vae.decode(vae.encode(images[:512], sample=False)) - images[:512]).abs().mean().item()
    save_grid(torch.cat([to_uint8(sample), to_uint8(recon)]), rows=8, path=out / "reconstructions.png", upscale=2)
    save_json({"embed_dim": cfg.embed_dim, "ddconfig": vae.ddconfig}, out / "vae.json")
    save_safetensors(vae.state_dict(), out / "vae.safetensors")
    save_torch({"vae": vae.state_dict(), "vf": vf.state_dict(), "extractor": extractor.state_dict(),
                "opt": opt.state_dict(), "config": {**asdict(cfg), "step": cfg.steps}}, out / "vae_train.pt")
    log.warning("VA-VAE: %d steps in %.0f s, eval L1 %.4f (mean latents), wrote %s",
                cfg.steps, time.time() - start, rec_l1, out)
    return out


def load_trained_vae(vae_dir: str | Path) -> VAVAE:
    """The VA-VAE a run of this module wrote (vae.json + vae.safetensors), in eval mode."""
    import json

    from model.checkpoints import load_vae_weights

    vae_dir = Path(vae_dir)
    spec = json.loads((vae_dir / "vae.json").read_text())
    vae = VAVAE(spec["embed_dim"], spec["ddconfig"])
    load_vae_weights(vae, vae_dir / "vae.safetensors")
    return vae.eval()


def parse_args(argv=None) -> tuple[VAETrainConfig, argparse.Namespace]:
    d = VAETrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=d.data, help="'digits' or an ImageNet-layout folder")
    p.add_argument("--out", default=d.out)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="latent channels")
    p.add_argument("--ch", type=int, default=d.ch)
    p.add_argument("--ch-mult", type=int, nargs="+", default=d.ch_mult)
    p.add_argument("--num-res-blocks", type=int, default=d.num_res_blocks)
    p.add_argument("--attn-resolutions", type=int, nargs="*", default=d.attn_resolutions)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--kl-weight", type=float, default=d.kl_weight)
    p.add_argument("--vf-weight", type=float, default=d.vf_weight, help="0 turns the VF loss off")
    p.add_argument("--no-vf-adaptive", action="store_true", help="use vf_weight as is")
    p.add_argument("--feature-dim", type=int, default=d.feature_dim)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=d.precision)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    cfg = VAETrainConfig(
        data=a.data, out=a.out, image_size=a.image_size, embed_dim=a.embed_dim, ch=a.ch, ch_mult=a.ch_mult,
        num_res_blocks=a.num_res_blocks, attn_resolutions=a.attn_resolutions, steps=a.steps,
        batch_size=a.batch_size, lr=a.lr, kl_weight=a.kl_weight, vf_weight=a.vf_weight,
        vf_adaptive=not a.no_vf_adaptive, feature_dim=a.feature_dim, precision=a.precision, seed=a.seed,
    )
    return cfg, a


def main(argv=None) -> None:
    cfg, args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    train_vae(cfg, progress=not args.quiet)


if __name__ == "__main__":
    main()
