"""The conformance cases: every registered family with the tiny checkpoints and image sizes that
exercise what it does with images, and how to ask Hugging Face for the same thing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


def _llava_features(loaded, inputs):
    config = loaded.model.config
    out = loaded.model.model.get_image_features(
        inputs["pixel_values"],
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    return out.pooler_output[0]


def _next_features(loaded, inputs):
    return loaded.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[
        0
    ]


def _qwen_features(loaded, inputs):
    pooled = loaded.model.model.get_image_features(
        inputs["pixel_values"], inputs["image_grid_thw"]
    ).pooler_output
    return pooled[0] if isinstance(pooled, list | tuple) else pooled


def _internvl_features(loaded, inputs):
    pooled = loaded.model.model.get_image_features(inputs["pixel_values"]).pooler_output  # [T, V/T, D]
    return pooled.reshape(-1, pooled.shape[-1])


def _qwen_positions(loaded, inputs) -> tuple[np.ndarray, int]:
    positions, delta = loaded.model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    return positions[:, 0].numpy(), int(delta)


def _plain_positions(loaded, inputs) -> tuple[np.ndarray, int]:
    return np.arange(inputs["input_ids"].shape[1])[None], 0


@dataclass(frozen=True)
class Case:
    family: str  # the registry key
    variant: str  # its tiny checkpoint (export.tiny_models)
    seed: int
    images: dict[str, tuple[int, int]]  # name -> (height, width)
    hf_features: Callable  # (loaded, processor output) -> Hugging Face's visual tokens [V, D]
    hf_pixels: Callable = field(default=lambda inputs: inputs["pixel_values"].numpy())  # as the runtime's
    hf_positions: Callable = _plain_positions  # -> (positions [sections, N], decode offset)
    primary: bool = True  # the family's main case (precisions, tools); other cases vary the decoder
    kv_flavours: tuple[str, ...] = ("inplace", "concat")  # concat only: a head size GQA cannot take

    @property
    def id(self) -> str:
        return f"{self.family}-{self.variant}"


# one view of a fixed size, whatever the image
FIXED = {"odd": (45, 61), "wide": (30, 100)}
# LLaVA-NeXT's tiny canvases: square (2x2 tiles), wide (1x3), tall (3x1), odd (2x2, columns unpadded)
TILED = {"square": (64, 64), "wide": (30, 100), "tall": (100, 40), "odd": (45, 61)}
# Qwen: wide, tall, tiny (scaled up to the minimum), huge (scaled down to the budget), odd
PATCHES = {"wide": (90, 160), "tall": (150, 60), "tiny": (20, 30), "huge": (400, 700), "odd": (97, 131)}

# InternVL's tiny tiles (28 px, up to 6 and a thumbnail): small (1 tile, no thumbnail), square
# (2x2: a tie between grids broken by the image's area), wide (3x1), tall (1x3), big (3x2: the most)
TILES = {"small": (20, 20), "square": (40, 40), "wide": (30, 100), "tall": (100, 40), "big": (90, 120)}

CASES = (
    Case("llava", "llama-gqa", 1, FIXED, _llava_features),
    Case("llava", "llama-mha", 0, FIXED, _llava_features, primary=False, kv_flavours=("inplace",)),
    Case("llava", "qwen2", 2, FIXED, _llava_features, primary=False),
    Case("llava", "llama-head12", 3, FIXED, _llava_features, primary=False, kv_flavours=("concat",)),
    Case("llava-next", "llama-gqa", 5, TILED, _next_features, lambda i: i["pixel_values"][0].numpy()),
    Case(
        "llava-next",
        "mistral",
        2,
        TILED,
        _next_features,
        lambda i: i["pixel_values"][0].numpy(),
        primary=False,
    ),
    Case("qwen2-vl", "tiny", 2, PATCHES, _qwen_features, hf_positions=_qwen_positions),
    Case("qwen2.5-vl", "tiny", 2, PATCHES, _qwen_features, hf_positions=_qwen_positions),
    Case("internvl", "tiny", 4, TILES, _internvl_features),
    Case("qwen3-vl", "tiny", 3, PATCHES, _qwen_features, hf_positions=_qwen_positions),
)
PRIMARY = tuple(c for c in CASES if c.primary)  # what depends on the family, not on its decoder
# the API's paths: every family, and a checkpoint whose bundles are concat only (no batches)
API = (*PRIMARY, *(c for c in CASES if "inplace" not in c.kv_flavours))
