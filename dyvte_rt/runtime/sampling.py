"""Choosing the next token: greedy by default, or temperature / top-k / top-p with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dyvte_rt.errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top-p must lie in (0, 1], got {self.top_p}")


class Sampler:
    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits [1, vocab] (or [vocab]) -> next token id."""
        scores = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.config.temperature == 0:
            return int(scores.argmax())
        scores = scores / self.config.temperature
        if self.config.top_k:
            kth = np.sort(scores)[-min(self.config.top_k, scores.size)]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if self.config.top_p < 1:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            cut = order[np.searchsorted(cumulative, self.config.top_p) + 1 :]  # keep the smallest set >= p
            probs[cut] = 0.0
            probs /= probs.sum()
        return int(self._rng.choice(probs.size, p=probs))
