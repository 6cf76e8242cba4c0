"""Qwen2-VL and Qwen2.5-VL (`qwen2-vl`, `qwen2.5-vl`): images and positions, torch-free, as
Hugging Face computes them.

Preprocessing (the PIL image processor): the image is resized so both sides are multiples of
patch_size * merge_size and its area lies within [min_pixels, max_pixels] (`smart_resize`;
Python's round, so halves go to even), rescaled and normalised, then cut into patches laid out
merge_size x merge_size block by block, each patch repeated over temporal_patch_size frames.

The vision graph takes the patches and what the model would compute from the grid with Python
loops: each patch's (row, column) for the vision rotary embedding and, for Qwen2.5-VL's windowed
attention, the window order of the merged patches and each patch's window. The language model
takes multimodal rotary positions [3, N]: text tokens count up in all three sections, an image's
tokens get (t, start + row, start + column) on the merged grid, and the text after an image goes
on from start + max(rows, columns). Decoding continues at max + 1: `position_offset` is what the
runtime adds to a token's index to get its position.
"""

from __future__ import annotations

import functools
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dyvte_rt.bundle import io_names
from dyvte_rt.bundle.manifest import ImagePreprocess
from dyvte_rt.errors import InputError
from dyvte_rt.families.base import Family
from dyvte_rt.inputs.preprocess import PreparedImage, to_rgb

Grid = tuple[int, int, int]  # (frames, patch rows, patch columns)


@dataclass(frozen=True)
class PatchGridInfo:
    """The manifest's `vision.layout` for Qwen2-VL / Qwen2.5-VL: images resized to a multiple of
    patch_size * merge_size within a pixel budget, cut into patches that merge_size² at a time
    become one visual token; positions are multimodal rotary (temporal, height, width)."""

    patch_size: int
    temporal_patch_size: int  # a still image is its frame repeated this many times
    merge_size: int
    min_pixels: int
    max_pixels: int
    window_size: int | None  # Qwen2.5-VL's windowed vision attention, in pixels; None: full attention
    # patches a full window holds: the vision graph attends window by window in slots of this many
    # (window_gather / window_slots); None: a bundle from before, whose graph masks one attention over
    # the whole image (window_ids)
    window_slots: int | None = None


class Qwen2VLFamily(Family):
    """Images of any size as patch grids; the vision graph takes one image's patches, their
    positions (and Qwen2.5-VL's windows); prompts take three-section rotary positions."""

    layout_type = PatchGridInfo
    vision_per_image = True

    def prepare_image(self, image: Image.Image) -> PreparedImage:
        spec, info = self.vision.preprocess, self.layout
        rgb = to_rgb(image) if spec.convert_rgb else image
        patches, grid = grid_patches(rgb, info, spec)
        feeds = {io_names.VISION_POSITIONS: vision_positions(grid, info)}
        if info.window_size is not None:
            window_index, window_ids = vision_windows(grid, info)
            feeds[io_names.WINDOW_INDEX] = window_index
            if info.window_slots is None:
                feeds[io_names.WINDOW_IDS] = window_ids
            else:
                gather, slots = window_slots(window_ids, info.window_slots)
                feeds[io_names.WINDOW_GATHER], feeds[io_names.WINDOW_SLOTS] = gather, slots
        return PreparedImage(patches, visual_tokens(grid, info), feeds, layout=grid)

    def visual_tokens(self, height: int, width: int) -> int:
        return visual_tokens(grid_for(height, width, self.layout), self.layout)

    def prompt_positions(self, input_ids: np.ndarray, image: PreparedImage | None) -> tuple[np.ndarray, int]:
        grids = [image.layout] if image is not None else []
        return prompt_positions(input_ids, self.image_token, grids, self.layout)

    def profile_ranges(self, settings) -> dict:
        """From the pixel budget's least to its most merged patches."""
        from engines.tensorrt.profiles import phase_ranges

        info = self.layout
        fewest = max(1, info.min_pixels // (info.patch_size * info.merge_size) ** 2)
        ranges = phase_ranges(self.vision.visual_tokens, settings, fewest)
        visual = ranges["prefill_visual"]["merged"] = ranges["prefill_visual"]["visual"]
        if info.window_slots is not None:  # a window holds 1..window_slots / merge² merged patches
            per_window = info.window_slots // info.merge_size**2
            fewest, typical = (-(-v // per_window) for v in (visual.min, visual.opt))
            ranges["prefill_visual"]["windows"] = type(visual)(fewest, typical, visual.max)
        return ranges

    def describe_image(self) -> str:
        info = self.layout
        return (
            f"any size: resized to {info.min_pixels:,}-{info.max_pixels:,} pixels, "
            f"{info.patch_size}px patches merged {info.merge_size}x{info.merge_size}; "
            f"up to {self.vision.visual_tokens} visual tokens per image"
            + (f"; windowed vision attention ({info.window_size}px)" if info.window_size else "")
        )


def smart_resize(height: int, width: int, info: PatchGridInfo) -> tuple[int, int]:
    """(height, width) after resizing: multiples of patch_size * merge_size, area within budget."""
    factor = info.patch_size * info.merge_size
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"the image is {width}x{height}: its aspect ratio must be below 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > info.max_pixels:
        beta = math.sqrt((height * width) / info.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < info.min_pixels:
        beta = math.sqrt(info.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def grid_for(height: int, width: int, info: PatchGridInfo) -> Grid:
    """The patch grid a height x width image becomes."""
    rows, cols = smart_resize(height, width, info)
    return 1, rows // info.patch_size, cols // info.patch_size


def patch_order(band: np.ndarray, info: PatchGridInfo) -> np.ndarray:
    """One colour band [H, W] -> a view [rows/m, cols/m, m, m, p, p]: patches merge block by block."""
    p, m = info.patch_size, info.merge_size
    rows, cols = band.shape[0] // p, band.shape[1] // p
    return band.reshape(rows // m, m, p, cols // m, m, p).transpose(0, 3, 1, 4, 2, 5)


def visual_tokens(grid: Grid, info: PatchGridInfo) -> int:
    frames, rows, cols = grid
    return frames * rows * cols // info.merge_size**2


def vision_positions(grid: Grid, info: PatchGridInfo) -> np.ndarray:
    """[patches, 2] int64: each patch's (row, column), in the patches' block-by-block order."""
    frames, rows, cols = grid
    m = info.merge_size
    h, w = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    block = (rows // m, m, cols // m, m)
    h = h.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    w = w.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([h, w], axis=-1), (frames, 1)).astype(np.int64)


def vision_windows(grid: Grid, info: PatchGridInfo) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL: (window_index [tokens] int64, the merged patches in window order;
    window_ids [patches] int64, each patch's window in that order)."""
    frames, rows, cols = grid
    m = info.merge_size
    side = info.window_size // m // info.patch_size  # merged patches per window side
    merged_h, merged_w = rows // m, cols // m
    index = np.arange(frames * merged_h * merged_w).reshape(frames, merged_h, merged_w)
    pad_h, pad_w = side - merged_h % side, side - merged_w % side
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
    windows_h, windows_w = (merged_h + pad_h) // side, (merged_w + pad_w) // side
    padded = padded.reshape(frames, windows_h, side, windows_w, side).transpose(0, 1, 3, 2, 4)
    padded = padded.reshape(frames, windows_h * windows_w, side * side)
    sizes = (padded != -100).sum(axis=2).reshape(-1)  # merged patches per window (some empty)
    order = padded.reshape(-1)
    window_index = order[order != -100].astype(np.int64)
    window_ids = np.repeat(np.arange(len(sizes)), sizes * m * m).astype(np.int64)
    return window_index, window_ids


def window_slots(window_ids: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's windows as padded slots, so the vision graph attends window by window:
    (window_gather [W, slots] int64, the window-ordered patch in each slot of each non-empty window,
    -1 where a window is not full; window_slots [patches] int64, each patch's flat slot)."""
    _, starts, counts = np.unique(window_ids, return_index=True, return_counts=True)
    if counts.max(initial=0) > slots:
        raise InputError(f"a window of {counts.max()} patches does not fit {slots} slots")
    within = np.arange(len(window_ids)) - np.repeat(starts, counts)
    flat = (np.repeat(np.arange(len(counts)), counts) * slots + within).astype(np.int64)
    gather = np.full(len(counts) * slots, -1, dtype=np.int64)
    gather[flat] = np.arange(len(window_ids))
    return gather.reshape(len(counts), slots), flat


def prompt_positions(input_ids: np.ndarray, image_token: int, grids: list[Grid], info: PatchGridInfo):
    """([3, N] int64 multimodal rotary positions of a prompt, position_offset: the first decoded
    token's position minus N). Each run of image tokens takes the next grid."""
    ids = np.asarray(input_ids).reshape(-1)
    is_image = ids == image_token
    pieces, position, grids_left = [], 0, list(grids)
    bounds = [0, *(np.flatnonzero(is_image[1:] != is_image[:-1]) + 1).tolist(), len(ids)]
    for start, end in itertools.pairwise(bounds):  # runs of text tokens and of image tokens
        if start == end:
            continue
        if not is_image[start]:
            pieces.append(np.broadcast_to(np.arange(position, position + end - start), (3, end - start)))
            position += end - start
        else:
            if not grids_left:
                raise InputError("the prompt has more images than were given")
            frames, rows, cols = grids_left.pop(0)
            rows, cols = rows // info.merge_size, cols // info.merge_size
            t, h, w = np.meshgrid(np.arange(frames), np.arange(rows), np.arange(cols), indexing="ij")
            block = np.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)]) + position
            if block.shape[1] != end - start:
                raise InputError(f"an image of {block.shape[1]} visual tokens has {end - start} placeholders")
            pieces.append(block)
            position += max(rows, cols)
    positions = np.concatenate(pieces, axis=1).astype(np.int64) if pieces else np.zeros((3, 0), np.int64)
    offset = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, offset


def grid_patches(image: Image.Image, info: PatchGridInfo, spec: ImagePreprocess) -> tuple[np.ndarray, Grid]:
    """An image -> normalised patches [rows * columns, C * T * p * p] and its grid, one thread per
    colour band. A band's bicubic resize is bit for bit that band of the RGB resize, and PIL and
    numpy let go of the GIL, so the bands resize, reorder and normalise side by side: a 1280x720
    image in about 15 ms on two cores instead of 21 (docs/benchmarks.md)."""
    height, width = smart_resize(image.height, image.width, info)
    grid = (1, height // info.patch_size, width // info.patch_size)
    bands = image.split()
    p, t = info.patch_size, info.temporal_patch_size
    patches = np.empty((grid[1] * grid[2], len(bands), t, p, p), np.float32)
    scale, shift = normalization_terms(spec, len(bands))
    resample = Image.Resampling(spec.resample)

    def one_band(channel: int) -> None:
        pixels = np.asarray(bands[channel].resize((width, height), resample=resample))
        ordered = patch_order(pixels, info)  # uint8 view in the patches' order
        first = patches[:, channel, 0].reshape(ordered.shape)
        np.multiply(ordered, scale[channel], out=first, dtype=np.float32)
        first -= shift[channel]
        patches[:, channel, 1:] = patches[:, channel, :1]  # the image repeated over T frames

    list(_band_pool().map(one_band, range(len(bands))))
    return patches.reshape(len(patches), -1), grid


def normalization_terms(spec: ImagePreprocess, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 (scale, shift) so that value * scale - shift rescales and normalises in
    one multiply-add: within 5e-7 of Hugging Face's two-step arithmetic (`normalized`)."""
    rescale = np.float32(spec.rescale_factor if spec.rescale_factor is not None else 1.0)
    mean = np.asarray(spec.mean if spec.mean is not None else (0.0,) * channels, np.float32)
    std = np.asarray(spec.std if spec.std is not None else (1.0,) * channels, np.float32)
    return rescale / std, mean / std


@functools.cache
def _band_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=3, thread_name_prefix="dyvte-bands")
