"""A small, visible KV cache whose layers may hold different lengths.

After an exit at layer k, layers 0..k hold keys/values of all N prompt tokens and layers k+1..
hold N−V (docs/exit-semantics.md). Nothing is copied or gathered at exit time. The object is duck-typed to
what Hugging Face attention modules call (`update(key, value, layer_idx, ...)`), so decoder
layers are used exactly as transformers ships them.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [B, H_kv, T_l, head_dim]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.position_offset = 0  # a decoded token's position id minus its index (multimodal rotary)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values ([B, H_kv, S, head_dim]) and return the whole layer's."""
        past_k, past_v = self.keys[layer_idx], self.values[layer_idx]
        if past_k is not None:
            key = torch.cat([past_k, key], dim=2)
            value = torch.cat([past_v, value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def length(self, layer_idx: int) -> int:
        keys = self.keys[layer_idx]
        return 0 if keys is None else keys.shape[2]

    def lengths(self) -> list[int]:
        return [self.length(i) for i in range(len(self.keys))]
