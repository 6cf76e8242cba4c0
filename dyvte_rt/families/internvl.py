"""InternVL 2.5 / 3 / 3.5 (`internvl`): dynamic tiles, torch-free, step for step as Hugging Face's
GotOcr2 image processor (PIL backend) makes them.

Tiles: among the grids of `min_tiles`..`max_tiles` square tiles, the one whose aspect ratio is
closest to the image's (ties: the larger grid, while the image's area exceeds half of it) is
chosen; the image is resized to fill that grid exactly (its aspect ratio not kept) and cut into
tiles row by row; a thumbnail of the whole image (resized to one tile) follows when there is more
than one tile. Each tile becomes `tokens_per_tile` visual tokens (the vision tower's patches after
the projector's pixel shuffle), in tile order, and the prompt wraps them in `<img>` … `</img>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from dyvte_rt.families.base import Family
from dyvte_rt.families.qwen2_vl import normalization_terms
from dyvte_rt.inputs.preprocess import PreparedImage, channels_first, to_rgb


@dataclass(frozen=True)
class TileInfo:
    """The manifest's `vision.layout` for InternVL: dynamic square tiles and a thumbnail."""

    tile_size: int  # side of a tile: the vision tower's input
    min_tiles: int
    max_tiles: int
    thumbnail: bool  # a thumbnail of the whole image follows the tiles (when there are several)
    tokens_per_tile: int  # visual tokens per tile (after the pixel shuffle)
    image_start: str  # text before an image's visual tokens, e.g. "<img>"
    image_end: str  # and after them, e.g. "</img>"


class InternVLFamily(Family):
    """Images cut into 1..max_tiles tiles plus a thumbnail; the vision graph takes one image's
    tiles and gives their visual tokens in order (their count depends on the image's shape)."""

    layout_type = TileInfo
    vision_per_image = True

    def prepare_image(self, image: Image.Image) -> PreparedImage:
        spec = self.vision.preprocess
        rgb = to_rgb(image) if spec.convert_rgb else image
        pixels = np.stack([channels_first(tile) for tile in tiles(rgb, self.layout, spec.resample)])  # uint8
        scale, shift = normalization_terms(spec, pixels.shape[1])  # one float32 multiply-add
        views = pixels * scale[None, :, None, None] - shift[None, :, None, None]
        return PreparedImage(views.astype(np.float32, copy=False), self.layout.tokens_per_tile * len(views))

    def visual_tokens(self, height: int, width: int) -> int:
        return self.layout.tokens_per_tile * tile_count(height, width, self.layout)

    def image_text(self, placeholder: str, count: int) -> str:
        return f"{self.layout.image_start}{placeholder * count}{self.layout.image_end}"

    def profile_ranges(self, settings) -> dict:
        """From one tile (a square image) to max_tiles tiles and the thumbnail."""
        from engines.tensorrt.profiles import phase_ranges

        info = self.layout
        most = max_views(info)
        return phase_ranges(info.tokens_per_tile * most, settings, info.tokens_per_tile, most)

    def describe_image(self) -> str:
        info = self.layout
        thumb = " + a thumbnail" if info.thumbnail else ""
        return (
            f"dynamic tiles: {info.min_tiles}-{info.max_tiles} tiles of {info.tile_size}px{thumb}, "
            f"{info.tokens_per_tile} visual tokens each; up to {self.vision.visual_tokens} per image"
        )


@lru_cache(maxsize=16)
def grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(columns, rows) of every grid of min..max tiles, fewest tiles first (HF's order)."""
    found = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    return tuple(sorted(found, key=lambda grid: grid[0] * grid[1]))


def best_grid(height: int, width: int, info: TileInfo) -> tuple[int, int]:
    """(columns, rows): the closest aspect ratio; on a tie the later (larger) grid while the image
    covers more than half of it (Hugging Face's `get_optimal_tiled_canvas`)."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids(info.min_tiles, info.max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * info.tile_size * info.tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_count(height: int, width: int, info: TileInfo) -> int:
    """Views the vision graph runs on: the grid's tiles, and the thumbnail if there are several."""
    cols, rows = best_grid(height, width, info)
    count = cols * rows
    return count + 1 if info.thumbnail and count != 1 else count


def max_views(info: TileInfo) -> int:
    return info.max_tiles + (1 if info.thumbnail and info.max_tiles > 1 else 0)


def tiles(image: Image.Image, info: TileInfo, resample: int) -> list[Image.Image]:
    """An RGB image -> its tiles row by row, then the thumbnail (each tile_size x tile_size)."""
    side, filter_ = info.tile_size, Image.Resampling(resample)
    cols, rows = best_grid(image.height, image.width, info)
    resized = image.resize((side * cols, side * rows), resample=filter_)
    views = [
        resized.crop((col * side, row * side, (col + 1) * side, (row + 1) * side))
        for row in range(rows)
        for col in range(cols)
    ]
    if info.thumbnail and len(views) != 1:
        views.append(image.resize((side, side), resample=filter_))
    return views
