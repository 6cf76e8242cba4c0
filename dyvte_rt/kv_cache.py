"""Per-layer numpy KV cache for the runtime; layers hold different lengths after an exit."""

from __future__ import annotations

import numpy as np

from dyvte_rt.io_names import past_name, present_name
from dyvte_rt.manifest import Dims


class KVCache:
    def __init__(self, dims: Dims, batch: int, dtype: np.dtype) -> None:
        empty = np.zeros((batch, dims.num_kv_heads, 0, dims.head_dim), dtype=dtype)  # [B, H_kv, 0, hd]
        self.keys: list[np.ndarray] = [empty] * dims.num_layers
        self.values: list[np.ndarray] = [empty] * dims.num_layers

    def past_feeds(self, layers: range) -> dict[str, np.ndarray]:
        feeds = {}
        for layer in layers:
            feeds[past_name(layer, "key")] = self.keys[layer]
            feeds[past_name(layer, "value")] = self.values[layer]
        return feeds

    def update(self, layers: range, outputs: dict[str, np.ndarray]) -> None:
        """Take a segment's present keys/values ([B, H_kv, P+S, hd]) as the new past."""
        for layer in layers:
            self.keys[layer] = outputs[present_name(layer, "key")]
            self.values[layer] = outputs[present_name(layer, "value")]

    def lengths(self) -> list[int]:
        return [k.shape[2] for k in self.keys]

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values, strict=True))
