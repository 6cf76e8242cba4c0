"""`python -m export.build`: split a checkpoint into a verified ONNX bundle (docs/bundle-format.md).

The bundle is built in a temporary directory beside --out and renamed into place only when
every graph has been exported and verified: a failed or interrupted export leaves --out as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dyvte_rt.bundle.manifest import (
    KV_FLAVOURS,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    TOKENIZER_FILE,
    ExitInfo,
    FileInfo,
    GraphQualityInfo,
    Manifest,
    QuantizationInfo,
    SegmentInfo,
    sha256_file,
)
from dyvte_rt.cli.commandline import config_from, new_parser, run_command, use_config_defaults
from dyvte_rt.errors import InputError
from dyvte_rt.runtime.policy import DEFAULT_THRESHOLD, check_policy_fits, parse_policy
from export.cli_options import model_options
from export.staging import check_destination, staged_directory
from export.summary import GraphRow, format_summary

DEFAULT_OPSET = 18
CHECKPOINT_ROUTERS = "routers.safetensors"  # routers a checkpoint ships with (the demo's)
EXPORT_DTYPES = ("fp32", "fp16")
QUANT_BITS = {"int4": 4, "int8": 8}
ACCURACY_LEVEL = 4  # MatMulNBits on the CPU: int8 activations inside the kernel, as ONNX Runtime GenAI uses


@dataclass(frozen=True)
class BuildConfig:
    model: str
    out: Path
    dtype: str = "fp32"
    kv: str = "inplace"  # KV flavour: inplace (ONNX Runtime) | concat (standard ONNX, TensorRT)
    exit_layers: str | None = None  # None: every layer from 1 to L-2
    routers: Path | None = None  # None: the checkpoint's own routers.safetensors, if any
    no_routers: bool = False
    default_exit: str | None = None  # None: "router" with routers, else "never"
    threshold: float | None = None  # None: the routers file's, else 0.5
    quantize: str | None = None  # None (float weights) | int8 | int4
    block_size: int = 32
    quant_format: str = "matmulnbits"  # matmulnbits | qdq
    quantize_vision: str | None = None  # None | int8
    force: bool = False  # write a quantised bundle even below the quality bar
    opset: int = DEFAULT_OPSET
    overwrite: bool = False
    trust_remote_code: bool = False
    stream: bool = True  # read each graph's weights when it is exported (False: load the whole model first)
    max_memory_gb: float | None = None  # None: the memory the machine has available
    quiet: bool = False

    def quantize_settings(self, graph: str):
        """How `graph` is quantised, or None when it keeps float weights."""
        from export.quantize import QuantizeSettings

        if graph.startswith("segment_") or graph == "head":
            bits = QUANT_BITS.get(self.quantize or "")
        elif graph == "vision":
            bits = QUANT_BITS.get(self.quantize_vision or "")
        else:
            bits = None  # embed (a Gather), routers and the exit gather stay float
        if bits is None:
            return None
        return QuantizeSettings(bits, self.block_size, self.quant_format, ACCURACY_LEVEL)


def parse_exit_layers(spec: str | None, num_layers: int) -> tuple[int, ...]:
    """`None` -> 1..L-2; otherwise `a-b`, `a..b`, `a,b,c`, or mixes such as `1-4,8`."""
    if spec is None:
        return tuple(range(1, num_layers - 1))
    layers: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        match = re.fullmatch(r"(\d+)\s*(?:-|\.\.)\s*(\d+)", part)
        if match:
            low, high = int(match.group(1)), int(match.group(2))
            if low > high:
                raise InputError(f"--exit-layers range {part!r} runs backwards")
            layers.update(range(low, high + 1))
        elif part.isdigit():
            layers.add(int(part))
        else:
            raise InputError(
                f"--exit-layers: cannot read {part!r}", hint="use e.g. '1-30', '4,8,12' or '2..5,9'"
            )
    bad = sorted(k for k in layers if k > num_layers - 2)
    if bad:
        raise InputError(
            f"--exit-layers {bad} are not possible exits for a {num_layers}-layer decoder",
            hint=f"an exit needs a layer after it: use layers 0..{num_layers - 2}",
        )
    return tuple(sorted(layers))


def build_bundle(config: BuildConfig) -> list[GraphRow]:
    """Export, verify and write the bundle; returns the summary rows."""
    from tqdm import tqdm

    from export.graph_plans import build_plans
    from export.loading import inspect_checkpoint, load_checkpoint, load_checkpoint_lazily
    from export.manifest_builder import graph_info, write_tokenizer
    from export.onnx_export import export_plan
    from export.reference.routers import RouterBank

    if config.dtype not in EXPORT_DTYPES:
        raise InputError(f"--dtype must be one of {EXPORT_DTYPES}, got {config.dtype!r}")
    if config.block_size < 16 or config.block_size & (config.block_size - 1):
        raise InputError(f"--block-size must be a power of two of at least 16, got {config.block_size}")
    out = config.out.expanduser().absolute()
    check_destination(out, config.overwrite)
    checkpoint = inspect_checkpoint(config.model)
    routers_file = routers_path(config, checkpoint.path)
    routers = RouterBank.load(routers_file) if routers_file else None
    num_layers = checkpoint.num_layers
    candidates = parse_exit_layers(config.exit_layers, num_layers)
    if routers is not None:
        _check_routers(routers, candidates)
    threshold = (
        config.threshold
        if config.threshold is not None
        else (routers.threshold if routers is not None else DEFAULT_THRESHOLD)
    )
    default_exit = config.default_exit or ("router" if routers is not None else "never")
    default_policy = parse_policy(default_exit, threshold)
    if default_policy.needs_routers and routers is None:
        raise InputError(
            "--default-exit router needs --routers", hint="train routers with python -m calibrate.routers"
        )
    check_policy_fits(default_policy, num_layers, candidates)

    if config.stream:  # parameters stay on disk until the graph that uses them is exported
        loaded, loader = load_checkpoint_lazily(checkpoint, config.dtype, config.trust_remote_code)
    else:
        loaded, loader = load_checkpoint(checkpoint, config.dtype, "cpu", config.trust_remote_code), None
    if routers is not None:
        if routers.hidden != loaded.adapter.dims.hidden:
            raise InputError(
                f"the routers were trained for hidden size {routers.hidden}, "
                f"the model has {loaded.adapter.dims.hidden}"
            )
        routers = routers.to(next(loaded.model.parameters()).dtype)

    plans = build_plans(loaded.adapter, candidates, routers, config.kv)
    if loader is not None:
        check_memory(plans, loader, config.max_memory_gb)
    rows: list[GraphRow] = []
    with staged_directory(out, config.overwrite) as staging:
        graphs, files, qualities = {}, [], {}
        bar = tqdm(plans, desc="export", unit="graph", disable=config.quiet, file=sys.stderr)
        for plan in bar:
            bar.set_postfix_str(f"{plan.name}, resident {resident_gib():.1f} GiB")
            started = time.perf_counter()
            with plan_weights(loader, plan) as release_weights:
                exported = export_plan(plan, staging, config.opset, release_weights)
            plan_files, quality = list(exported.files), None
            settings = config.quantize_settings(plan.name)
            if settings is not None:
                plan_files, quality = quantize_exported(plan, staging, settings, config.force)
                qualities[plan.name] = quality
                release_freed_memory()
            graphs[plan.name] = graph_info(staging / plan.file)
            files.extend(plan_files)
            size = sum((staging / f).stat().st_size for f in plan_files)
            cosine = quality.min_cosine if quality is not None else None
            seconds = time.perf_counter() - started
            rows.append(
                GraphRow(plan.name, exported.parameters, size, seconds, exported.max_abs_error, cosine)
            )
        write_tokenizer(loaded, staging / TOKENIZER_FILE)
        files.append(TOKENIZER_FILE)
        manifest = _manifest(
            config, loaded, plans, graphs, qualities, candidates, default_policy, threshold, routers
        )
        manifest = dataclasses.replace(manifest, files={f: _file_info(staging / f) for f in files})
        (staging / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
    return rows


def _manifest(
    config, loaded, plans, graphs, qualities, candidates, default_policy, threshold, routers
) -> Manifest:
    from export.manifest_builder import chat_template, dims_info, source_info, token_info, vision_info

    router_graphs = {p.name for p in plans if p.name.startswith("router_")}
    segments = tuple(
        SegmentInfo(
            graph=p.name,
            first_layer=p.module.first,
            last_layer=p.module.last,
            router=f"router_{p.module.last:02d}" if f"router_{p.module.last:02d}" in router_graphs else None,
        )
        for p in plans
        if p.name.startswith("segment_")
    )
    return Manifest(
        schema_version=SCHEMA_VERSION,
        source=source_info(loaded),
        dtype=config.dtype,
        quantization=quantization_info(config, qualities),
        kv_flavour=config.kv,
        dims=dims_info(loaded),
        vision=vision_info(loaded),
        tokens=token_info(loaded),
        chat_template=chat_template(loaded),
        segments=segments,
        exit=ExitInfo(
            candidate_layers=candidates,
            default_policy=default_policy.spec(),
            threshold=threshold,
            router_width=routers.width if routers is not None else None,
        ),
        graphs=graphs,
    )


def _file_info(path: Path) -> FileInfo:
    return FileInfo(sha256=sha256_file(path), bytes=path.stat().st_size)


# Peak resident memory of exporting one graph, measured on the LLaVA-1.5-7B-shaped slice
# (docs/benchmarks.md, Export): the graph's weights, the exporter's copies while it writes them, and
# Python, torch and the exporter themselves.
EXPORT_MEMORY_FACTOR = 1.5
EXPORT_BASELINE_GIB = 1.0


def check_memory(plans, loader, max_memory_gb: float | None) -> None:
    """Refuse to start when the largest graph cannot be exported within the memory budget."""
    sizes = {plan.name: loader.parameter_bytes(plan.module.weight_modules()) for plan in plans}
    largest = max(sizes, key=sizes.get)
    needed = EXPORT_MEMORY_FACTOR * sizes[largest] / 2**30 + EXPORT_BASELINE_GIB
    budget = max_memory_gb if max_memory_gb is not None else available_gib()
    if needed > budget:
        where = "--max-memory-gb" if max_memory_gb is not None else "available memory"
        raise InputError(
            f"exporting {largest} ({sizes[largest] / 2**30:.1f} GiB of weights) needs about "
            f"{needed:.1f} GiB, more than the {budget:.1f} GiB of {where}",
            hint="free memory, raise --max-memory-gb, or pass --exit-layers that split the decoder finer",
        )


@contextlib.contextmanager
def plan_weights(loader, plan):
    """The graph's parameters in memory while it is exported (with a loader), dropped after; yields
    a function that drops them sooner (None without a loader: the model stays whole)."""
    if loader is None:
        yield None
        return
    modules = plan.module.weight_modules()
    loader.materialize(modules)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            loader.release(modules)
            release_freed_memory()
            released = True

    try:
        yield release
    finally:
        release()


def release_freed_memory() -> None:
    """Collect garbage and hand the freed heap back to the system: glibc keeps freed blocks for
    reuse, and after a graph's exporter and checks that held gigabytes of a 7B export's memory."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def resident_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def available_gib() -> float:
    """MemAvailable from /proc/meminfo (Linux); infinite where it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def quantize_exported(plan, staging: Path, settings, force: bool):
    """Quantise an exported, verified float graph in place; check it against the float graph."""
    from export.quantize import check_quality, compare_graphs, quantize_graph

    floats = staging / ".float"
    floats.mkdir(exist_ok=True)
    for path in staging.glob(plan.file + "*"):
        path.rename(floats / path.name)
    try:
        files = quantize_graph(floats / plan.file, staging / plan.file, settings)
        release_freed_memory()  # the quantiser's copies of the float graph
        plan_cases = plan.cases()
        cases = [{n: t.numpy() for n, t in zip(plan.input_names, case, strict=True)} for case in plan_cases]
        rows = [plan.valid_rows(case) if plan.valid_rows is not None else None for case in plan_cases]
        quality = compare_graphs(floats / plan.file, staging / plan.file, cases, rows)
        check_quality(plan.name, quality, settings.bits, force)
    finally:
        shutil.rmtree(floats, ignore_errors=True)
    return files, quality


def quantization_info(config: BuildConfig, qualities: dict) -> QuantizationInfo | None:
    if not qualities:
        return None
    return QuantizationInfo(
        bits=QUANT_BITS[config.quantize] if config.quantize else QUANT_BITS[config.quantize_vision],
        block_size=config.block_size,
        format=config.quant_format,
        symmetric=True,
        accuracy_level=ACCURACY_LEVEL,
        graphs={name: GraphQualityInfo(q.min_cosine, q.max_abs_error) for name, q in qualities.items()},
    )


def routers_path(config: BuildConfig, checkpoint: Path) -> Path | None:
    """--routers, else the checkpoint's own routers file (unless --no-routers)."""
    if config.no_routers:
        return None
    if config.routers is not None:
        return config.routers
    shipped = checkpoint / CHECKPOINT_ROUTERS
    return shipped if shipped.is_file() else None


def _check_routers(routers, candidates: tuple[int, ...]) -> None:
    missing = sorted(set(candidates) - set(routers.layers))
    if missing:
        raise InputError(
            f"the routers file has no router for exit layers {missing}",
            hint=f"pass --exit-layers within the routers' layers {list(routers.layers)}",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "python -m export.build",
        "Split a multimodal checkpoint into a verified ONNX bundle: vision, embed, decoder segments (KV "
        "cache I/O), routers at candidate exit layers, head, tokenizer.json and manifest.json. Exit status: "
        "0 ok, 1 error, 2 usage error, 130 interrupted (the output is then left as it was).",
        parents=[model_options()],
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle directory to create")
    parser.add_argument(
        "--dtype", choices=EXPORT_DTYPES, help="weight precision; fp16 is meant for GPU bundles"
    )
    parser.add_argument(
        "--kv",
        choices=KV_FLAVOURS,
        help="KV cache flavour: inplace writes each step into one preallocated buffer per layer with ONNX "
        "Runtime's GroupQueryAttention; concat is standard ONNX (past in, past + new out), for TensorRT",
    )
    parser.add_argument(
        "--exit-layers",
        metavar="LAYERS",
        help="layers that may end a segment and carry a router, e.g. '1-30' or '4,8,12' "
        "(default: every layer from 1 to L-2)",
    )
    routers = parser.add_mutually_exclusive_group()
    routers.add_argument(
        "--routers",
        type=Path,
        metavar="FILE",
        help="trained routers (.safetensors from python -m calibrate.routers) (default: the checkpoint's own "
        f"{CHECKPOINT_ROUTERS} if it ships one, as the demo does)",
    )
    routers.add_argument(
        "--no-routers",
        action="store_true",
        help="export without routers: the bundle then offers the policies never and layer:K only",
    )
    parser.add_argument(
        "--default-exit",
        metavar="POLICY",
        help="policy the runtime uses when none is asked for (default: router with routers, else never)",
    )
    parser.add_argument(
        "--threshold", type=float, help="router exit threshold (default: the routers file's, else 0.5)"
    )
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="weight-only, block-wise quantisation of the decoder segments' and the head's MatMul weights "
        "with ONNX Runtime's quantiser (routers, norms and the embedding table stay float)",
    )
    parser.add_argument("--block-size", type=int, metavar="N", help="weights per quantisation block")
    parser.add_argument(
        "--quant-format",
        choices=("matmulnbits", "qdq"),
        help="matmulnbits: ONNX Runtime's MatMulNBits; qdq: DequantizeLinear + MatMul, the form TensorRT "
        "parses as weight-only quantisation",
    )
    parser.add_argument(
        "--quantize-vision", choices=("int8",), help="also quantise the vision tower's MatMuls"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write a quantised bundle even if a graph falls below the quality bar",
    )
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        metavar="GB",
        help="refuse to start if the largest graph cannot be exported within this memory (default: the "
        "memory available now); each graph's weights are read from the checkpoint when it is exported",
    )
    parser.add_argument(
        "--load-all",
        dest="stream",
        action="store_false",
        help="load the whole checkpoint before exporting (the earlier behaviour; needs memory for all of it)",
    )
    parser.add_argument("--opset", type=int, help="ONNX opset")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out bundle")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    use_config_defaults(parser, BuildConfig)
    return parser


def parse_args(argv: list[str] | None) -> BuildConfig:
    return config_from(BuildConfig, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        config = parse_args(argv)
        rows = build_bundle(config)
        if not config.quiet:
            print(format_summary(rows))
            print(f"bundle written to {config.out}")

    return run_command(body, interrupted="interrupted: the output directory was left as it was")


if __name__ == "__main__":
    sys.exit(main())
