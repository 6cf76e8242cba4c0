"""Deprecated module path, kept until 0.3: import from `dyvte_rt` (or `dyvte_rt.bundle.locations`)."""

import warnings

from dyvte_rt.bundle.locations import default_bundle, demo_bundle_dir, resolve_bundle  # noqa: F401

warnings.warn(
    "dyvte_rt.locations is deprecated and goes in 0.3; import from dyvte_rt instead",
    DeprecationWarning,
    stacklevel=2,
)
