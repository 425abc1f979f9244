# syntax=docker/dockerfile:1
#
# One image, every process; the command picks it:
#   python -m service api        HTTP API on $LDIT_HOST:$LDIT_PORT (0.0.0.0:8000 here)
#   python -m service worker     GPU worker, Prometheus metrics on $LDIT_METRICS_PORT (9400)
#   python build_engine.py --output-dir /engines --if-stale
#                                ONNX + TensorRT engines (exit 0: built/up to date,
#                                3: ONNX only, TensorRT skipped: no GPU/TensorRT)
#   python -m service            all-in-one local mode (embedded Redis, CPU, demo model)
#
# Targets:
#   gpu (default, last stage)    FROM the NGC PyTorch image: torch + TensorRT already there
#   cpu                          FROM python:3.11-slim with the CPU build of torch
#
#   docker build -t lightningdit-serve:gpu .
#   docker build --target cpu -t lightningdit-serve:cpu .
#
# Model checkpoints and engines are volumes (/models, /engines), not baked in; only the small
# shipped demo model (checkpoints/demo) is in the image, as the default LDIT_MODEL_DIR.

# ---------------------------------------------------------------------------------------------
# wheel: build the project's wheel once; both runtimes install it.
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY engines/ engines/
COPY service/ service/
COPY training/ training/
COPY ldit_client/ ldit_client/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
# cpu-build: a virtual environment with the CPU build of torch, then the project and its deps.
FROM python:3.11-slim AS cpu-build
# The CPU wheel index: a loose torch requirement from PyPI pulls a multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=wheel /wheels /wheels
# torch is already satisfied, so this adds only the project's other dependencies.
RUN pip install --no-cache-dir /wheels/*.whl

# ---------------------------------------------------------------------------------------------
# cpu: the CPU runtime (api, worker on CPU, all-in-one local mode).
FROM python:3.11-slim AS cpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    LDIT_HOST=0.0.0.0 \
    LDIT_PORT=8000 \
    LDIT_MODEL_DIR=/app/checkpoints/demo \
    LDIT_ENGINE_DIR=/engines
RUN groupadd --system --gid 10001 ldit \
    && useradd --system --uid 10001 --gid ldit --home-dir /app --shell /usr/sbin/nologin ldit \
    && mkdir -p /app /engines /models \
    && chown ldit:ldit /engines
COPY --from=cpu-build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root build_engine.py ./
COPY --chown=root:root checkpoints/demo/ checkpoints/demo/
VOLUME ["/engines", "/models"]
USER 10001:10001
EXPOSE 8000 9400
# Healthy when the API's /healthz or (for a worker) the metrics endpoint answers 200.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as r\ndef ok(u):\n    try:\n        return r.urlopen(u, timeout=2).status == 200\n    except OSError:\n        return False\ne = os.environ.get\nsys.exit(0 if ok('http://127.0.0.1:%s/healthz' % e('LDIT_PORT', '8000')) or ok('http://127.0.0.1:%s/metrics' % e('LDIT_METRICS_PORT', '9400')) else 1)"]
# Default: the all-in-one local mode (embedded Redis, CPU, demo model) on port 8000.
CMD ["python", "-m", "service"]

# ---------------------------------------------------------------------------------------------
# gpu: the GPU runtime. The NGC image already carries CUDA, torch and TensorRT (Python 3.12):
# pin the torch and tensorrt it ships so that installing the project never replaces them.
# 25.01 ships CUDA 12.8 and TensorRT 10.8: the gpu extra pins onnxruntime-gpu 1.21, the
# release built against TensorRT 10.8 and CUDA 12.x. The default backend is the GPU path that
# scripts/gpu_check.sh has verified (torch, fp16 with a float32 residual stream, CUDA graphs,
# compiled blocks; docs/benchmarks.md); TensorRT
# is LDIT_BACKEND=tensorrt LDIT_PRECISION=fp16.
FROM nvcr.io/nvidia/pytorch:25.01-py3 AS gpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    LDIT_HOST=0.0.0.0 \
    LDIT_PORT=8000 \
    LDIT_MODEL_DIR=/app/checkpoints/demo \
    LDIT_ENGINE_DIR=/engines \
    LDIT_BACKEND=torch \
    LDIT_PRECISION=fp16 \
    LDIT_CUDA_GRAPHS=true \
    LDIT_COMPILE=true \
    LDIT_DEVICE=cuda
COPY --from=wheel /wheels /wheels
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The project's wheel is a local file (a requirements line naming it); torch and tensorrt are
# held at the base image's versions by a constraints file written from what is installed.
# onnxruntime (a base dependency) and onnxruntime-gpu (the gpu extra) share one module
# directory: drop the CPU one, then lay onnxruntime-gpu's files again so the CUDA build wins.
RUN python -c "import importlib.metadata as m; print('\n'.join(f'{d}=={m.version(d)}' for d in ('torch', 'tensorrt')))" > /tmp/keep-base.txt \
    && echo "lightningdit-serve[gpu] @ file://$(ls /wheels/*.whl)" > /tmp/project.txt \
    && pip install --no-cache-dir --constraint /tmp/keep-base.txt --requirement /tmp/project.txt \
    && python -c "import importlib.metadata as m; print('onnxruntime-gpu==' + m.version('onnxruntime-gpu'))" > /tmp/ort-gpu.txt \
    && pip uninstall --yes onnxruntime \
    && pip install --no-cache-dir --no-deps --force-reinstall --requirement /tmp/ort-gpu.txt \
    && rm -rf /wheels /tmp/keep-base.txt /tmp/project.txt /tmp/ort-gpu.txt \
    && groupadd --system --gid 10001 ldit \
    && useradd --system --uid 10001 --gid ldit --home-dir /app --shell /usr/sbin/nologin ldit \
    && mkdir -p /app /engines /models \
    && chown ldit:ldit /engines
WORKDIR /app
COPY --chown=root:root build_engine.py ./
COPY --chown=root:root checkpoints/demo/ checkpoints/demo/
VOLUME ["/engines", "/models"]
USER 10001:10001
EXPOSE 8000 9400
# Healthy when the API's /healthz or (for a worker) the metrics endpoint answers 200.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as r\ndef ok(u):\n    try:\n        return r.urlopen(u, timeout=2).status == 200\n    except OSError:\n        return False\ne = os.environ.get\nsys.exit(0 if ok('http://127.0.0.1:%s/healthz' % e('LDIT_PORT', '8000')) or ok('http://127.0.0.1:%s/metrics' % e('LDIT_METRICS_PORT', '9400')) else 1)"]
# The NGC entrypoint (banner, CUDA checks) stays; the command picks the process.
CMD ["python", "-m", "service", "worker"]
