"""Packaging traps of ONNX Runtime are refused with one line that says what to run; row views of
backend buffers share their memory on the CPU as they would on a GPU (bound by address)."""

from pathlib import Path

import numpy as np
import pytest

from engines import SessionOptions, open_backend
from engines.errors import BackendError
from engines.onnxruntime_backend import RowView, check_installation, installed_runtimes


def test_no_runtime_names_the_extras():
    with pytest.raises(BackendError, match="not installed") as refused:
        check_installation({})
    assert "dyvte-rt[cpu]" in str(refused.value) and refused.value.unavailable


def test_cpu_and_gpu_runtimes_in_one_folder_are_refused():
    site = Path("/venv/site-packages")
    with pytest.raises(BackendError, match="shadows the GPU one") as refused:
        check_installation({"onnxruntime": site, "onnxruntime-gpu": site})
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in str(refused.value)


def test_this_machine_has_exactly_one_runtime():
    assert list(installed_runtimes()) in (["onnxruntime"], ["onnxruntime-gpu"]), installed_runtimes()
    check_installation()


def test_a_gpu_build_laid_over_the_cpu_one_from_another_folder_is_accepted(tmp_path, monkeypatch):
    """The GPU machine's set-up: its CPU onnxruntime stays, onnxruntime-gpu is unpacked into a folder
    put first on PYTHONPATH. Both are found, in different folders, and nothing overwrote anything."""
    info = tmp_path / "onnxruntime_gpu-1.31.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = installed_runtimes()
    assert found["onnxruntime-gpu"] == tmp_path.resolve() and found["onnxruntime"] != tmp_path.resolve()
    check_installation()
    # the same two in one folder (pip installed the second over the first) stay refused
    with pytest.raises(BackendError, match="shadows"):
        check_installation(dict.fromkeys(found, tmp_path))


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
