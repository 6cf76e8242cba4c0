"""One table for a tied embedding and LM head (checkpoints that tie them: Qwen2-VL-2B,
InternVL3-1B/2B, Qwen2.5-VL-3B, ...): the head graph reads the embed graph's table from the embed
graph's external data file instead of holding a copy.

Quantised: the embed graph reads the table with `GatherBlockQuantized`: [vocab, hidden] in
symmetric blocks along each row, the values offset by the default zero point, two 4-bit values a
byte, the lower nibble first (`export.quantize.block_quantize_rows`). `MatMulNBits` reads its weight
B as [N, K] in exactly that layout when N = vocab and K = hidden — the LM head's weight is the same
table. So a tied head's `MatMulNBits` points its B and scales at the embed graph's bytes.

Float: the head multiplies by `Transpose(table)`, the table read from the same file.

Sharing is decided by the bytes, not by the config: the head's weight is used from the table only
if it equals the table exactly (quantised: every byte it quantises to). A checkpoint that merely
claims to tie them keeps a head of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.staging import graph_files


@dataclass(frozen=True)
class StoredTable:
    """Where the embed graph keeps its quantised table: for its data and its scales the external
    data entries (location, offset, length) and the arrays."""

    bits: int
    block_size: int
    data: np.ndarray  # uint8 [vocab, hidden * bits / 8]
    scales: np.ndarray  # [vocab, hidden / block]
    data_location: dict[str, str]
    scales_location: dict[str, str]


def table_tensor_names(model) -> tuple[str, str] | None:
    """The (data, scales) initializers of the graph's GatherBlockQuantized table, if it has one."""
    for node in model.graph.node:
        if node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft":
            return node.input[0], node.input[2]
    return None


def store_table_externally(model, location: str) -> None:
    """Mark the table's data and scales to be written to external data `location` whatever their
    size, so that another graph can read them there (onnx.save writes marked tensors)."""
    from onnx.external_data_helper import set_external_data

    names = table_tensor_names(model)
    if names is None:
        return
    for tensor in model.graph.initializer:
        if tensor.name in names:
            set_external_data(tensor, location)


def read_stored_table(embed_path: Path) -> StoredTable | None:
    """The quantised table of an embed graph written with `store_table_externally`, or None when
    the graph has no quantised table kept in external data."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(embed_path), load_external_data=False)
    names = table_tensor_names(model)
    if names is None:
        return None
    node = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    tensors = {t.name: t for t in model.graph.initializer if t.name in names}
    if any(t.data_location != onnx.TensorProto.EXTERNAL for t in tensors.values()):
        return None
    arrays = {
        name: numpy_helper.to_array(tensor, base_dir=str(embed_path.parent))
        for name, tensor in tensors.items()
    }
    data, scales = names
    return StoredTable(
        bits=int(attrs.get("bits", 4)),
        block_size=int(attrs["block_size"]),
        data=arrays[data],
        scales=arrays[scales],
        data_location={e.key: e.value for e in tensors[data].external_data},
        scales_location={e.key: e.value for e in tensors[scales].external_data},
    )


def tied_head_matmul(model, table: StoredTable) -> tuple[str, np.ndarray] | None:
    """The graph's MatMul whose constant weight is the stored table, transposed ([hidden, vocab]):
    (node name, weight). None when no MatMul has a weight of that shape. A nameless node is named
    here (the quantiser leaves nodes out by name)."""
    from onnx import numpy_helper

    vocab, hidden = table.scales.shape[0], table.scales.shape[1] * table.block_size
    found = matmul_with_weight(model, (hidden, vocab))
    if found is None:
        return None
    node, weight = found
    node.name = node.name or f"lm_head_matmul_{list(model.graph.node).index(node)}"
    return node.name, numpy_helper.to_array(weight)


def matmul_with_weight(model, shape: tuple[int, ...]):
    """The graph's first MatMul whose second input is a constant of `shape` (the LM head's, when
    `shape` is [hidden, vocab]): (node, weight initializer), or None."""
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        weight = constants.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and tuple(weight.dims) == tuple(shape):
            return node, weight
    return None


def same_table(weight: np.ndarray, table: StoredTable) -> bool:
    """Whether `weight` [hidden, vocab] quantises to exactly the stored table's bytes."""
    from export.quantize import block_quantize_rows

    data, scales = block_quantize_rows(np.ascontiguousarray(weight.T), table.bits, table.block_size)
    return np.array_equal(data, table.data) and np.array_equal(
        scales.astype(table.scales.dtype), table.scales
    )


def point_matmul_at_table(model, node_name: str, table: StoredTable, accuracy_level: int) -> None:
    """Replace MatMul `node_name` (weight [hidden, vocab]) by a MatMulNBits whose B and scales are
    the stored table's bytes in the embed graph's external data file; the float weight goes."""
    import onnx
    from onnx import helper

    vocab, blocks = table.scales.shape
    hidden = blocks * table.block_size
    node = next(n for n in model.graph.node if n.name == node_name)
    base = node.input[1]
    shapes = {
        f"{base}_shared_q{table.bits}": (
            onnx.TensorProto.UINT8,
            [vocab, blocks, table.block_size * table.bits // 8],
            table.data_location,
        ),
        f"{base}_shared_scales": (
            helper.np_dtype_to_tensor_dtype(table.scales.dtype),
            [vocab * blocks],
            table.scales_location,
        ),
    }
    for name, (dtype, dims, location) in shapes.items():
        tensor = onnx.TensorProto(name=name, data_type=dtype, dims=dims)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key in ("location", "offset", "length"):
            if key in location:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, location[key]
        model.graph.initializer.append(tensor)
    replacement = helper.make_node(
        "MatMulNBits",
        [node.input[0], *shapes],
        list(node.output),
        name=node.name + "_shared_table",
        domain="com.microsoft",
        K=hidden,
        N=vocab,
        bits=table.bits,
        block_size=table.block_size,
        accuracy_level=accuracy_level,
    )
    position = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    model.graph.node.insert(position, replacement)
    if not any(base in n.input for n in model.graph.node):  # nothing else reads the float weight
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == base))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def shared_files(model, graph_file: str) -> list[str]:
    """Files of other graphs that the graph `graph_file` (its loaded model, external data not read)
    reads through external data (a tied head: the embed graph's data file)."""
    import onnx

    own = graph_file + ".data"
    found = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location and location != own:
                found.add(location)
    return sorted(found)


# -- float bundles: the head multiplies by the table, transposed ----------------------------------


def gather_table_name(model) -> str | None:
    """The float embedding table the graph's Gather reads, if any."""
    from export.quantize import embedding_gathers

    found = embedding_gathers(model)
    return found[0][1].name if found else None


def store_float_table_externally(embed_path: Path) -> list[str]:
    """Re-save a float embed graph with its table in external data `<graph>.data` (where another
    graph can read it), whatever its size; returns the graph's files."""
    import onnx
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(embed_path))  # every weight in memory: all are written again below
    name = gather_table_name(model)
    data = embed_path.with_name(embed_path.name + ".data")
    if name is None:
        return graph_files(embed_path)
    for tensor in model.graph.initializer:
        if tensor.name == name or len(tensor.raw_data) > 1024:  # the table, and what was external before
            set_external_data(tensor, data.name)
    mode = embed_path.stat().st_mode & 0o777
    data.unlink(missing_ok=True)  # every external tensor is written afresh
    onnx.save(model, str(embed_path))
    data.chmod(mode)
    return graph_files(embed_path)


def share_float_table(head_path: Path, embed_path: Path) -> bool:
    """Point a float head's LM-head MatMul at the embed graph's table: MatMul(x, Transpose(table))
    with the table read from the embed graph's external data. Only where the head's weight is
    exactly the table, transposed; returns whether it was shared."""
    import onnx
    from onnx import helper, numpy_helper

    embed = onnx.load(str(embed_path), load_external_data=False)
    name = gather_table_name(embed)
    stored = next((t for t in embed.graph.initializer if t.name == name), None)
    if stored is None or stored.data_location != onnx.TensorProto.EXTERNAL:
        return False
    table = numpy_helper.to_array(stored, base_dir=str(embed_path.parent))
    head = onnx.load(str(head_path))
    found = matmul_with_weight(head, table.shape[::-1])
    if found is None or not np.array_equal(numpy_helper.to_array(found[1]).T, table):
        return False
    node, weight = found
    shared = onnx.TensorProto(
        name=f"{weight.name}_shared_table", data_type=stored.data_type, dims=stored.dims
    )
    shared.data_location = onnx.TensorProto.EXTERNAL
    shared.external_data.extend(stored.external_data)
    transposed = f"{weight.name}_shared_table_t"
    position = list(head.graph.node).index(node)
    head.graph.node.insert(
        position,
        helper.make_node("Transpose", [shared.name], [transposed], name=f"{node.name}_table_t", perm=[1, 0]),
    )
    node.input[1] = transposed
    head.graph.initializer.remove(weight)
    head.graph.initializer.append(shared)
    onnx.save(head, str(head_path))  # loaded whole, its other weights are written inline
    head_path.with_name(head_path.name + ".data").unlink(missing_ok=True)
    return True
