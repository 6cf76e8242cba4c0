#!/usr/bin/env bash
# The main job on a fresh machine: install, export the bundled demo model to a bundle, and answer
# questions about an example image with the torch-free runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bundle=$(.venv/bin/python -c "from dyvte_rt.bundle.locations import demo_bundle_dir; print(demo_bundle_dir())")
# (re-)export when there is no bundle yet or the shipped weights or routers are newer than it
stale=0
for file in export/demo_checkpoint/model.safetensors export/demo_checkpoint/routers.safetensors; do
  if [ "$file" -nt "$bundle/manifest.json" ]; then stale=1; fi
done
if [ ! -f "$bundle/manifest.json" ] || [ "$stale" = 1 ]; then
  .venv/bin/python -m export.build --model demo --out "$bundle" --overwrite  # with the demo's routers
fi
.venv/bin/dyvte-rt inspect "$bundle" --no-verify
for question in "what color is the shape in the top left?" "what shape is in the top right?" "how many shapes are there?"; do
  printf '%s -> ' "$question"
  .venv/bin/dyvte-rt infer examples/three_shapes.png "$question"
done
echo "the full model (--exit never), then the routers' choice (the bundle's default) as JSON:"
.venv/bin/dyvte-rt infer examples/three_shapes.png "where is the blue shape?" --exit never
.venv/bin/dyvte-rt infer examples/three_shapes.png "where is the blue shape?" --json
