"""`dyvte-rt inspect [BUNDLE]`: what a bundle holds, from its manifest."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from dyvte_rt.bundle.locations import resolve_bundle
from dyvte_rt.bundle.manifest import Manifest
from dyvte_rt.cli.commandline import HelpFormatter, use_config_defaults
from dyvte_rt.cli.options import bundle_options, json_option
from dyvte_rt.errors import InputError
from dyvte_rt.families import family_for


@dataclass(frozen=True, kw_only=True)
class InspectConfig:
    bundle: Path | None = None
    verify: bool = True
    tensorrt_ready: bool = False
    as_json: bool = False


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect",
        help="summarise a bundle: model, exit layers, policies, graphs and files",
        description="Summarise a bundle's manifest and check its files (size and sha256).",
        formatter_class=HelpFormatter,
        parents=[bundle_options(), json_option()],
    )
    parser.add_argument("path", nargs="?", type=Path, metavar="BUNDLE", help="shorthand for --bundle BUNDLE")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the sha256 check")
    parser.add_argument(
        "--tensorrt-ready",
        action="store_true",
        help="check instead that every graph can become a TensorRT engine (no ONNX Runtime-only "
        "operators, no control flow, input types TensorRT takes, external data present, fp16 guards); "
        "exit status 1 if not",
    )
    use_config_defaults(parser, InspectConfig)
    parser.set_defaults(make_config=make_config, run=run)


def make_config(args: argparse.Namespace) -> InspectConfig:
    if args.path is not None and args.bundle is not None and args.path != args.bundle:
        raise InputError("give the bundle once: either BUNDLE or --bundle DIR")
    return InspectConfig(
        bundle=args.path or args.bundle,
        verify=args.verify,
        tensorrt_ready=args.tensorrt_ready,
        as_json=args.as_json,
    )


def run(config: InspectConfig) -> int:
    from dyvte_rt.bundle.manifest import load_manifest

    bundle = resolve_bundle(config.bundle)
    manifest = load_manifest(bundle, verify_hashes=config.verify)
    if config.tensorrt_ready:
        return report_tensorrt_readiness(bundle, manifest, config.as_json)
    if config.as_json:
        data = {
            "bundle": str(bundle),
            "sha256_verified": config.verify,
            **dataclasses.asdict(manifest),
            "graph_bytes": {name: size for name, (_, size) in graph_bytes(manifest).items()},
            "precision_bytes": precision_bytes(graph_bytes(manifest)),
        }
        print(json.dumps(data))
    else:
        print(summary(bundle, manifest, config.verify))
    return 0


def report_tensorrt_readiness(bundle: Path, manifest: Manifest, as_json: bool) -> int:
    from dyvte_rt.tools.engine_plan import tensorrt_readiness

    hazards = tensorrt_readiness(bundle, manifest)
    if as_json:
        print(json.dumps({"bundle": str(bundle), "tensorrt_ready": not hazards, "hazards": hazards}))
    else:
        print("\n".join(hazards) if hazards else f"{bundle}: every graph is TensorRT-ready")
    if hazards:
        raise InputError(f"{len(hazards)} graph hazards keep this bundle from TensorRT (listed above)")
    return 0


def graph_precision(m: Manifest, name: str) -> str:
    """A graph's weight precision: recorded since pruning's manifests, else derived."""
    info = m.graphs[name]
    if info.precision is not None:
        return info.precision
    quantized = m.quantization is not None and name in m.quantization.graphs
    return f"int{m.quantization.bits}" if quantized else m.dtype


def graph_files(m: Manifest, graph: str) -> list[str]:
    """A graph's files in the bundle: its .onnx and any external data."""
    stem = m.graphs[graph].file
    return [file for file in m.files if file == stem or file.startswith(stem + ".")]


def shared_note(m: Manifest, graph: str) -> str:
    """What a graph reads from other graphs' files (a tied LM head: the embed graph's table),
    counted there, not here."""
    shared = m.graphs[graph].shared_files
    if not shared:
        return ""
    size = sum(m.files[file].bytes for file in shared if file in m.files)
    return f"  + {size / 2**20:.2f} MiB shared: {', '.join(shared)}"


def graph_bytes(m: Manifest) -> dict[str, tuple[str, int]]:
    """graph -> (weight precision, bytes of its files)."""
    return {
        name: (graph_precision(m, name), sum(m.files[file].bytes for file in graph_files(m, name)))
        for name in m.graphs
    }


def precision_bytes(sizes: dict[str, tuple[str, int]]) -> dict[str, int]:
    """Bytes per weight precision, from `graph_bytes`."""
    totals: dict[str, int] = {}
    for kind, size in sizes.values():
        totals[kind] = totals.get(kind, 0) + size
    return totals


def precision(m: Manifest) -> str:
    if m.quantization is None:
        return f"{m.dtype} weights and activations"
    q = m.quantization
    worst = min(g.min_cosine for g in q.graphs.values())
    by_kind: dict[str, list[str]] = {}
    for name in sorted(q.graphs):
        by_kind.setdefault(graph_precision(m, name), []).append(name)
    parts = "; ".join(f"{kind} weights in {', '.join(names)}" for kind, names in sorted(by_kind.items()))
    return (
        f"{parts} ({q.format}, block {q.block_size}, outputs' cosine to float >= {worst:.4f}); "
        f"{m.dtype} activations and other weights"
    )


def prune_line(m: Manifest) -> str:
    if m.prune is None:
        return "none (exported before pruning existed: re-export to prune)"
    layers = ", ".join(map(str, m.prune.layers))
    return f"after layers {layers} (-1: the input embeddings, DART only); default {m.prune.default_policy}"


def summary(bundle: Path, m: Manifest, verified: bool) -> str:
    ex = m.exit
    total = sum(f.bytes for f in m.files.values())
    source = f" ({m.source.repo_id}@{m.source.revision})" if m.source.repo_id else ""
    routers = f"width {ex.router_width})" if ex.router_width is not None else "none)"
    segments = "  ".join(
        f"{s.graph}[{s.first_layer}-{s.last_layer}{'+router' if s.has_router else ''}]" for s in m.segments
    )
    lines = [
        f"bundle      {bundle}",
        f"model       {m.source.model}{source}",
        f"family      {m.source.family} ({m.source.architecture}), schema v{m.schema_version}",
        f"precision   {precision(m)}",
        f"KV cache    {m.kv_flavour}",
        f"decoder     {m.dims.num_layers} layers, hidden {m.dims.hidden}, heads {m.dims.num_heads}/"
        f"{m.dims.num_kv_heads} kv, vocab {m.dims.vocab_size}, context {m.dims.max_positions}",
        f"image       {family_for(m).describe_image()}",
        f"exit layers {', '.join(map(str, ex.candidate_layers)) or 'none'}",
        f"policy      {ex.default_policy} (threshold {ex.threshold:g}; routers: {routers}",
        f"pruning     {prune_line(m)}",
        f"segments    {segments}",
        f"files       {len(m.files)} files, {total / 2**20:.1f} MiB"
        + (", sha256 verified" if verified else ""),
    ]
    sizes = graph_bytes(m)
    lines += [
        f"  {name:<24} {kind:>5} {size / 2**20:>9.2f} MiB" + shared_note(m, name)
        for name, (kind, size) in sizes.items()
    ]
    in_graphs = {file for name in m.graphs for file in graph_files(m, name)}
    lines += [
        f"  {name:<24} {'':>5} {info.bytes / 2**20:>9.2f} MiB"
        for name, info in m.files.items()
        if name not in in_graphs
    ]
    lines.append(
        "by precision "
        + ", ".join(f"{kind} {size / 2**20:.2f} MiB" for kind, size in precision_bytes(sizes).items())
    )
    return "\n".join(lines)
