"""The second implementation of an exit: keep every token, mask visual *keys* after layer K.

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
    reference: DyVTEReference, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, exit_layer: int
) -> torch.Tensor:
    """Logits [1, N, vocab] at every prompt position; only non-visual rows are meaningful."""
    hidden, deepstack = reference.embed_with_deepstack(input_ids, pixel_values)  # [1, N, D]
    n = hidden.shape[1]
    positions, _ = reference.adapter.prompt_positions(input_ids, pixel_values)  # [1, N] or [3, 1, N]
    is_visual = input_ids[0] == reference.adapter.image_token_id  # [N]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))  # [N, N]
    # A visual query keeps its own key so its row never becomes empty; text rows never see it.
    text_only = causal & (~is_visual[None, :] | torch.eye(n, dtype=torch.bool))
    full_mask = additive(causal[None, None], hidden.dtype)
    masked = additive(text_only[None, None], hidden.dtype)
    cache = KVCache(reference.num_layers)
    for index in range(reference.num_layers):
        mask = full_mask if index <= exit_layer else masked
        hidden = reference.run_layer(index, hidden, positions, cache, mask)
        hidden = add_deepstack(hidden, index, is_visual, deepstack)  # after the exit: rows no text sees
    return reference.adapter.head(hidden)
