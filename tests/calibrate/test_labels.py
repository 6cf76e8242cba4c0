"""The label rule (docs/calibration.md) and the sweep that computes it."""

import shutil

import pytest
import torch

from calibrate.collect import answer_ids
from calibrate.fixed_layer import pick_layer
from calibrate.router_training import choose_threshold, sweep_thresholds
from calibrate.sweep import Sweep, sweep
from dyvte_rt.runtime.compute import DecoderDims
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit
from dyvte_rt.runtime.prune import parse_prune
from export.loading import load_checkpoint
from export.prompting import hf_inputs
from export.reference import DyVTEReference


def _sweep(agreement, ratio) -> Sweep:
    k = len(agreement)
    return Sweep(
        torch.zeros(k, 4),
        torch.tensor(agreement),
        torch.tensor(ratio),
        torch.ones(k, dtype=torch.bool),
        torch.zeros(k),
        10,
        6,
    )


def test_label_rule_thresholds():
    labels = _sweep([1.0, 0.99, 0.98, 1.0, 1.0], [1.0, 1.03, 1.0, 1.031, 0.5]).labels
    assert labels.tolist() == [1, 1, 0, 0, 1]


@pytest.fixture(scope="module")
def tiny(loaded_models, sample_image):

    loaded = loaded_models["llama-gqa"]
    inputs = hf_inputs(loaded.processor, sample_image, "what color is the circle?")
    return loaded, inputs


def test_sweep_exit_logits_equal_the_reference_exit(tiny):
    """The cheap text-only passes are the real exit: compare with the reference on prompt+answer."""
    loaded, inputs = tiny
    reference = DyVTEReference(loaded.adapter)
    answer = answer_ids(loaded, "red circle")
    result = sweep(reference, inputs["input_ids"], inputs["pixel_values"], answer, (0, 1, 2))
    full_ids = torch.cat([inputs["input_ids"], answer[None]], dim=1)
    n, a = inputs["input_ids"].shape[1], answer.shape[0]
    full = reference.prefill(full_ids, inputs["pixel_values"], NeverExit()).logits[0, n - 1 : n - 1 + a]
    changed = []
    for i, k in enumerate((0, 1, 2)):
        exited = reference.prefill(full_ids, inputs["pixel_values"], FixedLayerExit(k))
        start = n - exited.n_visual - 1
        logits = exited.logits[0, start : start + a]
        agreement = (logits.argmax(-1) == full.argmax(-1)).float().mean()
        assert float(result.token_agreement[i]) == pytest.approx(float(agreement))
        loss = torch.nn.functional.cross_entropy(logits, answer)
        full_loss = torch.nn.functional.cross_entropy(full, answer)
        assert float(result.loss_ratio[i]) == pytest.approx(float(loss / full_loss), rel=1e-4)
        changed.append(bool(agreement < 1))
    assert any(changed), "no exit changed the answer: the 'does not survive' case is not exercised"
    assert result.labels[changed.index(True)] == 0  # an exit that changes the answer is labelled unsafe


def test_an_answer_independent_of_the_image_survives_every_exit(tiny, tmp_path, tiny_checkpoints):
    """Constructed case: a zero final norm makes every logit 0, so no exit can change the answer."""
    _, inputs = tiny
    loaded = load_checkpoint(str(shutil.copytree(tiny_checkpoints["llama-gqa"], tmp_path / "ckpt")))
    with torch.no_grad():
        loaded.model.model.language_model.norm.weight.zero_()
    reference = DyVTEReference(loaded.adapter)
    result = sweep(
        reference, inputs["input_ids"], inputs["pixel_values"], answer_ids(loaded, "red"), (0, 1, 2)
    )
    assert result.labels.tolist() == [1, 1, 1] and bool(result.answer_equal.all())
    assert torch.equal(result.kl_first, torch.zeros(3))


def test_threshold_choice_takes_the_cheapest_that_meets_the_target():
    dims = DecoderDims(hidden=64, kv_width=64, mlp=128, num_layers=4)
    probs = torch.tensor([[0.9, 0.95], [0.2, 0.9], [0.1, 0.3]])  # 3 samples, layers (1, 2)
    equal = torch.tensor([[False, True], [True, True], [True, True]])  # sample 0 may not exit at layer 1
    points = sweep_thresholds(
        probs, equal, (1, 2), dims, [20, 20, 20], [16, 16, 16], thresholds=[0.05, 0.5, 0.92, 1.0]
    )
    by_t = {p.threshold: p for p in points}
    assert by_t[0.05].agreement == pytest.approx(2 / 3) and by_t[1.0].agreement == 1.0
    assert by_t[0.5].agreement == pytest.approx(2 / 3)  # sample 0 exits at layer 1 and changes its answer
    assert by_t[0.92].agreement == 1.0 and by_t[0.92].macs_ratio < by_t[1.0].macs_ratio
    assert choose_threshold(points, 0.99).threshold == 0.92
    assert choose_threshold(points, 0.5).threshold == 0.05


def test_fixed_layer_picks_the_earliest_layer_that_stays_within_the_kl_budget():
    assert pick_layer({1: 0.5, 2: 0.04, 3: 0.01, 4: 0.0}, 0.05) == 2
    assert pick_layer({1: 0.01, 2: 0.2, 3: 0.01}, 0.05) == 3  # a later layer must not break the budget
    assert pick_layer({1: 0.5, 2: 0.4}, 0.05) is None


@pytest.mark.parametrize("spec", ["dart:0:0.5", "fastv:1:0.5"])
def test_a_pruned_sweep_labels_the_pruned_model(tiny, spec):
    """With --prune the full model of the labels is the pruned one: each exit's logits equal the
    reference's pruned exit on prompt + answer (DART; FastV's last token there would be the answer's),
    and the router features those of the pruned prompt alone (both)."""
    loaded, inputs = tiny
    reference = DyVTEReference(loaded.adapter)
    answer = answer_ids(loaded, "red circle")
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    layers = (0, 1, 2)
    result = sweep(reference, ids, pixels, answer, layers, parse_prune(spec))
    prompt = reference.prefill(ids, pixels, NeverExit(), collect_features=True, prune=spec)
    assert result.n_kept == len(prompt.kept_visual) == parse_prune(spec).keep(result.n_visual)
    for i, k in enumerate(layers):
        assert torch.allclose(result.features[i], prompt.features[k][0].float(), atol=1e-5), k
    plain = sweep(reference, ids, pixels, answer, layers)
    assert not torch.allclose(result.features[2], plain.features[2], atol=1e-4), "the prune changed nothing"
    if spec.startswith("dart"):
        full_ids = torch.cat([ids, answer[None]], dim=1)
        n, a = ids.shape[1], answer.shape[0]
        full = reference.prefill(full_ids, pixels, NeverExit(), prune=spec)
        want_full = full.logits[0, n - result.n_visual + result.n_kept - 1 :][:a]
        for i, k in enumerate(layers):
            exited = reference.prefill(full_ids, pixels, FixedLayerExit(k), prune=spec)
            start = n - exited.n_visual - 1
            logits = exited.logits[0, start : start + a]
            agreement = (logits.argmax(-1) == want_full.argmax(-1)).float().mean()
            assert float(result.token_agreement[i]) == pytest.approx(float(agreement)), k
            ratio = torch.nn.functional.cross_entropy(logits, answer) / torch.nn.functional.cross_entropy(
                want_full, answer
            )
            assert float(result.loss_ratio[i]) == pytest.approx(float(ratio), rel=1e-4), k
