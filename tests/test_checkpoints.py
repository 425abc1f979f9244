"""Checkpoint loaders on files in every official layout, and on broken files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.bundle import load_bundle, read_spec
from model.checkpoints import (
    CheckpointError,
    load_dit_weights,
    load_latent_stats,
    load_vae_weights,
)
from model.generate import main as generate_main
from model.lightningdit import LightningDiT
from model.vavae import VAVAE
from tests.conftest import load_fixture

VAE_DD = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0, resolution=16,
              in_channels=3, out_ch=3, z_channels=32, double_z=True)


def tiny_dit() -> tuple[LightningDiT, dict, dict]:
    meta, sd = load_fixture("dit_tiny")
    cfg = {k: v for k, v in meta["config"].items() if k != "use_checkpoint"}
    return LightningDiT(**cfg).eval(), cfg, sd


def same_weights(a: torch.nn.Module, sd: dict) -> bool:
    return all(torch.equal(v, sd[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("layout", ["ema_only", "train_py", "bare", "ddp_prefixed", "model_only", "safetensors"])
def test_dit_layouts(tmp_path, layout):
    model, cfg, sd = tiny_dit()
    noise = {k: v + 1 for k, v in sd.items()}  # distinguishes "model" from "ema"
    obj = {
        "ema_only": {"ema": sd},
        "train_py": {"model": noise, "ema": sd, "opt": {"state": {}}, "config": {"model": cfg}},
        "bare": sd,
        "ddp_prefixed": {"ema": {f"module.{k}": v for k, v in sd.items()}},
        "model_only": {"model": sd},
    }.get(layout)
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "dit.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "dit.pt"
        torch.save(obj, path)
    load_dit_weights(model, path)
    assert same_weights(model, sd)


def test_dit_wrong_shape_missing_and_unexpected_are_named(tmp_path):
    model, _, sd = tiny_dit()
    broken = dict(sd)
    broken["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    del broken["final_layer.linear.bias"]
    broken["extra.weight"] = torch.zeros(1)
    torch.save({"ema": broken}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_dit_weights(model, tmp_path / "bad.pt")
    text = str(err.value)
    assert "missing keys: final_layer.linear.bias" in text
    assert "unexpected keys: extra.weight" in text
    assert "blocks.0.attn.qkv.weight (checkpoint (3, 3), model (192, 64))" in text


def test_dit_wrong_prefix_is_refused(tmp_path):
    model, _, sd = tiny_dit()
    torch.save({"ema": {f"net.{k}": v for k, v in sd.items()}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing keys: .*unexpected keys: net\\."):
        load_dit_weights(model, tmp_path / "bad.pt")


def vae_state() -> tuple[VAVAE, dict]:
    torch.manual_seed(0)
    src = VAVAE(32, VAE_DD)
    return VAVAE(32, VAE_DD), src.state_dict()


def test_vae_lightning_layout_drops_training_only_keys(tmp_path):
    vae, sd = vae_state()
    full = {**sd, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(2),
            "foundation_model.model.blocks.0.weight": torch.zeros(3), "linear_proj.weight": torch.zeros(1024, 32, 1, 1)}
    torch.save({"state_dict": full, "epoch": 3}, tmp_path / "vavae.pt")
    load_vae_weights(vae, tmp_path / "vavae.pt")
    assert same_weights(vae, sd)


def test_vae_bare_layout_and_decoder_only(tmp_path):
    vae, sd = vae_state()
    torch.save(sd, tmp_path / "bare.pt")
    load_vae_weights(vae, tmp_path / "bare.pt")
    assert same_weights(vae, sd)
    dec = {k: v for k, v in sd.items() if k.startswith(("decoder.", "post_quant_conv."))}
    torch.save(dec, tmp_path / "dec.pt")
    fresh, _ = vae_state()
    load_vae_weights(fresh, tmp_path / "dec.pt", decoder_only=True)
    assert torch.equal(fresh.decoder.conv_out.weight, sd["decoder.conv_out.weight"])
    with pytest.raises(CheckpointError, match="missing keys: encoder"):
        load_vae_weights(VAVAE(32, VAE_DD), tmp_path / "dec.pt")


def test_vae_wrong_prefix_loads_nothing_and_says_so(tmp_path):
    vae, sd = vae_state()
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="holds no key starting with encoder"):
        load_vae_weights(vae, tmp_path / "bad.pt")


def test_vae_mis_shaped_key_is_named(tmp_path):
    vae, sd = vae_state()
    sd = dict(sd)
    sd["decoder.conv_out.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="mis-shaped keys: decoder.conv_out.weight"):
        load_vae_weights(vae, tmp_path / "bad.pt")


@pytest.mark.parametrize("shape", [(1, 32, 1, 1), (32, 1, 1)])
def test_latent_stats_shapes(tmp_path, shape):
    mean, std = torch.randn(shape), torch.rand(shape) + 0.5
    torch.save({"mean": mean, "std": std}, tmp_path / "latents_stats.pt")
    stats = load_latent_stats(tmp_path / "latents_stats.pt")
    x = torch.randn(2, 32, 4, 4)
    torch.testing.assert_close(stats.denormalize(x), x * std.reshape(1, 32, 1, 1) + mean.reshape(1, 32, 1, 1))
    torch.testing.assert_close(stats.normalize(stats.denormalize(x)), x, rtol=1e-5, atol=1e-5)
    torch.save({"avg": mean}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="must hold 'mean' and 'std'"):
        load_latent_stats(tmp_path / "bad.pt")


def official_bundle(tmp_path):
    """A bundle whose model.json points at files in the official .pt layouts."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    model, cfg, sd = tiny_dit()
    cfg = dict(cfg, num_classes=1000)
    torch.save({"model": sd, "ema": sd, "opt": {}, "config": {"model": cfg}}, tmp_path / "lightningdit.pt")
    torch.manual_seed(1)
    vae = VAVAE(32, dict(VAE_DD, resolution=16))
    torch.save({"state_dict": {**vae.state_dict(), "loss.logvar": torch.zeros(())}}, tmp_path / "vavae.pt")
    torch.save({"mean": torch.zeros(1, 32, 1, 1), "std": torch.ones(1, 32, 1, 1)}, tmp_path / "latents_stats.pt")
    spec = {
        "name": "tiny-official-layout",
        "dit": {"config": cfg, "checkpoint": "lightningdit.pt"},
        "vae": {"embed_dim": 32, "ddconfig": VAE_DD, "checkpoint": "vavae.pt"},
        "latent_stats": "latents_stats.pt",
        "presets": {"quick": {"num_steps": 4, "cfg_scale": 4.0, "cfg_interval_start": 0.1, "timestep_shift": 0.3}},
        "default_preset": "quick",
    }
    (tmp_path / "model.json").write_text(json.dumps(spec))
    return tmp_path


def test_generate_writes_png_from_official_layout(tmp_path):
    root = official_bundle(tmp_path / "bundle")
    out = tmp_path / "one.png"
    assert generate_main(["--model-dir", str(root), "--class", "207", "--seed", "3", "--out", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    # Deterministic: the same class and seed gives the same image, batched with others or not.
    outdir = tmp_path / "many"
    generate_main(["--model-dir", str(root), "--class", "207", "--class", "1", "--seed", "3", "--seed", "4",
                   "--out", str(outdir), "--grid", "--batch-size", "3"])
    assert sorted(p.name for p in outdir.iterdir()) == [
        "class1_seed3.png", "class1_seed4.png", "class207_seed3.png", "class207_seed4.png", "grid.png"]
    assert np.array_equal(np.asarray(Image.open(outdir / "class207_seed3.png")), img)
    assert np.asarray(Image.open(outdir / "grid.png")).shape == (32, 32, 3)


def test_bundle_spec_errors(tmp_path):
    root = official_bundle(tmp_path)
    spec = json.loads((root / "model.json").read_text())
    spec["default_preset"] = "nope"
    (root / "model.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="default_preset 'nope'"):
        read_spec(root)
    with pytest.raises(CheckpointError, match="no model.json"):
        load_bundle(tmp_path / "missing")
