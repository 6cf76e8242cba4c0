"""Run llama.cpp's LLaVA-1.5 image-encoder converter under transformers 5.

    python benchmarks/mmproj_convert.py CONVERTER [the converter's own arguments]

The converter (`tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py`) reaches the tower as
`CLIPVisionModel(...).vision_model`, the layout of transformers 4; transformers 5 keeps the same
modules one level up. This wraps the model back under `vision_model` (same tensors, the names the
converter maps) and runs the converter unchanged.
"""

from __future__ import annotations

import runpy
import sys

import torch
import transformers

_CLIP_VISION_MODEL = transformers.CLIPVisionModel


class _NestedCLIPVisionModel(torch.nn.Module):
    """transformers 4's CLIPVisionModel layout: the tower under `.vision_model`."""

    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.vision_model = tower

    @classmethod
    def from_pretrained(cls, path: str) -> _NestedCLIPVisionModel:
        model = _CLIP_VISION_MODEL.from_pretrained(path)
        return cls(getattr(model, "vision_model", model))


def main() -> None:
    converter, *arguments = sys.argv[1:]
    # transformers' lazy module puts another module object in sys.modules once a name is loaded:
    # patch the one an import statement finds
    sys.modules["transformers"].CLIPVisionModel = _NestedCLIPVisionModel
    sys.argv = [converter, *arguments]
    runpy.run_path(converter, run_name="__main__")


if __name__ == "__main__":
    main()
