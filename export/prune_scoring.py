"""How FastV and DART rank visual tokens (docs/exit-semantics.md, *Pruning*), in torch: the
reference computes with these functions and the exported graphs are traced from them.

Rankings list the visual tokens best first (ties toward the lower index: stable sorts); the
runtime keeps the first `keep` of them. Shapes: B batch, H query heads, Hkv key/value heads,
S tokens, V visual tokens, D hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from export.attention import attention_function

CAPTURE_NAME = "dyvte_capture"  # registered with transformers' attention registry
COSINE_EPS = 1e-12  # norms below this count as this (a zero vector has cosine 0 to everything)


def last_query_attention(
    query: torch.Tensor, key: torch.Tensor, last_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """FastV's scores: query [B, H, S, hd] and key [B, Hkv, S, hd] of a layer's new tokens (after
    rotary), last_index [B] -> [B, S] fp32, the mean over heads of the softmax probability that
    the query at last_index gives to each key (causal: later keys get 0; grouped KV heads as the
    layer uses them)."""
    _, heads, steps, head_dim = query.shape
    groups = heads // key.shape[1]
    at = last_index.view(-1, 1, 1, 1).expand(-1, heads, 1, head_dim)
    last = torch.gather(query.float(), 2, at)  # [B, H, 1, hd]
    keys = key.float().repeat_interleave(groups, dim=1)  # [B, H, S, hd]
    scores = (last @ keys.transpose(-1, -2))[:, :, 0] * scale  # [B, H, S]
    later = torch.arange(steps, device=query.device)[None] > last_index[:, None]  # [B, S]
    scores = scores.masked_fill(later[:, None], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


def fastv_ranking(scores: torch.Tensor, sample: torch.Tensor, visual_rows: torch.Tensor) -> torch.Tensor:
    """scores [B, S], sample [1] (the batch row), visual_rows [1, V] (where that sample's visual
    tokens are) -> [1, V] int64: the visual tokens by score, highest first."""
    row = scores.index_select(0, sample).float()  # [1, S]
    visual = torch.gather(row, 1, visual_rows)  # [1, V]
    return stable_order(visual, descending=True)


def dart_ranking(
    hidden: torch.Tensor, sample: torch.Tensor, visual_rows: torch.Tensor, pivots: torch.Tensor
) -> torch.Tensor:
    """hidden [B, S, D], sample [1], visual_rows [1, V], pivots [1] (min(P, keep)) -> [1, V]
    int64: the pivots (largest L2 norms) first, then the other visual tokens by their largest
    cosine similarity to a pivot, smallest first."""
    row = hidden.index_select(0, sample).float()  # [1, S, D]
    x = torch.gather(row, 1, visual_rows[:, :, None].expand(-1, -1, row.shape[-1]))[0]  # [V, D]
    norms = x.norm(dim=-1)  # [V]
    by_norm = stable_order(norms[None], descending=True)[0]  # [V]
    rank = torch.empty_like(by_norm).scatter_(0, by_norm, torch.arange(by_norm.shape[0]))  # j's place
    is_pivot = rank < pivots  # [V]
    unit = x / norms.clamp_min(COSINE_EPS)[:, None]
    similarity = unit @ unit.T  # [V, V]
    to_pivots = similarity.masked_fill(~is_pivot[None, :], float("-inf")).amax(dim=1)  # [V]
    order_key = to_pivots.masked_fill(is_pivot, float("-inf"))  # pivots first, then least similar
    return stable_order(order_key[None], descending=False)


def stable_order(values: torch.Tensor, descending: bool) -> torch.Tensor:
    """[1, V] -> [1, V] int64 indices sorting `values`, equal values by index. Eagerly a stable
    argsort; in an exported graph ONNX's TopK over all V, whose specification breaks ties the same
    way (the exporter has no stable sort; the graph's verification cases include ties)."""
    if torch.compiler.is_exporting():
        return torch.topk(values, values.shape[-1], dim=-1, largest=descending, sorted=True).indices
    return torch.argsort(values, dim=-1, descending=descending, stable=True)


@dataclass
class QueryCapture:
    """The query and key of one layer's new tokens, recorded while the layer runs."""

    layer: int
    inner: str | None  # the attention implementation the layer would use otherwise
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    scale: float = 1.0

    def scores(self, last_index: torch.Tensor) -> torch.Tensor:
        if self.query is None:
            raise RuntimeError(f"layer {self.layer} ran no attention while its queries were captured")
        return last_query_attention(self.query, self.key, last_index, self.scale)


_active: list[QueryCapture] = []


def _capturing_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Records `layer`'s rotated query and its new keys (the last S of what the cache returns),
    then attends exactly as the implementation it wraps."""
    capture = _active[-1]
    if module.layer_idx == capture.layer:
        capture.query, capture.key = query, key[:, :, -query.shape[2] :]
        capture.scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(capture.inner, eager_attention_forward)
    return inner(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(CAPTURE_NAME, _capturing_attention)


@contextlib.contextmanager
def capture_queries(config, layer: int) -> Iterator[QueryCapture]:
    """While modules built from `config` run, record layer `layer`'s query and keys."""
    capture = QueryCapture(layer, config._attn_implementation)
    _active.append(capture)
    try:
        with attention_function(config, CAPTURE_NAME):
            yield capture
    finally:
        _active.pop()
