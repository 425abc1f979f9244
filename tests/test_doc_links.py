"""Every file a document names exists: markdown links, and every file name in the text.

A reader sent to a file that is not there has been misled. Names with a folder resolve from the
repository root or the document's folder; bare names must be some file of the repository. Outputs
of the commands shown (after -o/--out/--json/..., under bench/out/, loadtest/out/, engines_out/) and
the few files of other repositories that the text quotes (OUTSIDE, each with its reason) are exempt.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", ".venv-deploy", "node_modules", ".git", ".pytest_cache"}
# Named in the docs on purpose but not files of this repository: outputs of the commands shown,
# and files of other repositories the text says it is quoting.
OUTSIDE = {
    "imagenet_classes.txt": "pytorch/hub's class list, cited as the source of ours",
    "models/rmsnorm.py": "a module of the official LightningDiT code the fixtures were made with",
    "extract_features.py": "the official repository's latent extraction script",
    "shared/reference/LIGHTNINGDIT_FACTS.md": "the team's reference notes beside the repository",
    "dataset.json": "written by training.extract_latents into the latents directory",
}
OUTPUT_OPTION = re.compile(r"(?:-o|--out|--json|--npz|--plot|-f|--output-dir)\s+$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FILE = re.compile(r"(?<![\w/.:*<>-])([\w.-]+(?:/[\w.-]+)*\.(?:md|py|json|ya?ml|sh|toml|png|txt|csv|tpl|npz|html))\b")
URL = re.compile(r"[a-z]+://\S+")


@functools.cache
def repo_files() -> tuple[Path, ...]:
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [Path(folder) / f for f in files]
    return tuple(out)


def documents() -> list[Path]:
    return sorted(p for p in repo_files() if p.suffix == ".md")


def shipped_names() -> set[str]:
    return {p.name for p in repo_files()} | {p.parent.name for p in repo_files()}


def missing_references(doc: Path, text: str, names: set[str]) -> list[str]:
    """Links that lead nowhere, and file names that are not files of the repository."""
    missing = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        if not (doc.parent / target.split("#")[0]).exists():
            missing.append(target)
    text = URL.sub(" ", text)
    for m in FILE.finditer(text):
        name = m.group(1)
        if name in OUTSIDE or OUTPUT_OPTION.search(text[max(0, m.start() - 20):m.start()]):
            continue
        before = text[:m.start()]
        if before.rfind("<") > before.rfind(">"):
            continue  # inside a placeholder: <name or file.json>
        if re.match(r"^(bench|loadtest)/out/|^engines_out/", name):
            continue  # written by the command next to it
        found = (ROOT / name).exists() or (doc.parent / name).exists() if "/" in name else name in names
        if not found:
            missing.append(name)
    return sorted(set(missing))


DOCS = documents()


def test_the_documents_are_found():
    names = {str(d.relative_to(ROOT)) for d in DOCS}
    assert {"README.md", "docs/architecture.md", "docs/benchmarks.md", "docs/engines.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_referenced_file_exists(doc):
    missing = missing_references(doc, doc.read_text(), shipped_names())
    assert not missing, f"{doc.relative_to(ROOT)} points at files that do not exist: {missing}"


def test_the_checker_catches_what_it_should():
    doc = ROOT / "docs" / "x.md"
    text = ("see [gone](nothing-here.md), [ok](engines.md), `python bench/nope.py`, DEVELOPERS.md, "
            "bench/compare.py, `-o seven.png`, https://example.org/a/b.md, <name or file.json> and ci/*-values.yaml")
    assert missing_references(doc, text, shipped_names()) == ["DEVELOPERS.md", "bench/nope.py", "nothing-here.md"]
