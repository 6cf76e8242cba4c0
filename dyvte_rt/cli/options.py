"""Argument groups several `dyvte-rt` subcommands share, as argparse parent parsers.

Each function returns a fresh parser: argparse shares the Action objects of a parent with every
child, so one parent object must not serve two subcommands whose defaults differ. Defaults are not
set here; each subcommand takes them from its config dataclass (`use_config_defaults`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dyvte_rt.bundle.locations import BUNDLE_ENV
from engines import DEVICES


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def bundle_options() -> argparse.ArgumentParser:
    parser = _parent()
    parser.add_argument(
        "--bundle",
        type=Path,
        metavar="DIR",
        help=f"bundle directory (default: ${BUNDLE_ENV}, else the demo bundle the quickstart exported)",
    )
    return parser


def device_options(threads: bool = True) -> argparse.ArgumentParser:
    parser = _parent()
    parser.add_argument("--device", choices=DEVICES, help="where the graphs run")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        help="the precision you expect; a bundle exported for another is refused (default: the "
        "bundle's, except that fp16 on --device cpu must be asked for)",
    )
    if threads:
        parser.add_argument(
            "--threads",
            type=int,
            metavar="N",
            help="intra-op threads; 0 chooses: one for models narrower than 1024, else one per core",
        )
        parser.add_argument(
            "--spin",
            action="store_true",
            help="let idle ONNX Runtime threads spin-wait between runs: lower latency where cores are "
            "to spare, much slower decoding where they are not",
        )
    return parser


PRUNE_HELP = (
    "visual-token pruning with the exit: none, fastv:K:R (after layer K, keep the visual tokens the last "
    "prompt token attends to most) or dart:K:R[:P] (after layer K, -1 = the input embeddings, keep P "
    "pivots and the tokens least like them); R is the fraction removed (default: the bundle's, none)"
)


def exit_options() -> argparse.ArgumentParser:
    parser = _parent()
    parser.add_argument(
        "--exit", metavar="POLICY", help="exit policy: router, never or layer:K (default: the bundle's)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="router p(exit) threshold in [0, 1] (default: the bundle's)",
    )
    parser.add_argument("--prune", metavar="SPEC", help=PRUNE_HELP)
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="most tokens to generate")
    return parser


def sampling_options() -> argparse.ArgumentParser:
    parser = _parent()
    parser.add_argument("--temperature", type=float, metavar="T", help="0 decodes greedily")
    parser.add_argument(
        "--top-k", type=int, metavar="K", help="sample from the k most likely tokens; 0 keeps all"
    )
    parser.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass; 1 turns it off")
    parser.add_argument(
        "--seed", type=int, metavar="N", help="random seed for sampling (default: a fresh one)"
    )
    return parser


def json_option() -> argparse.ArgumentParser:
    parser = _parent()
    parser.add_argument(
        "--json", dest="as_json", action="store_true", help="print one JSON object instead of text"
    )
    return parser
