#!/usr/bin/env bash
# Create .venv (if missing) and install dyvte-rt with the CPU runtime and its export, calibrate,
# serve, ray and dev extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# CPU torch first: a bare torch requirement can pull a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[cpu,export,calibrate,serve,ray,dev]"
