"""The second implementation of an exit (and a prune): keep every token, mask visual *keys* after
layer K (and the pruned visual keys after the prune's layer).

Removing the visual tokens after layer K (the reference) must give the same text-token logits as
this, because a text token then sees exactly the same keys at the same positions. Tests use one
to check the other; nothing else should call this (it does the full model's compute).
"""

from __future__ import annotations

import torch

from export.reference.cache import KVCache
from export.reference.masks import additive
from export.reference.model import DyVTEReference, add_deepstack


@torch.no_grad()
def prefill_with_visual_keys_masked(
    reference: DyVTEReference,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    exit_layer: int | None,
    prune_layer: int | None = None,
    kept_visual: list[int] | None = None,
) -> torch.Tensor:
    """Logits [1, N, vocab] at every prompt position; only non-visual rows are meaningful. With
    `prune_layer`, the visual tokens not in `kept_visual` (ordinals) are masked after that layer
    (-1: from layer 0 on)."""
    hidden, deepstack = reference.embed_with_deepstack(input_ids, pixel_values)  # [1, N, D]
    n = hidden.shape[1]
    positions, _ = reference.adapter.prompt_positions(input_ids, pixel_values)  # [1, N] or [3, 1, N]
    is_visual = input_ids[0] == reference.adapter.image_token_id  # [N]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))  # [N, N]
    # A visual query keeps its own key so its row never becomes empty; text rows never see it.
    own = torch.eye(n, dtype=torch.bool)
    text_only = causal & (~is_visual[None, :] | own)
    pruned = torch.zeros(n, dtype=torch.bool)
    if prune_layer is not None:
        visual_at = torch.nonzero(is_visual)[:, 0]
        pruned[visual_at] = True
        pruned[visual_at[torch.as_tensor(kept_visual, dtype=torch.long)]] = False
    full_mask = additive(causal[None, None], hidden.dtype)
    masked = additive(text_only[None, None], hidden.dtype)
    after_prune = additive((causal & (~pruned[None, :] | own))[None, None], hidden.dtype)
    last_with_visual = reference.num_layers if exit_layer is None else exit_layer
    cache = KVCache(reference.num_layers)
    for index in range(reference.num_layers):
        if index > last_with_visual:
            mask = masked
        elif prune_layer is not None and index > prune_layer:
            mask = after_prune
        else:
            mask = full_mask
        hidden = reference.run_layer(index, hidden, positions, cache, mask)
        hidden = add_deepstack(hidden, index, is_visual, deepstack)  # after the exit: rows no text sees
    return reference.adapter.head(hidden)
