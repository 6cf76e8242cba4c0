"""Session fixtures. Checkpoints and bundles are built once for every pytest worker and later runs
(`tests.artefacts.shared`); variants of one checkpoint share the graphs they have in common."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.artefacts import export, shared

BACKBONES = ("llama-mha", "llama-gqa", "qwen2")  # the LLaVA decoders: MHA, GQA, attention biases
SEEDS = {"llama-mha": 0, "llama-gqa": 1, "qwen2": 2}


def tiny_checkpoint(family: str, variant: str, seed: int) -> Path:
    """A tiny random checkpoint of a registered family (`export.tiny_models.build_tiny`)."""
    from export.tiny_models import build_tiny

    return shared(f"checkpoint-{family}-{variant}-{seed}", lambda out: build_tiny(family, variant, out, seed))


def random_routers(hidden: int, layers: tuple[int, ...] = (1, 2), seed: int = 11) -> Path:
    """Random (not constant) routers: their decisions depend on the features."""

    def build(out: Path) -> None:
        import torch

        from export.reference import RouterBank

        out.mkdir()
        torch.manual_seed(seed)
        RouterBank(hidden, layers, width=16).save(out / "routers.safetensors")

    return shared(f"routers-{hidden}-{'-'.join(map(str, layers))}-{seed}", build) / "routers.safetensors"


class Lazy(Mapping):
    """name -> artefact, made on first access: a test that reads one bundle builds only that one."""

    def __init__(self, names: tuple[str, ...], make: Callable[[str], Any]) -> None:
        self._names, self._make, self._made = names, make, {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._made:
            self._made[name] = self._make(name)
        return self._made[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def made(self) -> list[Any]:
        """What has been made so far (to close at teardown without making the rest)."""
        return list(self._made.values())


@pytest.fixture(scope="session")
def tiny_checkpoints() -> Mapping[str, Path]:
    return Lazy(BACKBONES, lambda name: tiny_checkpoint("llava", name, SEEDS[name]))


@pytest.fixture(scope="session")
def loaded_models(tiny_checkpoints) -> Mapping[str, Any]:
    from export.loading import load_checkpoint

    return Lazy(BACKBONES, lambda name: load_checkpoint(str(tiny_checkpoints[name])))


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
def bundles(tiny_checkpoints) -> Mapping[str, Path]:
    """One bundle per tiny LLaVA backbone (default exit layers, no routers, in-place KV)."""
    return Lazy(
        BACKBONES, lambda name: shared(f"bundle-{name}", lambda out: export(tiny_checkpoints[name], out))
    )


@pytest.fixture(scope="session")
def concat_bundles(tiny_checkpoints) -> Mapping[str, Path]:
    """The GQA and Qwen2 bundles in the concat KV flavour (standard ONNX, the form TensorRT takes)."""

    def make(name: str) -> Path:
        return shared(f"bundle-{name}-concat", lambda out: export(tiny_checkpoints[name], out, kv="concat"))

    return Lazy(("llama-gqa", "qwen2"), make)


@pytest.fixture(scope="session")
def router_bundle(tiny_checkpoints):
    """A llama-gqa bundle whose routers fire at layer 2 (p = 0.99), plus the routers file."""

    def build(out: Path) -> None:
        from export.reference.routers import constant_routers

        out.mkdir()
        constant_routers(64, range(0, 3), fire_at=2).save(out / "routers.safetensors")
        export(tiny_checkpoints["llama-gqa"], out / "bundle", routers=out / "routers.safetensors")

    root = shared("router-bundle", build)
    return root / "bundle", root / "routers.safetensors"


FRESH_SEED = 424_242  # neither the demo's training seed nor its model card's evaluation seed
FRESH_N = 200  # the bundle answers ~150 questions a second on two cores


@pytest.fixture(scope="session")
def fresh_questions() -> Path:
    """Shape questions the demo model never saw (data.jsonl)."""
    from calibrate.shapes import write_dataset

    return shared("fresh-questions", lambda out: write_dataset(out, FRESH_N, FRESH_SEED)) / "data.jsonl"


@pytest.fixture(scope="session")
def demo_bundle() -> Path:
    """The shipped demo model exported as the quickstart does (its own routers come by default)."""
    return shared("bundle-demo", lambda out: export("demo", out))
