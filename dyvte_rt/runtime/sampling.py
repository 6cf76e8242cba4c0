"""Choosing the next token: greedy by default, or temperature / top-k / top-p with a seed.

Numerically safe for any accepted setting: scores are shifted by their maximum before they are
divided by the temperature (a temperature of 1e-320 makes the best token certain instead of
turning every score into inf - inf = NaN), and logits that are not numbers count as impossible.
"""

from __future__ import annotations

import math
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
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 <= self.top_p <= 1:  # 0 keeps only the most likely token, as OpenAI's API reads it
            raise InputError(f"top-p must lie in [0, 1], got {self.top_p}")
        if self.seed is not None and self.seed < 0:  # numpy's generators take none
            raise InputError(f"seed must be a non-negative integer, got {self.seed}")


class Sampler:
    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits [1, vocab] (or [vocab]) -> next token id."""
        scores = np.asarray(logits, dtype=np.float64).reshape(-1)
        scores = np.where(np.isnan(scores), -np.inf, scores)
        best = int(scores.argmax())
        if self.config.temperature == 0 or not np.isfinite(scores[best]):  # greedy, or nothing to weigh
            return best
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            scores = (scores - scores[best]) / self.config.temperature  # <= 0; -inf where it overflows
        scores = np.where(np.isnan(scores), -np.inf, scores)
        if self.config.top_k:
            kth = np.sort(scores)[-min(self.config.top_k, scores.size)]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores)  # the best token's is exactly 1: the sum is never 0
        probs /= probs.sum()
        if self.config.top_p < 1:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            cut = order[np.searchsorted(cumulative, self.config.top_p) + 1 :]  # keep the smallest set >= p
            probs[cut] = 0.0
            probs /= probs.sum()
        return int(self._rng.choice(probs.size, p=probs))
