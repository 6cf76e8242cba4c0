"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json


def eval_json(capsys, bundle, data, *options: str) -> dict:
    """`dyvte-rt eval --json` in-process; asserts exit code 0 and returns the report."""
    from dyvte_rt.cli import main as cli_main

    assert cli_main(["eval", "--bundle", str(bundle), "--data", str(data), "--json", *options]) == 0
    return json.loads(capsys.readouterr().out)
