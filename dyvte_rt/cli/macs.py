"""`dyvte-rt macs`: the theoretical prefill saving of an exit (docs/compute.md)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from dyvte_rt.bundle.manifest import AnyResInfo, PatchGridInfo
from dyvte_rt.cli.commandline import HelpFormatter, use_config_defaults
from dyvte_rt.cli.options import bundle_options, json_option
from dyvte_rt.errors import InputError
from dyvte_rt.families import qwen2_vl as patch_grid
from dyvte_rt.families.llava_next import most_visual_tokens
from dyvte_rt.families.llava_next import visual_tokens as anyres_visual_tokens
from dyvte_rt.runtime.compute import DecoderDims, prefill_macs

# LLaVA-1.5-7B, the default when neither --bundle nor sizes are given
LLAVA_7B = {"hidden": 4096, "kv_width": 4096, "mlp": 11008, "layers": 32, "visual": 576}
# LLaVA-NeXT-7B (Vicuna): LLaVA-1.5-7B's decoder; images tiled on five canvases of 336-pixel tiles
LLAVA_NEXT_TILING = AnyResInfo(
    grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    tile_size=336,
    feature_side=24,
    newline=True,
)
# Qwen2.5-VL-7B: 28 layers, hidden 3584, 4 KV heads of 128, SwiGLU 18944; its processor's budget
QWEN25_VL_GRID = PatchGridInfo(
    patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=3136, max_pixels=12845056, window_size=112
)
QWEN25_VL_7B = {"hidden": 3584, "kv_width": 512, "mlp": 18944, "layers": 28}
QWEN25_VL_7B["visual"] = patch_grid.visual_tokens(
    patch_grid.grid_for(720, 1280, QWEN25_VL_GRID), QWEN25_VL_GRID
)
# name -> (sizes, any-res tiling, patch grid)
FAMILIES = {
    "llava": (LLAVA_7B, None, None),
    "llava-next": (LLAVA_7B, LLAVA_NEXT_TILING, None),
    "qwen2.5-vl": (QWEN25_VL_7B, None, QWEN25_VL_GRID),
}


@dataclass(frozen=True, kw_only=True)
class MacsConfig:
    bundle: Path | None = None  # take the sizes from this bundle
    hidden: int | None = None
    kv_width: int | None = None
    mlp: int | None = None
    layers: int | None = None
    visual: int | None = None
    family: str = "llava"  # LLaVA-1.5-7B, LLaVA-NeXT-7B or Qwen2.5-VL-7B sizes, where no --bundle is given
    image: str | None = None  # WIDTHxHEIGHT: LLaVA-NeXT's and Qwen2-VL's visual tokens depend on it
    text: int = 60
    exit_layer: int | None = None
    as_json: bool = False


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "macs",
        help="theoretical prefill multiply-adds with and without an exit",
        description="Prefill multiply-adds of a decoder with and without a visual-token exit, counted as in "
        "docs/compute.md. Sizes come from --bundle when given, else from LLaVA-1.5-7B (hidden 4096, 32 "
        "layers, SwiGLU 11008, 576 visual tokens) or, with --family llava-next, LLaVA-NeXT-7B (the same "
        "decoder; 2,000-2,900 visual tokens, from --image) or, with --family qwen2.5-vl, Qwen2.5-VL-7B; "
        "any size flag overrides either.",
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
        choices=sorted(FAMILIES),
        help="model sizes without --bundle: llava (LLaVA-1.5-7B, default), llava-next (LLaVA-NeXT-7B) or "
        "qwen2.5-vl (Qwen2.5-VL-7B)",
    )
    parser.add_argument(
        "--image",
        metavar="WxH",
        help="image size for models whose visual-token count depends on it (LLaVA-NeXT, Qwen2-VL), e.g. "
        "672x672 (default: the largest count any LLaVA-NeXT image can take; a 1280x720 image for qwen2.5-vl)",
    )
    parser.add_argument("--text", type=int, help="text tokens")
    parser.add_argument(
        "--exit-layer", type=int, metavar="K", help="exit after layer K (0-indexed; default: none)"
    )
    use_config_defaults(parser, MacsConfig)
    parser.set_defaults(make_config=make_config, run=run)


def make_config(args: argparse.Namespace) -> MacsConfig:
    names = set(MacsConfig.__dataclass_fields__)
    return MacsConfig(**{k: v for k, v in vars(args).items() if k in names})


def sizes(config: MacsConfig) -> dict[str, int]:
    """Bundle (or --family's) sizes, overridden by the flags given."""
    if config.family not in FAMILIES:
        raise InputError(f"unknown --family {config.family!r}", hint=f"choose one of {', '.join(FAMILIES)}")
    defaults, tiling, grid = FAMILIES[config.family]
    base = dict(defaults)
    if tiling is not None:
        base["visual"] = most_visual_tokens(tiling)
    if config.bundle is not None:
        from dyvte_rt.bundle.manifest import load_manifest

        m = load_manifest(config.bundle, verify_hashes=False)
        tiling, grid = m.vision.anyres, m.vision.patch_grid
        base = {
            "hidden": m.dims.hidden,
            "kv_width": m.dims.num_kv_heads * m.dims.head_dim,
            "mlp": m.dims.mlp,
            "layers": m.dims.num_layers,
            "visual": m.vision.visual_tokens,
        }
    if config.image is not None and (tiling is not None or grid is not None):
        width, height = image_size(config.image)
        base["visual"] = (
            anyres_visual_tokens(height, width, tiling)
            if tiling is not None
            else patch_grid.visual_tokens(patch_grid.grid_for(height, width, grid), grid)
        )
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
    dims = DecoderDims(size["hidden"], size["kv_width"], size["mlp"], size["layers"])
    macs = prefill_macs(dims, size["visual"] + config.text, size["visual"], config.exit_layer)
    if config.as_json:
        print(
            json.dumps(
                {
                    **size,
                    "text": config.text,
                    "image": config.image,
                    "exit_layer": config.exit_layer,
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
    print(
        f"prefill multiply-adds: full {macs.full / 1e12:.3f} T, with exit {macs.actual / 1e12:.3f} T "
        f"({100 * macs.saved_fraction:.1f}% saved, {macs.full / macs.actual:.2f}x theoretical speed-up)"
    )
    return 0
