"""Qwen3-VL (`qwen3-vl`): Qwen2-VL's patch grids and three-section rotary positions (interleaved
across the head by the decoder's rotary embedding, inside the segment graphs), with two things of
its own, torch-free here:

- the vision tower's learned position embeddings, a square grid resampled to each image's patch
  grid by bilinear interpolation (align_corners): the runtime computes each patch's four taps and
  weights (`interpolation_taps`, Hugging Face's `get_vision_interpolation_indices_and_weights`)
  and the vision graph sums the weighted rows;
- DeepStack: the vision graph also gives `deepstack_layers` levels of visual features, level i
  added to the visual tokens' hidden states after decoder layer i. Segments end after each such
  layer and a small graph (`deepstack_add`) adds the level to the rows of the visual tokens present
  then; after an exit there are none, so the levels still to come are dropped (docs/exit-semantics.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from dyvte_rt.bundle import io_names
from dyvte_rt.families.qwen2_vl import Grid, PatchGridInfo, Qwen2VLFamily
from dyvte_rt.inputs.preprocess import PreparedImage


@dataclass(frozen=True)
class DeepStackGridInfo(PatchGridInfo):
    """The manifest's `vision.layout` for Qwen3-VL: Qwen2-VL's, plus the learned position grid's
    side and the number of DeepStack levels (injected after decoder layers 0..deepstack_layers-1)."""

    position_side: int = 0
    deepstack_layers: int = 0


class Qwen3VLFamily(Qwen2VLFamily):
    layout_type = DeepStackGridInfo

    @property
    def deepstack_layers(self) -> int:
        return self.layout.deepstack_layers

    def prepare_image(self, image: Image.Image) -> PreparedImage:
        prepared = super().prepare_image(image)
        index, weights = interpolation_taps(prepared.layout, self.layout)
        feeds = {**prepared.feeds, io_names.INTERP_INDEX: index, io_names.INTERP_WEIGHTS: weights}
        return PreparedImage(prepared.pixel_values, prepared.visual_tokens, feeds, prepared.layout)

    def describe_image(self) -> str:
        return super().describe_image() + f"; DeepStack into decoder layers 0-{self.deepstack_layers - 1}"


def interpolation_taps(grid: Grid, info: DeepStackGridInfo) -> tuple[np.ndarray, np.ndarray]:
    """([patches, 4] int64 rows of the flattened position grid, [patches, 4] float32 weights):
    bilinear with align_corners, for the patches in their merge-block order, in float32 as
    Hugging Face computes them."""
    frames, rows, cols = grid
    m, side = info.merge_size, info.position_side
    within = np.arange(rows * cols)
    in_col, in_row = within % m, (within // m) % m
    block_col, block_row = (within // (m * m)) % (cols // m), within // (m * m * (cols // m))
    row, col = block_row * m + in_row, block_col * m + in_col

    def axis(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        source = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(source)
        offsets = np.arange(2)
        taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
        distance = np.abs(source[:, None] - floor[:, None] - offsets.astype(np.float32))
        return taps, np.maximum(np.float32(1) - distance, np.float32(0)).astype(np.float32)

    h_taps, h_weights = axis(row, rows)
    w_taps, w_weights = axis(col, cols)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return np.tile(index, (frames, 1)).astype(np.int64), np.tile(weights, (frames, 1)).astype(np.float32)
