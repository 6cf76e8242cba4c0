"""What every entry point shares: exit codes, error handling, help formatting, defaults.

Each command parses its arguments into a frozen config dataclass and calls a library function.
The dataclass holds the only copy of the defaults (`use_config_defaults` hands them to argparse, so
`--help` shows them), and `run_command` turns what can go wrong into one line and an exit code:

    0 ok · 1 error (bad input, bad bundle, runtime failure) · 2 usage error (argparse)
    · 130 interrupted (Ctrl-C) · 141 the reader of stdout went away (`... | head`)

One CPython quirk: when Ctrl-C lands inside a string `exec` (a dataclass being created while a
module imports, say), the interpreter remembers it and ends the process by SIGINT itself even
though `run_command` caught it. A shell reports that as 130 too; a parent process sees -2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

from dyvte_rt.errors import DyvteError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # what argparse exits with
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when it says something: not for None, False, a flag (`--load-all`
    storing False into a default-True field would read "default: True") or help that names one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        flag = action.nargs == 0
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        quiet = flag or unset
        if quiet or "default" in text:
            return text
        return super()._get_help_string(action)


def new_parser(
    prog: str, description: str, parents: list[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter, parents=list(parents)
    )


def use_config_defaults(parser: argparse.ArgumentParser, config: type) -> None:
    """Take every argument's default from the config dataclass's field of the same name."""
    defaults = {}
    for field in dataclasses.fields(config):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    known = {action.dest for action in parser._actions}
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in known})


def config_from(config: type, namespace: argparse.Namespace, **extra: object):
    """The config dataclass built from parsed arguments (names that are not fields are ignored)."""
    names = {field.name for field in dataclasses.fields(config)}
    values = {k: v for k, v in vars(namespace).items() if k in names}
    return config(**values, **extra)


def run_command(body: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run a command's body; print user errors as one line and map everything to an exit code.

    argparse's own usage errors (exit 2) pass through untouched. Anything else escaping is a bug
    in dyvte-rt and keeps its traceback.
    """
    try:
        code = body()
        sys.stdout.flush()
        return EXIT_OK if code is None else code
    except DyvteError as err:
        _finish_progress_bars()
        print(f"error: {err.one_line()}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _finish_progress_bars()
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as err:  # an optional extra a lazy import found missing after all
        from dyvte_rt.cli.extras import extra_of

        extra = extra_of(err.name)
        if extra is None:
            raise
        _finish_progress_bars()
        print(f"error: {err.name} is not installed (hint: pip install 'dyvte-rt[{extra}]')", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # the reader left early (`dyvte-rt inspect | head`): stop quietly, as a unix filter does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _finish_progress_bars() -> None:
    """Close the progress bars still open, so the last line printed is a line of its own (Ctrl-C can
    arrive in the middle of a bar's redraw)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        if not hasattr(bar, "last_print_t") and getattr(bar, "sp", None) is not None:
            # interrupted while drawing itself the first time: tqdm's close() would leave that line open
            bar.fp.write("\n")
        bar.close()
