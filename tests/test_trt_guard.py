"""The TensorRT version guard and install hints, with fake tensorrt modules (no TensorRT needed)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from engines.base import EngineError
from engines.trt_backend import import_tensorrt
from engines.trt_build import tensorrt_status


def fake_tensorrt(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "tensorrt", None if version is None else types.SimpleNamespace(__version__=version))


@pytest.mark.parametrize("version", ["11.0.0.1", "12.1.0"])
def test_tensorrt_11_and_later_are_refused_with_the_pin_and_the_image(monkeypatch, version):
    fake_tensorrt(monkeypatch, version)
    ok, reason = tensorrt_status()
    assert not ok
    assert f"tensorrt {version} is installed" in reason and "TensorRT 10.x" in reason
    assert 'pip install "tensorrt<11"' in reason and "NGC" in reason
    with pytest.raises(EngineError, match=r"needs TensorRT 10\.x.*tensorrt<11"):
        import_tensorrt()


def test_a_missing_tensorrt_names_the_pin_not_a_plain_install(monkeypatch):
    fake_tensorrt(monkeypatch, None)  # a None entry makes `import tensorrt` raise ImportError
    ok, reason = tensorrt_status()
    assert not ok and 'pip install "tensorrt<11"' in reason and "NGC" in reason
    with pytest.raises(EngineError) as err:
        import_tensorrt()
    assert 'pip install "tensorrt<11"' in str(err.value)
    assert "pip install tensorrt " not in str(err.value) + " "


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the step after the version guard on a CPU machine")
def test_tensorrt_10_passes_the_guard(monkeypatch):
    fake_tensorrt(monkeypatch, "10.13.3.9")
    ok, reason = tensorrt_status()
    assert not ok and "torch sees no CUDA GPU" in reason  # the next check, not the version
    with pytest.raises(EngineError, match="no CUDA GPU"):
        import_tensorrt()
