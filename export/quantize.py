"""Weight-only, block-wise int4/int8 quantisation of exported graphs with ONNX Runtime's quantiser.

Each MatMul whose weight is a constant becomes `MatMulNBits` (or, with format `qdq`, a block-wise
`DequantizeLinear` feeding the original `MatMul`: the form TensorRT 10 parses as weight-only
INT4/INT8). With `matmulnbits`, the embedding table is stored in the same bits and blocks and read
by ONNX Runtime's `GatherBlockQuantized`, which dequantises only the rows it gathers: a 7B model's
table is 0.5 GB in fp32, and on an edge device memory decides whether the model runs at all (with
`qdq` it stays float: TensorRT's weight-only path does not cover Gather). Norms, rotary
embeddings, attention and routers stay float.

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
    # The checkpoint ties its LM head to the embedding table: the embed graph keeps its quantised
    # table in external data, the head reads the same bytes (export.shared_table)
    tied_table: bool = False


@dataclass(frozen=True)
class GraphQuality:
    min_cosine: float  # over outputs and cases, against the float graph
    max_abs_error: float


class QualityError(DyvteError):
    """A quantised graph drifted too far from its float graph."""


# Weights above this live in external data: ONNX Runtime maps that file and MatMulNBits packs its
# weights straight from the mapping, while weights inlined in the .onnx are parsed onto the heap
# first, where their freed pages stay resident (docs/benchmarks.md, *Resident memory of quantised
# bundles*).
EXTERNAL_WEIGHTS_BYTES = 8 << 20


def quantize_graph(
    source: Path, path: Path, settings: QuantizeSettings, table_graph: Path | None = None
) -> list[str]:
    """Write `source` with its constant-weight MatMuls (and, with `matmulnbits`, its embedding
    tables) quantised to `path`; returns the files written. With `settings.tied_table`, a MatMul
    whose weight is the quantised table `table_graph` (the embed graph, already written beside
    `path`) stored reads that table's bytes instead of a copy of its own."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from export.shared_table import point_matmul_at_table, store_table_externally
    from export.staging import graph_files

    for name in ("onnxruntime.quantization", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model = onnx.load(str(source))
    gemms_as_matmuls(model)  # the quantiser reads MatMul weights only
    shared = _shared_table_matmul(model, settings, table_graph)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=settings.bits,
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        quant_format=QuantFormat.QDQ if settings.format == "qdq" else QuantFormat.QOperator,
        nodes_to_exclude=[shared[0]] if shared else None,
    )
    quantizer.process()
    data = path.with_name(path.name + ".data")
    quantized = quantizer.model.model
    if shared:
        point_matmul_at_table(quantized, shared[0], shared[1], settings.accuracy_level)
    if settings.format == "matmulnbits":
        quantize_embedding_gathers(quantized, settings.bits, settings.block_size)
        if settings.tied_table:
            store_table_externally(quantized, data.name)
    external = sum(t.ByteSize() for t in quantized.graph.initializer) > EXTERNAL_WEIGHTS_BYTES
    onnx.save(
        quantized,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    if data.is_file():  # onnx creates external data owner-only (0600); as readable as the graph beside it
        data.chmod(path.stat().st_mode & 0o777)
    return graph_files(path)


def _shared_table_matmul(model, settings: QuantizeSettings, table_graph: Path | None):
    """(MatMul node name, stored table) when the graph's LM-head MatMul can read `table_graph`'s
    quantised table: settings ask for it and the weight quantises to exactly the stored bytes."""
    from export.shared_table import read_stored_table, same_table, tied_head_matmul

    if not settings.tied_table or settings.format != "matmulnbits" or table_graph is None:
        return None
    table = read_stored_table(table_graph)
    if table is None or (table.bits, table.block_size) != (settings.bits, settings.block_size):
        return None
    found = tied_head_matmul(model, table)
    if found is None or not same_table(found[1], table):
        return None
    return found[0], table


def gemms_as_matmuls(model) -> int:
    """Rewrite each `Gemm(A, W, C)` with a constant weight W (alpha 1, beta 1, A not transposed) as
    `MatMul(A, W')` then `Add(C)`, W' = W transposed where Gemm transposed it. The dynamo exporter
    writes a linear layer on 2-D activations as Gemm (Qwen2.5-VL's vision tower flattens its
    patches), and ONNX Runtime's weight-only quantiser only reads MatMul weights: without this those
    layers stayed float. Returns how many Gemms were rewritten."""
    from onnx import helper, numpy_helper

    tables = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    rewritten, nodes = 0, []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scaled = attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
        plain = not scaled and not attrs.get("transA", 0)
        weight = node.input[1] if len(node.input) > 1 else ""
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or not plain or weight not in tables:
            nodes.append(node)
            continue
        array = numpy_helper.to_array(tables[weight])
        if attrs.get("transB", 0):
            array = np.ascontiguousarray(array.T)
        name = f"{weight}_as_matmul"
        model.graph.initializer.append(numpy_helper.from_array(array, name))
        readers[weight] -= 1
        if not readers[weight]:  # nothing else reads the Gemm's copy
            model.graph.initializer.remove(tables.pop(weight))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}_matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=node.name + "_matmul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], list(node.output), name=f"{node.name}_add"))
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten


def embedding_gathers(model) -> list:
    """(node, table) for each Gather that reads rows (axis 0) of a constant 2-D table: an
    embedding table."""
    tables = {t.name: t for t in model.graph.initializer if len(t.dims) == 2}
    found = []
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (
            node.op_type == "Gather"
            and node.domain in ("", "ai.onnx")
            and axis == 0
            and node.input[0] in tables
        ):
            found.append((node, tables[node.input[0]]))
    return found


def quantize_embedding_gathers(model, bits: int, block_size: int) -> int:
    """Replace each Gather that reads rows of a constant 2-D float table (the embedding table) with
    ONNX Runtime's `GatherBlockQuantized`: the table stored in `bits` bits per weight, symmetric
    blocks of `block_size` along each row, dequantised only for the rows gathered. Returns how many
    tables were quantised (tables whose rows do not split into blocks stay float)."""
    import onnx
    from onnx import helper, numpy_helper

    count = 0
    for node, table in embedding_gathers(model):
        if table.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        weights = numpy_helper.to_array(table)
        rows, width = weights.shape
        if width % block_size or rows < 2:
            continue
        data, scales = block_quantize_rows(weights, bits, block_size)
        base = node.input[0]
        data_name, scale_name = f"{base}_q{bits}", f"{base}_scales"
        model.graph.initializer.append(numpy_helper.from_array(data, data_name))
        model.graph.initializer.append(numpy_helper.from_array(scales.astype(weights.dtype), scale_name))
        replacement = helper.make_node(
            "GatherBlockQuantized",
            [data_name, node.input[1], scale_name],
            list(node.output),
            name=(node.name or base) + "_quantized",
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=block_size,
            bits=bits,
        )
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(position, replacement)
        count += 1
    if count:
        used = {name for n in model.graph.node for name in n.input}
        keep = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def block_quantize_rows(weights, bits: int, block_size: int):
    """[rows, width] floats -> (uint8 data [rows, width * bits / 8], scales [rows, width / block]):
    symmetric blocks, values q + 2^(bits-1) (GatherBlockQuantized's and MatMulNBits' default zero
    point), two 4-bit values a byte, the lower nibble first."""
    import numpy as np

    rows, width = weights.shape
    qmax = 2 ** (bits - 1) - 1
    blocks = weights.astype(np.float32).reshape(rows, width // block_size, block_size)
    scales = np.abs(blocks).max(axis=-1) / qmax  # [rows, width / block]
    scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
    q = np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax).astype(np.int16)
    data = (q + 2 ** (bits - 1)).astype(np.uint8).reshape(rows, width)
    if bits == 4:
        data = (data[:, 0::2] | (data[:, 1::2] << 4)).astype(np.uint8)
    return data, scales


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


def quantize_exported(
    plan, staging: Path, settings: QuantizeSettings, force: bool, table_graph: Path | None = None
):
    """Quantise an exported, verified float graph in place; check it against the float graph on the
    plan's verification inputs -> (files written, quality). `table_graph`: see `quantize_graph`."""
    import shutil

    from export.memory import release_freed_memory

    floats = staging / ".float"
    floats.mkdir(exist_ok=True)
    for path in staging.glob(plan.file + "*"):
        path.rename(floats / path.name)
    try:
        files = quantize_graph(floats / plan.file, staging / plan.file, settings, table_graph)
        release_freed_memory()  # the quantiser's copies of the float graph
        plan_cases = plan.cases()
        cases = [{n: t.numpy() for n, t in zip(plan.input_names, case, strict=True)} for case in plan_cases]
        rows = [plan.valid_rows(case) if plan.valid_rows is not None else None for case in plan_cases]
        quality = compare_graphs(floats / plan.file, staging / plan.file, cases, rows)
        check_quality(plan.name, quality, settings.bits, force)
    finally:
        shutil.rmtree(floats, ignore_errors=True)
    return files, quality
