"""Small rewrites of an exported ONNX graph that let ONNX Runtime fuse what the exporter spelled out.

The dynamo exporter writes an RMSNorm's `x * rsqrt(mean(x²) + eps)` as Sqrt → Reciprocal → Mul;
ONNX Runtime's SimplifiedLayerNormalization fusion matches Sqrt → Div only, so the norm otherwise
runs as six separate kernels (2% of an int4 decode step on the 7B slice, docs/benchmarks.md).

The rewrite works on the exporter's own in-memory model (`onnx_ir`), before it is saved: a 7B
segment's weights are never read back, parsed and written again to change a few nodes.
"""

from __future__ import annotations

import onnx_ir as ir


def divide_by_square_roots(graph: ir.Graph) -> int:
    """Rewrite every `Mul(a, Reciprocal(Sqrt(v)))` into `Div(a, Sqrt(v))` (the reciprocal dropped
    where nothing else reads it); returns how many reciprocals went. Same value up to rounding."""
    outputs = set(graph.outputs)
    dropped = []
    for node in graph:
        if node.op_type != "Reciprocal" or node.domain not in ("", "ai.onnx"):
            continue
        root, inverse = node.inputs[0], node.outputs[0]
        source = root.producer() if root is not None else None
        users = [use.node for use in inverse.uses()]
        if source is None or source.op_type != "Sqrt" or inverse in outputs or not users:
            continue
        if any(user.op_type != "Mul" or sum(v is inverse for v in user.inputs) != 1 for user in users):
            continue
        for user in set(users):
            other = next(value for value in user.inputs if value is not inverse)
            user.op_type = "Div"
            user.replace_input_with(0, other)
            user.replace_input_with(1, root)
        dropped.append(node)
    for node in dropped:
        graph.remove(node, safe=True)
    return len(dropped)
