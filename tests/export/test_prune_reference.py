"""Pruning semantics of the reference (docs/exit-semantics.md, *Pruning*): the rankings follow the
specification written out by hand here, removal equals masking the pruned keys, and R = 0 is the
model without pruning."""

import math

import numpy as np
import pytest
import torch

from dyvte_rt.errors import PolicyError
from dyvte_rt.runtime.compute import DecoderDims, prefill_macs
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit
from dyvte_rt.runtime.prune import NO_PRUNE, PrunePolicy, check_prune_fits, kept_from_ranking, parse_prune
from export.prune_scoring import dart_ranking, fastv_ranking, last_query_attention
from export.reference import DyVTEReference
from export.reference.masking import prefill_with_visual_keys_masked


def test_specs_parse_round_trip_and_refuse_in_one_line():
    assert parse_prune("none") == NO_PRUNE and not NO_PRUNE.active
    assert parse_prune("FastV:2:0.5") == PrunePolicy("fastv", 2, 0.5)
    assert parse_prune("dart:-1:0.75") == PrunePolicy("dart", -1, 0.75, 8)
    assert parse_prune("dart:3:.3:4") == PrunePolicy("dart", 3, 0.3, 4)
    for spec in ("none", "fastv:2:0.5", "dart:-1:0.75", "dart:3:0.3:4"):
        assert parse_prune(spec).spec() == spec
    for bad in ("fastv:-1:0.5", "fastv:2:1.5", "fastv:2:0.5:3", "dart:1:0.5:0", "topk:1:0.5", "fastv:2"):
        with pytest.raises(PolicyError) as err:
            parse_prune(bad)
        assert "\n" not in err.value.one_line()
    with pytest.raises(PolicyError, match="re-export"):
        check_prune_fits(parse_prune("fastv:1:0.5"), None, 4)
    with pytest.raises(PolicyError, match="prunes after layers"):
        check_prune_fits(parse_prune("fastv:0:0.5"), (-1, 1, 2), 4)
    check_prune_fits(NO_PRUNE, None, 4)  # no prune asked: any bundle


def test_keep_rounds_halves_to_even():
    assert [PrunePolicy("fastv", 1, r).keep(5) for r in (0.0, 0.1, 0.3, 0.5, 0.7, 1.0)] == [5, 5, 3, 3, 1, 0]
    assert PrunePolicy("fastv", 1, 0.5).keep(576) == 288 and PrunePolicy("dart", 1, 0.25).keep(2) == 2


def _fastv_by_hand(query, key, last, scale):
    """Mean over heads of softmax(q_last . k / sqrt(d)) over the keys up to `last`, loops only."""
    heads, steps, _ = query.shape
    groups = heads // key.shape[0]
    out = np.zeros(steps)
    for h in range(heads):
        logits = [float(query[h, last] @ key[h // groups, j]) * scale for j in range(last + 1)]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        for j, e in enumerate(exps):
            out[j] += e / sum(exps) / heads
    return out


def _dart_by_hand(x, keep, pivots):
    """Pivots: the largest norms (ties: lower index); the rest by max cosine to a pivot, smallest first."""
    norms = np.linalg.norm(x, axis=1)
    order = sorted(range(len(x)), key=lambda j: (-norms[j], j))
    chosen = order[: min(pivots, keep)]
    unit = x / np.maximum(norms, 1e-12)[:, None]
    others = [j for j in range(len(x)) if j not in chosen]
    score = {j: max((float(unit[j] @ unit[p]) for p in chosen), default=-math.inf) for j in others}
    others.sort(key=lambda j: (score[j], j))
    return sorted(chosen + others[: keep - len(chosen)])


def test_rankings_follow_the_specification():
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, steps in ((4, 4, 9), (4, 2, 12), (6, 1, 7)):
        query = torch.randn(2, heads, steps, 8, generator=gen)
        key = torch.randn(2, kv_heads, steps, 8, generator=gen)
        last = torch.tensor([steps - 1, steps - 3])
        scores = last_query_attention(query, key, last, 8**-0.5)
        for b in range(2):
            want = _fastv_by_hand(query[b].numpy(), key[b].numpy(), int(last[b]), 8**-0.5)
            assert np.abs(scores[b].numpy() - want).max() < 1e-6
            rows = torch.arange(1, steps - 3)[None]
            ranking = fastv_ranking(scores, torch.tensor([b]), rows)[0].numpy()
            visual = scores[b, 1 : steps - 3].numpy()
            assert ranking.tolist() == sorted(range(len(visual)), key=lambda j: (-visual[j], j))
    tied = fastv_ranking(torch.full((1, 6), 0.5), torch.tensor([0]), torch.tensor([[0, 2, 3, 5]]))
    assert tied[0].tolist() == [0, 1, 2, 3]  # equal scores: the lower index first
    for visual, keep, pivots in ((10, 5, 2), (10, 3, 8), (6, 6, 1), (7, 0, 8)):
        hidden = torch.randn(2, visual + 3, 16, generator=gen)
        rows = torch.arange(2, 2 + visual)[None]
        ranking = dart_ranking(hidden, torch.tensor([1]), rows, torch.tensor([min(pivots, keep)]))
        kept = kept_from_ranking(ranking.numpy(), keep).tolist()
        assert kept == _dart_by_hand(hidden[1, 2 : 2 + visual].numpy(), keep, pivots)
    zeros = dart_ranking(
        torch.zeros(1, 5, 4), torch.tensor([0]), torch.tensor([[0, 1, 2, 3]]), torch.tensor([1])
    )
    assert zeros[0].tolist() == [0, 1, 2, 3]  # all norms 0, all cosines 0: index order


@pytest.mark.parametrize("spec", ["fastv:0:0.5", "fastv:2:0.25", "dart:-1:0.5", "dart:1:0.75:2"])
def test_removal_equals_masking_the_pruned_keys(loaded_models, backbone, prompt_factory, spec):
    loaded = loaded_models[backbone]
    prompt = prompt_factory(loaded)
    reference = DyVTEReference(loaded.adapter)
    prune = parse_prune(spec)
    ids, pixels = prompt.input_ids, prompt.pixel_values
    full = reference.prefill(ids, pixels, NeverExit()).logits[0, -1]
    for exit_layer in (None, 1, 2):
        policy = NeverExit() if exit_layer is None else FixedLayerExit(exit_layer)
        removed = reference.prefill(ids, pixels, policy, prune=prune)
        pruned = exit_layer is None or exit_layer > prune.layer  # an exit at or before K wins
        assert removed.pruned_after_layer == (prune.layer if pruned else None), exit_layer
        kept = removed.kept_visual
        assert (len(kept) == prune.keep(removed.n_visual)) if pruned else kept is None
        masked = prefill_with_visual_keys_masked(
            reference, ids, pixels, exit_layer, prune.layer if pruned else None, kept
        )
        assert (removed.logits[0, -1] - masked[0, -1]).abs().max() <= 1e-4, (spec, exit_layer)
        # the positions of what stayed are the original ones
        visual_at = torch.nonzero(ids[0] == loaded.adapter.image_token_id)[:, 0]
        stays = (ids[0] != loaded.adapter.image_token_id) if not pruned or exit_layer is not None else None
        if stays is None:
            stays = ids[0] != loaded.adapter.image_token_id
            stays[visual_at[kept]] = True
        assert removed.positions[0].tolist() == torch.nonzero(stays)[:, 0].tolist()
    assert (removed.logits[0, -1] - full).abs().max() > 1e-4, (
        "pruning had no effect: the test would prove nothing"
    )


def test_nothing_pruned_is_the_model_without_pruning(loaded_models, prompt_factory):
    loaded = loaded_models["llama-gqa"]
    prompt = prompt_factory(loaded)
    reference = DyVTEReference(loaded.adapter)
    plain = reference.generate(prompt.input_ids, prompt.pixel_values, FixedLayerExit(2), max_new_tokens=5)
    for spec in ("fastv:1:0", "dart:-1:0", "dart:0:0.0:1"):
        same = reference.generate(prompt.input_ids, prompt.pixel_values, FixedLayerExit(2), 5, prune=spec)
        assert same.tokens == plain.tokens and same.prefill.kept_visual == list(range(plain.prefill.n_visual))
        assert torch.equal(same.prefill.logits, plain.prefill.logits)


def test_pruned_prefill_macs_count_what_each_layer_sees():
    dims = DecoderDims(hidden=64, kv_width=32, mlp=128, num_layers=6)
    n, v = 40, 24
    from dyvte_rt.runtime.compute import layer_macs

    seen = [n, n, n - v + 10, n - v + 10, n - v, n - v]  # prune after 1 keeping 10, exit after 3
    assert prefill_macs(dims, n, v, 3, 1, 10).actual == sum(layer_macs(t, dims) for t in seen)
    assert prefill_macs(dims, n, v, None, -1, 10).actual == 6 * layer_macs(n - v + 10, dims)
    assert prefill_macs(dims, n, v, None).actual == prefill_macs(dims, n, v, None).full
