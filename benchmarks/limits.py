"""The machine's own limits, measured where a benchmark runs: memory bandwidth and matmul throughput.

A decode step must at least read every weight (and the KV cache) once, so bytes / bandwidth is a
lower bound on its time; a prefill must at least do its multiply-adds, so FLOPs / peak throughput is
one on prefill. Both are measured, not taken from a data sheet, because a shared machine has the
bandwidth it has today.
"""

from __future__ import annotations

import time

import numpy as np


def memory_bandwidth_gb_per_s(megabytes: int = 1024, repeats: int = 5) -> dict[str, float]:
    """GB/s, best of `repeats` over a `megabytes` array: `read` (a BLAS dot product streams it
    once, the access pattern of a decode step reading its weights) and `copy` (read + written)."""
    source = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)  # touch both once
    best_copy = best_read = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best_copy = min(best_copy, time.perf_counter() - started)
        started = time.perf_counter()
        np.dot(source, source)
        best_read = min(best_read, time.perf_counter() - started)
    return {"read": source.nbytes / best_read / 1e9, "copy": 2 * source.nbytes / best_copy / 1e9}


def matmul_gflop_per_s(size: int = 4096, tokens: int = 512, threads: int = 2, repeats: int = 3) -> float:
    """A [tokens, size] x [size, size] fp32 MatMul through ONNX Runtime (CPU), best of `repeats`."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", size])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((tokens, size), dtype=np.float32)
    session.run(None, {"x": x})
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - started)
    return 2 * tokens * size * size / best / 1e9
