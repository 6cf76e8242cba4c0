"""Export one graph plan to ONNX with the dynamo exporter, quietly, and verify it at once."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dyvte_rt.errors import DyvteError
from export.attention import TRANSLATIONS
from export.graph_plans import GraphPlan
from export.graph_rewrites import divide_by_square_roots
from export.staging import graph_files

EXTERNAL_DATA_BYTES = 1536 << 20  # well under protobuf's 2 GB limit


class VerificationError(DyvteError):
    """An exported graph disagrees with the torch module it came from."""


@dataclass(frozen=True)
class ExportedGraph:
    name: str
    files: tuple[str, ...]  # the .onnx and, for large graphs, its external data
    parameters: int
    max_abs_error: float  # largest |onnx - torch| over the verification cases


def parameter_bytes(module: torch.nn.Module, sample: tuple) -> tuple[int, int]:
    """(count, bytes) of the parameters the graph actually uses, found by a traced forward."""
    used: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, _args: used.update({id(p): p for p in mod.parameters(recurse=False)})
        )
        for m in module.modules()
    ]
    try:
        with torch.no_grad():
            module(*sample)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(p.numel() for p in used.values()), sum(p.numel() * p.element_size() for p in used.values())


def export_plan(
    plan: GraphPlan, out_dir: Path, opset: int, release_weights: Callable[[], None] | None = None
) -> ExportedGraph:
    """Export and verify; `release_weights` (streamed export) drops the module's weights once its
    expected outputs are computed, before ONNX Runtime loads the graph's own copy."""
    count, nbytes = parameter_bytes(plan.module, plan.sample)
    external = nbytes > EXTERNAL_DATA_BYTES
    path = out_dir / plan.file
    with _quiet():
        program = torch.onnx.export(
            plan.module.eval(),
            plan.sample,
            dynamo=True,
            input_names=plan.input_names,
            output_names=plan.output_names,
            dynamic_shapes=plan.dynamic_shapes,
            opset_version=opset,
            custom_translation_table=TRANSLATIONS,
            verbose=False,
        )
        divide_by_square_roots(program.model.graph)  # before saving: RMSNorms ONNX Runtime fuses
        program.save(str(path), external_data=external)
        del program  # its initializers hold the module's weights (a streamed export drops them next)
    files = tuple(graph_files(path))
    error = verify_plan(plan, path, release_weights=release_weights)
    return ExportedGraph(plan.name, files, count, error)


def verify_plan(
    plan: GraphPlan,
    path: Path,
    tolerance: float | None = None,
    release_weights: Callable[[], None] | None = None,
) -> float:
    """Run every verification case through ONNX Runtime and the torch module; fail above tolerance.

    Errors are absolute for outputs of magnitude <= 1 and relative to the output's largest value
    beyond that, so one tolerance serves tiny and 7B-sized activations alike.
    """
    import onnxruntime as ort

    cases = plan.cases()
    expected_outputs = []
    with torch.no_grad():
        for case in cases:
            expected = plan.module(*case)
            expected = expected if isinstance(expected, tuple) else (expected,)
            expected_outputs.append([tensor.float().numpy() for tensor in expected])
    if release_weights is not None:
        release_weights()
    gc.collect()  # the exporter's program and model, before ONNX Runtime loads the graph again
    session = ort.InferenceSession(str(path), lean_session_options(ort), providers=["CPUExecutionProvider"])
    if tolerance is None:
        tolerance = plan.tolerance if plan.dtype == torch.float32 else max(plan.tolerance, 2e-2)
    worst = 0.0
    for case, expected in zip(cases, expected_outputs, strict=True):
        feeds = {name: tensor.numpy() for name, tensor in zip(plan.input_names, case, strict=True)}
        got = session.run(plan.output_names, feeds)
        rows = plan.valid_rows(case) if plan.valid_rows is not None else None
        for name, want, have in zip(plan.output_names, expected, got, strict=True):
            if rows is not None and name.startswith("present."):  # rows past the valid ones are unspecified
                want, have = want[:, :, :rows], have[:, :, :rows]
            if want.shape != have.shape:
                raise VerificationError(
                    f"{plan.name}: output {name} has shape {have.shape}, expected {want.shape}"
                )
            error = float(np.abs(have.astype(np.float32) - want).max()) if want.size else 0.0
            scaled = error / max(1.0, float(np.abs(want).max()) if want.size else 1.0)
            worst = max(worst, error)
            if not scaled <= tolerance:
                raise VerificationError(
                    f"{plan.name}: output {name} differs from the torch module by {error:.3g} "
                    f"(tolerance {tolerance:g}, case shapes {[tuple(t.shape) for t in case]})",
                    hint="this is a bug in the exporter or an unsupported model variant; please report it",
                )
    return worst


def lean_session_options(ort, prepack: bool = False):
    """ONNX Runtime options for a session that checks a graph a few times and is dropped: no
    pre-packed second copy of the weights (unless asked: int4 kernels need it to be fast) and no
    memory arena holding the largest activations — export memory follows the graph, not twice it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter narrates every step; keep our progress bar readable."""
    loggers = [
        logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
