"""Opening user images safely: every failure is one InputError, never a traceback.

Deliberate differences from Hugging Face's processor, both towards what a user sees:
- EXIF orientation is applied, so photos are processed as image viewers show them;
- 16-bit and floating-point greyscale are scaled to 8 bits (PIL's plain RGB conversion would clip
  them to white).
Animated images use their first frame.
"""

from __future__ import annotations

import io
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


def load_image(image: ImageInput) -> Image.Image:
    """A path, the bytes of an image file, or a PIL image -> an upright image (checked, decoded)."""
    if isinstance(image, Image.Image):
        check_size(image.size, "the image")
        return normalize_image(image)
    if isinstance(image, bytes):
        if not image:
            raise InputError("the image is empty (0 bytes)")
        return _decode(io.BytesIO(image), "the image")
    path = Path(image)
    if not path.exists():
        raise InputError(f"image {path} does not exist")
    if not path.is_file():
        raise InputError(f"image {path} is not a file")
    if path.stat().st_size == 0:
        raise InputError(f"image {path} is empty (0 bytes)")
    return _decode(path, f"image {path}")


def _decode(source, name: str) -> Image.Image:
    """`name`: how messages call the image ("image photo.jpg", "the image")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as handle:
                check_size(handle.size, name)
                handle.seek(0)  # animated: the first frame
                handle.load()
                return normalize_image(handle)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{name} decodes to more than {MAX_PIXELS:,} pixels", hint="downscale it first"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"cannot read {name}: {reason}", hint=f"use a {SUPPORTED} file") from None


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


def normalize_image(image: Image.Image) -> Image.Image:
    """A detached, upright copy in a mode the RGB conversion handles faithfully."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        if image.mode == "F":
            low, high = float(np.nanmin(pixels)), float(np.nanmax(pixels))
            pixels, top = pixels - low, max(high - low, 1e-12)
        eight_bit = np.clip(np.nan_to_num(pixels) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, "L")
    return image.copy()
