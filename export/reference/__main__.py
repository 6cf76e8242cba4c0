"""Answer a question about an image with the PyTorch reference (no export needed).

    python -m export.reference --model DIR --image photo.png --question "what is this?" --exit layer:1

Useful to see the exit semantics on a checkpoint before exporting it, and as the ground truth
when a bundle's answer looks wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from dyvte_rt.cli.commandline import config_from, new_parser, run_command, use_config_defaults
from dyvte_rt.cli.extras import require
from dyvte_rt.cli.options import json_option
from dyvte_rt.errors import InputError
from dyvte_rt.runtime.policy import DEFAULT_THRESHOLD, parse_policy
from export.cli_options import model_options
from export.loading import DTYPES


@dataclass(frozen=True)
class ReferenceConfig:
    model: str
    image: Path
    question: str
    exit: str = "never"
    threshold: float | None = None  # None: the routers file's threshold, else 0.5
    routers: Path | None = None
    max_new_tokens: int = 32
    dtype: str = "fp32"
    device: str = "cpu"
    trust_remote_code: bool = False
    as_json: bool = False


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "python -m export.reference",
        "Run the PyTorch DyVTE reference on one image and question (greedy decoding).",
        parents=[model_options(), json_option()],
    )
    parser.add_argument("--image", type=Path, required=True, help="image file")
    parser.add_argument("--question", required=True, help="question about the image")
    parser.add_argument("--exit", metavar="POLICY", help="exit policy: never, router, or layer:K")
    parser.add_argument(
        "--threshold", type=float, help="router exit threshold (default: the routers file's, else 0.5)"
    )
    parser.add_argument("--routers", type=Path, help="trained routers (.safetensors)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="most tokens to generate")
    parser.add_argument("--dtype", choices=DTYPES, help="precision the model runs in")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda")
    use_config_defaults(parser, ReferenceConfig)
    return parser


def parse_args(argv: list[str] | None) -> ReferenceConfig:
    return config_from(ReferenceConfig, build_parser().parse_args(argv))


def run(config: ReferenceConfig) -> dict:
    """Load, prompt, generate; returns what the CLI prints."""
    import torch

    from dyvte_rt.inputs.images import load_image
    from export.loading import load_checkpoint
    from export.prompting import hf_inputs
    from export.reference.model import DyVTEReference
    from export.reference.routers import RouterBank

    if not config.question.strip():
        raise InputError("the question is empty", hint="ask something about the image")
    image = load_image(config.image)
    routers = RouterBank.load(config.routers) if config.routers else None
    threshold = (
        config.threshold
        if config.threshold is not None
        else (routers.threshold if routers is not None else DEFAULT_THRESHOLD)
    )
    policy = parse_policy(config.exit, threshold)
    loaded = load_checkpoint(config.model, config.dtype, config.device, config.trust_remote_code)
    reference = DyVTEReference(loaded.adapter, routers=routers)
    processor = loaded.processor
    inputs = hf_inputs(processor, image, config.question).to(config.device)
    if routers is not None:
        reference.routers = routers.to(config.device)
    with torch.inference_mode():
        result = reference.generate(
            inputs["input_ids"],
            loaded.adapter.image_input(inputs).to(loaded.model.dtype),
            policy,
            config.max_new_tokens,
        )
    prefill = result.prefill
    return {
        "answer": processor.tokenizer.decode(result.tokens, skip_special_tokens=True).strip(),
        "token_ids": result.tokens,
        "policy": policy.describe(),
        "exit_layer": prefill.exit_layer,
        "exit_probs": {str(k): round(v, 6) for k, v in prefill.exit_probs.items()},
        "prompt_tokens": prefill.n_tokens,
        "visual_tokens": prefill.n_visual,
        "prefill_macs": {
            "full": prefill.macs.full,
            "actual": prefill.macs.actual,
            "saved_fraction": round(prefill.macs.saved_fraction, 4),
        },
    }


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        require("export", "python -m export.reference")
        config = parse_args(argv)
        show(run(config), config)

    return run_command(body)


def show(report: dict, config: ReferenceConfig) -> None:
    if config.as_json:
        print(json.dumps(report))
        return
    exit_text = "none" if report["exit_layer"] is None else f"after layer {report['exit_layer']}"
    print(report["answer"])
    print(
        f"[{report['policy']}] visual tokens exit: {exit_text}; prefill multiply-adds "
        f"{report['prefill_macs']['actual'] / 1e9:.3f} G of {report['prefill_macs']['full'] / 1e9:.3f} G "
        f"({100 * report['prefill_macs']['saved_fraction']:.1f}% saved)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
