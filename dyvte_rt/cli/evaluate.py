"""`dyvte-rt eval`: accuracy, exit layers and compute saved on a JSONL dataset."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from dyvte_rt.cli.commandline import HelpFormatter, config_from, use_config_defaults
from dyvte_rt.cli.common import RunnerConfig, open_model
from dyvte_rt.cli.options import PRUNE_HELP, bundle_options, device_options, json_option


@dataclass(frozen=True, kw_only=True)
class EvalConfig(RunnerConfig):
    data: Path
    exit: str | None = None
    threshold: float | None = None
    prune: str | None = None
    limit: int | None = None
    max_new_tokens: int = 8
    compare_bundle: Path | None = None
    as_json: bool = False


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="accuracy, exit layers and compute saved on a JSONL dataset",
        description="Evaluate a bundle on a dataset in the project's JSONL format ({image, question, answer} "
        "per line, image paths relative to the file). Reports exact-match accuracy, the mean and histogram "
        "of exit layers (the last layer that saw the visual tokens; L-1 when they never exit) and the share "
        "of prefill multiply-adds saved.",
        formatter_class=HelpFormatter,
        parents=[bundle_options(), device_options(), json_option()],
    )
    parser.add_argument("--data", type=Path, required=True, metavar="JSONL", help="the dataset")
    parser.add_argument("--exit", metavar="POLICY", help="router, never or layer:K (default: the bundle's)")
    parser.add_argument("--threshold", type=float, help="router threshold (default: the bundle's)")
    parser.add_argument("--prune", metavar="SPEC", help=PRUNE_HELP)
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate the first N questions only")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="most tokens per answer")
    parser.add_argument(
        "--compare-bundle",
        type=Path,
        metavar="DIR",
        help="also run this bundle (e.g. the float one a quantised bundle came from) and report how often "
        "both exit at the same layer and give the same answer",
    )
    use_config_defaults(parser, EvalConfig)
    parser.set_defaults(make_config=partial(config_from, EvalConfig), run=run)


def run(config: EvalConfig) -> int:
    from dyvte_rt.inputs.datasets import read_jsonl
    from dyvte_rt.tools.evaluate import evaluate

    examples = read_jsonl(config.data, config.limit)
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(open_model(config))
        other = None
        if config.compare_bundle is not None:
            other = stack.enter_context(open_model(dataclasses.replace(config, bundle=config.compare_bundle)))
        policy = model.policy(config.exit, config.threshold)
        model.pipeline.check_policy(policy)
        prune = model.prune_policy(config.prune)
        model.pipeline.check_prune(prune)
        report = evaluate(
            model,
            examples,
            policy,
            config.max_new_tokens,
            progress=not config.as_json,
            compare_with=other,
            prune=prune,
        )
    if config.as_json:
        print(json.dumps(asdict(report)))
        return 0
    histogram = ", ".join(f"{k}: {v}" for k, v in report.exit_histogram.items())
    name = report.policy + ("" if report.prune == "none" else f" + prune {report.prune}")
    text = (
        f"policy {name}: accuracy {100 * report.accuracy:.1f}% on {report.n} questions; "
        f"mean exit layer {report.mean_exit_layer:.2f} (histogram {histogram}); "
        f"prefill multiply-adds saved {100 * report.prefill_macs_saved:.1f}%"
    )
    if report.prune != "none":
        text += f"; visual tokens kept {report.mean_visual_kept:.1f} on average"
    if report.exit_agreement is not None:
        text += (
            f"; against {config.compare_bundle}: same exit layer {100 * report.exit_agreement:.1f}%, "
            f"same answer {100 * report.answer_agreement:.1f}%"
        )
    print(text)
    return 0
