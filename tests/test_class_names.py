"""The bundled ImageNet-1k class names and the example official bundle spec that uses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.bundle import named_class_list, read_spec
from model.checkpoints import CheckpointError
from model.sampling import PRESETS
from model.vavae import VAVAE_CONFIGS
from service.http.schemas import resolve_class

REPO = Path(__file__).resolve().parent.parent
LIST = REPO / "model" / "class_names" / "imagenet1k.json"
OFFICIAL = REPO / "checkpoints" / "official-xl-800ep"

KNOWN = {0: "tench", 1: "goldfish", 2: "great white shark", 207: "golden retriever", 281: "tabby",
         291: "lion", 388: "giant panda", 417: "balloon", 812: "space shuttle", 933: "cheeseburger",
         980: "volcano", 999: "toilet tissue"}


def test_imagenet1k_list_has_1000_unique_short_names():
    names = json.loads(LIST.read_text())
    assert isinstance(names, list) and len(names) == 1000
    assert all(isinstance(n, str) and n and n == n.strip() and len(n) <= 40 for n in names)
    assert len({n.lower() for n in names}) == 1000  # a name (any case) picks exactly one class
    assert not any("_" in n or "," in n for n in names)  # human names, not WordNet ids or lemma lists
    for i, name in KNOWN.items():
        assert names[i] == name
    assert named_class_list("imagenet1k") == names


def test_unknown_named_list_is_a_clear_error():
    with pytest.raises(CheckpointError, match="imagenet1k"):
        named_class_list("imagenet22k")


def test_official_bundle_spec_resolves_names_and_matches_the_release():
    spec = read_spec(OFFICIAL)
    assert spec.num_classes == 1000 and len(spec.class_names) == 1000
    for i, name in KNOWN.items():
        assert spec.class_names[i] == name
    assert resolve_class(spec, "golden retriever") == 207 and resolve_class(spec, "Golden Retriever") == 207
    cfg = spec.dit_config
    assert (cfg["input_size"], cfg["patch_size"], cfg["in_channels"], cfg["hidden_size"], cfg["depth"],
            cfg["num_heads"]) == (16, 1, 32, 1152, 28, 16)
    assert cfg["use_swiglu"] and cfg["use_rope"] and cfg["use_rmsnorm"] and not cfg["use_qknorm"]
    assert not cfg["learn_sigma"] and not cfg["wo_shift"]
    assert spec.vae_embed_dim == 32 and spec.vae_ddconfig == VAVAE_CONFIGS["f16d32"]["ddconfig"]
    assert spec.latent_shape == (32, 16, 16) and spec.image_size == 256
    assert spec.default_preset == "800ep"
    assert {k: p.to_dict() for k, p in spec.presets.items()} == {k: PRESETS[k].to_dict() for k in ("800ep", "64ep", "demo")}
    assert spec.dit_checkpoint.name == "lightningdit-xl-imagenet256-800ep.pt"
    assert spec.vae_checkpoint.name == "vavae-imagenet256-f16d32-dinov2.pt"
    assert spec.latent_stats.name == "latents_stats.pt"
    readme = (OFFICIAL / "README.md").read_text()
    assert "hustvl/lightningdit-xl-imagenet256-800ep" in readme and "hustvl/vavae-imagenet256-f16d32-dinov2" in readme
