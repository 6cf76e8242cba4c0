"""`python -m calibrate.fixed_layer`: a training-free exit layer (the VTW recipe).

Picks the earliest candidate layer K at which removing the visual tokens changes the first
answer token's distribution by at most --max-kl (mean KL divergence from the full model over the
calibration set), and records `layer:K` as a bundle's default policy with --bundle.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from dyvte_rt.cli.commandline import config_from, new_parser, run_command, use_config_defaults
from dyvte_rt.cli.extras import require
from dyvte_rt.errors import InputError
from export.cli_options import model_options


def pick_layer(mean_kl: dict[int, float], max_kl: float) -> int | None:
    """Earliest layer whose mean KL — and every later layer's — stays within max_kl."""
    layers = sorted(mean_kl)
    for i, k in enumerate(layers):
        if all(mean_kl[j] <= max_kl for j in layers[i:]):
            return k
    return None


def record_default_policy(bundle: Path, layer: int) -> None:
    """Rewrite the bundle's manifest atomically with `layer:K` as its default policy."""
    from dyvte_rt.bundle.manifest import load_manifest, write_manifest

    manifest = load_manifest(bundle, verify_hashes=False)
    if layer not in manifest.exit.candidate_layers:
        raise InputError(
            f"layer {layer} is not an exit layer of {bundle} ({list(manifest.exit.candidate_layers)})",
            hint="re-export the bundle with --exit-layers including it",
        )
    write_manifest(bundle, replace(manifest, exit=replace(manifest.exit, default_policy=f"layer:{layer}")))


@dataclass(frozen=True)
class FixedLayerConfig:
    model: str
    data: Path
    image_root: Path | None = None
    max_kl: float = 0.05
    exit_layers: str | None = None  # None: 1..L-2
    limit: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    bundle: Path | None = None  # record layer:K as this bundle's default policy
    trust_remote_code: bool = False


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "python -m calibrate.fixed_layer",
        "Choose one exit layer for a model from KL divergences on a calibration set (VTW), and optionally "
        "record it as a bundle's default policy.",
        parents=[model_options()],
    )
    parser.add_argument("--data", type=Path, required=True, help="data.jsonl or LLaVA conversation JSON")
    parser.add_argument("--image-root", type=Path, metavar="DIR", help="folder of the LLaVA JSON's images")
    parser.add_argument("--max-kl", type=float, help="largest mean KL (nats) accepted")
    parser.add_argument("--exit-layers", metavar="LAYERS", help="candidate layers (default: 1..L-2)")
    parser.add_argument("--limit", type=int, metavar="N", help="use the first N samples only")
    parser.add_argument("--device", help="torch device: cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="precision the model runs in")
    parser.add_argument(
        "--bundle", type=Path, metavar="DIR", help="record layer:K as this bundle's default policy"
    )
    use_config_defaults(parser, FixedLayerConfig)
    return parser


def parse_args(argv: list[str] | None) -> FixedLayerConfig:
    return config_from(FixedLayerConfig, build_parser().parse_args(argv))


def choose_fixed_layer(config: FixedLayerConfig) -> dict:
    from calibrate.collect import collect
    from dyvte_rt.inputs.datasets import read_examples
    from export.build import parse_exit_layers
    from export.loading import inspect_checkpoint, load_checkpoint

    checkpoint = inspect_checkpoint(config.model)
    layers = parse_exit_layers(config.exit_layers, checkpoint.num_layers)
    examples = read_examples(config.data, config.image_root, config.limit)
    loaded = load_checkpoint(checkpoint, config.dtype, config.device, config.trust_remote_code)
    data = collect(loaded, examples, layers, config.device)
    mean_kl = {k: float(data.kl_first[:, i].mean()) for i, k in enumerate(layers)}
    return {"mean_kl": mean_kl, "layer": pick_layer(mean_kl, config.max_kl)}


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        require("export", "python -m calibrate.fixed_layer")
        config = parse_args(argv)
        chosen = choose_fixed_layer(config)
        layer = chosen["layer"]
        mean_kl = {str(k): round(v, 5) for k, v in chosen["mean_kl"].items()}
        print(json.dumps({"mean_kl": mean_kl, "layer": layer}, indent=2))
        if layer is None:
            raise InputError(
                f"no candidate layer keeps the mean KL within {config.max_kl}",
                hint="raise --max-kl or use policy 'never'",
            )
        if config.bundle is not None:
            record_default_policy(config.bundle, layer)
            print(f"recorded default policy layer:{layer} in {config.bundle}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
