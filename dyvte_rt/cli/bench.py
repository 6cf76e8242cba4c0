"""`dyvte-rt bench`: exit policies measured side by side on the same inputs."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from dyvte_rt.cli.commandline import HelpFormatter, config_from, use_config_defaults
from dyvte_rt.cli.common import RunnerConfig, open_model
from dyvte_rt.cli.options import bundle_options, device_options, json_option
from dyvte_rt.errors import InputError
from dyvte_rt.inputs.images import IMAGE_SUFFIXES


@dataclass(frozen=True, kw_only=True)
class BenchConfig(RunnerConfig):
    exit: str | None = None  # None: never, the bundle's default, and router where there are routers
    prune: str | None = None  # comma-separated prune policies run with each exit policy (None: none)
    images: Path | None = None
    data: Path | None = None
    question: str = "what is in the image?"
    limit: int = 8
    runs: int = 5
    warmup: int = 1
    max_new_tokens: int = 16
    as_json: bool = False


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench",
        help="measure exit policies side by side: prefill, TTFT, decode speed, exits, speed-up vs theory",
        description="Run the listed exit policies alternately on the same inputs and report, per policy, the "
        "median and p90 of vision, prefill and time to first token, decode tokens/s, exit layers, the host "
        "bytes copied per decode token, and the measured prefill speed-up against the first policy next to "
        "the theoretical one from multiply-adds (docs/compute.md).",
        formatter_class=HelpFormatter,
        parents=[bundle_options(), device_options(), json_option()],
    )
    parser.add_argument(
        "--exit",
        metavar="POLICIES",
        help="comma-separated policies, the first is the baseline (default: never, the bundle's default, "
        "and router when the bundle has routers)",
    )
    parser.add_argument(
        "--prune",
        metavar="SPECS",
        help="comma-separated prune policies (none, fastv:K:R, dart:K:R[:P]), each run with every --exit "
        "policy; the first pair is the baseline (default: none)",
    )
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", type=Path, metavar="DIR", help="a directory of images, asked --question")
    inputs.add_argument("--data", type=Path, metavar="JSONL", help="image/question pairs")
    parser.add_argument("--question", help="the question asked about every --images file")
    parser.add_argument("--limit", type=int, metavar="N", help="inputs to use")
    parser.add_argument("--runs", type=int, help="measured runs per input and policy")
    parser.add_argument("--warmup", type=int, help="unmeasured runs first")
    parser.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="tokens per answer (EOS ends one early)"
    )
    use_config_defaults(parser, BenchConfig)
    parser.set_defaults(make_config=partial(config_from, BenchConfig), run=run)


def run(config: BenchConfig) -> int:
    from dyvte_rt.inputs.datasets import Example, read_jsonl
    from dyvte_rt.tools.bench import bench, format_table

    if config.runs < 1 or config.warmup < 0 or config.limit < 1:
        raise InputError("--runs and --limit must be >= 1 and --warmup >= 0")
    if config.data is not None:
        examples = read_jsonl(config.data, config.limit)
    else:
        if not config.images.is_dir():
            raise InputError(f"--images {config.images} is not a directory")
        files = sorted(p for p in config.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"--images {config.images} holds no {'/'.join(IMAGE_SUFFIXES)} files")
        examples = [Example(path, config.question, "") for path in files[: config.limit]]
    with open_model(config) as model:
        specs = config.exit.split(",") if config.exit else default_policies(model)
        policies = [model.policy(spec.strip()) for spec in specs if spec.strip()]
        if not policies:
            raise InputError("--exit names no policy")
        for policy in policies:
            model.pipeline.check_policy(policy)
        prunes = [
            model.prune_policy(spec.strip()) for spec in (config.prune or "none").split(",") if spec.strip()
        ]
        for prune in prunes:
            model.pipeline.check_prune(prune)
        report = bench(
            model,
            examples,
            policies,
            config.runs,
            config.warmup,
            config.max_new_tokens,
            progress=not config.as_json,
            prunes=prunes or None,
        )
    print(json.dumps(report.to_dict()) if config.as_json else format_table(report))
    return 0


def default_policies(model) -> list[str]:
    specs = ["never", model.manifest.exit.default_policy]
    if model.pipeline.has_routers:
        specs.append("router")
    return list(dict.fromkeys(specs))
