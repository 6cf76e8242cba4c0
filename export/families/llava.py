"""LLaVA-1.5 style models (`LlavaForConditionalGeneration`, transformers 5.x).

Works with any decoder transformers provides under it whose layers follow the Llama layout
(Llama MHA/GQA, Qwen2 with attention biases, ...): the decoder layers are called as they are,
so per-family details such as biases or q/k norms come with them. Images are one fixed-size view.

Tiny checkpoints (`build_tiny`): random-weight models whose decoder is Llama with MHA or GQA, Qwen2
(attention biases) or Mistral, and `llava-7b-slice`, LLaVA-1.5-7B's true sizes with few layers.
LLaVA-NeXT builds its checkpoints with the same functions and its own classes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dyvte_rt.bundle import io_names
from dyvte_rt.bundle.manifest import VisionInfo
from dyvte_rt.families.presets import LLAVA_15_7B, ModelPreset
from export.families.base import FamilyAdapter
from export.graph_plans import BATCH, GraphPlan, RandomInputs
from export.manifest_builder import image_preprocess
from export.parts import VisionPart
from export.tiny_models import TINY_WORDS, TinySpec, decoder_config, fast_word_tokenizer, random_model

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), as llava-hf renders it.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


class LlavaAdapter(FamilyAdapter):
    family = "llava"
    ALIASES: ClassVar[dict[str, str]] = {
        "llava-7b": "llava-hf/llava-1.5-7b-hf",
        "llava-13b": "llava-hf/llava-1.5-13b-hf",
    }
    TINY_VARIANTS = ("llama-mha", "llama-gqa", "qwen2", "llama-head12", "llava-7b-slice")
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

    @classmethod
    def build_tiny(cls, variant: str, out: Path, seed: int = 0, **options: Any) -> Path:
        return build_tiny_llava(variant, out, seed, **options)

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

    @property
    def traced_visual_tokens(self) -> int:
        vision = self._model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def vision_plan(self, rand: RandomInputs, tolerance: float) -> GraphPlan:
        """pixel_values [B, 3, H, W] -> image_features [B, V, D]; same-size images batch together."""
        size = self._model.config.vision_config.image_size
        pixels = (3, size, size)
        return GraphPlan(
            "vision",
            "vision",
            VisionPart(self),
            [io_names.PIXEL_VALUES],
            [io_names.IMAGE_FEATURES],
            sample=(rand.randn(2, *pixels),),
            dynamic_shapes=({0: BATCH},),
            dtype=rand.dtype,
            tolerance=tolerance,
            cases=lambda: [(rand.randn(1, *pixels),), (rand.randn(2, *pixels),)],
        )

    def vision_info(self, processor) -> VisionInfo:
        vision = self._model.config.vision_config
        preprocess = image_preprocess(processor.image_processor)
        return VisionInfo(
            image_height=preprocess.crop_height or vision.image_size,
            image_width=preprocess.crop_width or vision.image_size,
            visual_tokens=self.traced_visual_tokens,
            preprocess=preprocess,
        )


# -- tiny checkpoints ---------------------------------------------------------------------------


def llama_decoder(spec: TinySpec, vocab: int):
    from transformers import LlamaConfig

    return decoder_config(LlamaConfig, spec, vocab, rms_norm_eps=1e-5)


def qwen2_decoder(spec: TinySpec, vocab: int):
    from transformers import Qwen2Config

    return decoder_config(
        Qwen2Config, spec, vocab, rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=False
    )


def mistral_decoder(spec: TinySpec, vocab: int):
    from transformers import MistralConfig

    return decoder_config(MistralConfig, spec, vocab, rms_norm_eps=1e-5, sliding_window=None)


def slice_spec(preset: ModelPreset, layers: int = 2) -> TinySpec:
    """A preset's true decoder and CLIP tower sizes with `layers` decoder layers (random weights)."""
    dims, tower = preset.dims, preset.tower
    return TinySpec(
        image_size=tower["image_size"],
        patch_size=tower["patch_size"],
        vision_hidden=tower["hidden_size"],
        vision_layers=tower["num_hidden_layers"],
        vision_heads=tower["num_attention_heads"],
        vision_mlp=tower["intermediate_size"],
        vocab_size=dims.vocab_size,
        max_positions=dims.max_positions,
        hidden=dims.hidden,
        heads=dims.num_heads,
        kv_heads=dims.num_kv_heads,
        layers=layers,
        mlp=dims.mlp,
        init_std=0.02,
        head_std=0.02,
    )


@dataclass(frozen=True)
class TinyBackbone:
    text_config: Callable[[TinySpec, int], Any]
    spec: TinySpec


TINY_BACKBONES: dict[str, TinyBackbone] = {
    "llama-mha": TinyBackbone(llama_decoder, TinySpec(kv_heads=4)),
    "llama-gqa": TinyBackbone(llama_decoder, TinySpec(kv_heads=2)),
    "qwen2": TinyBackbone(qwen2_decoder, TinySpec(kv_heads=2)),
    "mistral": TinyBackbone(mistral_decoder, TinySpec(kv_heads=2)),  # LLaVA-NeXT's Mistral-7B backbone
    # a head size of 12, legal in Hugging Face, which ONNX Runtime's GroupQueryAttention refuses
    "llama-head12": TinyBackbone(llama_decoder, TinySpec(hidden=48, heads=4, kv_heads=2)),
    # LLaVA-1.5-7B's true decoder and CLIP ViT-L/14-336 tower, random weights: for export memory and
    # speed measurements without a download
    "llava-7b-slice": TinyBackbone(llama_decoder, slice_spec(LLAVA_15_7B)),
}


@dataclass(frozen=True)
class LlavaClasses:
    """The transformers classes a LLaVA-style checkpoint is made of, and its extra config."""

    config: Callable[..., Any]
    model: type
    image_processor: Callable[..., Any]
    processor: type
    extra: Callable[[TinySpec], dict] = lambda spec: {}  # config and image-processor entries


def llava_classes() -> LlavaClasses:
    import transformers

    return LlavaClasses(
        transformers.LlavaConfig,
        transformers.LlavaForConditionalGeneration,
        transformers.CLIPImageProcessorPil,
        transformers.LlavaProcessor,
    )


def build_tiny_llava(
    variant: str,
    out: Path,
    seed: int = 0,
    *,
    layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    streamed: bool = False,
    classes: LlavaClasses | None = None,
    spec: TinySpec | None = None,
    tie_embeddings: bool = False,
) -> Path:
    """A tiny random checkpoint of `variant` (a TINY_BACKBONES key), written to `out`; `spec`
    overrides the backbone's sizes, `layers` its decoder depth; `tie_embeddings`: the LM head is the
    embedding table."""
    choice = TINY_BACKBONES[variant]
    spec = spec or choice.spec
    if layers is not None:
        spec = dataclasses.replace(spec, layers=layers)
    if tie_embeddings:
        spec = dataclasses.replace(spec, tie_embeddings=True)
    write = write_random_llava_streamed if streamed else build_random_llava
    return write(choice.text_config, spec, out, seed, dtype, classes or llava_classes())


def build_random_llava(
    text_config: Callable[[TinySpec, int], Any],
    spec: TinySpec,
    out: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    classes: LlavaClasses | None = None,
) -> Path:
    """Write a random-weight LLaVA checkpoint of the given sizes (llava-hf layout) to `out`."""
    model, processor = new_llava(text_config, spec, TINY_WORDS, seed, classes)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


SHARD_BYTES = 2 << 30


def write_random_llava_streamed(
    text_config: Callable[[TinySpec, int], Any],
    spec: TinySpec,
    out: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    classes: LlavaClasses | None = None,
) -> Path:
    """Write a random-weight LLaVA checkpoint without ever holding it in memory: tensors are drawn
    one at a time and written to ~2 GB safetensors shards (a full-depth 7B model on a small machine).

    Weights are N(0, init_std) (the LM head N(0, head_std)), biases 0, norm scales 1; the model is
    as random as `build_random_llava`'s, not the same draw.
    """
    from safetensors.torch import save_file

    from export.lazy_weights import parameters_on_meta

    classes = classes or llava_classes()
    config, processor = llava_config_and_processor(text_config, spec, TINY_WORDS, classes)
    with parameters_on_meta():
        skeleton = classes.model(config)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    shards: list[dict[str, torch.Tensor]] = []
    total = 0

    def flush() -> None:
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shards.append({})
            shard.clear()

    for name, param in skeleton.named_parameters():
        key = LlavaAdapter.checkpoint_keys(name)[-1]  # the layout transformers saves
        shard[key] = _random_like(name, param, spec, generator).to(dtype)
        total += shard[key].numel() * shard[key].element_size()
        if sum(t.numel() * t.element_size() for t in shard.values()) >= SHARD_BYTES:
            flush()
    flush()
    count = len(shards)
    final = {
        f"model-{i:05d}.safetensors": f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)
    }
    for old, new in final.items():
        (out / old).rename(out / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.dtype = dtype
    config.architectures = [classes.model.__name__]
    config.save_pretrained(out)
    skeleton.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    skeleton.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    skeleton.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _random_like(name: str, param: torch.Tensor, spec: TinySpec, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(param.shape)
    if param.dim() == 1 and ("norm" in name or "layernorm" in name):
        return torch.ones(param.shape)
    std = spec.head_std if name == "lm_head.weight" else spec.init_std
    return torch.randn(param.shape, generator=generator) * std


def new_llava(
    text_config: Callable[[TinySpec, int], Any],
    spec: TinySpec,
    words: list[str],
    seed: int = 0,
    classes: LlavaClasses | None = None,
):
    """A random-weight LLaVA model and its processor (word-level tokenizer over `words`), in memory."""
    classes = classes or llava_classes()
    config, processor = llava_config_and_processor(text_config, spec, words, classes)
    return random_model(classes.model, config, seed, spec.head_std, processor.tokenizer), processor


def llava_config_and_processor(
    text_config: Callable[[TinySpec, int], Any],
    spec: TinySpec,
    words: list[str],
    classes: LlavaClasses | None = None,
):
    from transformers import CLIPVisionConfig

    from export.word_tokenizer import IMAGE

    classes = classes or llava_classes()
    tokenizer = fast_word_tokenizer(words)
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
        initializer_range=spec.init_std,
    )
    extra = classes.extra(spec)
    config = classes.config(
        vision_config=vision,
        text_config=text_config(spec, spec.vocab_size or len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        **extra,
    )
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = spec.tie_embeddings
    image_processor = classes.image_processor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        **extra,
    )
    processor = classes.processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return config, processor
