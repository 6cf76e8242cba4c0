"""Image preprocessing with PIL + numpy, step for step as Hugging Face's CLIP image processor
(PIL backend): white-composited alpha -> shortest-edge resize -> center crop -> rescale -> normalize.
A family (`dyvte_rt.families`) turns an image into a `PreparedImage` with these steps, on one view
or on several (LLaVA-NeXT's tiles), or with its own (Qwen2-VL's patches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dyvte_rt.bundle.manifest import ImagePreprocess
from dyvte_rt.inputs.images import STRIP_PIXELS


@dataclass(frozen=True)
class PreparedImage:
    """One image as the vision graph takes it."""

    # [views, 3, H, W] float32: one view, or a base view and tiles (LLaVA-NeXT);
    # [patches, C * T * p * p] for patch-grid models (Qwen2-VL)
    pixel_values: np.ndarray
    visual_tokens: int  # image placeholders the prompt holds for it
    feeds: dict[str, np.ndarray] = field(default_factory=dict)  # the vision graph's other inputs
    layout: Any = None  # what the family needs of this image later (Qwen2-VL: its patch grid)
    # the vision graph's outputs, already computed (`Pipeline.encode_image`, backend values): the
    # prefill then skips the vision graph; encoded_ms is what computing them took
    encoded: dict[str, Any] | None = None
    encoded_ms: float = 0.0

    @classmethod
    def single_view(cls, pixel_values: np.ndarray, visual_tokens: int) -> PreparedImage:
        return cls(np.asarray(pixel_values, dtype=np.float32), visual_tokens)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as HF converts it: transparency is composited onto white, everything else converted.
    Both are per pixel, so a big image is converted a strip of rows at a time into one RGB image:
    the same pixels, without three full-size RGBA intermediates."""
    transparent = "A" in image.getbands() or image.info.get("transparency") is not None
    if image.mode == "RGB" and not transparent:
        return image  # read only: no copy needed
    if image.width * image.height <= STRIP_PIXELS:
        return _rgb(image, transparent)
    rgb = Image.new("RGB", image.size)
    rows = max(1, STRIP_PIXELS // image.width)
    for top in range(0, image.height, rows):
        box = (0, top, image.width, min(top + rows, image.height))
        rgb.paste(_rgb(image.crop(box), transparent), box[:2])
    return rgb


def _rgb(image: Image.Image, transparent: bool) -> Image.Image:
    if transparent:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


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
