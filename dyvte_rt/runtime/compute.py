"""Prefill compute accounting (docs/compute.md), in multiply-adds.

A measured latency ratio is judged against the theoretical ratio computed here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderDims:
    """The decoder sizes that determine per-layer cost."""

    hidden: int  # d: residual width
    kv_width: int  # d_kv: num_key_value_heads * head_dim (= d for MHA)
    mlp: int  # m: SwiGLU intermediate width
    num_layers: int  # L


def layer_macs(n: int, dims: DecoderDims, keys: int | None = None) -> int:
    """C(n) = 2·n·d² (q,o) + 2·n·d·d_kv (k,v) + 2·n·t·d (scores, values) + 3·n·d·m (SwiGLU), for n
    new tokens attending to t keys (t = n for a fresh prompt)."""
    d = dims.hidden
    t = n if keys is None else keys
    return 2 * n * d * d + 2 * n * d * dims.kv_width + 2 * n * t * d + 3 * n * d * dims.mlp


@dataclass(frozen=True)
class PrefillMacs:
    full: int  # L·C(N): every layer sees every token
    actual: int  # Σ_{l≤k} C(N) + Σ_{l>k} C(N−V)

    @property
    def saved_fraction(self) -> float:
        return 0.0 if self.full == 0 else 1.0 - self.actual / self.full


def continuation_macs(dims: DecoderDims, new_tokens: int, held: list[int]) -> PrefillMacs:
    """New tokens appended to a cache holding `held[l]` rows in layer l (a later conversation turn):
    `actual` with those rows, `full` as if every layer held the longest (no exit had happened)."""
    longest = max(held)
    full = dims.num_layers * layer_macs(new_tokens, dims, longest + new_tokens)
    actual = sum(layer_macs(new_tokens, dims, rows + new_tokens) for rows in held)
    return PrefillMacs(full=full, actual=actual)


def prefill_macs(
    dims: DecoderDims,
    n_tokens: int,
    n_visual: int,
    exit_layer: int | None,
    prune_layer: int | None = None,
    kept: int | None = None,
) -> PrefillMacs:
    """Prefill cost of a prompt of `n_tokens` (of which `n_visual` visual) exiting after
    `exit_layer`, and keeping `kept` visual tokens after `prune_layer` (-1: before layer 0) if a
    prune ran (docs/compute.md)."""
    if not 0 <= n_visual <= n_tokens:
        raise ValueError(f"need 0 <= n_visual <= n_tokens, got {n_visual} and {n_tokens}")
    if exit_layer is not None and not 0 <= exit_layer < dims.num_layers:
        raise ValueError(f"exit layer {exit_layer} outside 0..{dims.num_layers - 1}")
    if prune_layer is not None and not (-1 <= prune_layer < dims.num_layers and 0 <= (kept or 0) <= n_visual):
        raise ValueError(f"prune after layer {prune_layer} keeping {kept} of {n_visual} visual tokens")
    full = dims.num_layers * layer_macs(n_tokens, dims)

    def present(layer: int) -> int:
        if exit_layer is not None and layer > exit_layer:
            return n_tokens - n_visual
        if prune_layer is not None and layer > prune_layer:
            return n_tokens - n_visual + kept
        return n_tokens

    actual = sum(layer_macs(present(layer), dims) for layer in range(dims.num_layers))
    return PrefillMacs(full=full, actual=actual)
