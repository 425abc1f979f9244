"""The import rules between the layers (docs/architecture.md), read from the source with `ast`.

Imports point down only: service -> engines -> model; build_engine.py -> engines, model;
training -> model. Imports inside functions and `importlib.import_module` / `runpy.run_module`
calls with a literal name count too, so a lazy import cannot slip past.
"""

from __future__ import annotations

import ast
import contextlib
import io
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("model", "engines", "service", "training", "build_engine")
# The other layers each one may import (itself always).
ALLOWED = {
    "model": set(),
    "engines": {"model"},
    "service": {"engines", "model"},
    "training": {"model"},
    "build_engine": {"engines", "model"},
}
# `python -m model.<name>` forwards to `training.<name>` for one release (deprecation aliases).
OLD_COMMANDS = ("train", "train_vae", "extract_latents", "demo")
EXCEPTIONS = {(f"model/{name}.py", "training") for name in OLD_COMMANDS}
DYNAMIC_IMPORTERS = {"import_module", "run_module", "__import__"}


def imported_layers(source: str) -> set[str]:
    """Top-level names of our layers that a module imports (statically, lazily or by a literal name)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in DYNAMIC_IMPORTERS and isinstance(node.args[0].value, str):
                found.add(node.args[0].value.split(".")[0])
    return found & set(LAYERS)


def layer_files(root: Path) -> dict[str, list[Path]]:
    files = {layer: sorted((root / layer).rglob("*.py")) for layer in LAYERS if layer != "build_engine"}
    files["build_engine"] = [root / "build_engine.py"]
    return files


def forbidden_edges(root: Path, exceptions: set[tuple[str, str]] = frozenset()) -> list[str]:
    edges = []
    for layer, paths in layer_files(root).items():
        for path in paths:
            rel = path.relative_to(root).as_posix()
            for target in sorted(imported_layers(path.read_text()) - ALLOWED[layer] - {layer}):
                if (rel, target) not in exceptions:
                    edges.append(f"{rel} imports {target}")
    return edges


def test_the_layers_import_only_downwards() -> None:
    files = layer_files(ROOT)
    for layer, paths in files.items():
        assert paths and all(p.is_file() for p in paths), f"no modules found for layer {layer}"
    assert forbidden_edges(ROOT, EXCEPTIONS) == []


def test_every_exception_is_still_needed() -> None:
    """An exception nobody uses any more is deleted, so it cannot hide a new edge later."""
    for rel, target in EXCEPTIONS:
        assert target in imported_layers((ROOT / rel).read_text()), f"{rel} no longer imports {target}"


def test_the_checker_finds_each_kind_of_edge(tmp_path: Path) -> None:
    sources = {
        "model/a.py": "def f():\n    from training.train import train\n",
        "model/b.py": "from . import sampling\nfrom model.latents import to_uint8\nimport torch\n",
        "engines/c.py": "import service.settings as s\n",
        "service/d.py": "import importlib\nimportlib.import_module('training.demo')\nfrom engines import load_engine\n",
        "training/e.py": "from model import bundle\nimport runpy\nrunpy.run_module('service')\n",
        "build_engine.py": "from service.settings import Settings\n",
    }
    for rel, text in sources.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert forbidden_edges(tmp_path) == [
        "model/a.py imports training",
        "engines/c.py imports service",
        "service/d.py imports training",
        "training/e.py imports service",
        "build_engine.py imports service",
    ]
    assert forbidden_edges(tmp_path, {("build_engine.py", "service"), ("model/a.py", "training")}) == [
        "engines/c.py imports service",
        "service/d.py imports training",
        "training/e.py imports service",
    ]


def run_as_main(module: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[object, str, str]:
    """What `python -m <module> <argv>` does, in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [module, *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    return stop.value.code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", OLD_COMMANDS)
def test_old_command_forwards_with_a_notice(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m model.<name> --help` prints the deprecation notice, then exactly the new command's help."""
    monkeypatch.delitem(sys.modules, f"training.{name}", raising=False)  # as in a fresh `python -m` process
    code, out, err = run_as_main(f"model.{name}", ["--help"], monkeypatch)
    new_code, new_out, new_err = run_as_main(f"training.{name}", ["--help"], monkeypatch)
    assert code == new_code == 0
    assert f"model.{name} is deprecated" in err and f"python -m training.{name}" in err and new_err == ""
    assert out.startswith("usage: ") and out == new_out


@pytest.mark.parametrize("name", OLD_COMMANDS)
def test_importing_an_old_module_names_the_new_one(name: str) -> None:
    with pytest.raises(ImportError, match=f"training.{name}"):
        __import__(f"model.{name}")
    assert f"model.{name}" not in sys.modules
