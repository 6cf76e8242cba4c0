"""Additive attention masks in the layout HF attention modules take ([B, 1, q, k])."""

from __future__ import annotations

import torch


def causal_mask(
    q_len: int, past_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Query i (of the q_len new tokens) sees every past key and new keys 0..i.

    Index-based causality equals position-based causality here because kept tokens stay in
    their original order after an exit; only their position ids have gaps.
    """
    q = torch.arange(q_len, device=device)[:, None]  # [q, 1]
    k = torch.arange(past_len + q_len, device=device)[None, :]  # [1, k]
    allowed = k <= q + past_len  # [q, k]
    return additive(allowed[None, None], dtype)  # [1, 1, q, k]


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool "may attend" -> 0 / most-negative float, as HF models use."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, blocked)
