"""`dyvte-rt macs`: the theoretical prefill saving of an exit and a prune (docs/compute.md)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from dyvte_rt.cli.commandline import HelpFormatter, use_config_defaults
from dyvte_rt.cli.options import bundle_options, json_option
from dyvte_rt.errors import InputError
from dyvte_rt.families.presets import PRESETS
from dyvte_rt.runtime.compute import DecoderDims, prefill_macs
from dyvte_rt.runtime.prune import parse_prune


@dataclass(frozen=True, kw_only=True)
class MacsConfig:
    bundle: Path | None = None  # take the sizes from this bundle
    hidden: int | None = None
    kv_width: int | None = None
    mlp: int | None = None
    layers: int | None = None
    visual: int | None = None
    family: str = "llava"  # the family's 7B preset's sizes (dyvte_rt/families/presets.py), without --bundle
    image: str | None = None  # WIDTHxHEIGHT: some families' visual-token counts depend on it
    text: int = 60
    exit_layer: int | None = None
    prune: str = "none"
    as_json: bool = False


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "macs",
        help="theoretical prefill multiply-adds with and without an exit",
        description="Prefill multiply-adds of a decoder with and without a visual-token exit, counted as in "
        "docs/compute.md. Sizes come from --bundle when given, else from the 7B checkpoint of --family ("
        + "; ".join(f"{name}: {p.name}" for name, p in PRESETS.items())
        + "); any size flag overrides them.",
        formatter_class=HelpFormatter,
        parents=[bundle_options(), json_option()],
    )
    parser.add_argument("--hidden", type=int, help="hidden size d")
    parser.add_argument("--kv-width", type=int, help="num_kv_heads * head_dim (default: the hidden size)")
    parser.add_argument("--mlp", type=int, help="SwiGLU intermediate size m")
    parser.add_argument("--layers", type=int, help="decoder layers L")
    parser.add_argument("--visual", type=int, help="visual tokens V (overrides --image)")
    parser.add_argument(
        "--family",
        choices=sorted(PRESETS),
        help="whose 7B sizes to count without --bundle",
    )
    parser.add_argument(
        "--image",
        metavar="WxH",
        help="image size, for families whose visual-token count depends on it, e.g. 672x672 (default: "
        "the family's typical image where it has one, else the most visual tokens an image can take)",
    )
    parser.add_argument("--text", type=int, help="text tokens")
    parser.add_argument(
        "--exit-layer", type=int, metavar="K", help="exit after layer K (0-indexed; default: none)"
    )
    parser.add_argument(
        "--prune",
        metavar="SPEC",
        help="also prune: fastv:K:R or dart:K:R[:P] keep V - round(R*V) visual tokens after layer K "
        "(-1: before layer 0); an exit at or before K leaves nothing to prune (default: none)",
    )
    use_config_defaults(parser, MacsConfig)
    parser.set_defaults(make_config=make_config, run=run)


def make_config(args: argparse.Namespace) -> MacsConfig:
    names = set(MacsConfig.__dataclass_fields__)
    return MacsConfig(**{k: v for k, v in vars(args).items() if k in names})


def sizes(config: MacsConfig) -> dict[str, int]:
    """Bundle (or --family's preset's) sizes, overridden by the flags given."""
    if config.bundle is not None:
        from dyvte_rt.bundle.manifest import load_manifest
        from dyvte_rt.families import family_for

        manifest = load_manifest(config.bundle, verify_hashes=False)
        dims, family, typical = manifest.dims, family_for(manifest), None
    elif config.family in PRESETS:
        preset = PRESETS[config.family]
        dims, family, typical = preset.dims, preset.family_object(), preset.typical_image
    else:
        raise InputError(f"unknown --family {config.family!r}", hint=f"choose one of {', '.join(PRESETS)}")
    base = {
        "hidden": dims.hidden,
        "kv_width": dims.num_kv_heads * dims.head_dim,
        "mlp": dims.mlp,
        "layers": dims.num_layers,
        "visual": family.vision.visual_tokens,  # the most an image can take
    }
    image = image_size(config.image) if config.image is not None else typical
    if image is not None:
        width, height = image
        base["visual"] = family.visual_tokens(height, width)
    for key in base:
        if getattr(config, key) is not None:
            base[key] = getattr(config, key)
    if config.kv_width is None and config.hidden is not None and config.bundle is None:
        base["kv_width"] = base["hidden"]
    return base


def image_size(text: str) -> tuple[int, int]:
    """'672x672' -> (width, height)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--image must be WIDTHxHEIGHT, e.g. 672x672, got {text!r}") from None
    if width < 1 or height < 1:
        raise InputError(f"--image must be positive, got {text!r}")
    return width, height


def run(config: MacsConfig) -> int:
    size = sizes(config)
    if (
        min(size["hidden"], size["mlp"], size["layers"], size["kv_width"]) < 1
        or min(size["visual"], config.text) < 0
    ):
        raise InputError("sizes must be positive and token counts non-negative")
    if config.exit_layer is not None and not 0 <= config.exit_layer < size["layers"]:
        raise InputError(f"--exit-layer must lie in 0..{size['layers'] - 1}, got {config.exit_layer}")
    prune = parse_prune(config.prune)
    if prune.active and prune.layer >= size["layers"] - 1:
        raise InputError(f"--prune {prune.spec()}: pruning needs a layer after layer {prune.layer}")
    dims = DecoderDims(size["hidden"], size["kv_width"], size["mlp"], size["layers"])
    pruned = (
        prune.active and size["visual"] > 0 and (config.exit_layer is None or config.exit_layer > prune.layer)
    )
    kept = prune.keep(size["visual"]) if pruned else None
    macs = prefill_macs(
        dims,
        size["visual"] + config.text,
        size["visual"],
        config.exit_layer,
        prune.layer if pruned else None,
        kept,
    )
    if config.as_json:
        print(
            json.dumps(
                {
                    **size,
                    "text": config.text,
                    "image": config.image,
                    "exit_layer": config.exit_layer,
                    "prune": prune.spec(),
                    "visual_tokens_kept": kept if kept is not None else size["visual"],
                    "full": macs.full,
                    "actual": macs.actual,
                    "saved_fraction": macs.saved_fraction,
                    "theoretical_speedup": macs.full / macs.actual,
                }
            )
        )
        return 0
    image = f" for a {config.image} image" if config.image else ""
    print(f"{size['visual']} visual tokens{image} and {config.text} text tokens, {size['layers']} layers")
    saving = "with exit" + (" and prune" if kept is not None else "")
    if kept is not None:
        print(f"{prune.spec()} keeps {kept} of {size['visual']} visual tokens after layer {prune.layer}")
    print(
        f"prefill multiply-adds: full {macs.full / 1e12:.3f} T, {saving} {macs.actual / 1e12:.3f} T "
        f"({100 * macs.saved_fraction:.1f}% saved, {macs.full / macs.actual:.2f}x theoretical speed-up)"
    )
    return 0
