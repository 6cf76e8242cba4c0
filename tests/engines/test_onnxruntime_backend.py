"""Packaging traps of ONNX Runtime are refused with one line that says what to run; row views of
backend buffers share their memory on the CPU as they would on a GPU (bound by address)."""

import numpy as np
import pytest

from engines import SessionOptions, open_backend
from engines.errors import BackendError
from engines.onnxruntime_backend import RowView, check_installation, installed_runtimes


def test_no_runtime_names_the_extras():
    with pytest.raises(BackendError, match="not installed") as refused:
        check_installation([])
    assert "dyvte-rt[cpu]" in str(refused.value) and refused.value.unavailable


def test_cpu_and_gpu_runtimes_side_by_side_are_refused():
    with pytest.raises(BackendError, match="shadows the GPU one") as refused:
        check_installation(["onnxruntime", "onnxruntime-gpu"])
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in str(refused.value)


def test_this_machine_has_exactly_one_runtime():
    assert len(installed_runtimes()) == 1 and installed_runtimes()[0] in ("onnxruntime", "onnxruntime-gpu")
    check_installation()


def test_row_views_share_the_buffers_memory():
    backend = open_backend(SessionOptions())
    whole = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)
    value = backend.upload(whole)
    rows = backend.view_rows(value, 1, 3)
    assert isinstance(rows, RowView) and rows.shape == (2, 2, 3)
    assert (backend.download(rows) == whole[1:3]).all()
    inner = backend.view_rows(rows, 1, 2)  # a view of a view
    assert (backend.download(inner) == whole[2:3]).all()
    value.numpy()[2] = -1  # ONNX Runtime's CPU memory, seen through the view
    assert (backend.download(inner) == -1).all()
    with pytest.raises(BackendError, match="outside"):
        backend.view_rows(value, 3, 5)
