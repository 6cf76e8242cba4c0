"""The protocol a model family implements so that the reference and the exporter can use it.

An adapter wraps one loaded Hugging Face model and exposes the parts DyVTE needs; everything
family-specific (where the vision tower lives, how features are selected) stays behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from dyvte_rt.bundle.manifest import AnyResInfo, PatchGridInfo
from dyvte_rt.errors import UnsupportedModelError
from dyvte_rt.runtime.compute import DecoderDims


class FamilyAdapter(Protocol):
    """One loaded multimodal model, seen through the parts DyVTE splits it into."""

    family: str  # registry key written to the manifest, e.g. "llava"
    tolerance: float  # max abs logit error accepted in fp32 parity checks

    @classmethod
    def num_layers_in(cls, config: dict) -> int:
        """Decoder layer count read from config.json, before any weights load."""
        ...

    @property
    def model(self) -> nn.Module: ...

    @property
    def dims(self) -> DecoderDims: ...

    @property
    def image_token_id(self) -> int: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    @property
    def decoder_layers(self) -> Sequence[nn.Module]:
        """Layers called as `layer(h, attention_mask=, position_embeddings=, cache=)`."""
        ...

    @property
    def vision_modules(self) -> list[nn.Module]:
        """The modules whose parameters the vision graph uses."""
        ...

    @property
    def embed_module(self) -> nn.Module:
        """The token embedding (the embed graph's only weights)."""
        ...

    @property
    def head_modules(self) -> list[nn.Module]:
        """The final norm and the LM head."""
        ...

    @staticmethod
    def checkpoint_keys(name: str) -> tuple[str, ...]:
        """Checkpoint tensor names parameter `name` may be stored under, preferred first."""
        ...

    @property
    def anyres(self) -> AnyResInfo | None:
        """Any-resolution tiling (LLaVA-NeXT); None: one fixed-size view per image."""
        ...

    def image_input(self, inputs) -> object:
        """What `image_features` takes, picked from the processor's output for one image."""
        ...

    def image_features(self, image) -> torch.Tensor:
        """An image (pixels [B, 3, H, W], or what `image_input` gives) -> [B, V, D] visual tokens."""
        ...

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, N] ids -> [B, N, D] token embeddings (image placeholders still unfilled)."""
        ...

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for `position_ids` [B, S], in the layout the decoder layers expect."""
        ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: [B, S, D] -> [B, S, vocab]."""
        ...


class DecoderAdapter:
    """What every family shares: the dimensions, special ids and language-model parts of a
    transformers 5 multimodal model (its decoder under `model.model.language_model`), and the
    checkpoint names transformers 4 saved (`LEGACY_PREFIXES`: current prefix -> saved prefix)."""

    family: str
    tolerance = 1e-4  # max abs logit error accepted in fp32 parity checks
    position_sections = 1  # position ids [B, S]; 3: multimodal rotary [3, B, S]
    LEGACY_PREFIXES: tuple[tuple[str, str], ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        text = model.config.text_config
        check_full_attention(text)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self._dims = DecoderDims(
            hidden=text.hidden_size,
            kv_width=text.num_key_value_heads * head_dim,
            mlp=text.intermediate_size,
            num_layers=text.num_hidden_layers,
        )

    @classmethod
    def num_layers_in(cls, config: dict) -> int:
        text = config.get("text_config") or config  # transformers 4 wrote some decoders' keys at the top
        try:
            return int(text["num_hidden_layers"])
        except (KeyError, TypeError, ValueError):
            raise UnsupportedModelError("config.json has no num_hidden_layers (nor text_config's)") from None

    @classmethod
    def checkpoint_keys(cls, name: str) -> tuple[str, ...]:
        """Where a checkpoint stores parameter `name`: as transformers 5 names it, or as 4 saved it."""
        keys = [name]
        for current, legacy in cls.LEGACY_PREFIXES:
            if name.startswith(current):
                keys.append(legacy + name.removeprefix(current))
        return tuple(keys)

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
        """Any-resolution tiling (LLaVA-NeXT); None: not tiled."""
        return None

    @property
    def patch_grid(self) -> PatchGridInfo | None:
        """Patch-grid images (Qwen2-VL); None: fixed-size views."""
        return None

    @property
    def _language_model(self) -> nn.Module:
        return self._model.model.language_model

    @property
    def decoder_layers(self) -> Sequence[nn.Module]:
        return self._language_model.layers

    @property
    def embed_module(self) -> nn.Module:
        return self._language_model.embed_tokens

    @property
    def head_modules(self) -> list[nn.Module]:
        return [self._language_model.norm, self._model.lm_head]

    def prompt_positions(self, input_ids: torch.Tensor, image) -> tuple[torch.Tensor, int]:
        """Position ids [1, N] of a prompt (0..N-1) and the offset decoding continues at (0)."""
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None], 0

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._language_model.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._language_model.rotary_emb(hidden, position_ids=position_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._model.lm_head(self._language_model.norm(hidden))


def check_full_attention(text_config) -> None:
    """Sliding-window layers would need a different mask; refuse them rather than be wrong."""
    layer_types = getattr(text_config, "layer_types", None) or []
    windowed = sorted({t for t in layer_types if t != "full_attention"})
    if windowed:
        raise UnsupportedModelError(
            f"decoder layers of type {windowed} are not supported (only full attention)",
            hint="disable sliding-window attention in the checkpoint's text config",
        )
