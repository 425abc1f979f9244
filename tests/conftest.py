"""Shared fixtures: the official test vectors copied from shared/fixtures/lightningdit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "lightningdit"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def load_fixture(stem: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON sidecar and the tensors of one fixture file."""
    meta_path = FIXTURES / f"{stem}.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return meta, load_file(str(FIXTURES / f"{stem}.safetensors"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
