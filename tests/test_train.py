"""Training side: objective, EMA, VF loss, latent extraction, checkpoints, resume, DDP.

Every model here is tiny and every run a few steps, so the whole file takes seconds
(the DDP test starts two processes and is the slowest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model.bundle import load_bundle
from model.checkpoints import VAE_PREFIXES, load_dit_weights
from model.lightningdit import RELEASE_OPTIONS, LightningDiT
from model.sampling import SamplerPreset, sample
from training.ema import create_ema, update_ema
from training.extract_latents import load_latent_dataset
from training.extract_latents import main as extract_main
from training.objective import flow_matching_loss, interpolate, sample_logit_normal
from training.train import TrainConfig, train
from training.train_vae import VAETrainConfig, train_vae
from training.vf_loss import PatchPCAExtractor, VFLoss, adaptive_weight

REPO = Path(__file__).resolve().parents[1]


def tiny_dit(**overrides) -> LightningDiT:
    cfg = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3,
               class_dropout_prob=0.1, **RELEASE_OPTIONS)
    return LightningDiT(**{**cfg, **overrides})


# ---------------------------------------------------------------------------------
# Objective and EMA
# ---------------------------------------------------------------------------------


def test_logit_normal_times_are_inside_the_open_interval():
    t = sample_logit_normal(100_000, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    # logit-normal(0, 1) is symmetric about 1/2 and concentrated in the middle
    assert abs(t.mean().item() - 0.5) < 0.01
    assert 0.2 < ((t > 0.25) & (t < 0.75)).float().mean().item() < 0.9
    assert abs(torch.logit(t).std().item() - 1.0) < 0.02


def test_path_runs_from_noise_to_data():
    x0, x1 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(interpolate(x0, x1, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, x1, torch.ones(3)), x1)
    mid = interpolate(x0, x1, torch.full((3,), 0.25))
    assert torch.allclose(mid, 0.75 * x0 + 0.25 * x1)


def test_label_dropout_replaces_labels_with_the_null_class():
    model = tiny_dit(class_dropout_prob=1.0).train()
    emb = model.y_embedder
    labels = torch.tensor([0, 1, 2, 0])
    null_row = emb.embedding_table.weight[model.null_class]
    assert torch.equal(emb(labels), null_row.expand(4, -1))  # train mode, p = 1: all dropped
    emb.eval()
    assert torch.equal(emb(labels), emb.embedding_table.weight[labels])  # eval: never dropped
    emb.train()
    emb.dropout_prob = 0.5
    torch.manual_seed(0)
    out = emb(torch.zeros(4000, dtype=torch.long))
    dropped = (out == null_row).all(dim=1).float().mean().item()
    assert 0.45 < dropped < 0.55


def test_loss_decreases_when_overfitting_a_tiny_batch():
    torch.manual_seed(0)
    model = tiny_dit(class_dropout_prob=0.0)
    x1, y = torch.randn(8, 4, 4, 4), torch.randint(0, 3, (8,))

    def fixed_loss() -> float:
        with torch.no_grad():
            return flow_matching_loss(model, x1, y, generator=torch.Generator().manual_seed(123))["loss"].item()

    before = fixed_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    for _ in range(150):  # the same noise and times every step: a batch that can be memorised
        loss = flow_matching_loss(model, x1, y, generator=torch.Generator().manual_seed(123))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.3 * before, (before, after)


def test_cosine_term_is_part_of_the_loss():
    model = tiny_dit()
    x1, y = torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 0])
    terms = flow_matching_loss(model.eval(), x1, y, generator=torch.Generator().manual_seed(0))
    # a fresh adaLN-Zero model predicts 0: cosine similarity 0, so the cosine term is exactly 1
    assert terms["cos"].item() == pytest.approx(1.0, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(terms["mse"].item() + 1.0, rel=1e-6)


def test_ema_starts_as_a_copy_and_moves_towards_the_model():
    model = tiny_dit()
    ema = create_ema(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), model.state_dict().values(), strict=True))
    assert not any(p.requires_grad for p in ema.parameters())
    w0 = ema.x_embedder.proj.weight.clone()
    with torch.no_grad():
        model.x_embedder.proj.weight.add_(1.0)
    update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.x_embedder.proj.weight, w0 + 0.1, atol=1e-6)


# ---------------------------------------------------------------------------------
# VF loss
# ---------------------------------------------------------------------------------


def identity_vf(dim: int) -> VFLoss:
    vf = VFLoss(dim, dim)
    with torch.no_grad():
        vf.linear_proj.weight.copy_(torch.eye(dim).view(dim, dim, 1, 1))
    return vf


def test_vf_loss_is_zero_for_aligned_features_and_positive_for_misaligned():
    torch.manual_seed(0)
    z = torch.randn(4, 8, 6, 6)
    vf = identity_vf(8)
    aligned = vf(z, z.clone())
    assert aligned["vf"].item() == pytest.approx(0.0, abs=1e-6)
    # inside the margins small disagreements cost nothing either
    assert vf(z, z + 0.1 * torch.randn_like(z))["vf"].item() == pytest.approx(0.0, abs=1e-6)
    opposite = vf(z, -z)
    assert opposite["vf_cos"].item() == pytest.approx(1.5, abs=1e-5)  # relu(1 - 0.5 - (-1))
    unrelated = vf(z, torch.randn(4, 8, 6, 6))
    assert unrelated["vf_cos"].item() > 0.3 and unrelated["vf_distmat"].item() > 0.0
    # features at another resolution are resized to the latent grid
    assert vf(z, torch.randn(4, 8, 12, 12))["vf"].item() > 0


def test_vf_adaptive_weight_balances_the_gradients():
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    rec, vf = (3 * w).sum(), (w**2).sum()
    expected = (3 * torch.ones(5)).norm() / (2 * w.detach()).norm()
    assert adaptive_weight(rec, vf, w).item() == pytest.approx(expected.item(), rel=1e-3)


def test_patch_pca_extractor_gives_one_feature_per_latent_position():
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    ext = PatchPCAExtractor(dim=5, patch=8, stride=4).fit(images)
    feats = ext(images)
    assert feats.shape == (6, 5, 8, 8)
    # principal components are orthonormal
    assert torch.allclose(ext.components @ ext.components.T, torch.eye(5), atol=1e-4)


# ---------------------------------------------------------------------------------
# VAE -> latents -> DiT, on a tiny folder of PNGs
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "fox"):
        (root / cls).mkdir()
        for i in range(4):
            arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory, image_folder) -> Path:
    cfg = VAETrainConfig(data=str(image_folder), out=str(tmp_path_factory.mktemp("vae")), image_size=16,
                         embed_dim=4, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, steps=3, batch_size=4,
                         warmup=1, feature_dim=4, vf_adaptive_every=1)
    return train_vae(cfg, progress=False)


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory, image_folder, vae_dir) -> Path:
    out = tmp_path_factory.mktemp("latents")
    extract_main(["--data", str(image_folder), "--vae-dir", str(vae_dir), "--out", str(out), "--shard-size", "5",
                  "--batch-size", "4", "-q"])
    return out


def test_vae_file_has_only_the_official_keys(vae_dir):
    keys = load_file(str(vae_dir / "vae.safetensors")).keys()
    assert keys and all(k.startswith(VAE_PREFIXES) for k in keys)
    assert any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys)
    full = torch.load(vae_dir / "vae_train.pt", weights_only=True)
    assert "linear_proj.weight" in full["vf"]  # the projection is kept for training only


def test_extract_latents_writes_shards_stats_and_class_names(latent_dir):
    meta = json.loads((latent_dir / "dataset.json").read_text())
    assert meta["class_names"] == ["cat", "dog", "fox"]
    assert meta["num_latents"] == 12 and meta["latent_shape"] == [4, 4, 4]
    assert meta["shards"] == ["latents_00000.safetensors", "latents_00001.safetensors", "latents_00002.safetensors"]
    latents, labels, stats, _ = load_latent_dataset(latent_dir)
    assert latents.shape == (12, 4, 4, 4)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    raw = load_file(str(latent_dir / "latents_stats.safetensors"))
    assert raw["mean"].shape == (1, 4, 1, 1) and raw["std"].shape == (1, 4, 1, 1)
    assert torch.allclose(raw["mean"], latents.mean(dim=(0, 2, 3), keepdim=True), atol=1e-5)
    assert torch.allclose(raw["std"], latents.std(dim=(0, 2, 3), keepdim=True, unbiased=True), atol=1e-5)
    normed = stats.normalize(latents)
    assert torch.allclose(normed.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)


def tiny_train_config(latent_dir, vae_dir, out, steps) -> TrainConfig:
    return TrainConfig(data=str(latent_dir), vae_dir=str(vae_dir), out=str(out), hidden_size=32, depth=2,
                       num_heads=2, steps=steps, batch_size=4, ema_decay=0.9,
                       presets={"tiny": SamplerPreset(num_steps=3, cfg_scale=2.0).to_dict()}, default_preset="tiny")


def test_training_writes_a_checkpoint_and_a_bundle_the_loaders_read(latent_dir, vae_dir, tmp_path):
    out = train(tiny_train_config(latent_dir, vae_dir, tmp_path, steps=3), progress=False)
    ckpt = torch.load(out / "checkpoints" / "0000003.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "opt", "config"}
    assert ckpt["config"]["step"] == 3
    assert not torch.equal(ckpt["model"]["x_embedder.proj.weight"], ckpt["ema"]["x_embedder.proj.weight"])

    dit = LightningDiT(**ckpt["config"]["dit_config"])
    load_dit_weights(dit, out / "checkpoints" / "0000003.pt")  # takes the EMA weights
    assert torch.equal(dit.state_dict()["x_embedder.proj.weight"], ckpt["ema"]["x_embedder.proj.weight"])

    bundle = load_bundle(out / "bundle")
    assert bundle.spec.class_names == ["cat", "dog", "fox"]
    assert bundle.spec.default_preset == "tiny"
    assert torch.equal(bundle.dit.state_dict()["final_layer.linear.weight"], ckpt["ema"]["final_layer.linear.weight"])
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["version"]
    x = sample(bundle.dit, torch.randn(2, 4, 4, 4), torch.tensor([0, 2]), bundle.spec.presets["tiny"],
               bundle.null_class)
    images = bundle.vae.decode(bundle.stats.denormalize(x))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert (out / "samples" / "0000003.png").is_file()


def test_resume_continues_the_step_count_and_the_optimizer_state(latent_dir, vae_dir, tmp_path):
    cfg = tiny_train_config(latent_dir, vae_dir, tmp_path, steps=2)
    train(cfg, progress=False)
    first = torch.load(tmp_path / "checkpoints" / "0000002.pt", weights_only=True)
    train(replace(cfg, steps=5), resume=str(tmp_path / "checkpoints" / "0000002.pt"), progress=False)
    resumed = torch.load(tmp_path / "checkpoints" / "0000005.pt", weights_only=True)
    assert resumed["config"]["step"] == 5
    # AdamW counts its own steps per parameter: 2 before the restart + 3 after
    assert {float(s["step"]) for s in resumed["opt"]["state"].values()} == {5.0}
    name = "blocks.0.attn.qkv.weight"
    idx = list(first["model"]).index(name)
    assert not torch.equal(first["opt"]["state"][idx]["exp_avg"], resumed["opt"]["state"][idx]["exp_avg"])
    assert not torch.equal(first["model"][name], resumed["model"][name])


@pytest.mark.slow
def test_two_process_ddp_run_on_cpu(latent_dir, vae_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train", "--data", str(latent_dir), "--vae-dir", str(vae_dir), "--out", str(tmp_path),
           "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--steps", "3", "--batch-size", "4",
           "--presets", json.dumps({"tiny": {"num_steps": 2}}), "--default-preset", "tiny", "--threads", "1", "-q"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "0000003.pt", weights_only=True)
    assert ckpt["config"]["step"] == 3
    assert not any(k.startswith("module.") for k in ckpt["model"])
    bundle = load_bundle(tmp_path / "bundle")
    assert len(bundle.dit.blocks) == 1
