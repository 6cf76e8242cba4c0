"""What a model family implements so that the reference, the exporter and the tests can use it.

An adapter wraps one loaded Hugging Face model and exposes the parts DyVTE needs. `FamilyAdapter`
holds what every family shares — the dimensions, special ids and language-model parts of a
transformers 5 multimodal model (its decoder under `model.model.language_model`) — and a family
overrides the hooks that differ: its vision tower and graph, what its bundle's manifest says about
images, its processor, positions, aliases and tiny test checkpoints (docs/adding-a-family.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from dyvte_rt.bundle.manifest import VisionInfo
from dyvte_rt.errors import UnsupportedModelError
from dyvte_rt.runtime.compute import DecoderDims

if TYPE_CHECKING:
    from export.graph_plans import GraphPlan, RandomInputs


class FamilyAdapter:
    """One loaded multimodal model, seen through the parts DyVTE splits it into."""

    family: ClassVar[str]  # registry key written to the manifest, e.g. "llava"
    ALIASES: ClassVar[dict[str, str]] = {}  # --model alias -> Hugging Face repo id
    TINY_VARIANTS: ClassVar[tuple[str, ...]] = ()  # `build_tiny` variants (a guard test wants one)
    tolerance: ClassVar[float] = 1e-4  # max abs logit error accepted in fp32 parity checks
    position_sections: ClassVar[int] = 1  # position ids [B, S]; 3: multimodal rotary [3, B, S]
    # checkpoint names transformers 4 saved: current prefix -> saved prefix
    LEGACY_PREFIXES: ClassVar[tuple[tuple[str, str], ...]] = ()

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

    # -- before any weights load ------------------------------------------------------------------

    @classmethod
    def num_layers_in(cls, config: dict) -> int:
        """Decoder layer count read from config.json."""
        text = config.get("text_config") or config  # transformers 4 wrote some decoders' keys at the top
        try:
            return int(text["num_hidden_layers"])
        except (KeyError, TypeError, ValueError):
            raise UnsupportedModelError("config.json has no num_hidden_layers (nor text_config's)") from None

    @classmethod
    def head_dim_in(cls, config: dict) -> int | None:
        """The decoder's attention head size from config.json (None where it cannot be read)."""
        text = config.get("text_config") or config
        try:
            return int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None

    @classmethod
    def checkpoint_keys(cls, name: str) -> tuple[str, ...]:
        """Where a checkpoint stores parameter `name`: as transformers 5 names it, or as 4 saved it."""
        keys = [name]
        for current, legacy in cls.LEGACY_PREFIXES:
            if name.startswith(current):
                keys.append(legacy + name.removeprefix(current))
        return tuple(keys)

    @classmethod
    def load_processor(cls, path: Path, trust_remote_code: bool = False) -> Any:
        """The checkpoint's processor (image processor, tokenizer, chat template)."""
        import transformers

        return transformers.AutoProcessor.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )

    @classmethod
    def build_tiny(cls, variant: str, out: Path, seed: int = 0, **options: Any) -> Path:
        """Write a tiny random-weight checkpoint of this family (`TINY_VARIANTS`) to `out`."""
        raise NotImplementedError(f"family {cls.family!r} has no tiny checkpoints")

    @classmethod
    def whole_fp32_tiny_layers(cls, variant: str, options: dict[str, Any], ties: bool = False) -> int | None:
        """`build_tiny`'s options checked for a family whose tiny checkpoints are written whole, in
        fp32 -> the slice's decoder layers (None for `tiny`). `ties`: its tiny checkpoints can tie
        the LM head to the embedding table."""
        if variant not in cls.TINY_VARIANTS:
            raise ValueError(f"{cls.family} has no tiny variant {variant!r}")
        if options.get("streamed") or options.get("dtype", torch.float32) != torch.float32:
            raise ValueError(f"{cls.family} checkpoints are written whole, in fp32")
        if options.get("tie_embeddings") and not ties:
            raise ValueError(
                f"{cls.family} tiny checkpoints have an LM head of their own "
                "(--tie-embeddings: llava, llava-next, qwen2-vl)"
            )
        layers = None if variant == "tiny" else options.get("layers")
        if variant != "tiny" and layers is None:
            raise ValueError(f"the {variant} needs a number of decoder layers")
        return layers

    # -- the loaded model -------------------------------------------------------------------------

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
    def _language_model(self) -> nn.Module:
        return self._model.model.language_model

    @property
    def decoder_layers(self) -> Sequence[nn.Module]:
        """Layers called as `layer(h, attention_mask=, position_embeddings=, cache=)`."""
        return self._language_model.layers

    @property
    def embed_module(self) -> nn.Module:
        """The token embedding (the embed graph's only weights)."""
        return self._language_model.embed_tokens

    @property
    def head_modules(self) -> list[nn.Module]:
        """The final norm and the LM head."""
        return [self._language_model.norm, self._model.lm_head]

    @property
    def ties_word_embeddings(self) -> bool:
        """Whether the LM head reads the embedding table itself (the checkpoint ties them): a
        quantised bundle then stores the table once (export.shared_table, which shares it only if
        the bytes agree). A model built without weights (a streamed export) is not tied in memory;
        its config says so and the loader reads the head from the table."""
        from export.lazy_weights import tied_parameters

        return self._model.lm_head.weight is self.embed_module.weight or bool(tied_parameters(self._model))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, N] ids -> [B, N, D] token embeddings (image placeholders still unfilled)."""
        return self._language_model.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for `position_ids` [B, S], in the layout the decoder layers expect."""
        return self._language_model.rotary_emb(hidden, position_ids=position_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: [B, S, D] -> [B, S, vocab]."""
        return self._model.lm_head(self._language_model.norm(hidden))

    def prompt_positions(self, input_ids: torch.Tensor, image: Any) -> tuple[torch.Tensor, int]:
        """Position ids [1, N] of a prompt (0..N-1) and the offset decoding continues at (0)."""
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None], 0

    # -- images: each family's own ------------------------------------------------------------------

    @property
    def vision_modules(self) -> list[nn.Module]:
        """The modules whose parameters the vision graph uses."""
        raise NotImplementedError

    def image_input(self, inputs) -> Any:
        """What `image_features` takes, picked from the processor's output for one image."""
        raise NotImplementedError

    def image_features(self, image: Any) -> torch.Tensor:
        """An image (what `image_input` gives) -> [B, V, D] visual tokens."""
        raise NotImplementedError

    def vision_outputs(self, image: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([B, V, D] visual tokens, [B, n, V, D] DeepStack levels or None) of an image."""
        return self.image_features(image), None

    @property
    def deepstack_layers(self) -> int:
        """DeepStack levels: level i joins the visual tokens after decoder layer i (0: none)."""
        return 0

    @property
    def segment_boundaries(self) -> tuple[int, ...]:
        """Layers after which a segment must end besides the candidate exits (DeepStack's)."""
        return ()

    def vision_graph(self, pixel_values: torch.Tensor, *per_image: torch.Tensor) -> torch.Tensor:
        """The vision graph's computation from its inputs (`vision_plan` names them)."""
        return self.image_features(pixel_values)

    def vision_plan(self, rand: RandomInputs, tolerance: float) -> GraphPlan:
        """The vision graph: its inputs, tracing sample, dynamic axes and verification cases."""
        raise NotImplementedError

    @property
    def traced_visual_tokens(self) -> int:
        """Visual tokens in the prompts the embed and segment graphs are traced and checked on."""
        raise NotImplementedError

    def vision_info(self, processor) -> VisionInfo:
        """What the bundle's manifest says about images: size, preprocessing, layout."""
        raise NotImplementedError


def check_full_attention(text_config) -> None:
    """Sliding-window layers would need a different mask; refuse them rather than be wrong."""
    layer_types = getattr(text_config, "layer_types", None) or []
    windowed = sorted({t for t in layer_types if t != "full_attention"})
    if windowed:
        raise UnsupportedModelError(
            f"decoder layers of type {windowed} are not supported (only full attention)",
            hint="disable sliding-window attention in the checkpoint's text config",
        )
