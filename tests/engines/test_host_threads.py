"""engines/host_threads.py: the threads a graph's session starts, and the thread that runs it,
at the lowest CPU priority, and no other thread (Linux, where the server relies on it)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engines import host_threads

pytestmark = pytest.mark.skipif(not host_threads.supported(), reason="per-thread priorities are Linux's")


def _own_nice() -> int:
    return host_threads.nice_of(threading.get_native_id())


def _parked_thread() -> tuple[threading.Thread, threading.Event, list[int]]:
    release, ids = threading.Event(), []
    thread = threading.Thread(target=lambda: (ids.append(threading.get_native_id()), release.wait()))
    thread.start()
    while not ids:
        pass
    return thread, release, ids


def test_threads_started_in_the_block_are_lowered_and_no_other_is():
    main = _own_nice()
    before, release_before, before_id = _parked_thread()
    with host_threads.threads_started_at_low_priority():
        inside, release_inside, inside_id = _parked_thread()
    try:
        assert host_threads.nice_of(inside_id[0]) == host_threads.LOWEST
        assert host_threads.nice_of(before_id[0]) == main
        assert _own_nice() == main
    finally:
        for release, thread in ((release_before, before), (release_inside, inside)):
            release.set()
            thread.join()


def test_a_pool_thread_lowers_itself_and_the_caller_keeps_its_priority():
    main = _own_nice()
    with ThreadPoolExecutor(1, initializer=host_threads.lower_current_thread_priority) as pool:
        assert pool.submit(_own_nice).result() == host_threads.LOWEST
    assert _own_nice() == main


def test_an_onnx_runtime_session_opened_in_the_block_has_its_workers_lowered(tmp_path):
    """ONNX Runtime starts a session's intra-op workers when the session opens: those opened in
    the block run low, another session's keep the process's priority, and both compute the same."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "x"], ["y"])],
        "square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])],
    )
    path = tmp_path / "square.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 3

    def opened() -> tuple[ort.InferenceSession, set[int]]:
        before = host_threads.thread_ids()
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return session, host_threads.thread_ids() - before

    with host_threads.threads_started_at_low_priority():
        low, low_workers = opened()
    normal, normal_workers = opened()
    assert len(low_workers) == 2 and len(normal_workers) == 2  # the caller is the third thread
    assert {host_threads.nice_of(t) for t in low_workers} == {host_threads.LOWEST}
    assert {host_threads.nice_of(t) for t in normal_workers} == {_own_nice()}
    x = np.random.default_rng(0).standard_normal((64, 64), dtype=np.float32)
    assert np.array_equal(low.run(None, {"x": x})[0], normal.run(None, {"x": x})[0])
