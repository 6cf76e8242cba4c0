#!/usr/bin/env bash
# Install everything needed (scripts/setup.sh), then lint and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# two workers, each taking whole test files (a file's module fixtures are built once): about 10.5 min
# on 2 cores from a fresh clone; checkpoints and bundles are built once and shared by both workers
# (tests/artefacts.py), later runs of the same code reuse them from .pytest_cache/
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
