#!/usr/bin/env bash
# The prepared check for a machine with an NVIDIA GPU (benchmarks/gpu_check.py): the PyTorch
# reference at LLaVA-1.5-7B shapes on CUDA, the device-buffer exit copy, and whatever of
# onnxruntime-gpu / TensorRT is installed, in one JSON report ($OUT/gpu_check.json, else
# runs/gpu_check.json). Uses the machine's own python3 with torch; wheels in .whl/ (e.g. the
# transformers version this project pins) are installed to /tmp/site first when present.
# Finishes in a few minutes on an H100/H200; nothing here needs network access.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
PYTHONUNBUFFERED=1 exec python3 benchmarks/gpu_check.py "$@"
