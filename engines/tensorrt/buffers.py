"""The device memory a TensorRT request holds, planned before anything is allocated.

Concat-flavour segments read `past.{l}.*` [B, H_kv, P, hd] and write `present.{l}.*`
[B, H_kv, P + S, hd]. TensorRT binds packed tensors and never lets an output alias an input, so
each layer gets two buffers of the context's length used alternately: the past is read from one
and the present written into the other, then they swap. Hidden states alternate between two
buffers as well (one segment's output is the next one's input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.tensorrt.profiles import EngineSettings


@dataclass(frozen=True)
class BufferPlan:
    kv_bytes: int  # both alternating buffers, keys and values, every layer
    hidden_bytes: int  # the two alternating hidden-state buffers, at the longest prompt
    logits_bytes: int
    kv_bytes_per_token: int  # one position of one sample in one of the alternating buffers, all layers

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.hidden_bytes + self.logits_bytes

    def to_json(self) -> dict:
        return {**self.__dict__, "total_bytes": self.total_bytes}


def plan_buffers(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    hidden: int,
    vocab_size: int,
    visual_tokens: int,
    dtype: str,
    settings: EngineSettings,
) -> BufferPlan:
    item = np.dtype(dtype).itemsize
    per_token = num_layers * 2 * num_kv_heads * head_dim * item  # keys and values
    longest = min(settings.max_context, visual_tokens + settings.max_text_tokens)
    return BufferPlan(
        kv_bytes=2 * settings.max_batch * settings.max_context * per_token,
        hidden_bytes=2 * settings.max_batch * longest * hidden * item,
        logits_bytes=settings.max_batch * vocab_size * 4,  # the head's logits stay fp32
        kv_bytes_per_token=per_token,
    )


class AlternatingBuffers:
    """Two buffers per output name, handed out in turn: a step writes its present into one while
    its past — the previous step's present — is read from the other. Each is allocated once, at the
    capacity asked for first, so decoding allocates nothing per token."""

    def __init__(self, allocate: Callable[[int], Any]) -> None:
        self._allocate = allocate
        self._pairs: dict[str, list[Any]] = {}
        self._turn: dict[str, int] = {}

    def next(self, name: str, nbytes: int) -> Any:
        pair = self._pairs.setdefault(name, [None, None])
        turn = self._turn.get(name, 0)
        self._turn[name] = 1 - turn
        if pair[turn] is None or pair[turn].nbytes < nbytes:
            pair[turn] = self._allocate(nbytes)  # the smaller one it replaces is freed with it
        return pair[turn]
