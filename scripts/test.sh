#!/usr/bin/env bash
# Install everything needed (scripts/setup.sh), then lint and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# headless Chromium and its driver for the web page's browser test (tests/dyvte_rt/test_web_page.py)
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    packages=(chromium chromium-driver)
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null \
        || { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; }
fi
.venv/bin/ruff check .
# two workers, each taking whole test files (a file's module fixtures are built once): about 19 min
# on 2 cores from a fresh clone; checkpoints and bundles are built once and shared by both workers
# (tests/artefacts.py), later runs of the same code reuse them from .pytest_cache/
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
