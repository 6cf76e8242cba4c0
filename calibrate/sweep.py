"""One full teacher-forced pass plus cheap text-only passes: everything calibration needs.

For a sample (image, prompt, answer) the full model runs once over prompt + answer, keeping the
hidden states after every candidate layer k. From h_k, the visual tokens are dropped and only the
later layers run again on the N−V text tokens — exactly the removal semantics (docs/exit-semantics.md), at a
fraction of a full pass. Labels for every k come from these logits (docs/calibration.md), not from one
random k per step as in the reference implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from dyvte_rt.runtime.prune import NO_PRUNE, PrunePolicy
from export.reference.cache import KVCache
from export.reference.masks import causal_mask
from export.reference.model import DyVTEReference, Pruning, add_deepstack
from export.reference.routers import feature_positions, router_features

AGREEMENT = 0.99  # label rule: argmax agreement on answer tokens ...
LOSS_RATIO = 1.03  # ... and answer loss within 3% of the full model's


@dataclass
class Sweep:
    features: torch.Tensor  # [K, 2D] router features at each candidate layer
    token_agreement: torch.Tensor  # [K] share of answer tokens whose argmax equals the full model's
    loss_ratio: torch.Tensor  # [K] answer loss with exit at k / full answer loss
    answer_equal: torch.Tensor  # [K] bool: every answer token's argmax equals the full model's
    kl_first: torch.Tensor  # [K] KL(full || exit) of the first answer token's distribution
    n_tokens: int  # prompt tokens N
    n_visual: int  # V
    n_kept: int = -1  # visual tokens left by the prune (V without one)

    @property
    def labels(self) -> torch.Tensor:
        """[K] 1 = the visual tokens may exit after this layer."""
        return ((self.token_agreement >= AGREEMENT) & (self.loss_ratio <= LOSS_RATIO)).long()


@torch.no_grad()
def sweep(
    reference: DyVTEReference,
    prompt_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    answer_ids: torch.Tensor,
    layers: tuple[int, ...],
    prune: PrunePolicy = NO_PRUNE,
) -> Sweep:
    """prompt_ids [1, N], answer_ids [A] (EOS included) -> per-layer labels, features, agreement.
    With `prune`, the model that labels and is labelled is the pruned one: the full pass prunes
    after its layer K, and an exit after k > K starts from the pruned state (docs/exit-semantics.md)."""
    n, a = prompt_ids.shape[1], answer_ids.shape[0]
    ids = torch.cat([prompt_ids, answer_ids[None].to(prompt_ids.device)], dim=1)  # [1, T]
    device = ids.device
    hidden, deepstack = reference.embed_with_deepstack(ids, pixel_values)  # [1, T, D]
    t = ids.shape[1]
    positions, _ = reference.adapter.prompt_positions(ids, pixel_values)  # [1, T] or [3, 1, T]
    mask = causal_mask(t, 0, hidden.dtype, device)
    kept: dict[int, tuple] = {}  # layer -> (hidden, positions, is_visual, router mean positions)
    cache = KVCache(reference.num_layers)
    is_visual = ids[0] == reference.adapter.image_token_id
    n_visual = int(is_visual[:n].sum())
    mean_at = feature_positions(prompt_ids, reference.adapter.image_token_id).to(device)
    pruning = Pruning(prune if prune.active and n_visual else NO_PRUNE)
    prompt = n  # prompt rows present
    for index in range(-1, reference.num_layers):
        if index >= 0:
            with pruning.capture(reference.model.config.text_config, index):
                hidden = reference.run_layer(index, hidden, positions, cache, mask)
            hidden = add_deepstack(hidden, index, is_visual, deepstack)
            if index in layers:
                kept[index] = (hidden, positions, is_visual, mean_at)
        if pruning.due(index):
            rows = pruning.rows_kept(hidden, is_visual, last=prompt - 1)
            hidden, positions, is_visual = hidden[:, rows], positions[..., rows], is_visual[rows]
            mean_at = torch.searchsorted(rows, mean_at)
            prompt -= n_visual - len(pruning.kept)
            if deepstack is not None:
                deepstack = deepstack[:, :, torch.as_tensor(pruning.kept)]
            mask = causal_mask(hidden.shape[1], 0, hidden.dtype, device)
    t = hidden.shape[1]
    full = reference.adapter.head(hidden)[0, prompt - 1 : t - 1].float()  # [A, vocab] predicts the answer
    full_loss = F.cross_entropy(full, answer_ids.to(device))
    full_pick = full.argmax(-1)
    full_logp = F.log_softmax(full[0], -1)

    out = {name: [] for name in ("features", "agree", "ratio", "equal", "kl")}
    for k in layers:
        state, pos, visual, mean = kept[k]
        rows_of_prompt = state.shape[1] - a  # the prompt's rows at layer k (fewer after a prune)
        out["features"].append(router_features(state[:, :rows_of_prompt], mean)[0].float())
        h, pos = state[:, ~visual], pos[..., ~visual]  # [1, T-V, D]
        text_mask = causal_mask(h.shape[1], 0, h.dtype, device)
        text_cache = KVCache(reference.num_layers)
        for index in range(k + 1, reference.num_layers):
            h = reference.run_layer(index, h, pos, text_cache, text_mask)
        start = n - n_visual - 1
        logits = reference.adapter.head(h)[0, start : start + a].float()  # [A, vocab]
        pick = logits.argmax(-1)
        out["agree"].append((pick == full_pick).float().mean())
        out["ratio"].append(F.cross_entropy(logits, answer_ids.to(device)) / full_loss.clamp(min=1e-6))
        out["equal"].append(torch.equal(pick, full_pick))
        out["kl"].append(F.kl_div(F.log_softmax(logits[0], -1), full_logp, log_target=True, reduction="sum"))
    return Sweep(
        features=torch.stack(out["features"]).cpu(),
        token_agreement=torch.stack(out["agree"]).cpu(),
        loss_ratio=torch.stack(out["ratio"]).float().cpu(),
        answer_equal=torch.tensor(out["equal"]),
        kl_first=torch.stack(out["kl"]).float().cpu(),
        n_tokens=n,
        n_visual=n_visual,
        n_kept=len(pruning.kept) if pruning.kept is not None else n_visual,
    )
