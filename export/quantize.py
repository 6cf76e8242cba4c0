"""Weight-only, block-wise int4/int8 quantisation of exported graphs with ONNX Runtime's quantiser.

Each MatMul whose weight is a constant becomes `MatMulNBits` (or, with format `qdq`, a block-wise
`DequantizeLinear` feeding the original `MatMul`: the form TensorRT 10 parses as weight-only
INT4/INT8). Nothing else changes: norms, rotary embeddings, attention and routers stay float, and
so does the embedding table (a Gather reads one row of it per token, so quantising it would save
memory but no bandwidth; TensorRT's weight-only path does not cover Gather either).

The quantised graph is compared with the float graph it came from on the graph plan's
verification inputs; a graph whose outputs drift below the quality bar is not written unless the
user forces it.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyvte_rt.errors import DyvteError

QUANT_FORMATS = ("matmulnbits", "qdq")
# Cosine similarity every output of a quantised graph must keep against its float graph, on the
# verification inputs (docs/quantization.md). The bar catches broken quantisation (a wrong axis or
# scale gives cosines near 0), not 4-bit noise: a random-weight LLaVA-1.5-7B-shaped layer, whose
# attention is far more chaotic than a trained one's, keeps 0.96 at int4 while trained models keep
# 0.99 and more. Task accuracy is measured with `dyvte-rt eval`, not here.
MIN_COSINE = {8: 0.995, 4: 0.95}


@dataclass(frozen=True)
class QuantizeSettings:
    bits: int  # 4 | 8
    block_size: int = 32
    format: str = "matmulnbits"  # matmulnbits | qdq
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations inside the kernel (CPU); 0 = as the weights
    symmetric: bool = True


@dataclass(frozen=True)
class GraphQuality:
    min_cosine: float  # over outputs and cases, against the float graph
    max_abs_error: float


class QualityError(DyvteError):
    """A quantised graph drifted too far from its float graph."""


def quantize_graph(source: Path, path: Path, settings: QuantizeSettings) -> list[str]:
    """Write `source` with its constant-weight MatMuls quantised to `path`; returns the files written."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for name in ("onnxruntime.quantization", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model = onnx.load(str(source))
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=settings.bits,
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        quant_format=QuantFormat.QDQ if settings.format == "qdq" else QuantFormat.QOperator,
    )
    quantizer.process()
    data = path.with_name(path.name + ".data")
    quantized = quantizer.model.model
    large = sum(t.ByteSize() for t in quantized.graph.initializer) > (1 << 30)
    onnx.save(
        quantized,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    return sorted(
        p.name for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(path.name + ".")
    )


def compare_graphs(
    float_path: Path,
    quantized_path: Path,
    cases: list[dict[str, np.ndarray]],
    rows: list[int | None] | None = None,
) -> GraphQuality:
    """Min cosine similarity and max abs error of every output over `cases` (feeds by input name).

    `rows[i]`: for case i, compare only the first rows (axis 2) of 4-D outputs (in-place KV
    buffers, whose rows past the valid ones hold whatever was there)."""
    import onnxruntime as ort

    from export.onnx_export import lean_session_options

    def outputs(path: Path, prepack: bool) -> list[list[np.ndarray]]:
        """Every case through one graph; one session at a time, so the float graph's weights are
        gone before the quantised graph loads."""
        options = lean_session_options(ort, prepack=prepack)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return [session.run(None, feeds) for feeds in cases]

    float_outputs = outputs(float_path, prepack=False)
    gc.collect()
    quantized_outputs = outputs(quantized_path, prepack=True)
    worst_cosine, worst_error = 1.0, 0.0
    for index, (expected, got) in enumerate(zip(float_outputs, quantized_outputs, strict=True)):
        valid = rows[index] if rows is not None else None
        for want, have in zip(expected, got, strict=True):
            if valid is not None and want.ndim == 4:
                want, have = want[:, :, :valid], have[:, :, :valid]
            want, have = want.astype(np.float64).ravel(), have.astype(np.float64).ravel()
            if not want.size:
                continue
            norms = np.linalg.norm(want) * np.linalg.norm(have)
            cosine = float(want @ have / norms) if norms > 0 else 1.0
            worst_cosine = min(worst_cosine, cosine)
            worst_error = max(worst_error, float(np.abs(want - have).max()))
    return GraphQuality(worst_cosine, worst_error)


def check_quality(name: str, quality: GraphQuality, bits: int, force: bool) -> None:
    floor = MIN_COSINE[bits]
    if quality.min_cosine < floor and not force:
        raise QualityError(
            f"{name}: int{bits} outputs keep a cosine similarity of {quality.min_cosine:.4f} with the float "
            f"graph, below the {floor} the bundle needs",
            hint="try --block-size 32 or int8, or pass --force to write the bundle anyway",
        )


def quantize_exported(plan, staging: Path, settings: QuantizeSettings, force: bool):
    """Quantise an exported, verified float graph in place; check it against the float graph on the
    plan's verification inputs -> (files written, quality)."""
    import shutil

    from export.memory import release_freed_memory

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
