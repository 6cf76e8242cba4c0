#!/usr/bin/env bash
# Install everything needed (scripts/setup.sh), then lint and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# two workers, each taking whole test files (a file's module fixtures are built once): about 8 min
# on 2 cores instead of 14; the session fixtures (tiny bundles) are built by each worker that uses them
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
