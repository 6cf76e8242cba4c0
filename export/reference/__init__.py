"""PyTorch reference of DyVTE (docs/exit-semantics.md): the ground truth the rest is tested against."""

from export.reference.cache import KVCache
from export.reference.model import DyVTEReference, GenerationResult, PrefillResult, merge_image_features
from export.reference.routers import Router, RouterBank, feature_positions, router_features

__all__ = [
    "DyVTEReference",
    "GenerationResult",
    "KVCache",
    "PrefillResult",
    "Router",
    "RouterBank",
    "feature_positions",
    "merge_image_features",
    "router_features",
]
