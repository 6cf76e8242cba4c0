"""`python -m calibrate.fixed_layer`: a training-free exit layer (the VTW recipe).

Picks the earliest candidate layer K at which removing the visual tokens changes the first
answer token's distribution by at most --max-kl (mean KL divergence from the full model over the
calibration set), and records `layer:K` as a bundle's default policy with --bundle.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from dyvte_rt.errors import DyvteError, InputError


def pick_layer(mean_kl: dict[int, float], max_kl: float) -> int | None:
    """Earliest layer whose mean KL — and every later layer's — stays within max_kl."""
    layers = sorted(mean_kl)
    for i, k in enumerate(layers):
        if all(mean_kl[j] <= max_kl for j in layers[i:]):
            return k
    return None


def record_default_policy(bundle: Path, layer: int) -> None:
    """Rewrite the bundle's manifest atomically with `layer:K` as its default policy."""
    from dyvte_rt.manifest import MANIFEST_FILE, load_manifest

    manifest = load_manifest(bundle, verify_hashes=False)
    if layer not in manifest.exit.candidate_layers:
        raise InputError(
            f"layer {layer} is not an exit layer of {bundle} ({list(manifest.exit.candidate_layers)})",
            hint="re-export the bundle with --exit-layers including it",
        )
    updated = replace(manifest, exit=replace(manifest.exit, default_policy=f"layer:{layer}"))
    staging = bundle / (MANIFEST_FILE + ".tmp")
    staging.write_text(updated.to_json(), encoding="utf-8")
    staging.replace(bundle / MANIFEST_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m calibrate.fixed_layer",
        description="Choose one exit layer for a model from KL divergences on a calibration set (VTW).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True, help="data.jsonl or LLaVA conversation JSON")
    parser.add_argument("--image-root", type=Path, default=None)
    parser.add_argument("--max-kl", type=float, default=0.05, help="largest mean KL (nats) accepted")
    parser.add_argument("--exit-layers", default=None, help="candidate layers (default: 1..L-2)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument(
        "--bundle", type=Path, default=None, help="record layer:K as this bundle's default policy"
    )
    args = parser.parse_args(argv)
    try:
        from calibrate.collect import collect
        from calibrate.data import read_examples
        from export.build import parse_exit_layers
        from export.loading import inspect_checkpoint, load_checkpoint

        checkpoint = inspect_checkpoint(args.model)
        layers = parse_exit_layers(args.exit_layers, checkpoint.num_layers)
        examples = read_examples(args.data, args.image_root, args.limit)
        loaded = load_checkpoint(checkpoint, args.dtype, args.device)
        data = collect(loaded, examples, layers, args.device)
        mean_kl = {k: float(data.kl_first[:, i].mean()) for i, k in enumerate(layers)}
        layer = pick_layer(mean_kl, args.max_kl)
        print(
            json.dumps(
                {"mean_kl": {str(k): round(v, 5) for k, v in mean_kl.items()}, "layer": layer}, indent=2
            )
        )
        if layer is None:
            raise InputError(
                f"no candidate layer keeps the mean KL within {args.max_kl}",
                hint="raise --max-kl or use policy 'never'",
            )
        if args.bundle is not None:
            record_default_policy(args.bundle, layer)
            print(f"recorded default policy layer:{layer} in {args.bundle}")
    except DyvteError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
