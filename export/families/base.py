"""The protocol a model family implements so that the reference and the exporter can use it.

An adapter wraps one loaded Hugging Face model and exposes the parts DyVTE needs; everything
family-specific (where the vision tower lives, how features are selected) stays behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from dyvte_rt.compute import DecoderDims
from dyvte_rt.manifest import AnyResInfo


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
