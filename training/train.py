"""Train a class-conditional LightningDiT on VA-VAE latents (rectified flow, as the release).

    python -m training.train --data runs/latents --vae-dir runs/vae --out runs/dit
    torchrun --nproc_per_node 2 -m training.train --data runs/latents --vae-dir runs/vae --out runs/dit

--data is a folder written by `python -m training.extract_latents`, or `digits`
(the bundled demo set, encoded in memory with the VAE of --vae-dir).

Writes, from rank 0 only:
  <out>/checkpoints/<step:07d>.pt   {"model", "ema", "opt", "config"} (the release's layout;
                                    config["step"] is the step count, for --resume)
  <out>/bundle/                     the EMA weights as a model bundle (model.bundle.load_bundle)
  <out>/samples/<step:07d>.png      EMA samples, one row per class (up to 10 classes)

Under torchrun each process trains on its own 1/world share of every epoch
(DistributedSampler) and DDP averages the gradients; --batch-size is global.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from model.bundle import write_bundle
from model.checkpoints import save_torch
from model.latents import LatentStats, to_uint8
from model.lightningdit import RELEASE_OPTIONS, LightningDiT, lightningdit_config
from model.sampling import PRESETS, SamplerPreset, initial_noise, sample
from training.ema import create_ema, update_ema
from training.image_grid import save_grid
from training.objective import flow_matching_loss

log = logging.getLogger("training.train")


@dataclass
class TrainConfig:
    data: str = "digits"
    vae_dir: str | None = None  # needed for --data digits, the bundle and the sample grids
    out: str = "runs/dit"
    # model: a named size ("LightningDiT-B/1") or the explicit sizes below, always the release options
    model: str | None = None
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    # optimisation (release defaults except the step count and batch size)
    steps: int = 1000
    batch_size: int = 128  # global, split over the processes
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # or "cosine" (decay to 10 %)
    warmup: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    use_cosine_loss: bool = True
    precision: str = "fp32"  # or "bf16" autocast
    seed: int = 0
    # output
    ckpt_every: int = 0  # 0: only at the end
    sample_every: int = 0
    presets: dict = field(default_factory=lambda: {k: p.to_dict() for k, p in PRESETS.items()})
    default_preset: str = "800ep"
    name: str = "lightningdit"

    def dit_config(self, in_channels: int, input_size: int, num_classes: int) -> dict:
        shape = dict(in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                     class_dropout_prob=self.class_dropout_prob)
        if self.model:
            return lightningdit_config(self.model, **shape)
        return dict(patch_size=1, hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, learn_sigma=False, **RELEASE_OPTIONS, **shape)


# ---------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; without them this is one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


# ---------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------


def load_data(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, LatentStats, list[str]]:
    """Normalised latents [N, C, h, w], labels [N], their stats and the class names."""
    if cfg.data == "digits":
        from training.demo_data import DIGIT_CLASSES, load_digits_images
        from training.extract_latents import encode_images, latent_stats
        from training.train_vae import load_trained_vae

        if not cfg.vae_dir:
            raise SystemExit("--data digits needs --vae-dir (the latents are encoded on the fly)")
        vae = load_trained_vae(cfg.vae_dir)
        images, labels = load_digits_images(int(vae.ddconfig["resolution"]))
        latents = encode_images(vae, images, seed=cfg.seed)
        stats, classes = latent_stats(latents, seed=cfg.seed), list(DIGIT_CLASSES)
    else:
        from training.extract_latents import load_latent_dataset

        latents, labels, stats, meta = load_latent_dataset(cfg.data)
        classes = meta["class_names"]
    return stats.normalize(latents), labels, stats, classes


def batches(num_items: int, per_rank: int, d: Dist, seed: int, start_step: int):
    """Index batches for this rank forever; every epoch is a fresh shuffle split over the ranks."""
    sampler = DistributedSampler(range(num_items), num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    per_epoch = max(1, len(sampler) // per_rank)
    epoch = start_step // per_epoch  # a resumed run continues with the next epoch's shuffle
    while True:
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        for i in range(per_epoch):
            yield order[i * per_rank : (i + 1) * per_rank]
        epoch += 1


def lr_at(step: int, cfg: TrainConfig) -> float:
    scale = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.lr_schedule == "cosine":
        progress = min(1.0, step / max(1, cfg.steps))
        scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * scale


# ---------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------


@torch.no_grad()
def sample_grid(ema: LightningDiT, vae, stats: LatentStats, preset: SamplerPreset, num_classes: int,
                path: Path, per_class: int = 8) -> None:
    """per_class fixed seeds (0..per_class-1) for each of the first 10 classes, one row per class."""
    classes = list(range(min(num_classes, 10)))
    shape = (ema.in_channels, ema.input_size, ema.input_size)
    device = next(ema.parameters()).device
    noise = torch.stack([initial_noise(s, shape) for _ in classes for s in range(per_class)]).to(device)
    labels = torch.tensor([c for c in classes for _ in range(per_class)], device=device)
    latents = sample(ema, noise, labels, preset, ema.null_class)
    images = to_uint8(vae.decode(stats.denormalize(latents)))
    save_grid(images.cpu(), rows=len(classes), path=path, upscale=max(1, 128 // images.shape[1]))


def checkpoint_dict(model: LightningDiT, ema: LightningDiT, opt, cfg: TrainConfig, dit_cfg: dict, step: int) -> dict:
    config = {**asdict(cfg), "dit_config": dit_cfg, "step": step}
    return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "config": config}


def write_outputs(out: Path, ckpt: dict, ema: LightningDiT, vae, stats: LatentStats, classes: list[str],
                  cfg: TrainConfig, elapsed: float) -> None:
    step, dit_cfg = ckpt["config"]["step"], ckpt["config"]["dit_config"]
    save_torch(ckpt, out / "checkpoints" / f"{step:07d}.pt")
    if vae is None:
        return
    presets = {k: SamplerPreset(**v) for k, v in cfg.presets.items()}
    manifest = {"step": step, "train_seconds": round(elapsed, 1), "config": ckpt["config"]}
    write_bundle(out / "bundle", ema, dit_cfg, vae, stats, name=cfg.name, class_names=classes, presets=presets,
                 default_preset=cfg.default_preset, manifest=manifest)


# ---------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> Path:
    """Run training; returns the output folder. Called by `main` and by `training.demo`."""
    d = setup_distributed()
    out = Path(cfg.out)
    if cfg.batch_size % d.world:
        raise SystemExit(f"--batch-size {cfg.batch_size} is not divisible by the {d.world} processes")
    per_rank = cfg.batch_size // d.world

    latents, labels, stats, classes = load_data(cfg)
    dit_cfg = cfg.dit_config(latents.shape[1], latents.shape[-1], len(classes))
    torch.manual_seed(cfg.seed)  # the same initial weights (and EMA) on every rank
    model = LightningDiT(**dit_cfg).to(d.device)
    ema = create_ema(model)
    torch.manual_seed(cfg.seed + 1000 * d.rank + 1)  # but a different stream of noise, t and label drops
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    step = 0
    if resume:
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = int(ckpt["config"]["step"])
        log.info("resumed from %s at step %d", resume, step)
    ddp = DistributedDataParallel(model) if d.world > 1 else model

    vae = None
    if d.main and cfg.vae_dir:
        from training.train_vae import load_trained_vae

        vae = load_trained_vae(cfg.vae_dir).to(d.device)
    preset = SamplerPreset(**cfg.presets[cfg.default_preset])
    latents, labels = latents.to(d.device), labels.to(d.device)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    if d.main:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LightningDiT %s: %.2fM trainable parameters, %d latents %s, %d processes",
                 dit_cfg, n_params / 1e6, len(latents), tuple(latents.shape[1:]), d.world)

    start_step, start = step, time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="dit", disable=not (progress and d.main), dynamic_ncols=True)
    batch_iter = batches(len(latents), per_rank, d, cfg.seed, step)
    model.train()
    while step < cfg.steps:
        idx = next(batch_iter).to(d.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with autocast:
            losses = flow_matching_loss(ddp, latents[idx], labels[idx], cfg.use_cosine_loss)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        update_ema(ema, model, cfg.ema_decay)
        step += 1
        bar.update(1)
        if d.main and (step % 10 == 0 or step == cfg.steps):
            rate = (step - start_step) * cfg.batch_size / (time.time() - start)
            bar.set_postfix(loss=f"{losses['loss'].item():.4f}", img_s=f"{rate:.0f}")
        if d.main and vae is not None and cfg.sample_every and step % cfg.sample_every == 0:
            sample_grid(ema, vae, stats, preset, len(classes), out / "samples" / f"{step:07d}.png")
        if d.main and (step == cfg.steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0)):
            write_outputs(out, checkpoint_dict(model, ema, opt, cfg, dit_cfg, step), ema, vae, stats, classes, cfg,
                          time.time() - start)
    bar.close()
    if d.main and vae is not None:
        sample_grid(ema, vae, stats, preset, len(classes), out / "samples" / f"{step:07d}.png")
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if d.main:
        log.info("trained to step %d in %.0f s; outputs in %s", step, time.time() - start, out)
    return out


# ---------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=d.data, help="latent folder (training.extract_latents) or 'digits'")
    p.add_argument("--vae-dir", default=None, help="training.train_vae output folder (vae.json + vae.safetensors)")
    p.add_argument("--out", default=d.out)
    p.add_argument("--resume", default=None, help="a checkpoint .pt written by this script")
    p.add_argument("--model", default=None, help="named size, e.g. LightningDiT-B/1 (default: the sizes below)")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--num-heads", type=int, default=d.num_heads)
    p.add_argument("--class-dropout-prob", type=float, default=d.class_dropout_prob)
    p.add_argument("--steps", type=int, default=d.steps, help="total optimiser steps (a resumed run continues to it)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--betas", type=float, nargs=2, default=d.betas)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=d.lr_schedule)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 turns clipping off")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--no-cosine-loss", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--sample-every", type=int, default=d.sample_every)
    p.add_argument("--presets", default=None, help="JSON file or string {name: SamplerPreset fields} (default: release)")
    p.add_argument("--default-preset", default=d.default_preset)
    p.add_argument("--name", default=d.name, help="bundle name")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    a = p.parse_args(argv)
    presets = d.presets
    if a.presets:
        text = Path(a.presets).read_text() if Path(a.presets).is_file() else a.presets
        presets = {**presets, **json.loads(text)}
    if a.default_preset not in presets:
        p.error(f"--default-preset {a.default_preset!r} is not among {sorted(presets)}")
    cfg = TrainConfig(
        data=a.data, vae_dir=a.vae_dir, out=a.out, model=a.model, hidden_size=a.hidden_size, depth=a.depth,
        num_heads=a.num_heads, class_dropout_prob=a.class_dropout_prob, steps=a.steps, batch_size=a.batch_size,
        lr=a.lr, betas=tuple(a.betas), weight_decay=a.weight_decay, lr_schedule=a.lr_schedule, warmup=a.warmup,
        grad_clip=a.grad_clip, ema_decay=a.ema_decay, use_cosine_loss=not a.no_cosine_loss, precision=a.precision,
        seed=a.seed, ckpt_every=a.ckpt_every, sample_every=a.sample_every, presets=presets,
        default_preset=a.default_preset, name=a.name,
    )
    return cfg, a


def main(argv=None) -> None:
    cfg, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    train(cfg, resume=args.resume, progress=not args.quiet)


if __name__ == "__main__":
    main()
