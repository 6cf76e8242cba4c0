"""The whole bundle, composed with ONNX Runtime by the runtime loop, against the PyTorch reference."""

import numpy as np
import pytest
import torch

from dyvte_rt.bundle.loaded import Bundle
from dyvte_rt.errors import PolicyError
from dyvte_rt.runtime.pipeline import Pipeline
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit, RouterExit
from export.reference import DyVTEReference, RouterBank
from tests.helpers import DECODE_STEPS, runtime_vs_reference


def _compare(pipeline: Pipeline, reference: DyVTEReference, prompt, policy) -> tuple[float, object]:
    """Max |logit error| over prefill and DECODE_STEPS teacher-forced decode steps."""
    worst, got, _ = runtime_vs_reference(
        pipeline, reference, prompt.input_ids, prompt.pixel_values, prompt.pixel_values.numpy(), policy
    )
    return worst, got


def test_bundle_matches_reference_for_every_exit_layer(
    flavour_bundles, loaded_models, backbone, prompt_factory
):
    loaded = loaded_models[backbone]
    prompt = prompt_factory(loaded)
    reference = DyVTEReference(loaded.adapter)
    with Bundle.open(flavour_bundles[backbone]) as bundle:
        pipeline = Pipeline(bundle)
        candidates = bundle.manifest.exit.candidate_layers
        assert candidates == tuple(range(1, loaded.adapter.dims.num_layers - 1))  # default: 1..L-2
        for policy in [NeverExit(), *(FixedLayerExit(k) for k in candidates)]:
            error, result = _compare(pipeline, reference, prompt, policy)
            assert error <= 1e-4, f"{policy.describe()}: {error:.2e}"
            n, v = result.n_tokens, result.n_visual
            if result.exit_layer is not None:  # KV: N before the exit, N - V after it
                k = result.exit_layer
                lengths = result.cache.layer_lengths()
                assert lengths == [n + DECODE_STEPS] * (k + 1) + [n - v + DECODE_STEPS] * (
                    len(lengths) - k - 1
                )


def test_router_bundle_exits_where_its_routers_fire(router_bundle, loaded_models, prompt_factory):
    path, routers_file = router_bundle
    loaded = loaded_models["llama-gqa"]
    prompt = prompt_factory(loaded)
    reference = DyVTEReference(loaded.adapter, routers=RouterBank.load(routers_file), candidate_layers=(1, 2))
    with Bundle.open(path) as bundle:
        assert bundle.manifest.exit.default_policy == "router" and bundle.manifest.exit.router_width == 4
        pipeline = Pipeline(bundle)
        error, result = _compare(pipeline, reference, prompt, RouterExit(0.5))
        assert result.exit_layer == 2 and error <= 1e-4
        assert result.exit_probs == pytest.approx({1: 0.01, 2: 0.99}, abs=1e-5)
        assert (
            pipeline.prefill(
                prompt.input_ids.numpy(), prompt.pixel_values.numpy(), RouterExit(0.995)
            ).exit_layer
            is None
        )


def test_router_policy_on_a_bundle_without_routers_is_refused(bundles):
    with Bundle.open(bundles["qwen2"]) as bundle, pytest.raises(PolicyError, match="no routers"):
        Pipeline(bundle).check_policy(RouterExit())


def test_fixed_exit_outside_the_candidates_is_refused(bundles):
    with Bundle.open(bundles["qwen2"]) as bundle, pytest.raises(PolicyError, match=r"1\.\.2"):
        Pipeline(bundle).check_policy(FixedLayerExit(0))


def test_a_generated_image_placeholder_is_embedded_as_a_token(bundles, loaded_models, prompt_factory):
    """Decoding feeds back whatever the model generated; the placeholder id then means the token
    itself (as in Hugging Face's decoding), not an image row."""
    loaded = loaded_models["llama-gqa"]
    prompt = prompt_factory(loaded)
    reference = DyVTEReference(loaded.adapter)
    expected = reference.prefill(prompt.input_ids, prompt.pixel_values, NeverExit())
    image_token = loaded.adapter.image_token_id
    with Bundle.open(bundles["llama-gqa"]) as bundle:
        pipeline = Pipeline(bundle)
        got = pipeline.prefill(prompt.input_ids.numpy(), prompt.pixel_values.numpy(), NeverExit())
        want = reference.decode_one_token(torch.tensor([[image_token]]), expected.n_tokens, expected.cache)
        have = pipeline.decode_one_token(image_token, got.n_tokens, got.cache)
    assert np.abs(have - want.numpy()).max() <= 1e-4
