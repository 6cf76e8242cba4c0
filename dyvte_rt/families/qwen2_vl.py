"""Qwen2-VL and Qwen2.5-VL images and positions, torch-free, as Hugging Face computes them.

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

import itertools
import math

import numpy as np

from dyvte_rt.bundle.manifest import PatchGridInfo
from dyvte_rt.errors import InputError

Grid = tuple[int, int, int]  # (frames, patch rows, patch columns)


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
