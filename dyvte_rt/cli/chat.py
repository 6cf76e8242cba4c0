"""`dyvte-rt chat [IMAGE]`: a conversation on stdin/stdout that keeps its KV cache between turns."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from dyvte_rt.cli.commandline import HelpFormatter, config_from, use_config_defaults
from dyvte_rt.cli.common import RunnerConfig, open_model
from dyvte_rt.cli.options import bundle_options, device_options, exit_options, json_option, sampling_options
from dyvte_rt.errors import DyvteError

COMMANDS = "/reset starts the conversation over (same image), /exit or end of input leaves, /help lists these"
COMMAND = re.compile(r"/[a-z]+(?=\s|$)")  # a line that starts with one is a command (a path is not)


@dataclass(frozen=True, kw_only=True)
class ChatConfig(RunnerConfig):
    image: Path | None = None
    exit: str | None = None
    threshold: float | None = None
    prune: str | None = None
    max_new_tokens: int = 256
    context: int | None = None  # None: the model's context, at most 2048
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    as_json: bool = False


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "chat",
        help="a conversation about an image that keeps its KV cache between turns",
        description="Chat about an image (or without one): one question per line on stdin, answers streamed "
        f"to stdout. {COMMANDS}. The exit is decided in the first turn; later turns reuse the KV cache "
        "(docs/runtime.md, Conversations). --json prints one JSON object per answer.",
        formatter_class=HelpFormatter,
        parents=[bundle_options(), exit_options(), sampling_options(), device_options(), json_option()],
    )
    parser.add_argument("image", nargs="?", type=Path, help="image file (leave it out to chat without one)")
    parser.add_argument(
        "--context",
        type=int,
        metavar="N",
        help="positions the conversation may use (default: the model's context, at most 2048; "
        "the KV cache is sized for it)",
    )
    use_config_defaults(parser, ChatConfig)
    parser.set_defaults(make_config=partial(config_from, ChatConfig), run=run)


def run(config: ChatConfig) -> int:
    from dyvte_rt.runtime.sampling import SamplingConfig

    sampling = SamplingConfig(config.temperature, config.top_k, config.top_p, config.seed)
    interactive = sys.stdin.isatty()
    with open_model(config) as model:
        chat = model.chat(
            config.image,
            exit=config.exit,
            threshold=config.threshold,
            context=config.context,
            sampling=sampling,
            prune=config.prune,
        )
        if interactive:
            about = f"about {config.image}" if config.image else "without an image"
            print(f"chatting {about}; {COMMANDS}", file=sys.stderr)
        for line in _lines(interactive):
            question = line.strip()
            if not question:
                continue
            if question in ("/exit", "/quit"):
                break
            if question == "/reset":
                chat.reset()
                print("(conversation reset)", file=sys.stderr)
                continue
            command = COMMAND.match(question)
            if command:  # /help, or a command that does not exist: not a question for the model
                known = question == "/help"
                print(COMMANDS if known else f"unknown command {command[0]}; {COMMANDS}", file=sys.stderr)
                continue
            try:
                generation = chat.generate(question, max_new_tokens=config.max_new_tokens)
                if config.as_json:
                    print(
                        json.dumps({"turn": len(chat.history) + 1, **generation.result().to_dict()}),
                        flush=True,
                    )
                    continue
                for piece in generation:
                    print(piece, end="", flush=True)
                print(flush=True)
            except DyvteError as err:  # a bad turn ends the turn, not the conversation
                print(f"error: {err.one_line()}", file=sys.stderr)
    return 0


def _lines(interactive: bool):
    while True:
        try:
            yield input("> ") if interactive else input()
        except EOFError:
            return
