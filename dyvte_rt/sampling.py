"""Deprecated module path, kept until 0.3: import from `dyvte_rt` (or `dyvte_rt.runtime.sampling`)."""

import warnings

from dyvte_rt.runtime.sampling import Sampler, SamplingConfig  # noqa: F401

warnings.warn(
    "dyvte_rt.sampling is deprecated and goes in 0.3; import from dyvte_rt instead",
    DeprecationWarning,
    stacklevel=2,
)
