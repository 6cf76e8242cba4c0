"""The `dyvte-rt` command line: one module per subcommand, each a config, a parser and a `run`
(`dyvte_rt.cli.commands` puts them together; `dyvte_rt.cli.commandline` holds what every entry point
of the project shares)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The `dyvte-rt` console script."""
    from dyvte_rt.cli.commands import main as run

    return run(argv)
