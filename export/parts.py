"""The torch modules that become the bundle's graphs (DESIGN §4), one per ONNX file.

Each wraps the same adapter calls the reference uses, so a graph that matches its part also
matches the reference. Shapes: B batch, S new tokens, P past tokens, V visual tokens, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from export.families import FamilyAdapter
from export.reference.cache import KVCache
from export.reference.masks import causal_mask
from export.reference.model import merge_image_features
from export.reference.routers import Router


class VisionPart(nn.Module):
    """pixel_values [B, 3, H, W] -> image_features [B, V, D]."""

    def __init__(self, adapter: FamilyAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.adapter.image_features(pixel_values)


class EmbedPart(nn.Module):
    """input_ids [B, N] + image_features [B, V, D] (V may be 0) -> inputs_embeds [B, N, D]."""

    def __init__(self, adapter: FamilyAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model
        self.image_token_id = adapter.image_token_id

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        safe_ids = torch.where(input_ids == self.image_token_id, torch.zeros_like(input_ids), input_ids)
        embeds = self.adapter.embed_tokens(safe_ids)
        return merge_image_features(embeds, input_ids, image_features, self.image_token_id)


class SegmentPart(nn.Module):
    """Decoder layers first..last with explicit KV I/O and, optionally, the router of `last`.

    With a router:    forward(hidden, position_ids, router_pool, *past)
    Without a router: forward(hidden, position_ids, *past)
      hidden [B,S,D], position_ids [B,S], router_pool [B,S], past k/v per layer [B,Hkv,P,hd]
      -> (hidden_out [B,S,D], present k/v per layer [B,Hkv,P+S,hd], router_logits [B,2] if router)
    """

    def __init__(self, adapter: FamilyAdapter, first: int, last: int, router: Router | None) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model
        self.first, self.last = first, last
        self.router = router

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, *inputs: torch.Tensor) -> tuple:
        router_pool, past = (inputs[0], inputs[1:]) if self.router is not None else (None, inputs)
        cache = KVCache(self.last + 1)
        for offset, layer in enumerate(self.layers):
            cache.keys[layer], cache.values[layer] = past[2 * offset], past[2 * offset + 1]
        mask = causal_mask(hidden.shape[1], past[0].shape[2], hidden.dtype, hidden.device)  # [1,1,S,P+S]
        cos_sin = self.adapter.rotary(hidden, position_ids)
        for layer in self.layers:
            hidden = self.adapter.decoder_layers[layer](
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=cos_sin,
                cache=cache,
                use_cache=True,
            )
        presents = [t for layer in self.layers for t in (cache.keys[layer], cache.values[layer])]
        if router_pool is None:
            return (hidden, *presents)
        pooled = torch.einsum("bs,bsd->bd", router_pool.to(hidden.dtype), hidden)  # [B, D]
        features = torch.cat([pooled, hidden[:, -1]], dim=-1)  # [B, 2D]
        return (hidden, *presents, self.router(features.to(_dtype_of(self.router))).to(hidden.dtype))


class HeadPart(nn.Module):
    """hidden [B, S, D] -> logits [B, vocab] of the last position (final norm + LM head)."""

    def __init__(self, adapter: FamilyAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.head(hidden[:, -1:])[:, 0]


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
