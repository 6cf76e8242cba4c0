"""`dyvte-rt infer [IMAGE] QUESTION`: one answer, streamed to stdout (or one JSON object)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from dyvte_rt.cli.commandline import HelpFormatter, config_from, use_config_defaults
from dyvte_rt.cli.common import RunnerConfig, open_model
from dyvte_rt.cli.options import bundle_options, device_options, exit_options, json_option, sampling_options
from dyvte_rt.errors import InputError
from dyvte_rt.inputs.images import IMAGE_SUFFIXES


@dataclass(frozen=True, kw_only=True)
class InferConfig(RunnerConfig):
    question: str
    image: Path | None = None  # None: a text-only question
    exit: str | None = None
    threshold: float | None = None
    prune: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    as_json: bool = False


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "infer",
        help="answer a question about an image",
        description="Answer a question about an image (or a text-only question: leave the image out). The "
        "answer streams to stdout; --json prints one object with the answer, token ids, finish reason, exit "
        "layer, visual tokens kept by a --prune, timings and prefill multiply-adds.",
        formatter_class=HelpFormatter,
        parents=[bundle_options(), exit_options(), sampling_options(), device_options(), json_option()],
    )
    parser.add_argument(
        "image", nargs="?", type=Path, help="image file (leave it out for a text-only question)"
    )
    parser.add_argument("question", help="the question")
    use_config_defaults(parser, InferConfig)
    parser.set_defaults(make_config=make_config, run=run)


def make_config(args: argparse.Namespace) -> InferConfig:
    if (
        args.image is None
        and Path(args.question).suffix.lower() in IMAGE_SUFFIXES
        and Path(args.question).exists()
    ):
        raise InputError(f"no question given for the image {args.question}")
    return config_from(InferConfig, args)


def run(config: InferConfig) -> int:
    from dyvte_rt.runtime.sampling import SamplingConfig

    sampling = SamplingConfig(config.temperature, config.top_k, config.top_p, config.seed)
    with open_model(config) as model:
        generation = model.generate(
            config.image,
            config.question,
            exit=config.exit,
            threshold=config.threshold,
            max_new_tokens=config.max_new_tokens,
            sampling=sampling,
            prune=config.prune,
        )
        if config.as_json:
            print(json.dumps(generation.result().to_dict()))
            return 0
        for piece in generation:
            print(piece, end="", flush=True)
        print()
    return 0
