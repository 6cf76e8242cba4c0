"""`dyvte-rt build-engines`: one TensorRT engine per bundle graph, with profiles for prefill with
and without visual tokens and for decoding (engines.tensorrt; docs/tensorrt.md).

The command lives with the runtime's CLI, not as `python -m engines.build`: it reads the bundle's
manifest, and `engines` never imports the runtime that owns that format.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from dyvte_rt.cli.commandline import HelpFormatter, use_config_defaults
from dyvte_rt.cli.options import bundle_options, json_option
from dyvte_rt.errors import InputError
from engines import DEVICES

# --check-golden: the largest output error, relative to the largest golden output, that passes
GOLDEN_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}


@dataclass(frozen=True, kw_only=True)
class BuildEnginesConfig:
    bundle: Path | None = None
    precision: str | None = None  # None: the bundle's
    max_batch: int | None = None
    max_context: int | None = None
    max_text_tokens: int | None = None
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    plan: bool = False
    golden: bool = False
    check_golden: bool = False
    device: str = "tensorrt"  # what --check-golden compares with the golden outputs
    as_json: bool = False


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "build-engines",
        help="build TensorRT engines for a bundle (or, with --plan, show their profiles)",
        description="Build one TensorRT engine per graph of a concat-KV bundle, each with optimisation "
        "profiles for prefill with visual tokens, prefill of text rows (after the exit) and decoding, "
        "bounded by the options below; engines and a record of the TensorRT version and GPU they were "
        "built for go into DIR/tensorrt/. Needs TensorRT and an NVIDIA GPU, except --plan, which "
        "prints the profiles and the device memory a request holds and writes DIR/tensorrt/plan.json "
        "(read by --device ort-tensorrt). Networks are strongly typed: the precision is the bundle's.",
        formatter_class=HelpFormatter,
        parents=[bundle_options(), json_option()],
    )
    parser.add_argument(
        "--precision",
        choices=("fp16", "fp32"),
        help="the precision you expect; a bundle of another is refused (default: the bundle's)",
    )
    parser.add_argument("--max-batch", type=int, metavar="B", help="largest batch (default: 1)")
    parser.add_argument(
        "--max-context",
        type=int,
        metavar="N",
        help="prompt + generated tokens per sample (default: the model's, at most 4096)",
    )
    parser.add_argument(
        "--max-text-tokens",
        type=int,
        metavar="T",
        help="text tokens in one prompt besides the image (default: 512)",
    )
    parser.add_argument("--workspace-gb", type=float, metavar="G", help="TensorRT's workspace memory limit")
    parser.add_argument(
        "--timing-cache", type=Path, metavar="FILE", help="TensorRT timing cache, read and updated"
    )
    parser.add_argument(
        "--plan", action="store_true", help="print the profiles and buffer sizes; build nothing"
    )
    parser.add_argument(
        "--golden",
        action="store_true",
        help="run every graph with ONNX Runtime on the CPU at its profiles' opt shapes and save inputs and "
        "outputs in DIR/tensorrt/golden/ (build nothing)",
    )
    parser.add_argument(
        "--check-golden",
        action="store_true",
        help="run every graph on --device and compare with the golden outputs (build nothing)",
    )
    parser.add_argument("--device", choices=DEVICES, help="the backend --check-golden runs")
    use_config_defaults(parser, BuildEnginesConfig)
    parser.set_defaults(make_config=make_config, run=run)


def make_config(args: argparse.Namespace) -> BuildEnginesConfig:
    names = set(BuildEnginesConfig.__dataclass_fields__)
    return BuildEnginesConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(config: BuildEnginesConfig) -> int:
    from dyvte_rt.bundle.locations import resolve_bundle
    from dyvte_rt.bundle.manifest import load_manifest
    from dyvte_rt.tools.engine_plan import default_settings, plan_engines, tensorrt_readiness
    from engines.tensorrt.record import write_plan

    bundle = resolve_bundle(config.bundle)
    manifest = load_manifest(bundle)
    if config.precision is not None and config.precision != manifest.dtype:
        raise InputError(
            f"this bundle is {manifest.dtype}; strongly typed engines take the graphs' own precision",
            hint=f"export a bundle with --dtype {config.precision}",
        )
    settings = default_settings(
        manifest,
        max_batch=config.max_batch,
        max_context=config.max_context,
        max_text_tokens=config.max_text_tokens,
    )
    plan = plan_engines(manifest, settings)
    if config.golden or config.check_golden:
        return golden(bundle, plan, config)
    if config.plan:
        write_plan(bundle, plan)
        print(json.dumps(plan) if config.as_json else json.dumps(plan, indent=2))
        return 0
    hazards = tensorrt_readiness(bundle, manifest)
    if hazards:
        raise InputError(
            f"the bundle is not TensorRT-ready: {hazards[0]}"
            + (f" (and {len(hazards) - 1} more)" if len(hazards) > 1 else ""),
            hint=f"see them all: dyvte-rt inspect --tensorrt-ready {bundle}",
        )
    record = build(bundle, manifest, plan, config)
    summary = {name: engine.bytes for name, engine in record.engines.items()}
    print(
        json.dumps({"engines": summary, "gpu": record.gpu_name})
        if config.as_json
        else f"built {len(summary)} engines"
    )
    return 0


def golden(bundle: Path, plan: dict, config: BuildEnginesConfig) -> int:
    from dyvte_rt.bundle.loaded import Bundle
    from dyvte_rt.tools.golden import check_golden, write_golden
    from engines import SessionOptions

    device = "cpu" if config.golden else config.device
    with Bundle.open(bundle, SessionOptions(device=device), dtype=None) as opened:
        if config.golden:
            folder = write_golden(opened, plan)
            print(json.dumps({"golden": str(folder)}) if config.as_json else f"golden outputs in {folder}")
            return 0
        diffs = check_golden(opened)
    tolerance = GOLDEN_TOLERANCE[opened.manifest.dtype]
    failed = [d for d in diffs if d.relative > tolerance]
    if config.as_json:
        rows = [{**d.__dict__, "relative": d.relative, "ok": d.relative <= tolerance} for d in diffs]
        print(json.dumps({"device": device, "tolerance": tolerance, "graphs": rows}))
    else:
        for d in diffs:
            print(
                f"{d.graph:<14} {d.phase:<15} max abs error {d.max_abs_error:.3g} ({d.relative:.2g} of scale)"
            )
    if failed:
        worst = max(failed, key=lambda d: d.relative)
        raise InputError(
            f"{len(failed)} graph outputs on {device} differ from ONNX Runtime's by more than {tolerance:g} "
            f"(worst: {worst.graph}, {worst.phase}, {worst.relative:.3g})"
        )
    return 0


def build(bundle: Path, manifest, plan: dict, config: BuildEnginesConfig):
    """Every graph's engine, written to DIR/tensorrt/ (each file whole or not at all), then the record."""
    from tqdm import tqdm

    from dyvte_rt.bundle.loaded import as_runtime_error
    from engines.errors import BackendError
    from engines.tensorrt.builder import BuildOptions, build_engine, device_identity
    from engines.tensorrt.library import tensorrt
    from engines.tensorrt.profiles import Profile
    from engines.tensorrt.record import ENGINE_DIR, EngineFile, EngineRecord, sha256, write_plan

    try:
        trt = tensorrt()
        gpu_name, capability = device_identity()
    except BackendError as err:
        raise as_runtime_error(err) from None
    out = bundle / ENGINE_DIR
    out.mkdir(exist_ok=True)
    options = BuildOptions(workspace_gb=config.workspace_gb, timing_cache=config.timing_cache)
    engines = {}
    for name in tqdm(list(manifest.graphs), desc="engines", unit="graph"):
        profiles = [Profile.from_json(p) for p in plan["graphs"][name]]
        try:
            data = build_engine(bundle / manifest.graphs[name].file, profiles, options)
        except BackendError as err:
            raise as_runtime_error(err) from None
        path = out / f"{name}.engine"
        tmp = path.with_suffix(".engine.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        engines[name] = EngineFile(path.name, sha256(path), len(data), plan["graphs"][name])
    write_plan(bundle, plan)
    record = EngineRecord(trt.__version__, gpu_name, capability, manifest.dtype, plan["settings"], engines)
    record.write(bundle)
    return record
