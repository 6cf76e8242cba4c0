"""Tiny random-weight checkpoints of every registered family, for tests and trials.

Each is a real local checkpoint (config, safetensors, tokenizer, processor, chat template) that
`--model DIR` loads exactly like a downloaded one. The families build them (`build_tiny` on each
adapter, with the variants it lists); this module holds what they share: the word-level vocabulary,
the sizes of a tiny decoder, and the command line.

    python -m export.tiny_models --family llava --backbone llama-gqa --out /tmp/tiny-llava
    python -m export.tiny_models --family llava-next --out /tmp/tiny-llava-next
    python -m export.tiny_models --family qwen2.5-vl --out /tmp/tiny-qwen25-vl
    python -m export.tiny_models --family llava --backbone llava-7b-slice --layers 4 --out runs/slice
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from dyvte_rt.cli.commandline import new_parser, run_command
from dyvte_rt.cli.extras import require
from export.word_tokenizer import BOS, EOS, IMAGE, PAD, UNK, build_word_tokenizer

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
    tie_embeddings: bool = False  # the LM head is the embedding table (as small released models have it)


def decoder_sizes(spec: TinySpec) -> dict:
    """The config.json entries of `spec`'s decoder (Llama layout)."""
    return {
        "hidden_size": spec.hidden,
        "intermediate_size": spec.mlp,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": spec.max_positions,
        "initializer_range": spec.init_std,
    }


def preset_decoder_sizes(preset, layers: int) -> dict:
    """The config.json entries of a released model's decoder (`dyvte_rt.families.presets`) with
    `layers` layers: a random slice of its true widths."""
    dims = preset.dims
    return {
        "hidden_size": dims.hidden,
        "intermediate_size": dims.mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": dims.num_heads,
        "num_key_value_heads": dims.num_kv_heads,
        "max_position_embeddings": dims.max_positions,
        "initializer_range": 0.02,
        **preset.text_config,
    }


def decoder_config(config_class: type, spec: TinySpec, vocab: int, **extra: object):
    """A Llama-layout decoder config of `spec`'s sizes (special ids as the word tokenizer's)."""
    return config_class(
        vocab_size=vocab, **decoder_sizes(spec), bos_token_id=1, eos_token_id=2, pad_token_id=3, **extra
    )


def random_model(model_class: type, config, seed: int, head_std: float, tokenizer):
    """A random-weight model of `config`: seeded, its LM head drawn N(0, head_std) (sharper than
    the default init, so greedy picks win by clear margins), generation stopping at the tokenizer's
    EOS."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, head_std)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(out: Path, model, image_processor, tokenizer, chat_template: str) -> Path:
    """Write a checkpoint as a downloaded one looks: safetensors, config, image processor,
    tokenizer and chat template (no processor config: families without torchvision load the parts)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(chat_template)
    return out


def fast_word_tokenizer(
    words: list[str], extra_specials: tuple[str, ...] = (), roles: dict[str, str] | None = None
):
    """The word-level tokenizer over `words` as transformers' fast tokenizer, with the special
    tokens the processors look up (`roles`: e.g. image_token; default `<image>`)."""
    from transformers import PreTrainedTokenizerFast

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


def build_tiny(family: str, variant: str | None, out: Path, seed: int = 0, **options: object) -> Path:
    """A tiny checkpoint of a registered `family` (its first variant unless one is named)."""
    from export.families import adapter_class_for_family

    adapter = adapter_class_for_family(family)
    chosen = variant or adapter.TINY_VARIANTS[0]
    if chosen not in adapter.TINY_VARIANTS:
        raise ValueError(f"family {family!r} has no tiny variant {chosen!r} (it has {adapter.TINY_VARIANTS})")
    return adapter.build_tiny(chosen, out, seed, **options)


def build_parser():
    from export.families import FAMILIES

    adapters = {a.family: a for a in FAMILIES.values()}
    variants = "; ".join(f"{name}: {', '.join(a.TINY_VARIANTS)}" for name, a in adapters.items())
    parser = new_parser(
        "python -m export.tiny_models",
        "Write a random-weight checkpoint of a registered family for tests and trials. Slices "
        "(e.g. llava-7b-slice) have a released 7B model's true sizes (dyvte_rt/families/presets.py) "
        "and --layers decoder layers.",
    )
    parser.add_argument("--family", choices=sorted(adapters), default="llava", help="the model family")
    parser.add_argument(
        "--backbone", metavar="VARIANT", help=f"the family's variant (default: its first): {variants}"
    )
    parser.add_argument("--layers", type=int, help="decoder layers (default: the variant's)")
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
    parser.add_argument(
        "--tie-embeddings",
        action="store_true",
        help="the LM head is the embedding table, as in small released models (Qwen2-VL-2B); a quantised "
        "bundle then stores the table once",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        require("export", "python -m export.tiny_models")
        import torch

        args = build_parser().parse_args(argv)
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
        options = {"layers": args.layers, "dtype": dtype, "streamed": args.streamed}
        if args.tie_embeddings:
            options["tie_embeddings"] = True
        try:
            path = build_tiny(args.family, args.backbone, args.out, args.seed, **options)
        except ValueError as err:
            from dyvte_rt.errors import InputError

            raise InputError(str(err)) from None
        print(f"wrote a random {args.family} checkpoint ({args.backbone or 'default variant'}) to {path}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
