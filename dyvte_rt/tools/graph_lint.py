"""Reading a bundle's graphs for known hazards, without running them.

- fp16 soundness: softmax, normalisation and rotary embeddings must be computed in fp32, and no
  mask constant may overflow to -inf in fp16 (a fully masked row then turns into NaN).

Needs the `onnx` package (in the `export` extra), imported only here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dyvte_rt.errors import BackendUnavailableError

FP16_LIMIT = 65504.0  # the largest finite float16
# Ops a value passes through unchanged in precision, when tracing a rotary table to its use
_LAYOUT_OPS = {
    "Unsqueeze",
    "Squeeze",
    "Reshape",
    "Slice",
    "Expand",
    "Concat",
    "Transpose",
    "Gather",
    "Identity",
}


def load_graph(path: Path):
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError(
            "reading graphs needs the onnx package", hint="pip install onnx (or 'dyvte-rt[export]')"
        ) from None
    return onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))


def fp16_hazards(path: Path) -> list[str]:
    """What in `path` computes in fp16 that must not, as one line each (empty: sound)."""
    from onnx import TensorProto, numpy_helper

    model = load_graph(path)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    half = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    producers = {out: node for node in graph.node for out in node.output}
    exponents = {n.input[1] for n in graph.node if n.op_type == "Pow" and len(n.input) > 1}
    constants = {name: array for name, array in _constants(graph, numpy_helper, exponents)}
    found = []
    for node in graph.node:
        first = types.get(node.input[0]) if node.input else None
        if node.op_type == "Softmax" and first in half:
            found.append(f"{path.name}: {node.name or node.op_type} computes a softmax in fp16")
        if node.op_type == "Pow" and _is_cube(node, constants):
            continue  # tanh-GELU's x³ (Qwen3-VL's vision MLP): saturates to ±x in fp16, not a norm
        if node.op_type in ("ReduceMean", "Pow", "Sqrt") and first in half:
            found.append(f"{path.name}: {node.name or node.op_type} ({node.op_type}) normalises in fp16")
        if node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization") and first in half:
            stash = next((a.i for a in node.attribute if a.name == "stash_type"), 1)
            if stash != 1:
                found.append(
                    f"{path.name}: {node.name or node.op_type} normalises in fp16 (stash_type {stash})"
                )
        if node.op_type == "Cast" and _casts_to(node, half) and _from_rotary_table(node.input[0], producers):
            found.append(f"{path.name}: {node.name or 'a Cast'} applies the rotary embedding in fp16")
    for name, array in _constants(graph, numpy_helper):
        if array.size == 0 or array.dtype.kind != "f":
            continue
        if array.dtype.itemsize == 2 and (not np.isfinite(array).all() or float(array.min()) <= -FP16_LIMIT):
            low = float(np.nanmin(array))
            found.append(
                f"{path.name}: fp16 constant {name} holds {low:g}, which overflows in fp16 arithmetic"
            )
    return found


def _is_cube(node, constants: dict) -> bool:
    exponent = constants.get(node.input[1]) if len(node.input) > 1 else None
    return exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 3.0


def _casts_to(node, dtypes: Iterable[int]) -> bool:
    return any(a.name == "to" and a.i in dtypes for a in node.attribute)


def _from_rotary_table(name: str, producers: dict) -> bool:
    """Whether `name` is a Cos/Sin output, possibly reshaped or sliced on the way."""
    seen = set()
    while name in producers and name not in seen:
        seen.add(name)
        node = producers[name]
        if node.op_type in ("Cos", "Sin"):
            return True
        if node.op_type not in _LAYOUT_OPS or not node.input:
            return False
        name = node.input[0]
    return False


def _constants(graph, numpy_helper, names: set[str] | None = None):
    """(name, array) of the graph's constants held inline (only those in `names`, if given)."""
    for tensor in graph.initializer:
        if not tensor.external_data and (names is None or tensor.name in names):
            yield tensor.name, numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and (names is None or node.output[0] in names):
            for attribute in node.attribute:
                if attribute.name == "value":
                    yield node.output[0], numpy_helper.to_array(attribute.t)


# What ONNX Runtime runs and TensorRT's ONNX parser does not (or builds badly).
_TENSORRT_DTYPES = {"float32", "float16", "bfloat16", "int32", "int64", "int8", "uint8", "bool"}
_CONTROL_FLOW = {"If", "Loop", "Scan"}


def tensorrt_hazards(path: Path, input_dtypes: dict[str, str], fp16: bool) -> list[str]:
    """What in graph `path` keeps TensorRT from building it well, one line each (empty: ready)."""
    model = load_graph(path)
    graph = model.graph
    found = []
    custom = sorted({f"{n.domain}.{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        found.append(f"{path.name}: ONNX Runtime-only operators {', '.join(custom)}")
    control = sorted({n.op_type for n in graph.node if n.op_type in _CONTROL_FLOW})
    if control:
        found.append(
            f"{path.name}: control flow ({', '.join(control)}), which engines build poorly or not at all"
        )
    for name, dtype in input_dtypes.items():
        if dtype not in _TENSORRT_DTYPES:
            found.append(f"{path.name}: input {name} is {dtype}, which TensorRT does not take")
    for tensor in graph.initializer:
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is not None and not (path.parent / location).is_file():
            found.append(f"{path.name}: external data {location} is missing")
            break
    if fp16:
        found += fp16_hazards(path)
    return found
