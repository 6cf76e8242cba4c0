"""Qwen3-VL's own parts (dyvte_rt/families/qwen3_vl.py, export/families/qwen3_vl.py): the position
grid's bilinear taps against Hugging Face's for many grids, the DeepStack levels against Hugging
Face's tower, and the DeepStack exit rule — levels after an exit are dropped, because no visual
token is left to take them — checked against the second implementation of an exit (visual keys
masked from the text after the exit layer, every level still added to the visual rows) at exits
before, at and after the last injection."""

import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from dyvte_rt.families.qwen3_vl import DeepStackGridInfo, interpolation_taps
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit
from export.families.qwen3_vl import build_tiny_qwen3_vl
from export.loading import load_checkpoint
from export.prompting import hf_inputs
from export.reference import DyVTEReference
from export.reference.masking import prefill_with_visual_keys_masked

INFO = DeepStackGridInfo(16, 2, 2, 0, 0, None, position_side=48, deepstack_layers=3)  # Qwen3-VL-8B's
GRIDS = [(1, 2 * h, 2 * w) for h, w in np.random.RandomState(5).randint(1, 60, size=(80, 2))] + [(1, 2, 2)]


def test_position_grid_taps_equal_hugging_face_for_81_grids():
    for grid in GRIDS:
        index, weights = get_vision_interpolation_indices_and_weights(
            torch.tensor([grid]), 48, "bilinear", True, 2
        )
        ours_index, ours_weights = interpolation_taps(grid, INFO)
        assert np.array_equal(ours_index, index.numpy()), grid
        assert np.abs(ours_weights - weights.numpy()).max() <= 1e-7, grid


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_checkpoint(str(build_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3-vl"), seed=3)))


@pytest.fixture(scope="module")
def inputs(loaded):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (150, 90, 3), dtype=np.uint8)
    return hf_inputs(loaded.processor, Image.fromarray(pixels), "what shape is in the top left?")


def test_deepstack_levels_equal_hugging_face(loaded, inputs):
    adapter = loaded.adapter
    with torch.no_grad():
        hf = loaded.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        features, levels = adapter.vision_outputs(adapter.image_input(inputs))
    expected = torch.stack([level[0] for level in hf.deepstack_features])  # [n, V, D]
    assert levels.shape == (1, *expected.shape) and adapter.deepstack_layers == 2
    assert float((levels[0] - expected).abs().max()) <= 1e-5
    assert float((features[0] - hf.pooler_output[0]).abs().max()) <= 1e-5


@pytest.mark.parametrize("exit_layer", [0, 1, 2])  # before, at and after the last injection (layer 1)
def test_levels_after_an_exit_are_dropped_as_no_visual_token_is_left(loaded, inputs, exit_layer):
    reference = DyVTEReference(loaded.adapter, candidate_layers=(0, 1, 2))
    ids = inputs["input_ids"]
    image = loaded.adapter.image_input(inputs)
    text = ids[0] != loaded.adapter.image_token_id
    result = reference.prefill(ids, image, FixedLayerExit(exit_layer))
    masked = prefill_with_visual_keys_masked(reference, ids, image, exit_layer)
    assert result.exit_layer == exit_layer
    assert float((result.logits[0] - masked[0, text]).abs().max()) <= 1e-5
    full = reference.prefill(ids, image, NeverExit()).logits[0, -1]
    if exit_layer < 2:  # an exit before the last layers changes the answer's logits: the exit is real
        assert float((result.logits[0, -1] - full).abs().max()) > 1e-6
