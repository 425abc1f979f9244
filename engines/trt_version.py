"""Which TensorRT this project runs with, and what to tell someone who has another.

The plans are built with TensorRT 10's weakly typed API (`BuilderFlag.FP16`, per-layer
precisions), which TensorRT 11 removed; the `gpu` extra pins `tensorrt>=10,<11`. A
plain `pip install tensorrt` installs 11, so every hint names the pin. The public
index carries only TensorRT's frontend package, which downloads the libraries from
NVIDIA's own index at install time; the NGC PyTorch base image of the Dockerfile
ships a matching TensorRT and stays the supported way to get it.
"""

from __future__ import annotations

import re

SUPPORTED_MAJOR = 10
INSTALL_HINT = ('pip install "tensorrt<11" (the gpu extra\'s pin; needs an NVIDIA GPU), or better the NGC '
                "PyTorch base image of the Dockerfile, which ships a matching TensorRT (the supported way)")


def version_problem(trt) -> str | None:
    """Why this imported tensorrt module cannot be used (None when it can)."""
    version = str(getattr(trt, "__version__", ""))
    m = re.match(r"(\d+)\.", version)
    if m is None:
        return f"tensorrt reports no usable version ({version!r}); this project needs TensorRT {SUPPORTED_MAJOR}.x"
    major = int(m.group(1))
    if major == SUPPORTED_MAJOR:
        return None
    why = ("removed the weakly typed builder API (BuilderFlag.FP16, layer precisions) that the plans are built with"
           if major > SUPPORTED_MAJOR else "lacks the named-tensor API (set_tensor_address) the backend uses")
    return f"tensorrt {version} is installed but this project needs TensorRT {SUPPORTED_MAJOR}.x: {major} {why}; " \
           f"{INSTALL_HINT}"
