"""The whole bundle, run by the torch-free runtime, against the PyTorch reference: every exit
policy, both KV flavours, prefill and teacher-forced decoding, KV lengths after the exit."""

import numpy as np
import pytest
import torch

from dyvte_rt.bundle.loaded import Bundle
from dyvte_rt.runtime.pipeline import Pipeline
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit, RouterExit
from export.prompting import hf_inputs
from export.reference import DyVTEReference, RouterBank
from tests.conformance.conftest import QUESTION, case_bundle
from tests.helpers import DECODE_STEPS, runtime_vs_reference


@pytest.fixture(scope="module")
def flavoured(case, kv, checkpoint, routers):
    return case_bundle(case, checkpoint, routers, kv=kv)


def _router_thresholds(reference, loaded, inputs, image) -> list[float]:
    """Thresholds that make the routers exit at the first layer, at none, and between."""
    probs = reference.prefill(inputs["input_ids"], image, RouterExit(1.0)).exit_probs  # asks every router
    middle = (probs[1] + probs[2]) / 2 if probs[2] > probs[1] else None
    return [0.0, 1.0, *([middle] if middle is not None else [])]


def test_bundle_equals_the_reference_for_every_exit_policy(loaded, flavoured, routers, images):
    bank = RouterBank.load(routers)
    reference = DyVTEReference(loaded.adapter, routers=bank, candidate_layers=bank.layers)
    exits = set()
    with Bundle.open(flavoured) as opened:
        pipeline = Pipeline(opened)
        candidates = opened.manifest.exit.candidate_layers
        assert candidates == (1, 2) == bank.layers
        for name in list(images)[:3]:
            inputs = hf_inputs(loaded.processor, images[name], QUESTION)
            image = loaded.adapter.image_input(inputs)
            prepared = opened.family.prepare_image(images[name])
            policies = [NeverExit(), *(FixedLayerExit(k) for k in candidates)]
            policies += [RouterExit(t) for t in _router_thresholds(reference, loaded, inputs, image)]
            for policy in policies:
                worst, got, expected = runtime_vs_reference(
                    pipeline, reference, inputs["input_ids"], image, prepared, policy
                )
                assert worst <= 1e-4, f"{name} {policy.describe()}: {worst:.2e}"
                assert got.n_visual == prepared.visual_tokens == expected.n_visual
                assert int(got.cache.position_offsets[0]) == expected.cache.position_offset
                if isinstance(policy, RouterExit):  # the runtime asks routers only for this policy
                    assert got.exit_probs == pytest.approx(expected.exit_probs, abs=1e-5)
                if got.exit_layer is not None:  # every visual position left the layers above the exit
                    exits.add(got.exit_layer)
                    lengths, n, v, k = got.cache.layer_lengths(), got.n_tokens, got.n_visual, got.exit_layer
                    held = [n + DECODE_STEPS] * (k + 1) + [n - v + DECODE_STEPS] * (len(lengths) - k - 1)
                    assert lengths == held
    assert exits == {1, 2}


def test_a_generated_image_placeholder_is_embedded_as_a_token(loaded, bundle, images):
    """Decoding feeds back whatever the model generated; the placeholder id then means the token
    itself (as in Hugging Face's decoding), not an image row."""
    reference = DyVTEReference(loaded.adapter)
    name = next(iter(images))
    inputs = hf_inputs(loaded.processor, images[name], QUESTION)
    image = loaded.adapter.image_input(inputs)
    expected = reference.prefill(inputs["input_ids"], image, NeverExit())
    token = loaded.adapter.image_token_id
    with Bundle.open(bundle) as opened:
        pipeline = Pipeline(opened)
        got = pipeline.prefill(
            inputs["input_ids"].numpy(), opened.family.prepare_image(images[name]), NeverExit()
        )
        want = reference.decode_one_token(torch.tensor([[token]]), expected.n_tokens, expected.cache)
        have = pipeline.decode_one_token(token, got.n_tokens, got.cache)
    assert np.abs(have - want.numpy()).max() <= 1e-4
