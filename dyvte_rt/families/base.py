"""What the runtime asks a model family, and the answers of a family whose images are one
fixed-size view (LLaVA-1.5's): generic code asks the family object, never which fields are set.

A family is chosen by the manifest's `source.family` (`dyvte_rt.families.family_for`). Its image
layout, where it has one, is the manifest's `vision.layout` object, read strictly into the family's
own dataclass (`layout_type`) when the bundle loads, so a bad field is named there.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from PIL import Image

from dyvte_rt.bundle.manifest import BundleError, Dims, VisionInfo, build_strict
from dyvte_rt.inputs.preprocess import PreparedImage, preprocess


class Family:
    """One model family's image handling and prompt positions at run time."""

    layout_type: ClassVar[type | None] = None  # the dataclass of `vision.layout`; None: no layout
    # True: the vision graph's input shapes depend on the image, so it runs on one image at a time
    # (and a batch's features are padded to the longest); False: same-size images batch together
    vision_per_image: ClassVar[bool] = False

    def __init__(self, name: str, vision: VisionInfo, dims: Dims, image_token: int = -1) -> None:
        self.name = name  # the manifest's source.family
        self.vision = vision
        self.dims = dims
        self.image_token = image_token  # the prompt's image placeholder id
        self.layout: Any = self._read_layout(vision.layout)

    def _read_layout(self, data: dict[str, Any]) -> Any:
        if self.layout_type is None:
            if data:
                raise BundleError(f"manifest field vision.layout must be empty for family {self.name!r}")
            return None
        return build_strict(self.layout_type, data, "vision.layout")

    @property
    def deepstack_layers(self) -> int:
        """DeepStack levels of visual features added after decoder layers 0..n-1 (Qwen3-VL); 0: none."""
        return 0

    # -- images ---------------------------------------------------------------------------------

    def prepare_image(self, image: Image.Image) -> PreparedImage:
        """A decoded image -> the vision graph's inputs and its visual-token count."""
        return PreparedImage(preprocess(image, self.vision.preprocess), self.vision.visual_tokens)

    def visual_tokens(self, height: int, width: int) -> int:
        """Visual tokens an image of this size takes (the same for every size here)."""
        return self.vision.visual_tokens

    def image_text(self, placeholder: str, count: int) -> str:
        """The text an image's placeholder in the rendered prompt becomes: one placeholder per visual
        token (families that wrap them in markers, as InternVL's <img> ... </img>, say so here)."""
        return placeholder * count

    def prompt_positions(self, input_ids: np.ndarray, image: PreparedImage | None) -> tuple[np.ndarray, int]:
        """Original position ids [sections or 1, N] of a prompt ([N] ids), and the offset decoding
        adds to a token's index to get its position (0: positions are indices)."""
        return np.arange(np.asarray(input_ids).reshape(-1).shape[0], dtype=np.int64)[None], 0

    # -- engines and reports --------------------------------------------------------------------

    def profile_ranges(self, settings) -> dict:
        """Every named axis's range per TensorRT phase (`engines.tensorrt.profiles.phase_ranges`)."""
        from engines.tensorrt.profiles import phase_ranges

        return phase_ranges(self.vision.visual_tokens, settings)

    def describe_image(self) -> str:
        """One line for `dyvte-rt inspect`."""
        vision = self.vision
        return f"{vision.image_height}x{vision.image_width}, {vision.visual_tokens} visual tokens"
