"""The import rules between the layers (docs/architecture.md), read from the source with `ast`.

Imports point down only: service -> engines -> model; build_engine.py -> engines, model;
training -> model; ldit_client (the `ldit` command) imports none of them. Imports inside
functions and `importlib.import_module` / `runpy.run_module` calls with a literal name count too,
so a lazy import cannot slip past.

Inside service/, the rooms of docs/architecture.md: http/ (the API process) and worker/ (the worker
process) never import each other; store/ (Redis state both share) and batches/ (sample sets) import
neither; store/ does not import batches/; the ground floor (settings, metrics, logs, png, image_formats,
model_watch) imports none of the four; nothing imports service/runtime.py but service/__main__.py.
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
LAYERS = ("model", "engines", "service", "training", "build_engine", "ldit_client")
# The other layers each one may import (itself always).
ALLOWED = {
    "model": set(),
    "engines": {"model"},
    "service": {"engines", "model"},
    "training": {"model"},
    "build_engine": {"engines", "model"},
    "ldit_client": set(),  # the `ldit` command speaks HTTP only: it works against any deployment
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


def write_tree(root: Path, sources: dict[str, str]) -> None:
    for rel, text in sources.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_checker_finds_each_kind_of_edge(tmp_path: Path) -> None:
    sources = {
        "model/a.py": "def f():\n    from training.train import train\n",
        "model/b.py": "from . import sampling\nfrom model.latents import to_uint8\nimport torch\n",
        "engines/c.py": "import service.settings as s\n",
        "service/d.py": "import importlib\nimportlib.import_module('training.demo')\nfrom engines import load_engine\n",
        "training/e.py": "from model import bundle\nimport runpy\nrunpy.run_module('service')\n",
        "build_engine.py": "from service.settings import Settings\n",
    }
    write_tree(tmp_path, sources)
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


# service/'s rooms: a module's room is its folder under service/ ("root" for the files at its top).
ROOMS = ("http", "worker", "store", "batches")
GROUND = ("settings", "metrics", "logs", "png", "image_formats", "model_watch")
# The rooms each room may import (itself always); "root" here means the ground floor.
ROOM_ALLOWED = {
    "http": {"store", "batches", "ground"},
    "worker": {"store", "batches", "ground"},
    "batches": {"store", "ground"},
    "store": {"ground"},
    "ground": {"ground"},
}


def imported_modules(source: str) -> set[str]:
    """Dotted names of service modules a module imports (`from service import metrics` -> service.metrics)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "service"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "service" or node.module.startswith("service."):
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            value = node.args[0].value
            if name in DYNAMIC_IMPORTERS and isinstance(value, str) and value.split(".")[0] == "service":
                found.add(value)
    return found


def room_of(module: str) -> str | None:
    """The room of a dotted service module name: a folder, "ground", or None (process wiring, the package)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    if parts[1] in ROOMS:
        return parts[1]
    return "ground" if parts[1] in GROUND else None


def room_violations(root: Path) -> list[str]:
    found = []
    for path in sorted((root / "service").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        imports = imported_modules(path.read_text())
        for target in sorted(imports):
            if target.startswith("service.runtime") and rel != "service/__main__.py":
                found.append(f"{rel} imports {target} (only service/__main__.py may)")
        room = room_of(module)
        if room is None:
            continue
        for target in sorted(imports):
            other = room_of(target)
            if other is not None and other != room and other not in ROOM_ALLOWED[room]:
                found.append(f"{rel} imports {target}")
    # Outside service/ too: the process wiring is started through `python -m service` alone.
    for folder in ("bench", "loadtest", "tests", "engines", "model", "training"):
        for path in sorted((root / folder).rglob("*.py")) if (root / folder).is_dir() else []:
            rel = path.relative_to(root).as_posix()
            if rel in RUNTIME_USERS:
                continue
            if any(t.startswith("service.runtime") for t in imported_modules(path.read_text())):
                found.append(f"{rel} imports service.runtime (only service/__main__.py may)")
    return found


# Tests that build a worker in-process the way `python -m service worker` does.
RUNTIME_USERS = {"tests/test_workers.py", "tests/test_device_failure.py"}


def test_service_rooms_keep_their_rules() -> None:
    for room in ROOMS:
        assert (ROOT / "service" / room / "__init__.py").is_file(), f"service/{room}/ is missing"
    assert room_violations(ROOT) == []


def test_every_runtime_user_still_needs_it() -> None:
    for rel in RUNTIME_USERS:
        assert any(m.startswith("service.runtime") for m in imported_modules((ROOT / rel).read_text())), rel


def test_no_service_file_is_too_long_to_read_in_one_sitting() -> None:
    long = {p.relative_to(ROOT).as_posix(): n for p in (ROOT / "service").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 350}
    assert long == {}


def test_the_room_checker_finds_each_kind_of_edge(tmp_path: Path) -> None:
    sources = {
        "service/__main__.py": "from service.runtime import run_all\n",
        "service/runtime.py": "from service.http.app import create_app\nfrom service.worker.loop import Worker\n",
        "service/settings.py": "from service.store.jobs import Keys\n",
        "service/http/a.py": "from service.worker import loop\nfrom service.store.jobs import Keys\n",
        "service/worker/b.py": "import importlib\nimportlib.import_module('service.http.app')\n",
        "service/store/c.py": "from service.batches import sets\nfrom service import metrics\n",
        "service/batches/d.py": "from service.store import jobs\nfrom service.worker.runner import Decoded\n",
        "service/batches/e.py": "def f():\n    from service import runtime\n",
        "bench/f.py": "import service.runtime\n",
    }
    write_tree(tmp_path, sources)
    assert room_violations(tmp_path) == [
        "service/batches/d.py imports service.worker.runner.Decoded",
        "service/batches/e.py imports service.runtime (only service/__main__.py may)",
        "service/http/a.py imports service.worker.loop",
        "service/settings.py imports service.store.jobs.Keys",
        "service/store/c.py imports service.batches.sets",
        "service/worker/b.py imports service.http.app",
        "bench/f.py imports service.runtime (only service/__main__.py may)",
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
