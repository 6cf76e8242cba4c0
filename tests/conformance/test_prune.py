"""Pruning with the exit, bundle against reference, for every family and KV flavour: FastV and
DART at several layers and ratios, alone and with a fixed exit before, at and after the prune
layer, the same visual tokens kept, the same KV lengths, teacher-forced decoding after it; a batch
of samples pruning each in its own way equals each alone (in-place flavour: batches need it);
R = 0 is bit-for-bit no pruning."""

import numpy as np
import pytest

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.bundle.loaded import Bundle
from dyvte_rt.runtime.pipeline import Pipeline
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit
from dyvte_rt.runtime.prune import parse_prune
from export.prompting import hf_inputs
from export.reference import DyVTEReference
from tests.conformance.cases import CASES
from tests.conformance.conftest import QUESTION, case_bundle
from tests.helpers import runtime_vs_reference

PRUNES = ("fastv:1:0.5", "fastv:2:0.25", "dart:-1:0.5", "dart:1:0.75:2", "dart:2:0.3")
EXITS = (NeverExit(), FixedLayerExit(1), FixedLayerExit(2))


@pytest.fixture(scope="module")
def flavoured(case, kv, checkpoint, routers):
    return case_bundle(case, checkpoint, routers, kv=kv)


def test_bundle_prunes_as_the_reference_with_every_exit(loaded, flavoured, images):
    reference = DyVTEReference(loaded.adapter)
    pruned_layers = set()
    with Bundle.open(flavoured) as opened:
        layers = opened.manifest.prune.layers  # Qwen3-VL's DeepStack ends a segment after layer 0 too
        assert layers == ((-1, 0, 1, 2) if loaded.adapter.deepstack_layers else (-1, 1, 2))
        pipeline = Pipeline(opened)
        name = next(iter(images))
        inputs = hf_inputs(loaded.processor, images[name], QUESTION)
        image = loaded.adapter.image_input(inputs)
        prepared = opened.family.prepare_image(images[name])
        for spec in (*PRUNES, *(["fastv:0:0.5", "dart:0:0.5:3"] if 0 in layers else [])):
            for policy in EXITS:
                worst, got, expected = runtime_vs_reference(
                    pipeline, reference, inputs["input_ids"], image, prepared, policy, spec
                )
                assert worst <= 1e-4, f"{spec} {policy.describe()}: {worst:.2e}"
                assert got.macs == expected.macs, f"{spec} {policy.describe()}"
                if got.pruned_after_layer is not None:
                    pruned_layers.add(got.pruned_after_layer)
                    assert got.visual_tokens_kept == parse_prune(spec).keep(got.n_visual) < got.n_visual
    assert pruned_layers == set(layers)


def test_nothing_pruned_is_bit_for_bit_no_pruning(flavoured, image_files):
    with Bundle.open(flavoured) as opened:
        pipeline = Pipeline(opened)
        model = DyvteModel(opened)
        path = next(iter(image_files.values()))
        ids, prepared = model._prepare(path, QUESTION, 4)
        plain = pipeline.prefill(ids[0], prepared, FixedLayerExit(2))
        for spec in ("fastv:1:0", "dart:-1:0.0"):
            same = pipeline.prefill(ids[0], prepared, FixedLayerExit(2), prune=parse_prune(spec))
            assert np.array_equal(same.logits, plain.logits), spec
            assert same.kept_visual == list(range(plain.n_visual))


def test_a_batch_prunes_each_sample_as_alone(bundle, image_files):
    names = list(image_files)
    items = [
        (image_files[names[0]], QUESTION, "router", "fastv:1:0.5"),
        (image_files[names[1]], "how many?", "layer:2", "dart:-1:0.75"),
        (image_files[names[-1]], "what shape is in the top right corner, please?", "never", "dart:2:0.3:2"),
        (image_files[names[0]], "and the colour?", "layer:1", "fastv:2:0.5"),  # the exit wins
        (None, QUESTION, "never", "fastv:1:0.5"),  # text only: nothing to prune
    ]
    with DyvteModel.load(bundle) as model:
        alone = [
            model.ask(i, q, exit=e, prune=p, max_new_tokens=4, ignore_eos=True, threshold=0.5)
            for i, q, e, p in items
        ]
        together = model.ask_batch(
            [(i, q) for i, q, _, _ in items],
            exit=[e for _, _, e, _ in items],
            prune=[p for *_, p in items],
            max_new_tokens=4,
            ignore_eos=True,
            threshold=0.5,
        )
    for single, batched in zip(alone, together, strict=True):
        assert batched.token_ids == single.token_ids
        assert batched.kept_visual == single.kept_visual and batched.exit_layer == single.exit_layer
        assert batched.pruned_after_layer == single.pruned_after_layer
        assert batched.prefill_macs["actual"] == single.prefill_macs["actual"]
    assert together[3].pruned_after_layer is None and together[3].exit_layer == 1
    assert together[4].kept_visual is None and together[4].visual_tokens == 0
    assert together[1].visual_tokens_kept == parse_prune("dart:-1:0.75").keep(together[1].visual_tokens)


test_a_batch_prunes_each_sample_as_alone.family_cases = tuple(c for c in CASES if "inplace" in c.kv_flavours)
