"""`dyvte-rt`: the subcommands under one parser."""

from __future__ import annotations

import argparse

from dyvte_rt import __version__
from dyvte_rt.cli import bench, build_engines, chat, evaluate, infer, inspect, macs, serve
from dyvte_rt.cli.commandline import HelpFormatter, run_command

SUBCOMMANDS = (infer, chat, serve, evaluate, bench, inspect, macs, build_engines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dyvte-rt",
        description="Run multimodal LLM bundles with Dynamic Visual-Token Exit (DyVTE). Exit status: 0 ok, "
        "1 error (bad input, bad bundle, runtime failure), 2 usage error, 130 interrupted.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dyvte-rt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        return args.run(args.make_config(args))

    return run_command(body)
