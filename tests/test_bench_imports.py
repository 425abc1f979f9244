"""Every bench script imports: a moved helper must not leave a bench broken until someone runs it.

Regression: the GPU kit's split into bench/gpu_xl.py and bench/gpu_util.py left bench/fused.py importing
`random_model_bundle` and `rel_err` from bench.gpu_check, where they no longer were.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__"))
def test_bench_module_imports(name: str) -> None:
    importlib.import_module(f"bench.{name}")
