"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`, transformers 5.x): Vicuna, Mistral
and Llama-3 backbones.

The decoder, vision tower and projector are LLaVA's (`LlavaAdapter`). What differs is the image:
a base view and tiles of the image on its best-fitting canvas (`dyvte_rt.families.llava_next`), whose features
are unpadded and closed row by row with the `image_newline` embedding. The vision graph takes the
views and a packing index the runtime computes from the image size, and gathers the visual tokens
in Hugging Face's order — no data-dependent shapes inside the graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dyvte_rt.bundle.manifest import AnyResInfo
from dyvte_rt.errors import UnsupportedModelError
from dyvte_rt.families import llava_next as anyres
from export.families.llava import LlavaAdapter
from export.lazy_weights import OwnParameters


class AnyResPixels(NamedTuple):
    """One image as the torch side passes it: its views and its original size."""

    pixel_values: torch.Tensor  # [views, 3, S, S]: the base view, then the tiles row by row
    image_size: tuple[int, int]  # (height, width) of the image before tiling

    def to(self, *args, **kwargs) -> AnyResPixels:
        """Moved / cast like a tensor, so callers treat every family's image input alike."""
        return AnyResPixels(self.pixel_values.to(*args, **kwargs), self.image_size)


class LlavaNextAdapter(LlavaAdapter):
    family = "llava-next"

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
        views = anyres.tile_count(height, width, self._anyres)
        return AnyResPixels(inputs["pixel_values"][0, :views], (height, width))

    def image_features(self, image: AnyResPixels) -> torch.Tensor:
        """[1, V, D]: the visual tokens of one image, packed as Hugging Face packs them."""
        index = torch.from_numpy(anyres.pack_index(*image.image_size, self._anyres))
        return self.vision_graph(image.pixel_values, index)

    def vision_graph(self, pixel_values: torch.Tensor, pack_index: torch.Tensor) -> torch.Tensor:
        """The vision graph: views [T, 3, S, S] + pack_index [V] -> [1, V, D]."""
        views = LlavaAdapter.image_features(self, pixel_values)  # [T, side², D]
        newline = self._model.model.image_newline.to(views.dtype)[None]  # [1, D]
        rows = torch.cat([views.reshape(-1, views.shape[-1]), newline])  # [T·side² + 1, D]
        return rows.index_select(0, pack_index)[None]
