#!/usr/bin/env bash
# The main job on a fresh machine: install, build a tiny LLaVA checkpoint, and answer a question
# about the bundled example image with each exit policy (PyTorch reference).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
checkpoint=runs/tiny-llava
[ -f "$checkpoint/config.json" ] || .venv/bin/python -m export.tiny_models --backbone llama-gqa --out "$checkpoint"
for policy in never layer:2 layer:0; do
  .venv/bin/python -m export.reference --model "$checkpoint" --image examples/shapes.png \
    --question "what color is the circle?" --exit "$policy" --max-new-tokens 8
done
