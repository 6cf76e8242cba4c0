"""export.graph_rewrites: RMSNorms ONNX Runtime can fuse, with the same outputs."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.graph_rewrites import divide_by_square_roots as rewrite_ir


def divide_by_square_roots(model: onnx.ModelProto) -> int:
    """The rewrite on `model` through the exporter's in-memory form (onnx_ir), as export applies it."""
    import onnx_ir as ir

    graph = ir.serde.deserialize_model(model)
    count = rewrite_ir(graph.graph)
    model.CopyFrom(ir.serde.serialize_model(graph))
    return count


def _rms_norm_graph(extra_reader: bool = False) -> onnx.ModelProto:
    """x * rsqrt(mean(x²) + eps) * w, as the dynamo exporter writes it (Sqrt → Reciprocal → Mul)."""
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["normed"]),
        helper.make_node("Mul", ["normed", "w"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 16])]
    if extra_reader:  # a second reader that is not a Mul keeps the reciprocal
        nodes.append(helper.make_node("Neg", ["inv"], ["neg"]))
        outputs.append(helper.make_tensor_value_info("neg", TensorProto.FLOAT, [2, 5, 1]))
    initializers = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array(np.random.default_rng(0).normal(size=16).astype(np.float32), "w"),
    ]
    graph = helper.make_graph(
        nodes,
        "rms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
        outputs,
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run_and_optimised_ops(model: onnx.ModelProto, tmp_path, name: str) -> tuple[list, Counter]:
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32)
    outputs = session.run(None, {"x": x})
    optimised = onnx.load(str(tmp_path / f"{name}.opt.onnx"))
    return outputs, Counter(node.op_type for node in optimised.graph.node)


def test_an_exported_rms_norm_becomes_one_fused_kernel_with_the_same_output(tmp_path):
    model = _rms_norm_graph()
    before, ops_before = _run_and_optimised_ops(model, tmp_path, "before")
    assert divide_by_square_roots(model) == 1
    assert "Reciprocal" not in {node.op_type for node in model.graph.node}
    after, ops_after = _run_and_optimised_ops(model, tmp_path, "after")
    assert "SimplifiedLayerNormalization" not in ops_before  # ONNX Runtime cannot fuse the exported form
    assert ops_after["SimplifiedLayerNormalization"] == 1 and "Sqrt" not in ops_after
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-6)


def test_a_reciprocal_something_else_reads_stays():
    model = _rms_norm_graph(extra_reader=True)
    assert divide_by_square_roots(model) == 0
    assert Counter(node.op_type for node in model.graph.node)["Reciprocal"] == 1


def test_the_exported_demo_segments_fuse_their_norms(demo_bundle, tmp_path):
    """The exporter applies the rewrite: ONNX Runtime fuses every decoder norm of a real export."""
    segment = onnx.load(str(demo_bundle / "segment_00.onnx"))
    assert "Reciprocal" not in {node.op_type for node in segment.graph.node}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "segment.opt.onnx")
    ort.InferenceSession(str(demo_bundle / "segment_00.onnx"), options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "segment.opt.onnx")).graph.node)
    fused = ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"]
    assert fused >= 2 and "Sqrt" not in ops  # input and post-attention norms of its layer(s)
