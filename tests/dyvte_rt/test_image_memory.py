"""Images bounded by what they cost: the decoded size is checked before decoding, a JPEG over the
budget is decoded smaller, other formats are refused in one line, and the memory-lean conversions
(strips of rows) give exactly the pixels of the whole-image ones."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from dyvte_rt.errors import InputError
from dyvte_rt.inputs import images
from dyvte_rt.inputs.images import decoded_bytes, load_image
from dyvte_rt.inputs.preprocess import _rgb, to_rgb

RNG = np.random.default_rng(7)


def _file(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _noise(mode: str, width: int, height: int) -> Image.Image:
    bands = {"RGB": 3, "RGBA": 4, "LA": 2}.get(mode, 1)
    pixels = RNG.integers(0, 256, (height, width, bands), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if bands == 1 else pixels, "L" if bands == 1 else mode)


def test_the_cost_counts_the_decoded_mode_and_the_rgb_conversion():
    assert decoded_bytes("RGB", (100, 10)) == 4000  # PIL keeps RGB in 4 bytes a pixel
    assert decoded_bytes("RGBA", (100, 10)) == 8000  # itself and its RGB conversion
    assert decoded_bytes("P", (100, 10)) == 5000
    assert decoded_bytes("I;16", (100, 10)) == 6000
    assert decoded_bytes("RGB", (100, 10), "WEBP") == 16000


def test_a_png_over_the_budget_is_refused_in_one_line_before_it_is_decoded(monkeypatch):
    data = _file(Image.new("RGBA", (1000, 1000), (1, 2, 3, 4)), "PNG")
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    with pytest.raises(InputError) as refused:
        load_image(data, max_bytes=7 << 20)
    message = refused.value.one_line()
    assert "1000x1000 RGBA" in message and "8 MB" in message and "7 MB" in message
    assert "\n" not in message and not decoded


def test_a_jpeg_over_the_budget_is_decoded_at_the_first_scale_that_fits():
    photo = _noise("RGB", 1600, 1200).resize((160, 120)).resize((1600, 1200))  # smooth enough
    data = _file(photo, "JPEG", quality=92)
    assert load_image(data).size == (1600, 1200)  # within the default budget: untouched
    assert load_image(data, max_bytes=decoded_bytes("RGB", (1600, 1200))).size == (1600, 1200)
    assert load_image(data, max_bytes=decoded_bytes("RGB", (800, 600))).size == (800, 600)
    assert load_image(data, max_bytes=decoded_bytes("RGB", (799, 600))).size == (400, 300)
    assert load_image(data, max_bytes=decoded_bytes("RGB", (200, 150))).size == (200, 150)
    with pytest.raises(InputError, match="downscale it"):
        load_image(data, max_bytes=decoded_bytes("RGB", (199, 150)))
    smaller = np.asarray(load_image(data, max_bytes=decoded_bytes("RGB", (800, 600))), dtype=float)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((800, 600)), dtype=float)
    assert np.abs(smaller - reference).mean() < 4  # the same picture, decoded smaller


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "1", "P-transparent", "RGB-transparent"])
def test_converting_a_strip_at_a_time_gives_the_pixels_of_one_conversion(mode):
    width, height = 1100, 700  # 770,000 pixels: three strips, the last one short
    if mode in ("P", "P-transparent"):
        image = _noise("RGB", width, height).quantize(64)
        if mode == "P-transparent":
            image.info["transparency"] = 5
    elif mode == "RGB-transparent":
        image = _noise("RGB", width, height)
        image.info["transparency"] = (10, 20, 30)
        image.putpixel((3, 3), (10, 20, 30))
    elif mode in ("CMYK", "1"):
        image = _noise("RGB", width, height).convert(mode)
    else:
        image = _noise(mode, width, height)
    assert width * height > images.STRIP_PIXELS
    transparent = "A" in image.getbands() or image.info.get("transparency") is not None
    whole, strips = _rgb(image, transparent), to_rgb(image)
    assert strips.mode == "RGB" and strips.size == image.size
    assert np.array_equal(np.asarray(whole), np.asarray(strips))


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_deep_greyscale_is_scaled_a_strip_at_a_time_exactly_as_in_one_pass(mode):
    width, height = 900, 700
    if mode == "I;16":
        image = Image.fromarray(RNG.integers(0, 65536, (height, width), dtype=np.uint16))
        pixels, low, top = np.asarray(image, dtype=np.float64), 0.0, 65535.0
    elif mode == "I":
        pixels = RNG.integers(-500, 90_000, (height, width)).astype(np.int32)
        image = Image.fromarray(pixels, "I")
        pixels, low, top = pixels.astype(np.float64), 0.0, float(max(pixels.max(), 1.0))
    else:
        pixels = RNG.normal(3.0, 10.0, (height, width)).astype(np.float32)
        pixels[5, 7] = np.nan
        image = Image.fromarray(pixels, "F")
        pixels = pixels.astype(np.float64)
        low = float(np.nanmin(pixels))
        top = max(float(np.nanmax(pixels)) - low, 1e-12)
    one_pass = np.clip(np.nan_to_num(pixels - low) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    scaled = load_image(image)
    assert scaled.mode == "L" and np.array_equal(np.asarray(scaled), one_pass)


def test_a_decoded_file_is_not_copied_and_still_reads_after_its_file_is_closed(tmp_path):
    path = tmp_path / "frames.gif"
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    image = load_image(path)
    assert to_rgb(image).getpixel((5, 5))[0] > 200  # the first frame, after the file was closed
    png = tmp_path / "plain.png"
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(png)
    assert to_rgb(load_image(png)).getpixel((1, 1)) == (255, 255, 255)  # transparency on white


def test_the_server_budget_is_what_is_asked_or_a_share_of_its_resident_memory():
    from dyvte_rt.cli.serve import image_budget, resident_bytes

    assert image_budget(64) == 64 << 20
    share = 0.4 * resident_bytes()
    assert abs(image_budget(None) - max(32 << 20, share)) < 8 << 20  # resident memory moves a little
    assert image_budget(None) >= 32 << 20
    with pytest.raises(InputError, match="--max-image-mb"):
        image_budget(0)
