"""The `dyvte-rt` command line.

Subcommands parse their arguments into a frozen config, call a library function, and print
user mistakes (`DyvteError`) as one line with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from dyvte_rt import __version__
from dyvte_rt.compute import DecoderDims, prefill_macs
from dyvte_rt.errors import DyvteError, InputError


@dataclass(frozen=True)
class MacsConfig:
    hidden: int
    kv_width: int | None
    mlp: int
    layers: int
    visual: int
    text: int
    exit_layer: int | None


def run_macs(config: MacsConfig) -> str:
    if config.exit_layer is not None and not 0 <= config.exit_layer < config.layers:
        raise InputError(f"--exit-layer must lie in 0..{config.layers - 1}, got {config.exit_layer}")
    if min(config.hidden, config.mlp, config.layers) < 1 or min(config.visual, config.text) < 0:
        raise InputError("sizes must be positive and token counts non-negative")
    dims = DecoderDims(config.hidden, config.kv_width or config.hidden, config.mlp, config.layers)
    macs = prefill_macs(dims, config.visual + config.text, config.visual, config.exit_layer)
    return (
        f"prefill multiply-adds: full {macs.full / 1e12:.3f} T, with exit {macs.actual / 1e12:.3f} T "
        f"({100 * macs.saved_fraction:.1f}% saved)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dyvte-rt",
        description="Run multimodal LLM bundles with Dynamic Visual-Token Exit (DyVTE).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dyvte-rt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    macs = commands.add_parser(
        "macs",
        help="theoretical prefill multiply-adds with and without an exit (DESIGN §7)",
        description="Prefill multiply-adds of a decoder with and without a visual-token exit. "
        "Defaults are LLaVA-1.5-7B with 576 visual and 60 text tokens.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    macs.add_argument("--hidden", type=int, default=4096, help="hidden size d")
    macs.add_argument("--kv-width", type=int, default=None, help="num_kv_heads * head_dim (default: d)")
    macs.add_argument("--mlp", type=int, default=11008, help="SwiGLU intermediate size m")
    macs.add_argument("--layers", type=int, default=32, help="decoder layers L")
    macs.add_argument("--visual", type=int, default=576, help="visual tokens V")
    macs.add_argument("--text", type=int, default=60, help="text tokens")
    macs.add_argument("--exit-layer", type=int, default=None, help="exit after this layer (0-indexed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    try:
        if command == "macs":
            print(run_macs(MacsConfig(**args)))
    except DyvteError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
