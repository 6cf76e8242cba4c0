"""Session fixtures: each tiny checkpoint is built and loaded once per test run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

BACKBONES = ("llama-mha", "llama-gqa", "qwen2")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from export.tiny_models import build_tiny_llava

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {name: build_tiny_llava(name, root / name, seed=index) for index, name in enumerate(BACKBONES)}


@pytest.fixture(scope="session")
def loaded_models(tiny_checkpoints):
    from export.loading import load_checkpoint

    return {name: load_checkpoint(str(path)) for name, path in tiny_checkpoints.items()}


@pytest.fixture(params=BACKBONES)
def backbone(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def sample_image(tmp_path_factory) -> Path:
    from PIL import Image

    pixels = (np.random.RandomState(0).rand(45, 61, 3) * 255).astype("uint8")
    path = tmp_path_factory.mktemp("images") / "odd-size.png"
    Image.fromarray(pixels).save(path)
    return path


@dataclass
class Prompt:
    input_ids: object  # torch.LongTensor [1, N]
    pixel_values: object  # torch.FloatTensor [1, 3, H, W]; None for a text-only prompt
    inputs: object  # the processor's full output, for calling the HF model directly


def make_prompt(loaded, image_path: Path | None, question: str) -> Prompt:
    from export.prompting import hf_inputs

    inputs = hf_inputs(loaded.processor, image_path, question)
    return Prompt(inputs["input_ids"], inputs.get("pixel_values"), inputs)


_DEFAULT_IMAGE = object()


@pytest.fixture
def prompt_factory(sample_image):
    def factory(loaded, question="what color is the circle on the left?", image=_DEFAULT_IMAGE):
        return make_prompt(loaded, sample_image if image is _DEFAULT_IMAGE else image, question)

    return factory


@pytest.fixture(scope="session")
def bundles(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """One exported bundle per tiny backbone (default exit layers, no routers, in-place KV)."""
    from export.build import BuildConfig, build_bundle

    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, checkpoint in tiny_checkpoints.items():
        build_bundle(BuildConfig(model=str(checkpoint), out=root / name, quiet=True))
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def concat_bundles(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The same bundles in the concat KV flavour (standard ONNX, the form TensorRT takes)."""
    from export.build import BuildConfig, build_bundle

    root = tmp_path_factory.mktemp("concat-bundles")
    for name, checkpoint in tiny_checkpoints.items():
        build_bundle(BuildConfig(model=str(checkpoint), out=root / name, kv="concat", quiet=True))
    return {name: root / name for name in tiny_checkpoints}


@pytest.fixture(params=["inplace", "concat"])
def flavour_bundles(request, bundles, concat_bundles) -> dict[str, Path]:
    """Every tiny bundle, once per KV flavour."""
    return bundles if request.param == "inplace" else concat_bundles


@pytest.fixture(scope="session")
def router_bundle(tiny_checkpoints, tmp_path_factory):
    """A llama-gqa bundle whose routers fire at layer 2 (p = 0.99), plus the routers file."""
    from export.build import BuildConfig, build_bundle

    root = tmp_path_factory.mktemp("router-bundle")
    from export.reference.routers import constant_routers

    bank = constant_routers(64, range(0, 3), fire_at=2)
    bank.save(root / "routers.safetensors")
    build_bundle(
        BuildConfig(
            model=str(tiny_checkpoints["llama-gqa"]),
            out=root / "bundle",
            routers=root / "routers.safetensors",
            quiet=True,
        )
    )
    return root / "bundle", root / "routers.safetensors"


FRESH_SEED = 424_242  # neither the demo's training seed nor its model card's evaluation seed
FRESH_N = 200  # the bundle answers ~150 questions a second on two cores


@pytest.fixture(scope="session")
def fresh_questions(tmp_path_factory) -> Path:
    """Shape questions the demo model never saw (data.jsonl)."""
    from calibrate.shapes import write_dataset

    return write_dataset(tmp_path_factory.mktemp("fresh"), FRESH_N, FRESH_SEED)


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory) -> Path:
    """The shipped demo model exported as the quickstart does (its own routers come by default)."""
    from export.build import BuildConfig, build_bundle

    out = tmp_path_factory.mktemp("demo") / "bundle"
    build_bundle(BuildConfig(model="demo", out=out, quiet=True))
    return out
