"""Where the runtime looks for a bundle when none is named."""

from __future__ import annotations

import os
from pathlib import Path

from dyvte_rt.errors import InputError

BUNDLE_ENV = "DYVTE_RT_BUNDLE"  # the default --bundle


def demo_bundle_dir() -> Path:
    """Where the quickstart exports the demo bundle: $XDG_CACHE_HOME/dyvte-rt/demo-bundle."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "dyvte-rt" / "demo-bundle"


def default_bundle() -> Path | None:
    """$DYVTE_RT_BUNDLE, else the exported demo bundle if there is one."""
    value = os.environ.get(BUNDLE_ENV)
    if value:
        return Path(value)
    demo = demo_bundle_dir()
    return demo if (demo / "manifest.json").is_file() else None


def resolve_bundle(bundle: Path | None) -> Path:
    """The bundle asked for, else the default one; one clear error when there is none."""
    bundle = bundle or default_bundle()
    if bundle is None:
        raise InputError(
            "no bundle given and no demo bundle exported yet",
            hint=f"pass --bundle DIR, set {BUNDLE_ENV}, or run bash scripts/quickstart.sh",
        )
    return bundle
