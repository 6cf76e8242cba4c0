"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json


def routers_firing_at(hidden: int, layers, fire_at: int, p_exit: float = 0.99):
    """A RouterBank whose routers ignore their input: p(exit) = p_exit at `fire_at`, 1 - p_exit elsewhere."""
    from export.reference.routers import constant_routers

    return constant_routers(hidden, layers, fire_at, width=4, p_exit=p_exit)


def eval_json(capsys, bundle, data, *options: str) -> dict:
    """`dyvte-rt eval --json` in-process; asserts exit code 0 and returns the report."""
    from dyvte_rt.cli import main as cli_main

    assert cli_main(["eval", "--bundle", str(bundle), "--data", str(data), "--json", *options]) == 0
    return json.loads(capsys.readouterr().out)
