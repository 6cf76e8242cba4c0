"""Deprecated module path, kept until 0.3: import from `dyvte_rt` (or `dyvte_rt.api.model`)."""

import warnings

from dyvte_rt.api.answer import Answer, Generation  # noqa: F401
from dyvte_rt.api.model import DyvteModel  # noqa: F401

warnings.warn(
    "dyvte_rt.model is deprecated and goes in 0.3; import from dyvte_rt instead",
    DeprecationWarning,
    stacklevel=2,
)
