"""`python -m export.build`: split a checkpoint into a verified ONNX bundle (docs/bundle-format.md).

Four steps: validate (every check that needs no weights: `export.validation`), plan (the graphs
and their verification cases: `export.graph_plans`), export (each graph traced, checked against its
PyTorch module and, if asked, quantised and checked again), assemble (the manifest:
`export.manifest_builder`). The bundle is built in a temporary directory beside --out and renamed
into place only when all of it succeeded: a failed or interrupted export leaves --out as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dyvte_rt.bundle.manifest import KV_FLAVOURS, MANIFEST_FILE, TOKENIZER_FILE, GraphInfo
from dyvte_rt.cli.commandline import config_from, new_parser, run_command, use_config_defaults
from dyvte_rt.cli.extras import require
from export.cli_options import model_options
from export.summary import GraphRow, format_summary
from export.validation import CHECKPOINT_ROUTERS, EXPORT_DTYPES, parse_exit_layers, routers_path

DEFAULT_OPSET = 18
QUANT_BITS = {"int4": 4, "int8": 8}
ACCURACY_LEVEL = 4  # MatMulNBits on the CPU: int8 activations inside the kernel, as ONNX Runtime GenAI uses
QUANTISED_ROLES = ("segment", "head")  # --quantize; the vision graph with --quantize-vision
# ... and the embedding table with --quantize in the matmulnbits format (GatherBlockQuantized)
EMBEDDING_ROLES = ("embed",)
__all__ = ["BuildConfig", "build_bundle", "main", "parse_exit_layers", "routers_path"]


@dataclass(frozen=True)
class BuildConfig:
    model: str
    out: Path
    dtype: str = "fp32"
    kv: str | None = None  # KV flavour: inplace (ONNX Runtime) | concat (TensorRT); None: inplace if it fits
    exit_layers: str | None = None  # None: every layer from 1 to L-2
    prune_layers: str | None = None  # more layers to end a segment at, for pruning after them
    default_prune: str = "none"  # the prune policy the runtime uses when none is asked for
    routers: Path | None = None  # None: the checkpoint's own routers.safetensors, if any
    no_routers: bool = False
    default_exit: str | None = None  # None: "router" with routers, else "never"
    threshold: float | None = None  # None: the routers file's, else 0.5
    quantize: str | None = None  # None (float weights) | int8 | int4
    block_size: int = 32
    quant_format: str = "matmulnbits"  # matmulnbits | qdq
    quantize_vision: str | None = None  # None | "none" | int8
    force: bool = False  # write a quantised bundle even below the quality bar
    opset: int = DEFAULT_OPSET
    overwrite: bool = False
    trust_remote_code: bool = False
    stream: bool = True  # read each graph's weights when it is exported (False: load the whole model first)
    max_memory_gb: float | None = None  # None: the memory the machine has available
    graph_cache: Path | None = None  # reuse graphs earlier exports produced (export.graph_cache)
    quiet: bool = False

    def quantize_settings(self, role: str):
        """How a graph of `role` is quantised, or None when it keeps float weights."""
        from export.quantize import QuantizeSettings

        if role in QUANTISED_ROLES or (role in EMBEDDING_ROLES and self.quant_format == "matmulnbits"):
            bits = QUANT_BITS.get(self.quantize or "")
        elif role == "vision":
            bits = QUANT_BITS.get(self.quantize_vision or "")
        else:
            bits = None  # routers, gathers and rankings stay float
        if bits is None:
            return None
        return QuantizeSettings(bits, self.block_size, self.quant_format, ACCURACY_LEVEL)

    @property
    def quantized_bits(self) -> int | None:
        name = self.quantize or self.quantize_vision
        return QUANT_BITS.get(name or "")


@dataclass
class ExportedGraphs:
    """What the export step wrote: graph infos for the manifest, files, qualities, summary rows."""

    graphs: dict[str, GraphInfo] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    qualities: dict = field(default_factory=dict)  # quantised graph -> export.quantize.GraphQuality
    rows: list[GraphRow] = field(default_factory=list)


def build_bundle(config: BuildConfig) -> list[GraphRow]:
    """Validate, plan, export and assemble the bundle; returns the summary rows."""
    from export.graph_plans import build_plans
    from export.loading import load_checkpoint, load_checkpoint_lazily
    from export.manifest_builder import assemble_manifest, quantization_info, write_tokenizer
    from export.memory import check_memory
    from export.staging import staged_directory
    from export.validation import check_routers_fit, validate

    inputs = validate(config)
    if config.stream:  # parameters stay on disk until the graph that uses them is exported
        loaded, loader = load_checkpoint_lazily(inputs.checkpoint, config.dtype, config.trust_remote_code)
    else:
        loaded = load_checkpoint(inputs.checkpoint, config.dtype, "cpu", config.trust_remote_code)
        loader = None
    check_routers_fit(inputs.routers, loaded.adapter.dims.hidden)
    routers = inputs.routers.to(next(loaded.model.parameters()).dtype) if inputs.routers else None

    plans = build_plans(
        loaded.adapter, inputs.candidates, routers, inputs.kv, extra_prune_layers=inputs.extra_prune_layers
    )
    if loader is not None:
        check_memory(plans, loader, config.max_memory_gb)
    with staged_directory(inputs.out, config.overwrite) as staging:
        exported = export_graphs(plans, staging, loader, config, loaded.adapter)
        write_tokenizer(loaded, staging / TOKENIZER_FILE)
        quantization = quantization_info(
            config.quantized_bits, config.block_size, config.quant_format, ACCURACY_LEVEL, exported.qualities
        )
        files = [staging / f for f in [*exported.files, TOKENIZER_FILE]]
        manifest = assemble_manifest(
            loaded, inputs, plans, exported.graphs, config.dtype, quantization, files
        )
        (staging / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
    return exported.rows


def export_graphs(plans: list, staging: Path, loader, config: BuildConfig, adapter) -> ExportedGraphs:
    """Each graph exported and checked against its module (and quantised and checked again), or
    taken from the graph cache where an earlier export made the same graph."""
    from tqdm import tqdm

    from export.graph_cache import GraphCache
    from export.manifest_builder import graph_info
    from export.memory import plan_weights, resident_gib

    cache = GraphCache(config.graph_cache) if config.graph_cache is not None else None
    tied = adapter.ties_word_embeddings  # the head may read the embed graph's table (export.shared_table)
    table_graph = staging / next(p.file for p in plans if p.role in EMBEDDING_ROLES)
    done = ExportedGraphs()
    bar = tqdm(plans, desc="export", unit="graph", disable=config.quiet, file=sys.stderr)
    for plan in bar:
        bar.set_postfix_str(f"{plan.name}, resident {resident_gib():.1f} GiB")
        started = time.perf_counter()
        with plan_weights(loader, plan) as release_weights:
            plan_files, parameters, error, quality = _graph(
                plan, staging, config, cache, adapter, release_weights, tied, table_graph
            )
        if quality is not None:
            done.qualities[plan.name] = quality
        settings = config.quantize_settings(plan.role) if quality is not None else None
        precision = f"int{settings.bits}" if settings is not None else config.dtype
        done.graphs[plan.name] = graph_info(staging / plan.file, precision)
        done.files.extend(plan_files)
        size = sum((staging / f).stat().st_size for f in plan_files)
        cosine = quality.min_cosine if quality is not None else None
        seconds = time.perf_counter() - started
        done.rows.append(GraphRow(plan.name, parameters, size, seconds, error, cosine))
    return done


def _graph(
    plan,
    staging: Path,
    config: BuildConfig,
    cache,
    adapter,
    release_weights,
    tied: bool = False,
    table_graph: Path | None = None,
):
    """One graph into `staging` -> (files, parameters, max abs error, quality if quantised).
    `tied`: the checkpoint ties its LM head to the embedding table, which the head then reads from
    `table_graph` (the embed graph, exported before it)."""
    files, parameters, error, quality = _exported_graph(
        plan, staging, config, cache, adapter, release_weights, tied, table_graph
    )
    if tied and config.quantize is None and plan.role in ("head", *EMBEDDING_ROLES):
        files = _share_float_table(plan, staging, table_graph)  # made or from the cache: unshared
    return files, parameters, error, quality


def _exported_graph(
    plan, staging: Path, config: BuildConfig, cache, adapter, release_weights, tied, table_graph
):
    """`_graph`'s graph as exported (and quantised), from the graph cache where it can be."""
    from export.graph_cache import CacheEntry, plan_fingerprint, quantized_fingerprint
    from export.memory import release_freed_memory
    from export.onnx_export import export_plan
    from export.quantize import GraphQuality, check_quality, quantize_exported

    settings = config.quantize_settings(plan.role)
    shares_table = tied and settings is not None and plan.role in ("head", *EMBEDDING_ROLES)
    if shares_table and settings.format == "matmulnbits":
        settings = dataclasses.replace(settings, tied_table=True)
    key = plan_fingerprint(plan, adapter, config.opset) if cache is not None else None
    final_key = quantized_fingerprint(key, settings) if key and settings else key
    hit = cache.get(final_key, staging) if cache is not None else None
    if hit is not None:
        if hit.min_cosine is None:
            return list(hit.files), hit.parameters, hit.max_abs_error, None
        quality = GraphQuality(hit.min_cosine, hit.quantized_max_abs_error)
        check_quality(plan.name, quality, settings.bits, config.force)  # today's bar, not the cached one's
        return list(hit.files), hit.parameters, hit.max_abs_error, quality
    float_hit = cache.get(key, staging) if cache is not None and settings is not None else None
    if float_hit is not None:
        files, parameters, error = list(float_hit.files), float_hit.parameters, float_hit.max_abs_error
    else:
        exported = export_plan(plan, staging, config.opset, release_weights)
        files, parameters, error = list(exported.files), exported.parameters, exported.max_abs_error
        if cache is not None:
            cache.put(key, staging, CacheEntry(tuple(files), parameters, error))
    if settings is None:
        return files, parameters, error, None
    table = table_graph if settings.tied_table and plan.role == "head" else None
    files, quality = quantize_exported(plan, staging, settings, config.force, table)
    release_freed_memory()
    if cache is not None and table is None:  # a head reading the table is made afresh with its embed
        entry = CacheEntry(tuple(files), parameters, error, quality.min_cosine, quality.max_abs_error)
        cache.put(final_key, staging, entry)
    return files, parameters, error, quality


def _share_float_table(plan, staging: Path, table_graph: Path) -> list[str]:
    """A float bundle of a tied checkpoint: the embed graph keeps its table in external data and
    the head multiplies by it, transposed, instead of a copy (export.shared_table); the head is
    checked against itself before the change on its verification inputs. Returns the graph's files."""
    import shutil

    from export.onnx_export import VerificationError
    from export.quantize import compare_graphs
    from export.shared_table import share_float_table, store_float_table_externally
    from export.staging import graph_files

    path = staging / plan.file
    if plan.role in EMBEDDING_ROLES:
        return store_float_table_externally(path)
    aside = staging / ".unshared"
    aside.mkdir(exist_ok=True)
    try:
        for file in staging.glob(plan.file + "*"):
            shutil.copy2(file, aside / file.name)
        if share_float_table(path, table_graph):
            cases = [{n: t.numpy() for n, t in zip(plan.input_names, c, strict=True)} for c in plan.cases()]
            quality = compare_graphs(aside / plan.file, path, cases)
            if quality.min_cosine < 0.99999:
                raise VerificationError(
                    f"{plan.name}: reading the embedding table changed its outputs "
                    f"(cosine {quality.min_cosine:.6f})",
                    hint="this is a bug in the exporter; please report it",
                )
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return graph_files(path)


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
        "Runtime's GroupQueryAttention; concat is standard ONNX (past in, past + new out), for TensorRT "
        "(default: inplace, or concat where the model's head size is not a multiple of 8)",
    )
    parser.add_argument(
        "--exit-layers",
        metavar="LAYERS",
        help="layers that may end a segment and carry a router, e.g. '1-30' or '4,8,12' "
        "(default: every layer from 1 to L-2)",
    )
    parser.add_argument(
        "--prune-layers",
        metavar="LAYERS",
        help="more layers to end a segment at, so that fastv:K / dart:K can prune after them, e.g. '2' or "
        "'2,5' (a bundle prunes after -1, the input embeddings, and every exit layer without it)",
    )
    parser.add_argument(
        "--default-prune",
        metavar="POLICY",
        help="visual-token pruning the runtime uses when none is asked for: none, fastv:K:R or dart:K:R[:P] "
        "(default: none)",
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
        "with ONNX Runtime's quantiser, and (format matmulnbits) of the embedding table, read with "
        "GatherBlockQuantized (routers and norms stay float)",
    )
    parser.add_argument("--block-size", type=int, metavar="N", help="weights per quantisation block")
    parser.add_argument(
        "--quant-format",
        choices=("matmulnbits", "qdq"),
        help="matmulnbits: ONNX Runtime's MatMulNBits; qdq: DequantizeLinear + MatMul, the form TensorRT "
        "parses as weight-only quantisation",
    )
    parser.add_argument(
        "--quantize-vision",
        choices=("int8", "none"),
        help="also quantise the vision tower's MatMuls (weight-only int8; default: none, float)",
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
    parser.add_argument(
        "--graph-cache",
        type=Path,
        metavar="DIR",
        help="keep every exported graph in DIR and take from it the graphs an earlier export of the same "
        "checkpoint already made and checked: the variants of one model (KV flavours, precisions, routers) "
        "then re-export only what differs",
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
        require("export", "python -m export.build")
        config = parse_args(argv)
        rows = build_bundle(config)
        if not config.quiet:
            print(format_summary(rows))
            print(f"bundle written to {config.out}")

    return run_command(body, interrupted="interrupted: the output directory was left as it was")


if __name__ == "__main__":
    sys.exit(main())
