"""Argument groups the torch-side commands share (export, reference, calibration)."""

from __future__ import annotations

import argparse


def model_options() -> argparse.ArgumentParser:
    from export.families import ALIASES  # the families' own aliases (this imports torch)

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--model",
        required=True,
        help=f"demo, an alias ({', '.join(sorted(ALIASES))}), a checkpoint directory in the Hugging Face "
        "layout, or a repo id already in the local Hugging Face cache (nothing is downloaded)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the checkpoint's own Python code to run (off by default)",
    )
    return parser
