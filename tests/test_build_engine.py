"""build_engine.py end to end (subprocess) on a tiny random bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines.build_config import EngineBuildConfig
from engines.random_bundle import TINY_DIT, TINY_VAE_DDCONFIG, make_random_bundle
from engines.trt_build import tensorrt_status
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
TRT_OK, _ = tensorrt_status()


def run_build(*args: str, ldit_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """build_engine.py in a subprocess; with ldit_env, exactly those LDIT_* variables are set."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if ldit_env is not None:
        env = {k: v for k, v in env.items() if not k.startswith("LDIT_")} | ldit_env
    return subprocess.run([sys.executable, str(REPO / "build_engine.py"), "--threads", "2", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    bundle = make_random_bundle(root / "bundle", TINY_DIT, TINY_VAE_DDCONFIG, name="tiny")
    out = root / "engines"
    proc = run_build("--model-dir", str(bundle), "--output-dir", str(out), "--max-rows", "8", "--opt-rows", "4")
    return bundle, out, proc


def test_exit_code_and_messages(built):
    _, _, proc = built
    print(proc.stdout, proc.stderr)
    if TRT_OK:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 3, proc.stderr
        assert "TensorRT step skipped" in proc.stdout
    assert "max_abs=" in proc.stdout and "[1/" in proc.stdout


def test_step_headers_match_the_docs_and_details_sit_under_their_step(built):
    """[i/n] headers as docs/engines.md lists them; each graph's validation lines under its own step."""
    _, _, proc = built
    headers = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    n = 8 if TRT_OK else 5
    assert [h.split("]")[0] + "]" for h in headers] == [f"[{i}/{n}]" for i in range(1, n + 1)], headers
    assert "exporting dit" in headers[0] and "validating dit" in headers[1]
    assert "exporting vae_decoder" in headers[2] and "validating vae_decoder" in headers[3]
    assert "manifest" in headers[-1]
    under, current = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("["):
            current = line
        elif line.startswith("      ") and current:
            under.setdefault(current, []).append(line.strip())
    assert under[headers[1]] and all(x.startswith("dit: ") for x in under[headers[1]])
    assert under[headers[3]] and all(x.startswith("vae_decoder: ") for x in under[headers[3]])
    doc = (REPO / "docs" / "engines.md").read_text()
    assert "n = 5 without TensorRT, 8 with it" in doc


def test_manifest_fields(built):
    bundle, out, _ = built
    m = json.loads((out / "manifest.json").read_text())
    for key in ("format", "bundle", "graphs", "onnx", "batch_profile", "precision", "versions", "gpu",
                "build_seconds", "files", "tensorrt", "tensorrt_skipped", "written_at"):
        assert key in m, key
    assert m["batch_profile"]["min"] == 1 and m["batch_profile"]["opt"] == 4 and m["batch_profile"]["max"] == 8
    assert len(m["bundle"]["dit_checkpoint"]["sha256"]) == 64 and m["bundle"]["version"]
    assert {"dit.onnx", "vae_decoder.onnx"} <= set(m["files"])
    assert m["versions"]["torch"] and m["versions"]["onnxruntime"]
    if not TRT_OK:
        assert m["tensorrt"] is None and m["tensorrt_skipped"]


def test_onnx_files_load_in_onnxruntime(built):
    import numpy as np
    import onnxruntime as ort

    _, out, _ = built
    dit = ort.InferenceSession(str(out / "dit.onnx"), providers=["CPUExecutionProvider"])
    c, s = TINY_DIT["in_channels"], TINY_DIT["input_size"]
    v = dit.run(None, {"x": np.zeros((2, c, s, s), np.float32), "t": np.zeros(2, np.float32),
                       "y": np.array([0, TINY_DIT["num_classes"]], np.int64)})[0]
    assert v.shape == (2, c, s, s)
    vae = ort.InferenceSession(str(out / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    img = vae.run(None, {"z": np.zeros((3, c, s, s), np.float32)})[0]
    assert img.shape == (3, 3, 2 * s, 2 * s)


def test_if_stale_skips_an_up_to_date_dir(built):
    bundle, out, first = built
    proc = run_build("--model-dir", str(bundle), "--output-dir", str(out), "--max-rows", "8", "--opt-rows", "4",
                     "--if-stale")
    assert proc.returncode == first.returncode, proc.stderr
    assert "up to date" in proc.stdout


def test_defaults_come_from_the_ldit_variables(built):
    bundle, out, first = built
    proc = run_build("--if-stale", ldit_env={"LDIT_MODEL_DIR": str(bundle), "LDIT_ENGINE_DIR": str(out),
                                             "LDIT_MAX_BATCH_SIZE": "8", "LDIT_PREFERRED_BATCH_SIZE": "4"})
    assert proc.returncode == first.returncode, proc.stderr
    assert f"{out} is up to date for {bundle}" in proc.stdout


def test_the_service_settings_map_onto_the_build(built):
    """What the worker passes to build_engine.py: its settings object, whatever the environment says."""
    bundle, out, first = built
    settings = Settings(model_dir=bundle, engine_dir=out, max_batch_size=8, preferred_batch_size=4)
    proc = run_build(*settings.engine_build().cli_args(), "--if-stale",
                     ldit_env={"LDIT_MAX_BATCH_SIZE": "32", "LDIT_ENGINE_DIR": str(out / "elsewhere")})
    assert proc.returncode == first.returncode, proc.stderr
    assert f"{out} is up to date for {bundle}" in proc.stdout


@pytest.mark.parametrize("env", [{}, {"LDIT_MODEL_DIR": "/m", "LDIT_ENGINE_DIR": "/e", "LDIT_MIN_BATCH_SIZE": "2",
                                      "LDIT_PREFERRED_BATCH_SIZE": "6", "LDIT_MAX_BATCH_SIZE": "12",
                                      "LDIT_DECODE_PRECISION": "bf16"}])
def test_build_config_reads_what_the_service_settings_read(env, monkeypatch):
    for name in [k for k in os.environ if k.startswith("LDIT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert EngineBuildConfig() == Settings().engine_build()
    assert EngineBuildConfig().profile_opt_rows == Settings().profile_opt_rows
    for name, field in EngineBuildConfig.model_fields.items():
        ours = Settings.model_fields[name]
        assert (field.annotation, field.default, field.metadata) == (ours.annotation, ours.default, ours.metadata)
    monkeypatch.setenv("LDIT_MAX_BATCH_SIZE", "0")
    for config in (EngineBuildConfig, Settings):
        with pytest.raises(ValueError, match="max_batch_size"):
            config()


def test_bad_arguments_exit_2(tmp_path):
    proc = run_build("--model-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "model bundle" in proc.stderr
    proc = run_build("--min-rows", "8", "--max-rows", "4")
    assert proc.returncode == 2


def test_any_tensorrt_step_failure_is_a_clean_build_failure(tmp_path, monkeypatch, capsys):
    """A converter that dies with an unexpected exception type (Torch-TensorRT once raised
    UnboundLocalError) is reported as a failed build (exit 1, no manifest), not a traceback."""
    import build_engine

    bundle = make_random_bundle(tmp_path / "bundle", TINY_DIT, TINY_VAE_DDCONFIG, name="tiny")

    def broken_converter(*_args, **_kwargs):
        raise UnboundLocalError("cannot access local variable 'engine' where it is not associated with a value")

    monkeypatch.setattr(build_engine, "tensorrt_step_status", lambda args: (True, "pretend TensorRT is here"))
    monkeypatch.setattr(build_engine, "build_tensorrt", broken_converter)
    out = tmp_path / "engines"
    code = build_engine.main(["--model-dir", str(bundle), "--output-dir", str(out), "--max-rows", "4",
                              "--opt-rows", "2", "--validate-rows", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == build_engine.EXIT_FAILED
    assert "TensorRT build failed: UnboundLocalError" in err
    assert not (out / "manifest.json").exists()
