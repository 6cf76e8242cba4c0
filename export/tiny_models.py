"""Tiny random-weight LLaVA, LLaVA-NeXT and Qwen2(.5)-VL checkpoints, for tests and trials.

Each is a real local checkpoint (config, safetensors, tokenizer, processor, chat template) that
`--model DIR` loads exactly like a downloaded one. Backbones cover the decoder variants the
LLaVA adapter must handle: Llama with MHA, Llama with GQA, Qwen2 (attention biases). LLaVA-NeXT
checkpoints (`--family llava-next`) tile images on LLaVA-NeXT's five canvases scaled to the tiny
tower's tile (1x2, 2x1, 2x2, 3x1, 1x3 tiles), so that tiling and unpadding happen.

    python -m export.tiny_models --backbone llama-gqa --out /tmp/tiny-llava
    python -m export.tiny_models --family llava-next --out /tmp/tiny-llava-next
    python -m export.tiny_models --family qwen2.5-vl --out /tmp/tiny-qwen25-vl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from dyvte_rt.cli.commandline import new_parser, run_command
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


def _mistral(spec: TinySpec, vocab: int) -> PretrainedConfig:
    return decoder_config(MistralConfig, spec, vocab, rms_norm_eps=1e-5, sliding_window=None)


@dataclass(frozen=True)
class TinyBackbone:
    text_config: Callable[[TinySpec, int], PretrainedConfig]
    spec: TinySpec


TINY_BACKBONES: dict[str, TinyBackbone] = {
    "llama-mha": TinyBackbone(_llama, TinySpec(kv_heads=4)),
    "llama-gqa": TinyBackbone(_llama, TinySpec(kv_heads=2)),
    "qwen2": TinyBackbone(_qwen2, TinySpec(kv_heads=2)),
    "mistral": TinyBackbone(_mistral, TinySpec(kv_heads=2)),  # LLaVA-NeXT's Mistral-7B backbone
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
TINY_QWEN_VL = ("qwen2-vl", "qwen2.5-vl")  # build_tiny_qwen_vl variants
TINY_MODELS_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "llava": ("llama-mha", "llama-gqa", "qwen2"),
    "llava-next": ("llama-gqa", "mistral"),
    "qwen2-vl": ("qwen2-vl",),
    "qwen2.5-vl": ("qwen2.5-vl",),
}
FAMILY_CLASSES = {"llava": LlavaForConditionalGeneration, "llava-next": LlavaNextForConditionalGeneration}


def grid_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-NeXT's canvases (336x672, 672x336, 672x672, 1008x336, 336x1008) in units of `tile`."""
    return [[tile * h, tile * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]


def fast_word_tokenizer(
    words: list[str], extra_specials: tuple[str, ...] = (), roles: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """The word-level tokenizer over `words` as transformers' fast tokenizer, with the special
    tokens the processors look up (`roles`: e.g. image_token; default `<image>`)."""
    words_tokenizer = build_word_tokenizer(words)
    if extra_specials:
        words_tokenizer.add_special_tokens(list(extra_specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=words_tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=roles or {"image_token": IMAGE},
    )


def build_tiny_llava(backbone: str, out: Path, seed: int = 0, family: str = "llava") -> Path:
    """Write a tiny random LLaVA (or LLaVA-NeXT) checkpoint to `out` and return it."""
    choice = TINY_BACKBONES[backbone]
    return build_random_llava(choice.text_config, choice.spec, out, seed, family=family)


def build_random_llava(
    text_config: Callable[[TinySpec, int], PretrainedConfig],
    spec: TinySpec,
    out: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    family: str = "llava",
) -> Path:
    """Write a random-weight LLaVA checkpoint of the given sizes (llava-hf layout) to `out`."""
    model, processor = new_llava(text_config, spec, TINY_WORDS, seed, family)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


SHARD_BYTES = 2 << 30


def write_random_llava_streamed(
    text_config: Callable[[TinySpec, int], PretrainedConfig],
    spec: TinySpec,
    out: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    family: str = "llava",
) -> Path:
    """Write a random-weight LLaVA checkpoint without ever holding it in memory: tensors are drawn
    one at a time and written to ~2 GB safetensors shards (a full-depth 7B model on a small machine).

    Weights are N(0, init_std) (the LM head N(0, head_std)), biases 0, norm scales 1; the model is
    as random as `build_random_llava`'s, not the same draw.
    """
    from safetensors.torch import save_file

    from export.families.llava import LlavaAdapter
    from export.lazy_weights import parameters_on_meta

    config, processor = llava_config_and_processor(text_config, spec, TINY_WORDS, family)
    model_class = FAMILY_CLASSES[family]
    with parameters_on_meta():
        skeleton = model_class(config)
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
    config.architectures = [model_class.__name__]
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
    text_config: Callable[[TinySpec, int], PretrainedConfig],
    spec: TinySpec,
    words: list[str],
    seed: int = 0,
    family: str = "llava",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-weight LLaVA model and its processor (word-level tokenizer over `words`), in memory."""
    config, processor = llava_config_and_processor(text_config, spec, words, family)
    torch.manual_seed(seed)
    model = FAMILY_CLASSES[family](config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, spec.head_std)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def llava_config_and_processor(
    text_config: Callable[[TinySpec, int], PretrainedConfig],
    spec: TinySpec,
    words: list[str],
    family: str = "llava",
) -> tuple[LlavaConfig, LlavaProcessor]:
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
    common = {
        "vision_config": vision,
        "text_config": text_config(spec, spec.vocab_size or len(tokenizer)),
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
    }
    sizes = {
        "size": {"shortest_edge": spec.image_size},
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
    }
    if family == "llava-next":
        pinpoints = grid_pinpoints(spec.image_size)
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        image_processor = LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=pinpoints)
        processor_class = LlavaNextProcessor
    else:
        config = LlavaConfig(**common)
        image_processor, processor_class = CLIPImageProcessorPil(**sizes), LlavaProcessor
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return config, processor


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "python -m export.tiny_models",
        "Write a random-weight LLaVA, LLaVA-NeXT or Qwen2(.5)-VL checkpoint for tests and trials.",
    )
    parser.add_argument(
        "--backbone",
        choices=[*sorted(TINY_BACKBONES), "llava-7b-slice", QWEN25_VL_7B_SLICE],
        default="llama-gqa",
        help="llava-7b-slice: true LLaVA-1.5-7B dimensions and CLIP ViT-L/14-336, random weights; "
        f"{QWEN25_VL_7B_SLICE} (with --family qwen2.5-vl): true Qwen2.5-VL-7B dimensions, vision tower "
        "and pixel budget, random weights, the word tokenizer's vocabulary",
    )
    parser.add_argument(
        "--family",
        choices=[*sorted(FAMILY_CLASSES), *TINY_QWEN_VL],
        default="llava",
        help="llava: LLaVA-1.5 (one 336-style view per image); llava-next: any-resolution tiles; qwen2-vl, "
        "qwen2.5-vl: tiny Qwen VL models (--layers and --dtype do not apply; --backbone only as "
        f"{QWEN25_VL_7B_SLICE})",
    )
    parser.add_argument("--layers", type=int, help="decoder layers (default: the backbone's)")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="checkpoint directory to write"
    )
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument(
        "--dtype", choices=("fp32", "fp16"), default="fp32", help="precision of the weights on disk"
    )
    parser.add_argument(
        "--streamed",
        action="store_true",
        help="draw and write the weights tensor by tensor into 2 GB shards, never holding the model in "
        "memory (a full-depth 7B: --backbone llava-7b-slice --layers 32 --dtype fp16 --streamed)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.backbone == QWEN25_VL_7B_SLICE and (args.family != "qwen2.5-vl" or args.layers is None):
            parser.error(f"--backbone {QWEN25_VL_7B_SLICE} goes with --family qwen2.5-vl and --layers N")
        if args.family in TINY_QWEN_VL:
            layers = args.layers if args.backbone == QWEN25_VL_7B_SLICE else None
            path = build_tiny_qwen_vl(args.family, args.out, args.seed, slice_layers=layers)
            kind = f"{QWEN25_VL_7B_SLICE} ({layers} decoder layers)" if layers else f"tiny {args.family}"
            print(f"wrote random {kind} checkpoint to {path}")
            return
        if args.backbone == "llava-7b-slice":
            spec, text_config = LLAVA_7B_SLICE, _llama
        else:
            spec, text_config = TINY_BACKBONES[args.backbone].spec, TINY_BACKBONES[args.backbone].text_config
        if args.layers is not None:
            spec = dataclasses.replace(spec, layers=args.layers)
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
        write = write_random_llava_streamed if args.streamed else build_random_llava
        path = write(text_config, spec, args.out, args.seed, dtype, family=args.family)
        print(
            f"wrote random {args.backbone} {args.family} checkpoint ({spec.layers} decoder layers) to {path}"
        )

    return run_command(body)


# Qwen2-VL's chat format (without its default system turn), as its processor renders it.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Tiny Qwen VL images: 14-pixel patches merged 2 x 2 (as the real models), 4 to 64 visual tokens
QWEN_TINY_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}


# Qwen2.5-VL-7B's true sizes (config.json of Qwen/Qwen2.5-VL-7B-Instruct) for a random slice of a
# few decoder layers. The vocabulary stays the word tokenizer's: prefill runs the head on the last
# token only, so the exit's timing does not depend on it, and the slice fits on this machine's disk.
QWEN25_VL_7B_TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}
QWEN25_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "initializer_range": 0.02,
}
QWEN25_VL_7B_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
QWEN25_VL_7B_SLICE = "qwen2.5-vl-7b-slice"


def build_tiny_qwen_vl(variant: str, out: Path, seed: int = 0, *, slice_layers: int | None = None) -> Path:
    """A tiny random Qwen2-VL (`variant` "qwen2-vl") or Qwen2.5-VL ("qwen2.5-vl", windowed vision
    attention in its first block) checkpoint with its image processor, tokenizer and chat template
    (no video processor: transformers builds those only with torchvision). With `slice_layers`, a
    Qwen2.5-VL-7B-shaped slice instead: true sizes and pixel budget, that many decoder layers."""
    import transformers

    if slice_layers is not None and variant != "qwen2.5-vl":
        raise ValueError(f"the 7B-shaped slice is a qwen2.5-vl model, not {variant}")

    from export.families.qwen2_vl import image_only_processor

    tokenizer = fast_word_tokenizer(
        TINY_WORDS, QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    )
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    ids = dict(zip(QWEN_SPECIALS, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIALS)), strict=True))
    spec = TinySpec(kv_heads=2)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden,
        "intermediate_size": spec.mlp,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": spec.max_positions,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "initializer_range": spec.init_std,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    common = {
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "depth": 2,
    }
    if variant == "qwen2-vl":
        vision = {**common, "embed_dim": 32, "hidden_size": spec.hidden, "num_heads": 4, "mlp_ratio": 2}
        config_class, model_class, processor_class = (
            transformers.Qwen2VLConfig,
            transformers.Qwen2VLForConditionalGeneration,
            transformers.Qwen2VLProcessor,
        )
    elif variant == "qwen2.5-vl":
        vision = {
            **common,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": spec.hidden,
            "window_size": 56,  # 2 x 2 merged patches per window
            "fullatt_block_indexes": [1],
        }
        config_class, model_class, processor_class = (
            transformers.Qwen2_5_VLConfig,
            transformers.Qwen2_5_VLForConditionalGeneration,
            transformers.Qwen2_5_VLProcessor,
        )
    else:
        raise ValueError(f"unknown Qwen VL variant {variant!r}")
    vision["initializer_range"] = spec.init_std
    pixels, head_std = dict(QWEN_TINY_PIXELS), spec.head_std
    if slice_layers is not None:
        text = {**text, **QWEN25_VL_7B_TEXT, "num_hidden_layers": slice_layers}
        vision = {**vision, **QWEN25_VL_7B_VISION}
        pixels, head_std = dict(QWEN25_VL_7B_PIXELS), 0.02
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, head_std)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = transformers.Qwen2VLImageProcessorPil(size=pixels)
    processor = image_only_processor(processor_class)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(processor.chat_template)
    return out


if __name__ == "__main__":
    sys.exit(main())
