"""LLaVA-1.5 style models (`LlavaForConditionalGeneration`, transformers 5.x).

Works with any decoder transformers provides under it whose layers follow the Llama layout
(Llama MHA/GQA, Qwen2 with attention biases, ...): the decoder layers are called as they are,
so per-family details such as biases or q/k norms come with them.
"""

from __future__ import annotations

import torch
from torch import nn

from export.families.base import DecoderAdapter


class LlavaAdapter(DecoderAdapter):
    family = "llava"
    # the layout transformers 4 saved, which the Hub's llava-hf repositories use
    LEGACY_PREFIXES = (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._vision_layer = model.config.vision_feature_layer
        self._select = model.config.vision_feature_select_strategy

    @property
    def vision_modules(self) -> list[nn.Module]:
        return [self._model.model.vision_tower, self._model.model.multi_modal_projector]

    def image_input(self, inputs):
        """What `image_features` takes, from the processor's output for one image."""
        return inputs["pixel_values"]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # HF's get_image_features splits the batch into a Python list, which pins the batch size
        # in an exported graph; the same selection with tensor ops only:
        out = self._model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [self._vision_layer] if isinstance(self._vision_layer, int) else list(self._vision_layer)
        selected = [out.hidden_states[k] for k in layers]  # each [B, 1 + V, Dv]
        if self._select == "default":
            selected = [h[:, 1:] for h in selected]  # drop CLS
        return self._model.model.multi_modal_projector(torch.cat(selected, dim=-1))  # [B, V, D]
