"""LLaVA-NeXT's own arithmetic (dyvte_rt/families/llava_next.py): tiling and token counts against
Hugging Face's functions at LLaVA-NeXT-7B's true sizes (336-pixel tiles, 14-pixel patches, its five
canvases), for many more image sizes than the conformance suite exports."""

import numpy as np
import pytest
from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

from dyvte_rt.families import llava_next as anyres
from dyvte_rt.families.presets import LLAVA_NEXT_7B
from export.tiny_models import fast_word_tokenizer

TILING = LLAVA_NEXT_7B.family_object().layout

SIZES = [(h, w) for h, w in np.random.RandomState(0).randint(1, 2500, size=(300, 2))] + [
    (672, 672),
    (720, 1280),
    (1280, 720),
    (336, 336),
    (1, 4000),
    (4000, 3),
    (337, 1009),
]
PINPOINTS = [list(p) for p in TILING.grid_pinpoints]


@pytest.fixture(scope="module")
def hf_processor():
    tokenizer = fast_word_tokenizer(["a"])
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def test_canvas_choice_and_fitted_size_match_hugging_face():
    for height, width in SIZES:
        height, width = int(height), int(width)
        canvas = anyres.best_resolution(height, width, TILING.grid_pinpoints)
        assert canvas == select_best_resolution((height, width), PINPOINTS), (height, width)
        image = np.zeros((3, height, width), dtype=np.uint8)
        assert anyres.fitted_size(height, width, canvas) == get_patch_output_size(
            image, canvas, "channels_first"
        )


def test_visual_token_counts_match_the_processor(hf_processor):
    for height, width in SIZES:
        height, width = int(height), int(width)
        expected = hf_processor._get_number_of_features(height, width, 336, 336) - 1  # "default": no CLS
        assert anyres.visual_tokens(height, width, TILING) == expected, (height, width)
        assert len(anyres.pack_index(height, width, TILING)) == expected


def test_llava_next_7b_counts():
    assert anyres.visual_tokens(672, 672, TILING) == 2928  # 576 base + 48 rows of 48 + newline
    assert anyres.most_visual_tokens(TILING) == 2928
    assert anyres.tile_count(672, 672, TILING) == 5


def test_pack_index_reads_the_base_view_then_unpadded_rows_with_newlines():
    info = TILING
    side = info.feature_side
    index = anyres.pack_index(250, 900, info)  # wide: canvas 336x1008, 1 x 3 tiles, rows cut above/below
    views = anyres.tile_count(250, 900, info)
    assert views == 4
    assert (index[: side * side] == np.arange(side * side)).all()
    newline = views * side * side
    rows = index[side * side :].reshape(-1, 3 * side + 1)  # whole map width + the newline
    assert (rows[:, -1] == newline).all()
    assert rows.shape[0] < side  # unpadded: fewer rows than the map's 24
    first = rows[0, :-1]
    # a map row crosses tile 1, 2 and 3 at the same row inside each tile
    y = (first[0] - side * side) // side
    assert list(first[:2]) == [side * side + y * side, side * side + y * side + 1]
    assert first[side] == 2 * side * side + y * side
    assert index.max() == newline and index.min() == 0
