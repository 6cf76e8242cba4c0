"""The runtime's KV cache: backend-resident keys and values per layer, and how many rows each holds.

Layers hold different lengths after an exit (all N prompt tokens up to the exit layer, the N−V
text tokens after it), so the cache tracks a length per layer and sample. Two flavours, as the
bundle's manifest says:

- `InplaceKVCache`: one buffer per layer and kind, [B, H_kv, capacity, head_dim], allocated once
  per request; the graph writes each step's rows into it (past and present are the same value).
- `ConcatKVCache`: the graph takes the past [B, H_kv, P, head_dim] and returns past + new rows,
  which become the next step's past.

Either way the cache never leaves the backend. `feeds` gives a segment its cache inputs, `outputs`
the values it writes into, and `update` takes the step's outputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from dyvte_rt.bundle import io_names as names
from dyvte_rt.bundle.manifest import Dims
from dyvte_rt.errors import InputError
from engines import Backend, Value


class KVCache(ABC):
    def __init__(self, backend: Backend, dims: Dims, batch: int, dtype: np.dtype) -> None:
        self.backend = backend
        self.dims = dims
        self.dtype = np.dtype(dtype)
        self.lengths = np.zeros((batch, dims.num_layers), dtype=np.int64)  # [B, L] rows held per layer
        # [B] a token's position id minus its index (multimodal rotary positions; 0 otherwise)
        self.position_offsets = np.zeros(batch, dtype=np.int64)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def layer_lengths(self) -> list[int]:
        """Rows held per layer (batch 1)."""
        return self.lengths[0].tolist()

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows start..stop-1 (this flavour has no views: all rows or none)."""
        if (start, stop) != (0, self.batch):
            raise InputError("only the in-place KV flavour holds requests in rows of one cache")
        return self

    def row_bytes(self) -> int:
        """Bytes of one token's keys and values in one layer."""
        return 2 * self.dims.num_kv_heads * self.dims.head_dim * self.dtype.itemsize

    def nbytes(self) -> int:
        """Bytes of the rows held (what a cache of exactly that size would take)."""
        return int(self.lengths.sum()) * self.row_bytes()

    def allocated_bytes(self) -> int:
        """Bytes its buffers take: the rows held, where buffers grow with them (concat)."""
        return self.nbytes()

    @abstractmethod
    def feeds(self, layers: range, new_tokens: int | np.ndarray) -> dict[str, Value | np.ndarray]:
        """A segment's cache inputs for a step that adds `new_tokens` rows (per sample: [B]) to each
        of `layers`."""

    @abstractmethod
    def outputs(self, layers: range) -> dict[str, Value]:
        """Values the segment writes its present keys/values into (none: the backend allocates)."""

    @abstractmethod
    def update(self, layers: range, new_tokens: int | np.ndarray, outputs: dict[str, Value]) -> None:
        """Record the step: `outputs` are the segment's outputs."""


class InplaceKVCache(KVCache):
    """One preallocated buffer per layer and kind; rows are written in place by the graph."""

    def __init__(
        self,
        backend: Backend,
        dims: Dims,
        batch: int,
        dtype: np.dtype,
        capacity: int,
        buffers: dict | None = None,
        lengths: np.ndarray | None = None,
        position_offsets: np.ndarray | None = None,
    ) -> None:
        super().__init__(backend, dims, batch, dtype)
        if lengths is not None:
            self.lengths = lengths  # a view of a batch cache's lengths (`row`)
        if position_offsets is not None:
            self.position_offsets = position_offsets
        self.capacity = capacity
        shape = (batch, dims.num_kv_heads, capacity, dims.head_dim)
        self.buffers = buffers or {
            (layer, kind): backend.empty(shape, self.dtype)
            for layer in range(dims.num_layers)
            for kind in ("key", "value")
        }

    def rows(self, start: int, stop: int) -> InplaceKVCache:
        """A cache over rows start..stop-1 of this one's buffers, in the same memory (a view): requests
        prefilled into it join the batch without a copy, and a decode step can leave out rows."""
        if (start, stop) == (0, self.batch):
            return self
        views = {key: self.backend.view_rows(value, start, stop) for key, value in self.buffers.items()}
        lengths = self.lengths[start:stop]  # shared: what the rows write, the whole cache sees
        offsets = self.position_offsets[start:stop]
        return InplaceKVCache(
            self.backend, self.dims, stop - start, self.dtype, self.capacity, views, lengths, offsets
        )

    def allocated_bytes(self) -> int:
        return (
            len(self.buffers)
            * self.batch
            * self.dims.num_kv_heads
            * self.capacity
            * self.dims.head_dim
            * self.dtype.itemsize
        )

    def feeds(self, layers: range, new_tokens: int | np.ndarray) -> dict[str, Value | np.ndarray]:
        total = self.lengths[:, layers.start] + new_tokens  # [B]; a segment's layers hold equal lengths
        if int(total.max()) > self.capacity:
            raise InputError(
                f"the KV cache holds {self.capacity} positions and this step needs {int(total.max())}",
                hint="start a new conversation or raise the context it was created with",
            )
        feeds: dict[str, Value | np.ndarray] = {names.TOTAL_LENGTHS: total.astype(np.int32)}
        for layer in layers:
            for kind in ("key", "value"):
                feeds[names.past_name(layer, kind)] = self.buffers[layer, kind]
        return feeds

    def outputs(self, layers: range) -> dict[str, Value]:
        return {
            names.present_name(layer, kind): self.buffers[layer, kind]
            for layer in layers
            for kind in ("key", "value")
        }

    def update(self, layers: range, new_tokens: int | np.ndarray, outputs: dict[str, Value]) -> None:
        self.lengths[:, layers.start : layers.stop] += np.reshape(new_tokens, (-1, 1))


class ConcatKVCache(KVCache):
    """past in, past + new out: standard ONNX, one new value per layer and kind each step."""

    def __init__(self, backend: Backend, dims: Dims, batch: int, dtype: np.dtype) -> None:
        super().__init__(backend, dims, batch, dtype)
        empty = np.zeros((batch, dims.num_kv_heads, 0, dims.head_dim), dtype=self.dtype)
        none = backend.upload(empty)  # 0 bytes
        self.values: dict[tuple[int, str], Value] = {
            (layer, kind): none for layer in range(dims.num_layers) for kind in ("key", "value")
        }

    def feeds(self, layers: range, new_tokens: int | np.ndarray) -> dict[str, Value | np.ndarray]:
        return {
            names.past_name(layer, kind): self.values[layer, kind]
            for layer in layers
            for kind in ("key", "value")
        }

    def outputs(self, layers: range) -> dict[str, Value]:
        return {}

    def update(self, layers: range, new_tokens: int | np.ndarray, outputs: dict[str, Value]) -> None:
        for layer in layers:
            for kind in ("key", "value"):
                self.values[layer, kind] = outputs[names.present_name(layer, kind)]
        self.lengths[:, layers.start : layers.stop] += np.reshape(new_tokens, (-1, 1))
