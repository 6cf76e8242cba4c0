"""The machine's own limits, measured where a benchmark runs: memory bandwidth and matmul throughput.

A decode step must at least read every weight (and the KV cache) once, so bytes / bandwidth is a
lower bound on its time; a prefill must at least do its multiply-adds, so FLOPs / peak throughput is
one on prefill. Both are measured, not taken from a data sheet, because a shared machine has the
bandwidth it has today.
"""

from __future__ import annotations

import time

import numpy as np


def memory_bandwidth_gb_per_s(megabytes: int = 1024, threads: int = 2, repeats: int = 5) -> dict[str, float]:
    """GB/s, best of `repeats`: `read` streams a `megabytes` weight matrix through a one-token
    MatMul in ONNX Runtime with `threads` threads (a decode step's access pattern, the bound every
    system here is held to); `copy` is a numpy array copy (bytes read + bytes written)."""
    session = _matmul_session(4096, megabytes * 2**20 // (4 * 4096), threads)
    x = np.ones((1, 4096), dtype=np.float32)
    session.run(None, {"x": x})
    best_read = min(_timed(lambda: session.run(None, {"x": x})) for _ in range(repeats))
    source = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)  # touch both once
    best_copy = min(_timed(lambda: np.copyto(target, source)) for _ in range(repeats))
    return {"read": megabytes * 2**20 / best_read / 1e9, "copy": 2 * source.nbytes / best_copy / 1e9}


def matmul_gflop_per_s(size: int = 4096, tokens: int = 512, threads: int = 2, repeats: int = 3) -> float:
    """A [tokens, size] x [size, size] fp32 MatMul through ONNX Runtime (CPU), best of `repeats`."""
    session = _matmul_session(size, size, threads)
    x = np.random.default_rng(1).standard_normal((tokens, size), dtype=np.float32)
    session.run(None, {"x": x})
    best = min(_timed(lambda: session.run(None, {"x": x})) for _ in range(repeats))
    return 2 * tokens * size * size / best / 1e9


def _matmul_session(rows: int, columns: int, threads: int):
    """An ONNX Runtime session computing x @ W for a constant W [rows, columns] of ones."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((rows, columns), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", columns])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started
