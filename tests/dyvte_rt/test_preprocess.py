"""Image preprocessing (PIL + numpy) equals the Hugging Face processor's, mode for mode."""

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from dyvte_rt.inputs.preprocess import preprocess, shortest_edge_size
from export.manifest_builder import image_preprocess

# LLaVA-1.5's processor settings (llava-hf/llava-1.5-7b-hf preprocessor_config.json)
LLAVA_15 = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def _image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    base = Image.fromarray(rgba, "RGBA")
    if mode == "RGBA":
        return base
    if mode == "P":
        return base.convert("RGB").quantize(colors=37)
    if mode == "PA":  # palette with a transparent index
        image = base.convert("RGB").quantize(colors=16)
        image.info["transparency"] = 3
        return image
    return base.convert("RGB").convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "PA", "CMYK"])
@pytest.mark.parametrize("size", [(45, 61), (501, 333), (17, 400), (336, 336)])
@pytest.mark.parametrize("processor", [LLAVA_15], ids=["llava-1.5"])
def test_matches_hf_processor(mode, size, processor):
    image = _image(mode, *size)
    expected = processor(image, return_tensors="np")["pixel_values"]
    got = preprocess(image, image_preprocess(processor))
    assert got.shape == expected.shape == (1, 3, 336, 336) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5


def test_matches_the_tiny_checkpoint_processor(loaded_models):
    processor = loaded_models["llama-gqa"].processor.image_processor
    for mode in ("RGB", "RGBA", "P"):
        image = _image(mode, 53, 29, seed=3)
        expected = processor(image, return_tensors="np")["pixel_values"]
        assert np.abs(preprocess(image, image_preprocess(processor)) - expected).max() <= 1e-5


def test_shortest_edge_truncates_the_long_side_like_hf():
    assert shortest_edge_size(333, 501, 336) == (336, 505)  # 336 * 501 / 333 = 505.5
    assert shortest_edge_size(400, 17, 336) == (7905, 336)
