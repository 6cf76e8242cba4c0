"""LLaVA-1.5 style models (`LlavaForConditionalGeneration`, transformers 5.x).

Works with any decoder transformers provides under it whose layers follow the Llama layout
(Llama MHA/GQA, Qwen2 with attention biases, ...): the decoder layers are called as they are,
so per-family details such as biases or q/k norms come with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dyvte_rt.compute import DecoderDims
from dyvte_rt.errors import UnsupportedModelError
from dyvte_rt.manifest import AnyResInfo


class LlavaAdapter:
    family = "llava"
    tolerance = 1e-4
    position_sections = 1  # position ids [B, S]

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        config = model.config
        text = config.text_config
        _check_full_attention(text)
        self._vision_layer = config.vision_feature_layer
        self._select = config.vision_feature_select_strategy
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self._dims = DecoderDims(
            hidden=text.hidden_size,
            kv_width=text.num_key_value_heads * head_dim,
            mlp=text.intermediate_size,
            num_layers=text.num_hidden_layers,
        )

    @classmethod
    def num_layers_in(cls, config: dict) -> int:
        try:
            return int(config["text_config"]["num_hidden_layers"])
        except (KeyError, TypeError, ValueError):
            raise UnsupportedModelError("config.json has no text_config.num_hidden_layers") from None

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def dims(self) -> DecoderDims:
        return self._dims

    @property
    def image_token_id(self) -> int:
        return int(self._model.config.image_token_id)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self._model.generation_config.eos_token_id
        if eos is None:
            eos = self._model.config.text_config.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)

    @property
    def anyres(self) -> AnyResInfo | None:
        """Any-resolution tiling (LLaVA-NeXT); None: one fixed-size view per image."""
        return None

    @property
    def patch_grid(self) -> None:
        return None

    def image_input(self, inputs):
        """What `image_features` takes, from the processor's output for one image."""
        return inputs["pixel_values"]

    def prompt_positions(self, input_ids: torch.Tensor, image) -> tuple[torch.Tensor, int]:
        """Position ids [1, N] of a prompt (0..N-1) and the offset decoding continues at (0)."""
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None], 0

    @property
    def _language_model(self) -> nn.Module:
        return self._model.model.language_model

    @property
    def decoder_layers(self) -> Sequence[nn.Module]:
        return self._language_model.layers

    @property
    def vision_modules(self) -> list[nn.Module]:
        return [self._model.model.vision_tower, self._model.model.multi_modal_projector]

    @property
    def embed_module(self) -> nn.Module:
        return self._language_model.embed_tokens

    @property
    def head_modules(self) -> list[nn.Module]:
        return [self._language_model.norm, self._model.lm_head]

    @staticmethod
    def checkpoint_keys(name: str) -> tuple[str, ...]:
        """Where a llava-hf checkpoint stores parameter `name`: as transformers 5 names it, or in the
        layout transformers 4 saved (and the Hub's llava-hf repositories use)."""
        keys = [name]
        for current, legacy in _LEGACY_PREFIXES:
            if name.startswith(current):
                keys.append(legacy + name.removeprefix(current))
        return tuple(keys)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # HF's get_image_features splits the batch into a Python list, which pins the batch size
        # in an exported graph; the same selection with tensor ops only:
        out = self._model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [self._vision_layer] if isinstance(self._vision_layer, int) else list(self._vision_layer)
        selected = [out.hidden_states[k] for k in layers]  # each [B, 1 + V, Dv]
        if self._select == "default":
            selected = [h[:, 1:] for h in selected]  # drop CLS
        return self._model.model.multi_modal_projector(torch.cat(selected, dim=-1))  # [B, V, D]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._language_model.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._language_model.rotary_emb(hidden, position_ids=position_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._model.lm_head(self._language_model.norm(hidden))


_LEGACY_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def _check_full_attention(text_config) -> None:
    """Sliding-window layers would need a different mask; refuse them rather than be wrong."""
    layer_types = getattr(text_config, "layer_types", None) or []
    windowed = sorted({t for t in layer_types if t != "full_attention"})
    if windowed:
        raise UnsupportedModelError(
            f"decoder layers of type {windowed} are not supported (only full attention)",
            hint="disable sliding-window attention in the checkpoint's text config",
        )
