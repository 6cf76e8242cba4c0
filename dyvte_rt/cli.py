"""The `dyvte-rt` command line.

Subcommands parse their arguments into a frozen config, call a library function, and print
user mistakes (`DyvteError`) as one line with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from dyvte_rt import __version__
from dyvte_rt.compute import DecoderDims, prefill_macs
from dyvte_rt.errors import DyvteError, InputError

BUNDLE_ENV = "DYVTE_RT_BUNDLE"  # default --bundle
SIGPIPE_EXIT = 141  # what a shell reports for a process ended by SIGPIPE


@dataclass(frozen=True)
class InferConfig:
    image: Path
    question: str
    bundle: Path | None
    exit: str | None
    threshold: float | None
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    device: str
    dtype: str | None
    threads: int
    spin: bool
    as_json: bool


def demo_bundle_dir() -> Path:
    """Where the quickstart exports the demo bundle: $XDG_CACHE_HOME/dyvte-rt/demo-bundle."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "dyvte-rt" / "demo-bundle"


def default_bundle() -> Path | None:
    """$DYVTE_RT_BUNDLE, else the exported demo bundle if there is one."""
    value = os.environ.get(BUNDLE_ENV)
    if value:
        return Path(value)
    demo = demo_bundle_dir()
    return demo if (demo / "manifest.json").is_file() else None


@dataclass(frozen=True)
class EvalConfig:
    bundle: Path | None
    data: Path
    exit: str | None
    threshold: float | None
    limit: int | None
    max_new_tokens: int
    device: str
    dtype: str | None
    as_json: bool


def run_eval(config: EvalConfig) -> str:
    from dataclasses import asdict

    from dyvte_rt.evaluate import evaluate, read_jsonl
    from dyvte_rt.model import DyvteModel

    examples = read_jsonl(config.data, config.limit)
    with DyvteModel.load(_bundle_or_error(config.bundle), device=config.device, dtype=config.dtype) as model:
        policy = model.policy(config.exit, config.threshold)
        model.pipeline.check_policy(policy)
        report = evaluate(model, examples, policy, config.max_new_tokens, progress=not config.as_json)
    if config.as_json:
        return json.dumps(asdict(report))
    histogram = ", ".join(f"{k}: {v}" for k, v in report.exit_histogram.items())
    return (
        f"policy {report.policy}: accuracy {100 * report.accuracy:.1f}% on {report.n} questions; "
        f"mean exit layer {report.mean_exit_layer:.2f} (histogram {histogram}); "
        f"prefill multiply-adds saved {100 * report.prefill_macs_saved:.1f}%"
    )


@dataclass(frozen=True)
class BenchConfig:
    bundle: Path | None
    exit: str | None
    images: Path | None
    data: Path | None
    question: str
    limit: int
    runs: int
    warmup: int
    max_new_tokens: int
    device: str
    dtype: str | None
    threads: int
    spin: bool
    as_json: bool


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def run_bench(config: BenchConfig) -> str:
    from dyvte_rt.bench import bench, format_table
    from dyvte_rt.evaluate import Example, read_jsonl
    from dyvte_rt.model import DyvteModel

    if (config.images is None) == (config.data is None):
        raise InputError("pass exactly one of --images DIR or --data JSONL")
    if config.runs < 1 or config.warmup < 0:
        raise InputError("--runs must be >= 1 and --warmup >= 0")
    if config.data is not None:
        examples = read_jsonl(config.data, config.limit)
    else:
        if not config.images.is_dir():
            raise InputError(f"--images {config.images} is not a directory")
        files = sorted(p for p in config.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[
            : config.limit
        ]
        if not files:
            raise InputError(f"--images {config.images} holds no {'/'.join(IMAGE_SUFFIXES)} files")
        examples = [Example(path, config.question, "") for path in files]
    with DyvteModel.load(
        _bundle_or_error(config.bundle),
        device=config.device,
        threads=config.threads,
        spin=config.spin,
        dtype=config.dtype,
    ) as model:
        specs = config.exit.split(",") if config.exit else _default_bench_policies(model)
        policies = [model.policy(spec.strip()) for spec in specs if spec.strip()]
        for policy in policies:
            model.pipeline.check_policy(policy)
        report = bench(
            model,
            examples,
            policies,
            config.runs,
            config.warmup,
            config.max_new_tokens,
            progress=not config.as_json,
        )
    return json.dumps(report.to_dict()) if config.as_json else format_table(report)


def _default_bench_policies(model) -> list[str]:
    specs = ["never", model.manifest.exit.default_policy]
    if model.pipeline.has_routers:
        specs.append("router")
    return list(dict.fromkeys(specs))


def _bundle_or_error(bundle: Path | None) -> Path:
    bundle = bundle or default_bundle()
    if bundle is None:
        raise InputError(
            "no bundle given and no demo bundle exported yet",
            hint=f"pass --bundle DIR, set {BUNDLE_ENV}, or run bash scripts/quickstart.sh",
        )
    return bundle


def run_infer(config: InferConfig) -> int:
    from dyvte_rt.model import DyvteModel
    from dyvte_rt.sampling import SamplingConfig

    bundle = _bundle_or_error(config.bundle)
    sampling = SamplingConfig(config.temperature, config.top_k, config.top_p, config.seed)
    with DyvteModel.load(
        bundle, device=config.device, threads=config.threads, spin=config.spin, dtype=config.dtype
    ) as model:
        generation = model.generate(
            config.image,
            config.question,
            exit=config.exit,
            threshold=config.threshold,
            max_new_tokens=config.max_new_tokens,
            sampling=sampling,
        )
        if config.as_json:
            print(json.dumps(generation.result().to_dict()))
            return 0
        first = True
        for piece in generation:
            print(piece.lstrip() if first else piece, end="", flush=True)
            first = False
        print()
    return 0


def run_inspect(bundle: Path, verify: bool) -> str:
    from dyvte_rt.manifest import load_manifest

    m = load_manifest(bundle, verify_hashes=verify)
    ex = m.exit
    total = sum(f.bytes for f in m.files.values())
    lines = [
        f"bundle      {bundle}",
        f"model       {m.source.model}"
        + (f" ({m.source.repo_id}@{m.source.revision})" if m.source.repo_id else ""),
        f"family      {m.source.family} ({m.source.architecture}), schema v{m.schema_version}",
        f"dtype       {m.dtype}",
        f"decoder     {m.dims.num_layers} layers, hidden {m.dims.hidden}, heads {m.dims.num_heads}/"
        f"{m.dims.num_kv_heads} kv, vocab {m.dims.vocab_size}, context {m.dims.max_positions}",
        f"image       {m.vision.image_height}x{m.vision.image_width}, {m.vision.visual_tokens} visual tokens",
        f"exit layers {', '.join(map(str, ex.candidate_layers)) or 'none'}",
        f"policy      {ex.default_policy} (threshold {ex.threshold:g}; routers: "
        + (f"width {ex.router_width})" if ex.router_width is not None else "none)"),
        "segments    "
        + "  ".join(
            f"{s.graph}[{s.first_layer}-{s.last_layer}{'+router' if s.has_router else ''}]"
            for s in m.segments
        ),
        f"files       {len(m.files)} files, {total / 2**20:.1f} MiB"
        + (", sha256 verified" if verify else ""),
    ]
    lines += [f"  {name:<24} {info.bytes / 2**20:>9.2f} MiB" for name, info in m.files.items()]
    return "\n".join(lines)


@dataclass(frozen=True)
class MacsConfig:
    hidden: int
    kv_width: int | None
    mlp: int
    layers: int
    visual: int
    text: int
    exit_layer: int | None


def run_macs(config: MacsConfig) -> str:
    if config.exit_layer is not None and not 0 <= config.exit_layer < config.layers:
        raise InputError(f"--exit-layer must lie in 0..{config.layers - 1}, got {config.exit_layer}")
    if min(config.hidden, config.mlp, config.layers) < 1 or min(config.visual, config.text) < 0:
        raise InputError("sizes must be positive and token counts non-negative")
    dims = DecoderDims(config.hidden, config.kv_width or config.hidden, config.mlp, config.layers)
    macs = prefill_macs(dims, config.visual + config.text, config.visual, config.exit_layer)
    return (
        f"prefill multiply-adds: full {macs.full / 1e12:.3f} T, with exit {macs.actual / 1e12:.3f} T "
        f"({100 * macs.saved_fraction:.1f}% saved)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dyvte-rt",
        description="Run multimodal LLM bundles with Dynamic Visual-Token Exit (DyVTE).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dyvte-rt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    infer = commands.add_parser(
        "infer",
        help="answer a question about an image with a bundle",
        description="Answer a question about an image. The answer streams to stdout; --json prints one "
        "object with the answer, token ids, exit layer, timings and prefill multiply-adds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    infer.add_argument("image", type=Path, help="image file")
    infer.add_argument("question", help="question about the image")
    infer.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help=f"bundle directory (default: ${BUNDLE_ENV}, else the exported demo bundle)",
    )
    infer.add_argument(
        "--exit", default=None, help="exit policy: router, never or layer:K (default: the bundle's)"
    )
    infer.add_argument(
        "--threshold", type=float, default=None, help="router threshold (default: the bundle's)"
    )
    infer.add_argument("--max-new-tokens", type=int, default=64)
    infer.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    infer.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    infer.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    infer.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    _add_device_arguments(infer)
    _add_thread_arguments(infer)
    infer.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object")
    evaluation = commands.add_parser(
        "eval",
        help="accuracy, exit layers and compute saved on a JSONL dataset",
        description="Evaluate a bundle on a dataset in the project's JSONL format ({image, question, answer} "
        "per line, image paths relative to the file). Reports exact-match accuracy, the mean and histogram "
        "of exit layers (the last layer that saw the visual tokens; L-1 when they never exit) and the share "
        "of prefill multiply-adds saved.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluation.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help=f"bundle directory (default: ${BUNDLE_ENV}, else the exported demo bundle)",
    )
    evaluation.add_argument("--data", type=Path, required=True, help="data.jsonl")
    evaluation.add_argument("--exit", default=None, help="router, never or layer:K (default: the bundle's)")
    evaluation.add_argument(
        "--threshold", type=float, default=None, help="router threshold (default: the bundle's)"
    )
    evaluation.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    evaluation.add_argument("--max-new-tokens", type=int, default=8)
    _add_device_arguments(evaluation)
    evaluation.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object")
    benchmark = commands.add_parser(
        "bench",
        help="measure policies side by side: prefill, TTFT, decode speed, exits, speed-up vs theory",
        description="Run the listed exit policies alternately on the same inputs and report, per policy, the "
        "median and p90 of vision, prefill and time to first token, decode tokens/s, exit layers, and the "
        "measured prefill speed-up against the first policy next to the theoretical one (DESIGN §7).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    benchmark.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help=f"bundle directory (default: ${BUNDLE_ENV}, else the exported demo bundle)",
    )
    benchmark.add_argument(
        "--exit",
        default=None,
        help="comma-separated policies, the first is the baseline (default: never, the "
        "bundle's default, and router when the bundle has routers)",
    )
    benchmark.add_argument(
        "--images", type=Path, default=None, help="a directory of images (asked --question)"
    )
    benchmark.add_argument("--data", type=Path, default=None, help="data.jsonl with image/question pairs")
    benchmark.add_argument("--question", default="what is in the image?", help="question for --images")
    benchmark.add_argument("--limit", type=int, default=8, help="inputs to use")
    benchmark.add_argument("--runs", type=int, default=5, help="measured runs per input and policy")
    benchmark.add_argument("--warmup", type=int, default=1, help="unmeasured runs first")
    benchmark.add_argument("--max-new-tokens", type=int, default=16)
    _add_device_arguments(benchmark)
    _add_thread_arguments(benchmark)
    benchmark.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object")
    inspect = commands.add_parser(
        "inspect",
        help="summarise a bundle's manifest",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    inspect.add_argument("bundle", type=Path, help="bundle directory")
    inspect.add_argument("--no-verify", dest="verify", action="store_false", help="skip the sha256 check")
    macs = commands.add_parser(
        "macs",
        help="theoretical prefill multiply-adds with and without an exit (DESIGN §7)",
        description="Prefill multiply-adds of a decoder with and without a visual-token exit. "
        "Defaults are LLaVA-1.5-7B with 576 visual and 60 text tokens.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    macs.add_argument("--hidden", type=int, default=4096, help="hidden size d")
    macs.add_argument("--kv-width", type=int, default=None, help="num_kv_heads * head_dim (default: d)")
    macs.add_argument("--mlp", type=int, default=11008, help="SwiGLU intermediate size m")
    macs.add_argument("--layers", type=int, default=32, help="decoder layers L")
    macs.add_argument("--visual", type=int, default=576, help="visual tokens V")
    macs.add_argument("--text", type=int, default=60, help="text tokens")
    macs.add_argument("--exit-layer", type=int, default=None, help="exit after this layer (0-indexed)")
    return parser


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda", "tensorrt"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        default=None,
        help="the precision you expect; a bundle exported for another is refused (default: the bundle's, "
        "except that fp16 on --device cpu must be asked for)",
    )


def _add_thread_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    parser.add_argument(
        "--spin",
        action="store_true",
        help="let idle ONNX Runtime threads spin-wait between runs: lower latency where cores are to "
        "spare, much slower decode where they are not",
    )


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    code = 0
    try:
        if command == "macs":
            print(run_macs(MacsConfig(**args)))
        elif command == "infer":
            code = run_infer(InferConfig(**args))
        elif command == "eval":
            print(run_eval(EvalConfig(**args)))
        elif command == "bench":
            print(run_bench(BenchConfig(**args)))
        elif command == "inspect":
            print(run_inspect(args["bundle"], args["verify"]))
        sys.stdout.flush()
    except DyvteError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # the reader left early (`dyvte-rt inspect B | head`): stop quietly, as a unix filter does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT
    return code


if __name__ == "__main__":
    sys.exit(main())
