"""The PyTorch reference of DyVTE's exit semantics (docs/exit-semantics.md) over a Hugging Face model.

Everything else (ONNX graphs, the numpy runtime, calibration) is tested against this module,
and this module is tested against the plain Hugging Face model with policy `never`.

Shapes: B = 1 (batch 1 is the first target), N prompt tokens, V visual tokens, D hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from dyvte_rt.errors import InputError
from dyvte_rt.runtime.compute import PrefillMacs, prefill_macs
from dyvte_rt.runtime.policy import ExitPolicy, check_policy_fits, exit_probability
from dyvte_rt.runtime.prune import NO_PRUNE, PrunePolicy, kept_from_ranking, parse_prune
from export.prune_scoring import QueryCapture, capture_queries, dart_ranking, fastv_ranking
from export.reference.cache import KVCache
from export.reference.masks import causal_mask
from export.reference.routers import RouterBank, feature_positions, router_features

if TYPE_CHECKING:
    from export.families import FamilyAdapter


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [1, S, vocab] at every position still present after the last layer
    positions: torch.Tensor  # [1, S] original position ids of those positions
    cache: KVCache
    exit_layer: int | None  # visual tokens took part in layers 0..exit_layer
    exit_probs: dict[int, float]  # router p(exit) per evaluated candidate layer
    macs: PrefillMacs
    n_tokens: int  # N
    n_visual: int  # V
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1, 2D], if collected
    pruned_after_layer: int | None = None  # a prune policy removed visual tokens after this layer
    kept_visual: list[int] | None = None  # then: the visual tokens that stayed (sorted ordinals 0..V-1)

    @property
    def visual_tokens_kept(self) -> int:
        """Visual tokens present after the prune (all V without one)."""
        return len(self.kept_visual) if self.kept_visual is not None else self.n_visual


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids, EOS included if produced
    prefill: PrefillResult

    @property
    def exit_layer(self) -> int | None:
        return self.prefill.exit_layer


def merge_image_features(
    token_embeds: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Place visual tokens at the image-token positions, in order (export-friendly gather).

    token_embeds [B, N, D], input_ids [B, N], image_features [B, V, D] -> [B, N, D]. V may be 0
    (text-only prompts, decode steps): a zero row is appended so the gather always has a source.
    """
    batch, _, dim = token_embeds.shape
    padded = torch.cat([image_features.to(token_embeds.dtype), token_embeds.new_zeros(batch, 1, dim)], dim=1)
    is_image = image_placeholders(input_ids, image_features, image_token_id)  # [B, N]
    index = torch.cumsum(is_image.long(), dim=1) - 1  # [B, N]: k-th image token takes feature k
    index = torch.where(is_image, index, torch.full_like(index, image_features.shape[1]))  # else: zero row
    gathered = torch.gather(padded, 1, index.unsqueeze(-1).expand(-1, -1, dim))  # [B, N, D]
    return torch.where(is_image.unsqueeze(-1), gathered, token_embeds)


def image_placeholders(
    input_ids: torch.Tensor, image_features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """[B, N] bool: the positions image features fill. None without features (V = 0): a generated
    token that happens to be the placeholder is embedded as the token it is, as in Hugging Face's
    decoding. (A tensor condition, not a Python branch, so that exported graphs keep V dynamic.)"""
    has_features = image_features.new_ones(image_features.shape[1]).sum() > 0
    return (input_ids == image_token_id) & has_features


def add_deepstack(
    hidden: torch.Tensor, layer: int, is_visual: torch.Tensor, deepstack: torch.Tensor | None
) -> torch.Tensor:
    """DeepStack (Qwen3-VL): after decoder layer `layer`, its level [1, n, V, D] joins the
    visual tokens' rows (`is_visual` [N] marks them); other layers, and families without it, pass."""
    if deepstack is None or layer >= deepstack.shape[1]:
        return hidden
    hidden = hidden.clone()
    hidden[:, is_visual] = hidden[:, is_visual] + deepstack[:, layer].to(hidden.dtype)
    return hidden


class DyVTEReference(nn.Module):
    def __init__(
        self,
        adapter: FamilyAdapter,
        routers: RouterBank | None = None,
        candidate_layers: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model
        self.routers = routers
        num_layers = adapter.dims.num_layers
        if candidate_layers is None:
            candidate_layers = routers.layers if routers is not None else tuple(range(num_layers - 1))
        bad = [k for k in candidate_layers if not 0 <= k < num_layers - 1]
        if bad:
            raise InputError(f"candidate exit layers {bad} outside 0..{num_layers - 2}")
        self.candidate_layers = tuple(sorted(candidate_layers))

    @property
    def num_layers(self) -> int:
        return self.adapter.dims.num_layers

    # -- pieces -------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, pixel_values) -> torch.Tensor:
        """[1, N] ids (+ the image: [1, 3, H, W] pixels, or what the adapter's `image_input` gives)
        -> [1, N, D] input embeddings."""
        return self.embed_with_deepstack(input_ids, pixel_values)[0]

    def embed_with_deepstack(
        self, input_ids: torch.Tensor, pixel_values
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The input embeddings [1, N, D] and the image's DeepStack levels [1, n, V, D] (None
        without an image or for families without DeepStack)."""
        image_id = self.adapter.image_token_id
        safe_ids = input_ids.masked_fill(input_ids == image_id, 0)  # placeholder rows are replaced
        embeds = self.adapter.embed_tokens(safe_ids)
        n_image = int((input_ids == image_id).sum())
        if n_image == 0:
            return embeds, None
        if pixel_values is None:
            raise InputError(f"the prompt has {n_image} image tokens but no image was given")
        features, deepstack = self.adapter.vision_outputs(pixel_values)  # [1, V, D], [1, n, V, D] | None
        if features.shape[1] != n_image:
            raise InputError(f"the prompt has {n_image} image tokens but the image gives {features.shape[1]}")
        return merge_image_features(embeds, input_ids, features, image_id), deepstack

    def run_layer(
        self, index: int, hidden: torch.Tensor, position_ids: torch.Tensor, cache: KVCache, mask: torch.Tensor
    ) -> torch.Tensor:
        """One decoder layer exactly as transformers ships it, with our cache and mask."""
        layer = self.adapter.decoder_layers[index]
        return layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=self.adapter.rotary(hidden, position_ids),
            cache=cache,
            use_cache=True,
        )

    # -- prefill / decode / generate ----------------------------------------------------------

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        policy: ExitPolicy,
        collect_features: bool = False,
        prune: PrunePolicy | str | None = NO_PRUNE,
    ) -> PrefillResult:
        _check_batch_one(input_ids)
        check_policy_fits(policy, self.num_layers, self.candidate_layers)
        prune = parse_prune(prune)
        if prune.active and prune.layer >= self.num_layers - 1:
            raise InputError(f"cannot prune after layer {prune.layer} of {self.num_layers} (0-indexed)")
        if policy.needs_routers and self.routers is None:
            raise InputError("policy 'router' needs trained routers, and none are loaded")
        hidden, deepstack = self.embed_with_deepstack(input_ids, pixel_values)  # [1, N, D], [1, n, V, D]
        n_tokens = hidden.shape[1]
        is_visual = input_ids[0] == self.adapter.image_token_id  # [N]: of the rows present
        n_visual = int(is_visual.sum())
        # [1, N] (0..N-1), or [3, 1, N] multimodal rotary positions (Qwen2-VL)
        positions, cache_offset = self.adapter.prompt_positions(input_ids, pixel_values if n_visual else None)
        mean_at = feature_positions(input_ids, self.adapter.image_token_id).to(hidden.device)
        cache = KVCache(self.num_layers)
        cache.position_offset = cache_offset
        mask = causal_mask(n_tokens, 0, hidden.dtype, hidden.device)
        exit_layer: int | None = None
        exit_probs: dict[int, float] = {}
        features: dict[int, torch.Tensor] = {}
        pruning = Pruning(prune if prune.active and n_visual else NO_PRUNE)
        for index in range(-1, self.num_layers):
            if index >= 0:
                with pruning.capture(self.model.config.text_config, index):
                    hidden = self.run_layer(index, hidden, positions, cache, mask)
                if exit_layer is None:  # after an exit no visual token is left to take a DeepStack level
                    hidden = add_deepstack(hidden, index, is_visual, deepstack)
            if exit_layer is None and n_visual and index in self.candidate_layers:
                feats = router_features(hidden, mean_at)  # [1, 2D]
                if collect_features:
                    features[index] = feats
                prob = None
                if self.routers is not None and index in self.routers.layers:
                    logits = self.routers.logits(index, feats.to(next(self.routers.parameters()).dtype))
                    prob = exit_probability(logits.float().cpu().numpy())
                    exit_probs[index] = prob
                if policy.decide(index, prob):
                    exit_layer = index
                    keep = ~is_visual
                    hidden, positions = hidden[:, keep], positions[..., keep]  # [1, N-V, D], [(3,) 1, N-V]
                    mask = causal_mask(hidden.shape[1], 0, hidden.dtype, hidden.device)
            if exit_layer is None and pruning.due(index):  # an exit at this layer wins
                rows = pruning.rows_kept(hidden, is_visual)  # [N'] of the present rows
                hidden, positions, is_visual = hidden[:, rows], positions[..., rows], is_visual[rows]
                mean_at = torch.searchsorted(rows, mean_at)  # the same text tokens, at their new rows
                if deepstack is not None:
                    deepstack = deepstack[:, :, torch.as_tensor(pruning.kept)]
                mask = causal_mask(hidden.shape[1], 0, hidden.dtype, hidden.device)
        pruned_after = prune.layer if pruning.kept is not None else None
        return PrefillResult(
            logits=self.adapter.head(hidden),
            positions=positions,
            cache=cache,
            exit_layer=exit_layer,
            exit_probs=exit_probs,
            macs=prefill_macs(
                self.adapter.dims, n_tokens, n_visual, exit_layer, pruned_after, pruning.kept_count
            ),
            n_tokens=n_tokens,
            n_visual=n_visual,
            features=features,
            pruned_after_layer=pruned_after,
            kept_visual=pruning.kept,
        )

    @torch.no_grad()
    def decode_one_token(self, token: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        """token [1, 1] at original position `position` (its index; the cache adds the offset
        multimodal rotary positions continue at) -> next-token logits [1, vocab]."""
        hidden = self.adapter.embed_tokens(token)  # [1, 1, D]
        positions = torch.full(
            (1, 1), position + cache.position_offset, dtype=torch.long, device=hidden.device
        )
        for index in range(self.num_layers):
            mask = causal_mask(1, cache.length(index), hidden.dtype, hidden.device)  # all zeros
            hidden = self.run_layer(index, hidden, positions, cache, mask)
        return self.adapter.head(hidden)[:, -1]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        policy: ExitPolicy,
        max_new_tokens: int = 32,
        prune: PrunePolicy | str | None = NO_PRUNE,
    ) -> GenerationResult:
        """Greedy generation; stops after EOS or `max_new_tokens`."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        result = self.prefill(input_ids, pixel_values, policy, prune=prune)
        eos = set(self.adapter.eos_token_ids)
        token = result.logits[:, -1].argmax(dim=-1, keepdim=True)  # [1, 1]
        tokens = [int(token)]
        position = result.n_tokens  # decode continues the original numbering
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            logits = self.decode_one_token(token, position, result.cache)
            token = logits.argmax(dim=-1, keepdim=True)
            tokens.append(int(token))
            position += 1
        return GenerationResult(tokens=tokens, prefill=result)


class Pruning:
    """One request's prune policy in the reference (and the calibration sweep): it captures layer
    K's queries for FastV and picks the rows that stay after layer K (once)."""

    def __init__(self, policy: PrunePolicy) -> None:
        self.policy = policy
        self.kept: list[int] | None = None  # sorted visual ordinals, once pruned
        self._capture: QueryCapture | None = None

    @property
    def kept_count(self) -> int | None:
        return len(self.kept) if self.kept is not None else None

    def due(self, layer: int) -> bool:
        return self.policy.active and self.kept is None and self.policy.layer == layer

    @contextlib.contextmanager
    def capture(self, config, layer: int) -> Iterator[None]:
        """Around layer `layer`: records its queries if FastV prunes after it."""
        if self.policy.method != "fastv" or not self.due(layer):
            yield
            return
        with capture_queries(config, layer) as self._capture:
            yield

    def rows_kept(
        self, hidden: torch.Tensor, is_visual: torch.Tensor, last: int | None = None
    ) -> torch.Tensor:
        """[N'] sorted rows of `hidden` [1, N, D] that stay: every non-visual row and the kept
        visual ones. `last`: the row of the last prompt token (default: the last row; a
        teacher-forced pass has the answer after it)."""
        visual_rows = torch.nonzero(is_visual)[:, 0][None]  # [1, V]
        keep = self.policy.keep(visual_rows.shape[1])
        sample = torch.zeros(1, dtype=torch.long)
        if self.policy.method == "fastv":
            last = torch.tensor([hidden.shape[1] - 1 if last is None else last])
            ranking = fastv_ranking(self._capture.scores(last), sample, visual_rows)
        else:
            pivots = torch.tensor([min(self.policy.pivots, keep)])
            ranking = dart_ranking(hidden, sample, visual_rows, pivots)
        kept = kept_from_ranking(ranking.numpy(), keep)
        self.kept = kept.tolist()
        stay = ~is_visual
        stay[visual_rows[0, torch.from_numpy(kept)]] = True
        return torch.nonzero(stay)[:, 0]


def _check_batch_one(input_ids: torch.Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InputError(
            f"the reference runs batch 1 (got input_ids of shape {tuple(input_ids.shape)})",
            hint="run requests one at a time; per-sample exits in a batch come with batching support",
        )
