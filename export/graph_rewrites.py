"""Small rewrites of an exported ONNX graph that let ONNX Runtime fuse what the exporter spelled out.

The dynamo exporter writes an RMSNorm's `x * rsqrt(mean(x²) + eps)` as Sqrt → Reciprocal → Mul;
ONNX Runtime's SimplifiedLayerNormalization fusion matches Sqrt → Div only, so the norm otherwise
runs as six separate kernels (2% of an int4 decode step on the 7B slice, docs/benchmarks.md).
"""

from __future__ import annotations

from collections import defaultdict

import onnx


def divide_by_square_roots(graph: onnx.GraphProto) -> int:
    """Rewrite every `Mul(a, Reciprocal(Sqrt(v)))` into `Div(a, Sqrt(v))` (the reciprocal dropped
    where nothing else reads it); returns how many reciprocals went. Same value up to rounding."""
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {out.name for out in graph.output}
    dropped = []
    for node in graph.node:
        if node.op_type != "Reciprocal" or node.domain not in ("", "ai.onnx"):
            continue
        source = producers.get(node.input[0])
        users = consumers[node.output[0]]
        if source is None or source.op_type != "Sqrt" or node.output[0] in graph_outputs or not users:
            continue
        if any(user.op_type != "Mul" or list(user.input).count(node.output[0]) != 1 for user in users):
            continue
        for user in users:
            other = next(name for name in user.input if name != node.output[0])
            user.op_type = "Div"
            del user.input[:]
            user.input.extend([other, node.input[0]])
        dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    return len(dropped)
