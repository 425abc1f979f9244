"""The README's first command says what it is doing: scripts/serve.sh on a fresh clone, output to a file.

The scripts run for real (bash, from a copy of scripts/ in a temporary "clone") and start the real
service; only the two programs that would download gigabytes are stand-ins: the system `python3`
(`PYTHON`), whose `-m venv` makes a `.venv/bin/python` that runs the real interpreter of these tests
for everything except `-m pip`, which it only records (and answers as pip would, with progress when
not quiet), `import torch` before the stand-in pip "installed" it, and the project's import when a
test says it is broken.
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_SYSTEM_PYTHON = """#!/usr/bin/env bash
# stand-in for the system python3: `-m venv DIR` makes DIR/bin/python, the venv stand-in
case "$1" in
  --version) echo "Python 3.99.0 (stand-in)"; exit 0 ;;
  -m) [ "$2" = venv ] || exit 2; mkdir -p "$3/bin"; cp "$FAKE_DIR/venv-python" "$3/bin/python"; exit 0 ;;
esac
exit 2
"""

FAKE_VENV_PYTHON = """#!/usr/bin/env bash
# stand-in for .venv/bin/python: pip is recorded, not run; everything else is the real interpreter
echo "$*" >> "$FAKE_DIR/calls"
if [ "$1" = -m ] && [ "$2" = pip ]; then
  case " $* " in
    *" -q "*) ;;
    *) echo "Collecting torch==2.13.0"
       echo "  Downloading torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl (900.0 MB)"
       echo "     ---------------------------------------- 900.0/900.0 MB 80.0 MB/s eta 0:00:00" ;;
  esac
  if [ -n "${FAKE_PIP_FAIL:-}" ]; then
    echo "ERROR: No matching distribution found for torch==2.13.0"; exit 1
  fi
  case "$*" in *torch*) touch "$FAKE_DIR/torch-installed" ;; esac
  exit 0
fi
if [ "$1" = -c ] && [[ "$2" == *"import torch"* ]] && [ ! -e "$FAKE_DIR/torch-installed" ]; then
  echo "ModuleNotFoundError: No module named 'torch'" >&2; exit 1
fi
if [ "$1" = -c ] && [[ "$2" == *"import torch, model"* ]] && [ -e "$FAKE_DIR/model-broken" ]; then
  echo "ModuleNotFoundError: No module named 'model'" >&2; exit 1
fi
PYTHONPATH="$REAL_REPO" exec "$REAL_PYTHON" "$@"
"""

PHASES = [
    r"^setup \[1/4\] virtual environment: creating \.venv with .*python3 \(Python 3\.99\.0 \(stand-in\)\)$",
    r"^setup \[2/4\] torch: installing torch==2\.13\.0 from pip's index .*$",
    r"^setup \[3/4\] project: pip install -e \. \(the service's dependencies\)$",
    r"^setup \[4/4\] checking: import torch, model, engines, service, training$",
    r"^setup: ready \(\d+ s\)$",
]


@pytest.fixture
def clone(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A checkout's scripts and pyproject.toml without a .venv, and the environment of the stand-ins."""
    repo = tmp_path / "clone"
    (repo / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "serve.sh"):
        shutil.copy2(ROOT / "scripts" / name, repo / "scripts" / name)
    shutil.copy2(ROOT / "pyproject.toml", repo / "pyproject.toml")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "python3").write_text(FAKE_SYSTEM_PYTHON)
    (fake / "venv-python").write_text(FAKE_VENV_PYTHON)
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LDIT_", "TORCH_"))}
    env.update(PYTHON=str(fake / "python3"), FAKE_DIR=str(fake), REAL_PYTHON=sys.executable,
               REAL_REPO=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return repo, env


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_DIR"]) / "calls"
    return path.read_text().splitlines() if path.exists() else []


def in_order(text: str, patterns: list[str]) -> None:
    lines = text.splitlines()
    at = 0
    for pattern in patterns:
        hit = next((i for i in range(at, len(lines)) if re.search(pattern, lines[i])), None)
        assert hit is not None, f"no line matching {pattern!r} after line {at}:\n{text}"
        at = hit + 1


def test_serve_on_a_fresh_clone_shows_each_phase_before_the_first_request(clone, tmp_path) -> None:
    repo, env = clone
    out = tmp_path / "serve.log"
    env.update(LDIT_PORT="0", LDIT_HOST="127.0.0.1")
    with out.open("w") as f:
        proc = subprocess.Popen([str(repo / "scripts" / "serve.sh")], stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        end = time.time() + 300
        while not (m := re.search(r"^LDIT_LISTENING (http://\S+)$", out.read_text(), re.M)):
            assert proc.poll() is None and time.time() < end, out.read_text()
            time.sleep(0.2)
        before = out.read_text()  # everything printed before the first request
        r = httpx.post(f"{m.group(1)}/generate", json={"class_label": "7", "seed": 42}, timeout=60)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    finally:
        proc.terminate()
        proc.wait(60)
    in_order(before, [*PHASES, r" INFO ldit\.startup: loading the model from \S+checkpoints/demo ",
                      r" INFO ldit\.startup: ready on http://127\.0\.0\.1:\d+: the API and one worker "])
    assert "Downloading" not in before, "off a terminal pip is quiet"
    pips = [c for c in calls(env) if c.startswith("-m pip install")]
    assert len(pips) == 2 and all(" -q " in c for c in pips), pips
    assert "torch==2.13.0" in pips[0] and pips[1].endswith("-e .")


def test_a_second_setup_keeps_torch_and_the_project(clone) -> None:
    repo, env = clone
    first = subprocess.run([str(repo / "scripts" / "setup.sh")], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([str(repo / "scripts" / "setup.sh")], capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr
    in_order(second.stderr, [
        r"^setup \[1/4\] virtual environment: \.venv exists \(Python \d+\.\d+\.\d+\)$",
        r"^setup \[2/4\] torch: \S+ already installed, kept$",
        r"^setup \[3/4\] project: up to date ",
        r"^setup \[4/4\] checking: ",
        r"^setup: ready ",
    ])
    assert sum(c.startswith("-m pip") for c in calls(env)) == 2, "the second run installs nothing"
    (repo / "pyproject.toml").write_text((repo / "pyproject.toml").read_text() + "\n# changed\n")
    third = subprocess.run([str(repo / "scripts" / "setup.sh"), "dev"], capture_output=True, text=True, env=env)
    assert third.returncode == 0, third.stderr
    assert re.search(r"^setup \[3/4\] project: pip install -e \.\[dev\] ", third.stderr, re.M), third.stderr
    pips = [c for c in calls(env) if c.startswith("-m pip install")]
    assert len(pips) == 3 and pips[-1].endswith("-e .[dev]"), pips
    # the project no longer imports (a package removed by hand): setup installs it again
    (Path(env["FAKE_DIR"]) / "model-broken").touch()
    fourth = subprocess.run([str(repo / "scripts" / "setup.sh"), "dev"], capture_output=True, text=True, env=env)
    assert fourth.returncode != 0
    in_order(fourth.stderr, [r"^setup \[3/4\] project: up to date ", r"^setup \[4/4\] checking: ",
                             r"^setup \[3/4\] project: pip install -e \.\[dev\] .*, as the check failed$",
                             r"ModuleNotFoundError"])
    assert calls(env)[-2].endswith("-e .[dev]")


def test_on_a_terminal_pip_shows_its_progress(clone) -> None:
    repo, env = clone
    parent, child = pty.openpty()
    proc = subprocess.Popen([str(repo / "scripts" / "setup.sh")], stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(parent, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert proc.wait(300) == 0
    reader.join(30)
    os.close(parent)
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    in_order(text, [PHASES[1], r"Downloading torch-2\.13\.0", r"900\.0/900\.0 MB", PHASES[2], PHASES[3], PHASES[4]])
    pips = [c for c in calls(env) if c.startswith("-m pip install")]
    assert len(pips) == 2 and not any(" -q " in c for c in pips), pips


def test_a_failed_pip_shows_why(clone) -> None:
    repo, env = clone
    env["FAKE_PIP_FAIL"] = "1"
    proc = subprocess.run([str(repo / "scripts" / "setup.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    in_order(proc.stderr, [PHASES[0], PHASES[1], r"^ERROR: No matching distribution found for torch==2\.13\.0$",
                           r"^pip install torch==2\.13\.0 failed$"])
    assert "[3/4]" not in proc.stderr
