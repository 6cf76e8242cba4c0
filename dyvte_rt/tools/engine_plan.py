"""A bundle's TensorRT engines planned from its manifest: each graph's profiles and the device
memory a request holds (engines.tensorrt.profiles / .buffers do the arithmetic; this module knows
the bundle). Also whether the bundle's graphs are fit for TensorRT at all."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dyvte_rt.bundle.manifest import Manifest
from dyvte_rt.errors import InputError
from dyvte_rt.families import family_for
from engines.tensorrt.buffers import plan_buffers
from engines.tensorrt.profiles import PHASES, EngineSettings, PlanError, graph_profiles

PREFILL_ONLY = ("prefill_visual",)  # routers, gathers and rankings run only while visual tokens are there
VISUAL_ONLY = ("exit_gather", "fastv_rank", "dart_rank", "deepstack_add")


def default_settings(manifest: Manifest, **overrides: int | None) -> EngineSettings:
    given = {k: v for k, v in overrides.items() if v is not None}
    context = given.pop("max_context", None) or min(manifest.dims.max_positions, 4096)
    try:
        return EngineSettings(max_context=context, **given)
    except PlanError as err:
        raise InputError(str(err)) from None


def plan_engines(manifest: Manifest, settings: EngineSettings) -> dict:
    """{"settings", "graphs": {graph: [profile...]}, "buffers"} as JSON-ready data."""
    try:
        family = family_for(manifest)
        ranges = family.profile_ranges(settings)
        graphs = {}
        for name, graph in manifest.graphs.items():
            prefill_only = name.startswith("router_") or name in VISUAL_ONLY
            prefill_only |= family.vision_per_image and name == "vision"  # one image's own shapes
            phases = PREFILL_ONLY if prefill_only else PHASES
            inputs = {t.name: t.shape for t in graph.inputs}
            graphs[name] = [p.to_json() for p in graph_profiles(inputs, ranges, phases)]
    except PlanError as err:
        raise InputError(str(err)) from None
    d = manifest.dims
    buffers = plan_buffers(
        num_layers=d.num_layers,
        num_kv_heads=d.num_kv_heads,
        head_dim=d.head_dim,
        hidden=d.hidden,
        vocab_size=d.vocab_size,
        visual_tokens=manifest.vision.visual_tokens,
        dtype="float16" if manifest.dtype == "fp16" else "float32",
        settings=settings,
    )
    return {"settings": dataclasses.asdict(settings), "graphs": graphs, "buffers": buffers.to_json()}


def tensorrt_readiness(bundle: Path, manifest: Manifest) -> list[str]:
    """Every hazard in the bundle for TensorRT, one line each (empty: ready)."""
    from dyvte_rt.tools.graph_lint import tensorrt_hazards

    found = []
    if manifest.kv_flavour != "concat":
        found.append(
            f"KV cache flavour {manifest.kv_flavour!r} (ONNX Runtime's GroupQueryAttention): "
            "TensorRT needs --kv concat"
        )
    for graph in manifest.graphs.values():
        dtypes = {t.name: t.dtype for t in graph.inputs}
        found += tensorrt_hazards(bundle / graph.file, dtypes, fp16=manifest.dtype == "fp16")
    return found
