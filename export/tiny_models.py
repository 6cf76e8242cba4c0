"""Tiny random-weight LLaVA checkpoints in the llava-hf layout, for tests and quick trials.

Each is a real local checkpoint (config, safetensors, tokenizer, processor, chat template) that
`--model DIR` loads exactly like a downloaded one. Backbones cover the decoder variants the
LLaVA adapter must handle: Llama with MHA, Llama with GQA, Qwen2 (attention biases).

    python -m export.tiny_models --backbone llama-gqa --out /tmp/tiny-llava
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from dyvte_rt.commandline import new_parser, run_command
from export.word_tokenizer import BOS, EOS, IMAGE, PAD, UNK, build_word_tokenizer

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

TINY_WORDS = (
    "user assistant system : ? . , ! ' the a an is are what which where how many color colour shape "
    "of in on at to and or this that image picture there red green blue yellow purple orange black "
    "white circle square triangle star one two three four left right top bottom middle center yes no "
    "describe answer question word short big small"
).split()


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a random checkpoint; visual tokens = (image_size / patch_size)²."""

    image_size: int = 32
    patch_size: int = 8  # -> 16 visual tokens
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 64
    vocab_size: int | None = None  # None: the tokenizer's size
    max_positions: int = 512
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 4
    layers: int = 4
    mlp: int = 128
    init_std: float = 0.1  # larger than HF's 0.02 so the random model is not near-uniform
    head_std: float = 0.6  # sharper LM head: greedy picks win by clear margins, not near-ties


def decoder_config(config_class: type, spec: TinySpec, vocab: int, **extra: object) -> PretrainedConfig:
    """A Llama-layout decoder config of `spec`'s sizes (special ids as the word tokenizer's)."""
    return config_class(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.mlp,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        initializer_range=spec.init_std,
        **extra,
    )


def _llama(spec: TinySpec, vocab: int) -> PretrainedConfig:
    return decoder_config(LlamaConfig, spec, vocab, rms_norm_eps=1e-5)


def _qwen2(spec: TinySpec, vocab: int) -> PretrainedConfig:
    return decoder_config(
        Qwen2Config, spec, vocab, rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=False
    )


@dataclass(frozen=True)
class TinyBackbone:
    text_config: Callable[[TinySpec, int], PretrainedConfig]
    spec: TinySpec


TINY_BACKBONES: dict[str, TinyBackbone] = {
    "llama-mha": TinyBackbone(_llama, TinySpec(kv_heads=4)),
    "llama-gqa": TinyBackbone(_llama, TinySpec(kv_heads=2)),
    "qwen2": TinyBackbone(_qwen2, TinySpec(kv_heads=2)),
}

# LLaVA-1.5-7B's true decoder dimensions and CLIP ViT-L/14-336 tower, with few decoder layers and
# random weights: for export memory and speed measurements without a download.
LLAVA_7B_SLICE = TinySpec(
    image_size=336,
    patch_size=14,
    vision_hidden=1024,
    vision_layers=24,
    vision_heads=16,
    vision_mlp=4096,
    vocab_size=32064,
    max_positions=4096,
    hidden=4096,
    heads=32,
    kv_heads=32,
    layers=2,
    mlp=11008,
    init_std=0.02,
    head_std=0.02,
)

# Which tiny backbones exercise each registered family (a guard test checks every family has one).
TINY_MODELS_BY_FAMILY: dict[str, tuple[str, ...]] = {"llava": tuple(TINY_BACKBONES)}


def build_tiny_llava(backbone: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny random LLaVA checkpoint to `out` and return it."""
    choice = TINY_BACKBONES[backbone]
    return build_random_llava(choice.text_config, choice.spec, out, seed)


def build_random_llava(
    text_config: Callable[[TinySpec, int], PretrainedConfig], spec: TinySpec, out: Path, seed: int = 0
) -> Path:
    """Write a random-weight LLaVA checkpoint of the given sizes (llava-hf layout) to `out`."""
    model, processor = new_llava(text_config, spec, TINY_WORDS, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def new_llava(
    text_config: Callable[[TinySpec, int], PretrainedConfig], spec: TinySpec, words: list[str], seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-weight LLaVA model and its processor (word-level tokenizer over `words`), in memory."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_word_tokenizer(words),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
    )
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
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config(spec, spec.vocab_size or len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, spec.head_std)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": spec.image_size},
            crop_size={"height": spec.image_size, "width": spec.image_size},
        ),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "python -m export.tiny_models",
        "Write a random-weight LLaVA checkpoint (llava-hf layout) for tests and trials.",
    )
    parser.add_argument(
        "--backbone",
        choices=[*sorted(TINY_BACKBONES), "llava-7b-slice"],
        default="llama-gqa",
        help="llava-7b-slice: true LLaVA-1.5-7B dimensions and CLIP ViT-L/14-336, random weights",
    )
    parser.add_argument("--layers", type=int, help="decoder layers (default: the backbone's)")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="checkpoint directory to write"
    )
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.backbone == "llava-7b-slice":
            spec, text_config = LLAVA_7B_SLICE, _llama
        else:
            spec, text_config = TINY_BACKBONES[args.backbone].spec, TINY_BACKBONES[args.backbone].text_config
        if args.layers is not None:
            spec = dataclasses.replace(spec, layers=args.layers)
        path = build_random_llava(text_config, spec, args.out, args.seed)
        print(f"wrote random {args.backbone} LLaVA checkpoint ({spec.layers} decoder layers) to {path}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
