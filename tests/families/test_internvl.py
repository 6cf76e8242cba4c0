"""InternVL's own arithmetic (dyvte_rt/families/internvl.py): tile grids and token counts against
Hugging Face's GotOcr2 functions at InternVL3-8B's true sizes (448-pixel tiles, 1-12 of them and a
thumbnail, 256 tokens each), for many more image sizes than the conformance suite exports, and the
tiles' pixels against the processor's for a few large ones."""

import numpy as np
import pytest
from PIL import Image
from transformers import GotOcr2ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from dyvte_rt.families import internvl
from dyvte_rt.families.presets import INTERNVL3_8B

FAMILY = INTERNVL3_8B.family_object()
TILES = FAMILY.layout
SIZES = [(int(h), int(w)) for h, w in np.random.RandomState(3).randint(1, 4000, size=(400, 2))] + [
    (448, 448),
    (720, 1280),
    (1008, 1344),
    (1, 20),
    (4000, 200),
    (449, 447),
    (300, 299),
]


@pytest.fixture(scope="module")
def hf_processor():
    return GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )


def test_grids_and_token_counts_equal_hugging_face_for_400_sizes(hf_processor):
    for height, width in SIZES:
        expected = get_optimal_tiled_canvas((height, width), (448, 448), 1, 12)
        assert internvl.best_grid(height, width, TILES) == expected, (height, width)
        patches = hf_processor.get_number_of_image_patches(height, width, {})
        assert internvl.tile_count(height, width, TILES) == patches, (height, width)
        assert FAMILY.visual_tokens(height, width) == 256 * patches


def test_the_largest_count_is_twelve_tiles_and_the_thumbnail():
    assert FAMILY.vision.visual_tokens == 256 * 13 == max(FAMILY.visual_tokens(h, w) for h, w in SIZES)
    assert FAMILY.visual_tokens(1008, 1344) == 256 * 13  # 4:3 -> 4x3 tiles
    assert FAMILY.visual_tokens(448, 448) == 256  # one tile, no thumbnail


@pytest.mark.parametrize("size", [(720, 1280), (1000, 333), (450, 451)])
def test_tiles_equal_the_processors_pixels(hf_processor, size):
    height, width = size
    pixels = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = hf_processor(images=image, return_tensors="np")["pixel_values"]
    ours = FAMILY.prepare_image(image)
    assert ours.pixel_values.shape == expected.shape
    assert np.abs(ours.pixel_values - expected).max() <= 1e-5
    assert ours.visual_tokens == 256 * expected.shape[0]


def test_the_prompt_wraps_the_visual_tokens_in_image_markers():
    assert FAMILY.image_text("<IMG_CONTEXT>", 3) == "<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>"
