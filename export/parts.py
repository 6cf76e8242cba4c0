"""The torch modules that become the bundle's graphs (docs/bundle-format.md), one per ONNX file.

Each wraps the same adapter calls the reference uses, so a graph that matches its part also
matches the reference. Shapes: B batch, S new tokens, P past tokens, V visual tokens, D hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from dyvte_rt.bundle.manifest import KV_FLAVOURS
from export.attention import ATTENTION_NAME, FP32_ATTENTION_NAME, GqaCache, attention_function
from export.prune_scoring import QueryCapture, capture_queries, dart_ranking, fastv_ranking
from export.reference.cache import KVCache
from export.reference.masks import causal_mask
from export.reference.model import image_placeholders, merge_image_features
from export.reference.routers import Router

if TYPE_CHECKING:
    from export.families import FamilyAdapter


class GraphPart(nn.Module):
    """A module that becomes one graph. `weight_modules`: the modules whose parameters the graph
    holds and a streamed export loads from the checkpoint; `fingerprint_modules`: every module
    whose parameters decide the graph (`export.graph_cache`)."""

    def weight_modules(self) -> list[nn.Module]:
        return []

    def fingerprint_modules(self) -> list[nn.Module]:
        return self.weight_modules()


class VisionPart(GraphPart):
    """pixel_values [B, 3, H, W] -> image_features [B, V, D], or for families whose graph inputs
    depend on the image, one image's inputs -> image_features [1, V, D] (the adapter's
    `vision_graph` and `vision_plan` say which)."""

    def __init__(self, adapter: FamilyAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model

    def weight_modules(self) -> list[nn.Module]:
        return self.adapter.vision_modules

    def forward(self, pixel_values: torch.Tensor, *per_image: torch.Tensor) -> torch.Tensor:
        with attention_function(self.model.config.vision_config, _fp32_attention_for(pixel_values)):
            return self.adapter.vision_graph(pixel_values, *per_image)


class EmbedPart(GraphPart):
    """input_ids [B, N] + image_features [B, V, D] (V may be 0) -> inputs_embeds [B, N, D]."""

    def __init__(self, adapter: FamilyAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model
        self.image_token_id = adapter.image_token_id

    def weight_modules(self) -> list[nn.Module]:
        return [self.adapter.embed_module]

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        filled = image_placeholders(input_ids, image_features, self.image_token_id)
        safe_ids = torch.where(filled, torch.zeros_like(input_ids), input_ids)
        embeds = self.adapter.embed_tokens(safe_ids)
        return merge_image_features(embeds, input_ids, image_features, self.image_token_id)


class SegmentPart(GraphPart):
    """Decoder layers first..last with explicit KV I/O (no router: routers are graphs of their own).

    Concat flavour:  forward(hidden, position_ids, *past)
      past k/v per layer [B,Hkv,P,hd] -> (hidden_out, present k/v per layer [B,Hkv,P+S,hd])
    In-place flavour: forward(hidden, position_ids, total_lengths, *cache)
      cache k/v per layer [B,Hkv,M,hd], total_lengths [B] int32 = rows valid after this step
      -> (hidden_out, the same buffers with this step's rows written)
    hidden [B,S,D], position_ids [B,S] int64.
    With `scores` (a segment FastV may prune after), one more input, last_index [B], and one more
    output, prune_scores [B, S]: the attention of each sample's last new token to the new tokens in
    the segment's last layer (`export.prune_scoring.last_query_attention`).
    """

    def __init__(self, adapter: FamilyAdapter, first: int, last: int, kv: str, scores: bool = False) -> None:
        super().__init__()
        if kv not in KV_FLAVOURS:
            raise ValueError(f"kv flavour must be one of {KV_FLAVOURS}, got {kv!r}")
        self.adapter = adapter
        self.model = adapter.model
        self.first, self.last = first, last
        self.kv = kv
        self.scores = scores

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)

    def weight_modules(self) -> list[nn.Module]:
        return [self.adapter.decoder_layers[layer] for layer in self.layers]

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, *inputs: torch.Tensor) -> tuple:
        if self.scores:
            inputs, last_index = inputs[:-1], inputs[-1]
        # cos/sin in fp32: the rotary embedding then runs in fp32 in fp16 graphs too
        cos_sin = self.adapter.rotary(hidden.float(), position_ids)
        if self.kv == "inplace":
            outputs, capture = self._inplace(hidden, position_ids, cos_sin, inputs[0], inputs[1:])
        else:
            outputs, capture = self._concat(hidden, position_ids, cos_sin, inputs)
        return (*outputs, capture.scores(last_index)) if self.scores else outputs

    @contextlib.contextmanager
    def _attention(self, name: str | None) -> Iterator[QueryCapture | None]:
        """The layers attend with `name`; with `scores`, the last layer's queries are recorded."""
        config = self.model.config.text_config
        with attention_function(config, name):
            if not self.scores:
                yield None
                return
            with capture_queries(config, self.last) as capture:
                yield capture

    def _concat(self, hidden, position_ids, cos_sin, inputs) -> tuple:
        cache = CastingKVCache(self.last + 1)
        for offset, layer in enumerate(self.layers):
            cache.keys[layer], cache.values[layer] = inputs[2 * offset], inputs[2 * offset + 1]
        fp32 = _fp32_attention_for(hidden)
        mask_dtype = torch.float32 if fp32 else hidden.dtype  # an fp32 mask cannot overflow in fp16
        mask = causal_mask(hidden.shape[1], inputs[0].shape[2], mask_dtype, hidden.device)  # [1,1,S,P+S]
        with self._attention(fp32) as capture:
            for layer in self.layers:
                hidden = self._layer(layer, hidden, position_ids, cos_sin, mask=mask, cache=cache)
        presents = (t for layer in self.layers for t in (cache.keys[layer], cache.values[layer]))
        return (hidden, *presents), capture

    def _inplace(self, hidden, position_ids, cos_sin, total_lengths, buffers) -> tuple:
        cache = GqaCache(
            {layer: (buffers[2 * i], buffers[2 * i + 1]) for i, layer in enumerate(self.layers)},
            total_lengths,
        )
        with self._attention(ATTENTION_NAME) as capture:
            for layer in self.layers:
                hidden = self._layer(
                    layer, hidden, position_ids, cos_sin, mask=None, cache=cache, gqa_cache=cache
                )
        return (hidden, *(t for layer in self.layers for t in cache.presents[layer])), capture

    def _layer(self, index, hidden, position_ids, cos_sin, mask, cache, **kwargs) -> torch.Tensor:
        return self.adapter.decoder_layers[index](
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=cos_sin,
            cache=cache,
            use_cache=True,
            **kwargs,
        )


class CastingKVCache(KVCache):
    """The concat cache, storing keys in the model's dtype (they arrive in fp32 from an fp32 rotary)."""

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object):
        return super().update(key.to(value.dtype), value, layer_idx, *args, **kwargs)


def _fp32_attention_for(tensor: torch.Tensor) -> str | None:
    """fp16/bf16 graphs compute attention scores and softmax in fp32; fp32 graphs keep their own."""
    return FP32_ATTENTION_NAME if tensor.dtype != torch.float32 else None


class RouterPart(GraphPart):
    """The router of one candidate layer, and the exit switch it may trigger, in one graph:

    (hidden [B,S,D], router_pool [B,S], last_index [B], keep_index [B,K])
      -> (router_logits [B, 2], hidden [B, K, D] at keep_index)

    Features as the exit semantics define them: concat(pool-weighted mean of the text tokens after
    the image, the hidden state of the last prompt token). The gathered hidden state is the input
    of the next segment if the router says exit (a copy of the few text rows either way), which
    saves the switch a second graph call.
    """

    def __init__(self, adapter: FamilyAdapter, router: Router) -> None:
        super().__init__()
        self.adapter = adapter
        self.router = router
        self.gather = ExitGatherPart()

    def weight_modules(self) -> list[nn.Module]:
        return []  # the router's own weights are in memory already

    def fingerprint_modules(self) -> list[nn.Module]:
        return [self.router]

    def forward(
        self,
        hidden: torch.Tensor,
        router_pool: torch.Tensor,
        last_index: torch.Tensor,
        keep_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.einsum("bs,bsd->bd", router_pool.to(hidden.dtype), hidden)  # [B, D]
        last = last_position(hidden, last_index)  # [B, D]
        features = torch.cat([pooled, last], dim=-1)  # [B, 2D]
        logits = self.router(features.to(_dtype_of(self.router))).to(hidden.dtype)
        return logits, self.gather(hidden, keep_index)


class HeadPart(GraphPart):
    """(hidden [B, S, D], last_index [B]) -> logits [B, vocab] at each sample's last position."""

    def __init__(self, adapter: FamilyAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model

    def weight_modules(self) -> list[nn.Module]:
        return self.adapter.head_modules

    def forward(self, hidden: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        return self.adapter.head(last_position(hidden, last_index)[:, None])[:, 0]


class DeepstackAddPart(GraphPart):
    """DeepStack (Qwen3-VL): one level of the image's extra visual features joins the visual
    tokens' rows after the decoder layer it belongs to.

    hidden [B, S, D], deepstack [B, n, V, D], level [1] int64, visual_slots [B, S] int64 (for each
    row, which visual token it holds, or V: none — text, padding, or a sample that has exited)
    -> hidden [B, S, D]. A gather of the level's rows (and a zero row), not a scatter: no
    duplicate writes, and fp16 graphs run on every provider."""

    def forward(
        self, hidden: torch.Tensor, deepstack: torch.Tensor, level: torch.Tensor, visual_slots: torch.Tensor
    ) -> torch.Tensor:
        features = deepstack.index_select(1, level)[:, 0].to(hidden.dtype)  # [B, V, D]
        padded = torch.cat([features, features.new_zeros(features.shape[0], 1, features.shape[2])], dim=1)
        slots = visual_slots[:, :, None].expand(-1, -1, hidden.shape[-1])
        return hidden + torch.gather(padded, 1, slots)


class FastvRankPart(GraphPart):
    """FastV's ranking of one sample's visual tokens:
    (prune_scores [B, S], sample [1], visual_rows [1, V]) -> ranking [1, V] int64, best first."""

    def forward(self, scores: torch.Tensor, sample: torch.Tensor, visual_rows: torch.Tensor) -> torch.Tensor:
        return fastv_ranking(scores, sample, visual_rows)


class DartRankPart(GraphPart):
    """DART's ranking of one sample's visual tokens:
    (hidden [B, S, D], sample [1], visual_rows [1, V], pivots [1]) -> ranking [1, V] int64."""

    def forward(
        self, hidden: torch.Tensor, sample: torch.Tensor, visual_rows: torch.Tensor, pivots: torch.Tensor
    ) -> torch.Tensor:
        return dart_ranking(hidden, sample, visual_rows, pivots)


class ExitGatherPart(GraphPart):
    """The exit switch on the backend: (hidden [B, S, D], keep_index [B, K]) -> hidden [B, K, D]."""

    def weight_modules(self) -> list[nn.Module]:
        return []

    def forward(self, hidden: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        index = keep_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # [B, K, D]
        return torch.gather(hidden, 1, index)


def last_position(hidden: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, D] at position last_index[b] of each sample -> [B, D] (a gather TensorRT takes)."""
    index = last_index.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])  # [B, 1, D]
    return torch.gather(hidden, 1, index)[:, 0]


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
