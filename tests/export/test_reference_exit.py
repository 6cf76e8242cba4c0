"""Exit semantics of the reference (docs/exit-semantics.md)."""

import pytest
import torch

from dyvte_rt.errors import InputError, PolicyError
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit, RouterExit
from export.reference import DyVTEReference, RouterBank, feature_positions
from export.reference.masking import prefill_with_visual_keys_masked
from export.reference.routers import constant_routers


def test_removal_equals_masking_for_every_exit_layer(loaded_models, backbone, prompt_factory):
    loaded = loaded_models[backbone]
    prompt = prompt_factory(loaded)
    reference = DyVTEReference(loaded.adapter)
    keep = prompt.input_ids[0] != loaded.adapter.image_token_id
    full = reference.prefill(prompt.input_ids, prompt.pixel_values, NeverExit()).logits[:, keep]
    for k in range(reference.num_layers - 1):
        removed = reference.prefill(prompt.input_ids, prompt.pixel_values, FixedLayerExit(k))
        masked = prefill_with_visual_keys_masked(reference, prompt.input_ids, prompt.pixel_values, k)
        assert removed.exit_layer == k
        assert removed.positions[0].tolist() == torch.nonzero(keep).flatten().tolist()  # original ids kept
        assert (removed.logits - masked[:, keep]).abs().max() <= 1e-4, f"exit after layer {k}"
        assert (removed.logits - full).abs().max() > 1e-3, "exit had no effect: the test would prove nothing"


def test_kv_cache_lengths_differ_before_and_after_the_exit(loaded_models, prompt_factory):
    loaded = loaded_models["llama-gqa"]
    prompt = prompt_factory(loaded)
    reference = DyVTEReference(loaded.adapter)
    result = reference.generate(prompt.input_ids, prompt.pixel_values, FixedLayerExit(1), max_new_tokens=3)
    n, v = result.prefill.n_tokens, result.prefill.n_visual
    decoded = len(result.tokens) - 1  # the last token is produced but never fed back
    assert result.prefill.cache.lengths() == [n + decoded] * 2 + [n - v + decoded] * 2


def test_decode_after_exit_equals_masked_full_sequence(loaded_models, prompt_factory):
    """A decoded token sees the same keys whether visual tokens were removed or masked."""
    loaded = loaded_models["qwen2"]
    prompt = prompt_factory(loaded)
    reference = DyVTEReference(loaded.adapter)
    k = 1
    result = reference.generate(prompt.input_ids, prompt.pixel_values, FixedLayerExit(k), max_new_tokens=4)
    ids = torch.cat([prompt.input_ids, torch.tensor([result.tokens[:-1]])], dim=1)
    masked = prefill_with_visual_keys_masked(reference, ids, prompt.pixel_values, k)
    greedy = masked[0, prompt.input_ids.shape[1] - 1 :].argmax(-1).tolist()
    assert greedy == result.tokens


def test_router_policy_exits_where_the_routers_fire(loaded_models, backbone, prompt_factory):
    loaded = loaded_models[backbone]
    prompt = prompt_factory(loaded)
    layers = range(loaded.adapter.dims.num_layers - 1)
    bank = constant_routers(loaded.adapter.dims.hidden, layers, fire_at=2)
    reference = DyVTEReference(loaded.adapter, routers=bank)
    routed = reference.prefill(prompt.input_ids, prompt.pixel_values, RouterExit(0.5))
    fixed = reference.prefill(prompt.input_ids, prompt.pixel_values, FixedLayerExit(2))
    assert routed.exit_layer == 2
    assert sorted(routed.exit_probs) == [0, 1, 2]  # evaluated up to the exit, not beyond
    assert routed.exit_probs[2] == pytest.approx(0.99, abs=1e-6)
    assert torch.equal(routed.logits, fixed.logits)
    stricter = reference.prefill(prompt.input_ids, prompt.pixel_values, RouterExit(0.995))
    assert stricter.exit_layer is None and stricter.macs.saved_fraction == 0.0


def test_features_are_finite_when_the_question_follows_the_image(loaded_models, prompt_factory):
    loaded = loaded_models["llama-mha"]
    image_id = loaded.adapter.image_token_id
    prompt = prompt_factory(loaded)
    n_visual = int((prompt.input_ids == image_id).sum())
    bos = loaded.processor.tokenizer.bos_token_id
    cases = {
        "image is the last prompt token": torch.tensor([[bos] + [image_id] * n_visual]),
        "one token after the image": torch.tensor([[bos] + [image_id] * n_visual + [bos]]),
        "empty question": prompt_factory(loaded, question="").input_ids,
    }
    reference = DyVTEReference(
        loaded.adapter, routers=RouterBank(loaded.adapter.dims.hidden, range(3), width=8)
    )
    for name, ids in cases.items():
        positions = feature_positions(ids, image_id)
        assert positions.numel() >= 1 and int(positions.max()) < ids.shape[1], name
        result = reference.prefill(ids, prompt.pixel_values, NeverExit(), collect_features=True)
        assert result.features, name
        for layer, feats in result.features.items():
            assert torch.isfinite(feats).all(), f"{name}: NaN/inf features at layer {layer}"
        assert all(0.0 <= p <= 1.0 for p in result.exit_probs.values()), name


def test_feature_positions_follow_the_last_image_token():
    ids = torch.tensor([[1, 5, 4, 4, 4, 7, 8, 9]])  # image tokens (id 4) at 2..4
    assert feature_positions(ids, image_token_id=4).tolist() == [5, 6]  # last token (7) excluded
    assert feature_positions(torch.tensor([[1, 7, 8]]), image_token_id=4).tolist() == [0, 1]  # no image


def test_prompts_without_image_tokens_never_exit(loaded_models):
    loaded = loaded_models["llama-gqa"]
    reference = DyVTEReference(loaded.adapter)
    result = reference.prefill(torch.tensor([[1, 10, 11, 12]]), None, FixedLayerExit(1))
    assert result.exit_layer is None and result.n_visual == 0


def test_user_mistakes_raise_project_errors(loaded_models, prompt_factory):
    loaded = loaded_models["llama-gqa"]
    prompt = prompt_factory(loaded)
    reference = DyVTEReference(loaded.adapter)
    with pytest.raises(InputError, match="routers"):
        reference.prefill(prompt.input_ids, prompt.pixel_values, RouterExit())
    with pytest.raises(PolicyError):
        reference.prefill(
            prompt.input_ids, prompt.pixel_values, FixedLayerExit(3)
        )  # last layer: nothing after
    with pytest.raises(InputError, match="batch 1"):
        reference.prefill(prompt.input_ids.repeat(2, 1), prompt.pixel_values.repeat(2, 1, 1, 1), NeverExit())
    with pytest.raises(InputError, match="no image"):
        reference.prefill(prompt.input_ids, None, NeverExit())
