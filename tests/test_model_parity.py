"""Our model/sampler against vectors produced by running the official LightningDiT code."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model.latents import to_uint8
from model.lightningdit import LightningDiT, VisionRoPE, create_lightningdit, timestep_features
from model.sampling import SamplerPreset, sample, time_grid
from model.vavae import VAVAE, create_vavae
from tests.conftest import FIXTURES, load_fixture

TOL = dict(rtol=1e-4, atol=1e-4)


def build_dit(stem: str) -> tuple[LightningDiT, dict, dict]:
    meta, sd = load_fixture(stem)
    cfg = {k: v for k, v in meta["config"].items() if k != "use_checkpoint"}
    model = LightningDiT(**cfg).eval()
    model.load_state_dict(sd, strict=True)
    io = load_file(str(FIXTURES / f"{stem}_io.safetensors"))
    return model, meta, io


@pytest.mark.parametrize("stem", ["dit_tiny", "dit_tiny_qknorm"])
def test_dit_forward_and_taps(stem):
    model, meta, io = build_dit(stem)
    with torch.no_grad():
        torch.testing.assert_close(timestep_features(io["t"]), io["dbg_t_freq"], **TOL)
        torch.testing.assert_close(model.t_embedder(io["t"]), io["dbg_t_emb"], **TOL)
        torch.testing.assert_close(model.y_embedder(io["y"]), io["dbg_y_emb"], **TOL)
        h = model.x_embedder(io["x"]) + model.pos_embed
        torch.testing.assert_close(h, io["dbg_x_embed_plus_pos"], **TOL)
        c = model.t_embedder(io["t"]) + model.y_embedder(io["y"])
        for i, block in enumerate(model.blocks):
            h = block(h, c, model.feat_rope)
            torch.testing.assert_close(h, io[f"dbg_block{i}_out"], **TOL)
        torch.testing.assert_close(model.final_layer(h, c), io["dbg_final_layer_out"], **TOL)
        torch.testing.assert_close(model(io["x"], io["t"], io["y"]), io["out"], **TOL)


@pytest.mark.parametrize("stem", ["dit_tiny", "dit_tiny_qknorm"])
def test_dit_forward_with_cfg_cases(stem):
    model, meta, io = build_dit(stem)
    assert len(meta["forward_with_cfg"]) == 4
    for case in meta["forward_with_cfg"]:
        t = torch.full((4,), case["t_value"])
        with torch.no_grad():
            out = model.forward_with_cfg(
                io[case["x"]], t, io[case["y"]], case["cfg_scale"],
                cfg_interval=case["cfg_interval"], cfg_interval_start=case["cfg_interval_start"],
            )
        torch.testing.assert_close(out, io[case["out"]], **TOL, msg=case["name"])


def test_pos_embed_table_is_rebuilt_exactly():
    """A fresh model's fixed sin-cos table equals the one stored by the official code."""
    meta, sd = load_fixture("dit_tiny")
    cfg = {k: v for k, v in meta["config"].items() if k != "use_checkpoint"}
    fresh = LightningDiT(**cfg)
    torch.testing.assert_close(fresh.pos_embed, sd["pos_embed"], rtol=0, atol=1e-7)
    torch.testing.assert_close(fresh.feat_rope.freqs_cos, sd["feat_rope.freqs_cos"], rtol=0, atol=0)


def test_time_grids_bit_exact():
    grids = load_file(str(FIXTURES / "time_grids.safetensors"))
    assert torch.equal(time_grid(250, 0.3), grids["grid_250_shift0p3"])
    assert torch.equal(time_grid(250, 0.0), grids["grid_250_noshift"])
    assert torch.equal(time_grid(8, 0.3), grids["grid_8_shift0p3"])


def test_guided_call_counts_of_release_presets():
    """With 250 points and shift 0.3: 81 unguided / 168 guided calls (800ep), 68 / 181 (64ep)."""
    from model.sampling import PRESETS

    for name, unguided in (("800ep", 81), ("64ep", 68)):
        preset = PRESETS[name]
        grid = time_grid(preset.num_steps, preset.timestep_shift)[:-1]
        flags = [preset.guided_at(float(t)) for t in grid]
        assert flags.count(False) == unguided and flags.count(True) == 249 - unguided
        assert flags.index(True) == unguided


SAMPLER_RUNS = {
    "sampler_tiny_800ep": SamplerPreset(num_steps=8, cfg_scale=6.7, cfg_interval_start=0.125, timestep_shift=0.3),
    "sampler_tiny_64ep": SamplerPreset(num_steps=8, cfg_scale=10.0, cfg_interval_start=0.10, timestep_shift=0.3),
    "sampler_tiny_nocfg": SamplerPreset(num_steps=8, cfg_scale=1.0, timestep_shift=0.3),
    "sampler_tiny_demo": SamplerPreset(num_steps=8, cfg_scale=9.0, cfg_interval_start=None, timestep_shift=0.0),
}


@pytest.mark.parametrize("run", sorted(SAMPLER_RUNS))
def test_sampler_runs_match_official(run):
    model, _, _ = build_dit("dit_tiny")
    meta = json.loads((FIXTURES / "sampler_tiny.json").read_text())["runs"][run]
    preset = SAMPLER_RUNS[run]
    assert preset.num_steps == meta["num_steps"] and preset.timestep_shift == meta["timestep_shift"]
    data = load_file(str(FIXTURES / f"{run}.safetensors"))
    assert torch.equal(time_grid(8, preset.timestep_shift), data["time_grid"])
    expected_flags = meta.get("guided_calls") or [False] * 7
    assert [preset.guided_at(t) for t in meta["model_call_times"]] == expected_flags
    traj: list[torch.Tensor] = []
    final = sample(model, data["noise"], data["labels"], preset, model.null_class, trajectory=traj)
    torch.testing.assert_close(final, data["final"], **TOL)
    if "trajectory_cond" in data:
        torch.testing.assert_close(torch.stack(traj), data["trajectory_cond"], **TOL)


def test_xl_constants():
    const = load_file(str(FIXTURES / "xl_constants.safetensors"))
    rope = VisionRoPE(1152 // 16 // 2, 16)
    assert torch.equal(rope.freqs_cos, const["rope_freqs_cos"])
    assert torch.equal(rope.freqs_sin, const["rope_freqs_sin"])
    torch.testing.assert_close(timestep_features(const["t_freq_inputs"]), const["t_freq_256"], rtol=0, atol=1e-6)


def tiny_decoder() -> VAVAE:
    meta = json.loads((FIXTURES / "vae_decoder_tiny.json").read_text())
    dd = dict(meta["decoder_config"], double_z=True)
    vae = VAVAE(32, dd).eval()
    sd = load_file(str(FIXTURES / "vae_decoder_tiny.safetensors"))
    missing, unexpected = vae.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(("encoder.", "quant_conv.")) for k in missing)
    return vae


def test_vae_decoder_float_and_uint8():
    vae = tiny_decoder()
    io = load_file(str(FIXTURES / "vae_decoder_tiny_io.safetensors"))
    with torch.no_grad():
        img = vae.decode(io["z"])
    torch.testing.assert_close(img, io["decoded"], rtol=0, atol=1e-5)
    assert torch.equal(to_uint8(img), io["decoded_uint8_nhwc"])
    assert torch.equal(to_uint8(io["ramp_in"]), io["ramp_uint8_nhwc"])


def test_decoder_key_names_match_official_list():
    meta = json.loads((FIXTURES / "vae_decoder_tiny.json").read_text())
    vae = tiny_decoder()
    ours = {k: list(v.shape) for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert ours == meta["state_dict_keys"]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_release_parameter_counts():
    with torch.device("meta"):
        xl = create_lightningdit("LightningDiT-XL/1")
        vae = create_vavae("f16d32")
    assert count(xl) == 675_256_736
    assert sum(b.numel() for b in xl.buffers()) == 36_864
    assert len(xl.state_dict()) == 351
    assert count(vae.encoder) == 28_413_248
    assert count(vae.decoder) == 41_417_603
    assert count(vae.quant_conv) == 4_160 and count(vae.post_quant_conv) == 1_056
    assert count(vae) == 69_836_067


def test_xl_state_dict_shapes():
    with torch.device("meta"):
        sd = create_lightningdit("LightningDiT-XL/1").state_dict()
    expected = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 32, 1, 1),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "feat_rope.freqs_cos": (256, 72),
        "blocks.27.attn.qkv.weight": (3456, 1152),
        "blocks.0.mlp.w12.weight": (6144, 1152),
        "blocks.0.mlp.w3.weight": (1152, 3072),
        "blocks.0.adaLN_modulation.1.weight": (6912, 1152),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "blocks.28.norm1.weight" not in sd


def test_named_sizes():
    for name, heads_dim in (("LightningDiT-B/1", 64), ("LightningDiT-L/1", 64), ("LightningDiT-XL/1", 72)):
        with torch.device("meta"):
            m = create_lightningdit(name)
        assert m.blocks[0].attn.head_dim == heads_dim
    with pytest.raises(ValueError, match="unknown LightningDiT size"):
        create_lightningdit("LightningDiT-Huge/3")
