"""Opening user images safely: every failure is one InputError, never a traceback, and no image
costs more memory than it is allowed.

Deliberate differences from Hugging Face's processor, all towards what a user sees:
- EXIF orientation is applied, so photos are processed as image viewers show them;
- 16-bit and floating-point greyscale are scaled to 8 bits (PIL's plain RGB conversion would clip
  them to white);
- a JPEG that would decode to more than the memory an image may take (`max_bytes`) is decoded at
  1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling), the first that fits; other formats over it
  are refused. Within the limit, pixels are exactly Hugging Face's.
Animated images use their first frame.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dyvte_rt.errors import InputError

ImageInput = str | Path | Image.Image | bytes
MAX_PIXELS = 64_000_000  # 64 megapixels, e.g. 8000 x 8000; larger images are refused before decoding
# Models resize the short side to their input size and the long side follows: a 10000x1 image would
# become 640000x64 before it is cropped (about 400 MB and a second of work for 89 bytes of PNG). A
# panorama is 4-8:1; 20:1 bounds the resized image to 20 views' worth of pixels.
MAX_ASPECT_RATIO = 20
# The memory one image may take while it is decoded and converted to RGB (`decoded_bytes`), unless
# the caller says otherwise: enough for any image within MAX_PIXELS. The server sets its own.
MAX_IMAGE_BYTES = 8 * MAX_PIXELS
STRIP_PIXELS = 1 << 18  # conversions of bigger images run a strip of rows at a time
SUPPORTED = "PNG, JPEG, GIF, BMP, TIFF or WebP"
IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
)  # for directories of images


def load_image(image: ImageInput, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """A path, the bytes of an image file, or a PIL image -> an upright image (checked, decoded).

    `max_bytes`: the memory the decoded image and its RGB conversion may take (`decoded_bytes`)."""
    if isinstance(image, Image.Image):
        check_size(image.size, "the image")
        _check_cost(image.mode, image.size, "the image", max_bytes)
        return normalize_image(image)
    if isinstance(image, bytes):
        if not image:
            raise InputError("the image is empty (0 bytes)")
        return _decode(io.BytesIO(image), "the image", max_bytes)
    path = Path(image)
    if not path.exists():
        raise InputError(f"image {path} does not exist")
    if not path.is_file():
        raise InputError(f"image {path} is not a file")
    if path.stat().st_size == 0:
        raise InputError(f"image {path} is empty (0 bytes)")
    with path.open("rb") as file:  # ours to close: the decoded image outlives it, with no copy
        return _decode(file, f"image {path}", max_bytes)


def decoded_bytes(mode: str, size: tuple[int, int], format: str | None = None) -> int:
    """Memory for an image decoded in `mode` and, unless it is RGB already, its RGB conversion
    (PIL keeps a pixel of RGB, RGBA and CMYK in 4 bytes, of L, P and 1 in one). WebP is decoded
    through libwebp's own canvas and a copy of it, three more full frames (measured)."""
    width, height = size
    per_pixel = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}.get(mode, 4)
    decoding = 4 * per_pixel if format == "WEBP" else per_pixel
    return width * height * (decoding + (0 if mode == "RGB" else 4))


def _decode(source, name: str, max_bytes: int) -> Image.Image:
    """`name`: how messages call the image ("image photo.jpg", "the image")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = Image.open(source)
            check_size(handle.size, name)
            handle.seek(0)  # animated: the first frame
            _fit(handle, name, max_bytes)
            handle.load()
            return normalize_image(handle, copy=False)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{name} decodes to more than {MAX_PIXELS:,} pixels", hint="downscale it first"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"cannot read {name}: {reason}", hint=f"use a {SUPPORTED} file") from None


def _fit(handle: Image.Image, name: str, max_bytes: int) -> None:
    """Within `max_bytes` as it is, or as a JPEG decoded smaller, or refused (before decoding)."""
    if decoded_bytes(handle.mode, handle.size, handle.format) <= max_bytes:
        return
    if handle.format == "JPEG":
        for scale in (2, 4, 8):
            smaller = (math.ceil(handle.width / scale), math.ceil(handle.height / scale))
            if decoded_bytes(handle.mode, smaller) <= max_bytes:
                handle.draft(handle.mode, smaller)
                return
    _check_cost(handle.mode, handle.size, name, max_bytes, handle.format)


def _check_cost(
    mode: str, size: tuple[int, int], name: str, max_bytes: int, format: str | None = None
) -> None:
    cost = decoded_bytes(mode, size, format)
    if cost > max_bytes:
        raise InputError(
            f"{name} is {size[0]}x{size[1]} {mode}: decoding it takes {cost / 2**20:.0f} MB, above the "
            f"{max_bytes / 2**20:.0f} MB an image may take here",
            hint="downscale it or send it as a JPEG (decoded smaller to fit)",
        )


def check_size(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InputError(f"{name} has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise InputError(
            f"{name} is {width}x{height} = {width * height:,} pixels, above the limit of {MAX_PIXELS:,}",
            hint="downscale it first",
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InputError(
            f"{name} is {width}x{height}, more than {MAX_ASPECT_RATIO} times wider than high or higher "
            "than wide: resizing it for the model would cost out of all proportion",
            hint=f"crop it to at most {MAX_ASPECT_RATIO}:1",
        )


def normalize_image(image: Image.Image, copy: bool = True) -> Image.Image:
    """Upright, in a mode the RGB conversion handles faithfully. `copy=False` (an image decoded
    here, nobody else's) turns it in place instead of copying it."""
    if copy:
        image = ImageOps.exif_transpose(image) or image  # a copy, turned if it must be
    else:
        ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _eight_bit(image)
    return image


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale scaled to 8 bits, a strip of rows at a time."""
    rows = max(1, STRIP_PIXELS // image.width)
    strips = [(top, min(top + rows, image.height)) for top in range(0, image.height, rows)]

    def strip(top: int, bottom: int) -> np.ndarray:
        return np.asarray(image.crop((0, top, image.width, bottom)), dtype=np.float64)

    low, top_value = 0.0, 65535.0
    if not image.mode.startswith("I;16"):
        extrema = [(np.nanmin(s), np.nanmax(s)) for s in (strip(*bounds) for bounds in strips)]
        low, high = float(min(e[0] for e in extrema)), float(max(e[1] for e in extrema))
        top_value = max(high, 1.0) if image.mode == "I" else max(high - low, 1e-12)
        low = low if image.mode == "F" else 0.0
    eight_bit = np.empty((image.height, image.width), dtype=np.uint8)
    for top, bottom in strips:
        pixels = strip(top, bottom) - low
        eight_bit[top:bottom] = np.clip(np.nan_to_num(pixels) / top_value * 255.0 + 0.5, 0, 255)
    return Image.fromarray(eight_bit, "L")
