"""LLaVA-NeXT (`llava-next`): any-resolution images, torch-free, step for step as Hugging Face
does them.

Preprocessing (the PIL image processor): the image is resized, keeping its aspect ratio, onto the
best-fitting canvas among the checkpoint's grid pinpoints, padded to it with black, and cut into
square tiles; a base view of the whole image (squashed to one tile) goes first.

Packing (the model's `pack_image_features`): the tiles' features form one map, the padding's rows
or columns are cut off again ("unpadding"), an `image_newline` row closes every map row, and the
base view's features go first. Here that is an index: the vision graph gathers the rows of its
flattened tile features (and a newline row appended after them) in this order, so the graph
itself has no data-dependent shapes. `visual_tokens` gives the count the processor gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dyvte_rt.bundle import io_names
from dyvte_rt.bundle.manifest import ImagePreprocess
from dyvte_rt.families.base import Family
from dyvte_rt.inputs.preprocess import PreparedImage, preprocess, to_rgb


@dataclass(frozen=True)
class AnyResInfo:
    """The manifest's `vision.layout` for LLaVA-NeXT: a base view of the whole image plus tiles of
    it resized onto the best-fitting canvas."""

    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) canvases, multiples of tile_size
    tile_size: int  # side of the base view and of every tile: the vision tower's input
    feature_side: int  # visual tokens per tile side (tile_size // patch_size)
    newline: bool  # an image_newline row closes each row of the unpadded tile map


class LlavaNextFamily(Family):
    """Images cut into a base view and tiles; the vision graph takes one image's views and the
    packing index of its visual tokens (their count depends on the image's size)."""

    layout_type = AnyResInfo
    vision_per_image = True

    def prepare_image(self, image: Image.Image) -> PreparedImage:
        spec = self.vision.preprocess
        rgb = to_rgb(image) if spec.convert_rgb else image
        views = np.concatenate([preprocess(view, spec) for view in tile_views(rgb, self.layout, spec)])
        index = pack_index(rgb.height, rgb.width, self.layout)
        return PreparedImage(views, len(index), {io_names.PACK_INDEX: index})

    def visual_tokens(self, height: int, width: int) -> int:
        return visual_tokens(height, width, self.layout)

    def profile_ranges(self, settings) -> dict:
        """From the base view alone (nothing left after unpadding) to the largest canvas's count."""
        from engines.tensorrt.profiles import phase_ranges

        info = self.layout
        views = max(tile_count(h, w, info) for h, w in info.grid_pinpoints)
        return phase_ranges(self.vision.visual_tokens, settings, info.feature_side**2, views)

    def describe_image(self) -> str:
        canvases = ", ".join(f"{h}x{w}" for h, w in self.layout.grid_pinpoints)
        return (
            f"any resolution: {self.layout.tile_size}px tiles on canvases {canvases}; "
            f"up to {self.vision.visual_tokens} visual tokens per image"
        )


def best_resolution(height: int, width: int, pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The canvas (height, width) that keeps most of the image's pixels and wastes least
    (Hugging Face's `select_best_resolution`)."""
    best, most_effective, least_wasted = pinpoints[0], 0, float("inf")
    for canvas_h, canvas_w in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - effective
        if effective > most_effective or (effective == most_effective and wasted < least_wasted):
            best, most_effective, least_wasted = (canvas_h, canvas_w), effective, wasted
    return best


def fitted_size(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """The image's size resized onto `canvas` with its aspect ratio kept (`get_patch_output_size`)."""
    canvas_h, canvas_w = canvas
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:  # float products as Hugging Face computes them (ceil of 336.00000000000006 is 337)
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def kept_map(height: int, width: int, info: AnyResInfo) -> tuple[int, int, int, int, int]:
    """The tile-feature map of an image: (tile columns, first row, end row, first column, end column)
    left after unpadding (`unpad_image`), in feature units."""
    canvas_h, canvas_w = best_resolution(height, width, info.grid_pinpoints)
    rows, cols = canvas_h // info.tile_size, canvas_w // info.tile_size
    map_h, map_w = rows * info.feature_side, cols * info.feature_side
    if width / height > map_w / map_h:  # wider than the map: padding above and below
        new_h = int(round(height * (map_w / width), 7))
        pad = (map_h - new_h) // 2
        return cols, pad, map_h - pad, 0, map_w
    new_w = int(round(width * (map_h / height), 7))
    pad = (map_w - new_w) // 2
    return cols, 0, map_h, pad, map_w - pad


def tile_count(height: int, width: int, info: AnyResInfo) -> int:
    """Views the vision graph runs on: the base view and the canvas's tiles."""
    canvas_h, canvas_w = best_resolution(height, width, info.grid_pinpoints)
    return 1 + (canvas_h // info.tile_size) * (canvas_w // info.tile_size)


def visual_tokens(height: int, width: int, info: AnyResInfo) -> int:
    """Visual tokens of a height x width image: the base view's, the unpadded map's, its newlines."""
    _, top, bottom, left, right = kept_map(height, width, info)
    rows, row_width = bottom - top, right - left + int(info.newline)
    return info.feature_side**2 + rows * row_width


def most_visual_tokens(info: AnyResInfo) -> int:
    """The largest count any image can take: an image filling the largest canvas, unpadded."""
    return max(visual_tokens(h, w, info) for h, w in info.grid_pinpoints)


def pack_index(height: int, width: int, info: AnyResInfo) -> np.ndarray:
    """[V] int64: row of the vision graph's flattened tile features [views * side², D] for each visual
    token in prompt order; views * side² is the image_newline row."""
    side = info.feature_side
    cols, top, bottom, left, right = kept_map(height, width, info)
    views = tile_count(height, width, info)
    y = np.arange(top, bottom)[:, None]  # feature-map coordinates kept
    x = np.arange(left, right)[None, :]
    tile = 1 + (y // side) * cols + x // side  # view 0 is the base view
    rows = tile * side * side + (y % side) * side + x % side  # [rows, cols]
    if info.newline:
        newline = np.full((rows.shape[0], 1), views * side * side)
        rows = np.concatenate([rows, newline], axis=1)
    return np.concatenate([np.arange(side * side), rows.reshape(-1)]).astype(np.int64)


def tile_views(image: Image.Image, info: AnyResInfo, spec: ImagePreprocess) -> list[Image.Image]:
    """An RGB image -> [base view, tile 0, tile 1, ...] as PIL images of tile_size x tile_size."""
    resample = Image.Resampling(spec.resample)
    canvas = best_resolution(image.height, image.width, info.grid_pinpoints)
    new_h, new_w = fitted_size(image.height, image.width, canvas)
    resized = image.resize((new_w, new_h), resample=resample)
    padded = Image.new("RGB", (canvas[1], canvas[0]), (0, 0, 0))
    padded.paste(resized, ((canvas[1] - new_w) // 2, (canvas[0] - new_h) // 2))
    size = info.tile_size
    tiles = [
        padded.crop((left, top, left + size, top + size))
        for top in range(0, canvas[0], size)
        for left in range(0, canvas[1], size)
    ]
    return [image.resize((size, size), resample=resample), *tiles]
