"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`, transformers 5.x): Vicuna, Mistral
and Llama-3 backbones.

The decoder, vision tower and projector are LLaVA's (`LlavaAdapter`). What differs is the image:
a base view and tiles of the image on its best-fitting canvas (`dyvte_rt.families.llava_next`),
whose features are unpadded and closed row by row with the `image_newline` embedding. The vision
graph takes the views and a packing index the runtime computes from the image size, and gathers
the visual tokens in Hugging Face's order — no data-dependent shapes inside the graph.

Tiny checkpoints tile images on LLaVA-NeXT's five canvases scaled to the tiny tower's tile (1x2,
2x1, 2x2, 3x1, 1x3 tiles), so that tiling and unpadding happen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from dyvte_rt.bundle import io_names
from dyvte_rt.bundle.manifest import VisionInfo
from dyvte_rt.errors import UnsupportedModelError
from dyvte_rt.families import llava_next as tiling
from dyvte_rt.families.llava_next import AnyResInfo
from export.families.llava import LlavaAdapter, LlavaClasses, build_tiny_llava
from export.graph_plans import VIEWS, VISUAL, GraphPlan, RandomInputs
from export.lazy_weights import OwnParameters
from export.manifest_builder import image_preprocess
from export.parts import VisionPart


class AnyResPixels(NamedTuple):
    """One image as the torch side passes it: its views and its original size."""

    pixel_values: torch.Tensor  # [views, 3, S, S]: the base view, then the tiles row by row
    image_size: tuple[int, int]  # (height, width) of the image before tiling

    def to(self, *args, **kwargs) -> AnyResPixels:
        """Moved / cast like a tensor, so callers treat every family's image input alike."""
        return AnyResPixels(self.pixel_values.to(*args, **kwargs), self.image_size)


class LlavaNextAdapter(LlavaAdapter):
    family = "llava-next"
    ALIASES: ClassVar[dict[str, str]] = {
        "llava-next-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llava-next-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
    }
    TINY_VARIANTS = ("llama-gqa", "mistral", "llava-7b-slice")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        vision = config.vision_config
        if self._select != "default":
            raise UnsupportedModelError(
                f"vision_feature_select_strategy {self._select!r} is not supported for LLaVA-NeXT "
                "(only 'default', which drops CLIP's CLS token)"
            )
        self._anyres = AnyResInfo(
            grid_pinpoints=tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints),
            tile_size=int(vision.image_size),
            feature_side=int(vision.image_size // vision.patch_size),
            newline=True,
        )
        bad = [p for p in self._anyres.grid_pinpoints if p[0] % vision.image_size or p[1] % vision.image_size]
        if bad:
            raise UnsupportedModelError(
                f"image_grid_pinpoints {bad} are not multiples of the vision tower's {vision.image_size}"
            )

    @classmethod
    def build_tiny(cls, variant: str, out: Path, seed: int = 0, **options: Any) -> Path:
        return build_tiny_llava(variant, out, seed, classes=llava_next_classes(), **options)

    @property
    def anyres(self) -> AnyResInfo:
        return self._anyres

    @property
    def vision_modules(self) -> list[nn.Module]:
        return [*super().vision_modules, OwnParameters(self._model.model)]  # + image_newline

    @classmethod
    def checkpoint_keys(cls, name: str) -> tuple[str, ...]:
        keys = super().checkpoint_keys(name)
        return (*keys, "image_newline") if name == "model.image_newline" else keys

    def image_input(self, inputs) -> AnyResPixels:
        """The processor's output (pixel_values [1, views, 3, S, S], image_sizes [1, 2]) for one image."""
        height, width = (int(x) for x in inputs["image_sizes"][0])
        views = tiling.tile_count(height, width, self._anyres)
        return AnyResPixels(inputs["pixel_values"][0, :views], (height, width))

    def image_features(self, image: AnyResPixels) -> torch.Tensor:
        """[1, V, D]: the visual tokens of one image, packed as Hugging Face packs them."""
        index = torch.from_numpy(tiling.pack_index(*image.image_size, self._anyres))
        return self.vision_graph(image.pixel_values, index)

    def vision_graph(self, pixel_values: torch.Tensor, *per_image: torch.Tensor) -> torch.Tensor:
        """The vision graph: views [T, 3, S, S] + pack_index [V] -> [1, V, D]."""
        (pack_index,) = per_image
        views = LlavaAdapter.image_features(self, pixel_values)  # [T, side², D]
        newline = self._model.model.image_newline.to(views.dtype)[None]  # [1, D]
        rows = torch.cat([views.reshape(-1, views.shape[-1]), newline])  # [T·side² + 1, D]
        return rows.index_select(0, pack_index)[None]

    def vision_plan(self, rand: RandomInputs, tolerance: float) -> GraphPlan:
        """The views of one image and its packing index. Traced on a tall image's views; checked on
        a square, a wide and a tall one (view and token counts differ)."""
        info = self._anyres
        side = info.tile_size

        def image(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
            views = tiling.tile_count(height, width, info)
            index = torch.from_numpy(tiling.pack_index(height, width, info))
            return rand.randn(views, 3, side, side), index

        largest = max(info.grid_pinpoints, key=lambda p: p[0] * p[1])
        return GraphPlan(
            "vision",
            "vision",
            VisionPart(self),
            [io_names.PIXEL_VALUES, io_names.PACK_INDEX],
            [io_names.IMAGE_FEATURES],
            sample=image(3 * side, 2 * side),
            dynamic_shapes=({0: VIEWS}, ({0: VISUAL},)),  # VisionPart(pixel_values, *per_image)
            dtype=rand.dtype,
            tolerance=tolerance,
            cases=lambda: [image(*largest), image(side, 3 * side), image(2 * side + 5, side // 2 + 3)],
        )

    def vision_info(self, processor) -> VisionInfo:
        vision = self._model.config.vision_config
        preprocess = image_preprocess(processor.image_processor)
        size, crop = preprocess.resize_shortest_edge, preprocess.crop_height
        if {size, crop} != {vision.image_size}:
            raise UnsupportedModelError(
                f"the image processor's size {size} / crop {crop} differ from the vision tower's "
                f"{vision.image_size}: any-resolution tiles need them equal"
            )
        return VisionInfo(
            image_height=vision.image_size,
            image_width=vision.image_size,
            visual_tokens=tiling.most_visual_tokens(self._anyres),
            preprocess=preprocess,
            layout=dataclasses.asdict(self._anyres),
        )


def grid_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-NeXT's canvases (336x672, 672x336, 672x672, 1008x336, 336x1008) in units of `tile`."""
    return [[tile * h, tile * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]


def llava_next_classes() -> LlavaClasses:
    import transformers

    return LlavaClasses(
        transformers.LlavaNextConfig,
        transformers.LlavaNextForConditionalGeneration,
        transformers.LlavaNextImageProcessorPil,
        transformers.LlavaNextProcessor,
        extra=lambda spec: {"image_grid_pinpoints": grid_pinpoints(spec.image_size)},
    )
