"""Image preprocessing with PIL + numpy, step for step as Hugging Face's CLIP image processor
(PIL backend): white-composited alpha -> shortest-edge resize -> center crop -> rescale -> normalize.
Any-resolution models (LLaVA-NeXT) run the same steps on each view `dyvte_rt.families.llava_next` cuts;
patch-grid models (Qwen2-VL) resize, normalise and patchify as `dyvte_rt.families.qwen2_vl` says.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from dyvte_rt.bundle import io_names
from dyvte_rt.bundle.manifest import ImagePreprocess, PatchGridInfo, VisionInfo
from dyvte_rt.families import llava_next as anyres
from dyvte_rt.families import qwen2_vl as patch_grid
from dyvte_rt.families.qwen2_vl import Grid


@dataclass(frozen=True)
class PreparedImage:
    """One image as the vision graph takes it."""

    # [views, 3, H, W] float32: one view, or a base view and tiles (any-res);
    # [patches, C * T * p * p] for patch-grid models (Qwen2-VL)
    pixel_values: np.ndarray
    visual_tokens: int  # image placeholders the prompt holds for it
    feeds: dict[str, np.ndarray] = field(default_factory=dict)  # the vision graph's other inputs
    grid: tuple[int, int, int] | None = None  # patch-grid models: (frames, rows, columns) of patches

    @property
    def per_image(self) -> bool:
        """The vision graph runs on this image alone (its shapes depend on the image)."""
        return bool(self.feeds)

    @classmethod
    def single_view(cls, pixel_values: np.ndarray, visual_tokens: int) -> PreparedImage:
        return cls(np.asarray(pixel_values, dtype=np.float32), visual_tokens)


def prepare_image(image: Image.Image, vision: VisionInfo) -> PreparedImage:
    """A decoded image -> pixel values and the vision graph's other inputs, for the bundle's family."""
    spec = vision.preprocess
    if vision.anyres is None and vision.patch_grid is None:
        return PreparedImage(preprocess(image, spec), vision.visual_tokens)  # converts to RGB itself
    rgb = to_rgb(image) if spec.convert_rgb else image
    if vision.anyres is not None:
        info = vision.anyres
        views = np.concatenate([preprocess(view, spec) for view in anyres.tile_views(rgb, info, spec)])
        index = anyres.pack_index(rgb.height, rgb.width, info)
        return PreparedImage(views, len(index), {io_names.PACK_INDEX: index})
    info = vision.patch_grid
    patches, grid = grid_patches(rgb, info, spec)
    feeds = {io_names.VISION_POSITIONS: patch_grid.vision_positions(grid, info)}
    if info.window_size is not None:
        window_index, window_ids = patch_grid.vision_windows(grid, info)
        feeds[io_names.WINDOW_INDEX] = window_index
        feeds[io_names.WINDOW_IDS] = window_ids
    return PreparedImage(patches, patch_grid.visual_tokens(grid, info), feeds, grid)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as HF converts it: transparency is composited onto white, everything else converted."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # read only: no copy needed


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(new_height, new_width) with the short side = shortest_edge; the long side truncated like HF."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] -> [C, height, width]; zero-padded (centred) where the image is smaller."""
    _, orig_h, orig_w = pixels.shape
    if orig_h < height or orig_w < width:
        new_h, new_w = max(height, orig_h), max(width, orig_w)
        padded = np.zeros((pixels.shape[0], new_h, new_w), dtype=pixels.dtype)
        top_pad, left_pad = math.ceil((new_h - orig_h) / 2), math.ceil((new_w - orig_w) / 2)
        padded[:, top_pad : top_pad + orig_h, left_pad : left_pad + orig_w] = pixels
        pixels, orig_h, orig_w = padded, new_h, new_w
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    return pixels[:, top : top + height, left : left + width]


def preprocess(image: Image.Image, spec: ImagePreprocess) -> np.ndarray:
    """One PIL image -> pixel values [1, 3, H, W] float32."""
    if spec.convert_rgb:
        image = to_rgb(image)
    if spec.resize_shortest_edge is not None:
        new_h, new_w = shortest_edge_size(image.height, image.width, spec.resize_shortest_edge)
        image = image.resize((new_w, new_h), resample=Image.Resampling(spec.resample))
    pixels = channels_first(image)
    if spec.crop_height is not None and spec.crop_width is not None:
        pixels = center_crop(pixels, spec.crop_height, spec.crop_width)
    return np.ascontiguousarray(normalized(pixels, spec)[None], dtype=np.float32)


def channels_first(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image)  # [H, W, C] uint8
    return pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)  # [C, H, W]


def normalized(pixels: np.ndarray, spec: ImagePreprocess) -> np.ndarray:
    """[C, H, W] -> rescaled and normalised as Hugging Face's numpy transforms compute it."""
    if spec.rescale_factor is not None:
        pixels = (pixels.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    if spec.mean is not None and spec.std is not None:
        pixels = pixels.astype(np.float32) if not np.issubdtype(pixels.dtype, np.floating) else pixels
        mean = np.asarray(spec.mean, dtype=pixels.dtype)[:, None, None]
        std = np.asarray(spec.std, dtype=pixels.dtype)[:, None, None]
        pixels = (pixels - mean) / std
    return pixels


def grid_patches(image: Image.Image, info: PatchGridInfo, spec: ImagePreprocess) -> tuple[np.ndarray, Grid]:
    """An image -> normalised patches [rows * columns, C * T * p * p] and its grid, one thread per
    colour band. A band's bicubic resize is bit for bit that band of the RGB resize, and PIL and
    numpy let go of the GIL, so the bands resize, reorder and normalise side by side: a 1280x720
    image in about 15 ms on two cores instead of 21 (docs/benchmarks.md)."""
    height, width = patch_grid.smart_resize(image.height, image.width, info)
    grid = (1, height // info.patch_size, width // info.patch_size)
    bands = image.split()
    p, t = info.patch_size, info.temporal_patch_size
    patches = np.empty((grid[1] * grid[2], len(bands), t, p, p), np.float32)
    scale, shift = normalization_terms(spec, len(bands))
    resample = Image.Resampling(spec.resample)

    def one_band(channel: int) -> None:
        pixels = np.asarray(bands[channel].resize((width, height), resample=resample))
        ordered = patch_grid.patch_order(pixels, info)  # uint8 view in the patches' order
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
