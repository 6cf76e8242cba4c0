"""Write routers that exit at a chosen layer, for benchmarking models without trained routers.

    python benchmarks/constant_routers.py --model runs/llava-7b-slice-4 --fire-at 1 --width 2048 \\
        --out runs/slice4-routers.safetensors

The routers have the real shape (2d -> width -> 2) and cost, but ignore their input, so a bench of
policy `router` measures the router's and the switch's overhead with the exit where it is wanted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.build import parse_exit_layers
from export.loading import inspect_checkpoint
from export.reference.routers import constant_routers


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--fire-at", type=int, required=True, help="the layer the routers exit after")
    parser.add_argument("--width", type=int, default=2048, help="router width (the paper's: 2048)")
    parser.add_argument("--exit-layers", default=None, help="candidate layers (default: 1..L-2)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    checkpoint = inspect_checkpoint(args.model)
    layers = parse_exit_layers(args.exit_layers, checkpoint.num_layers)
    hidden = checkpoint.config["text_config"]["hidden_size"]
    bank = constant_routers(hidden, layers, args.fire_at, width=args.width)
    bank.save(args.out)
    print(f"wrote {args.out}: {len(layers)} routers, width {args.width}, exit after layer {args.fire_at}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
