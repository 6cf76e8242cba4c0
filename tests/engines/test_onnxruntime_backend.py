"""Packaging traps of ONNX Runtime are refused with one line that says what to run."""

import pytest

from engines.errors import BackendError
from engines.onnxruntime_backend import check_installation, installed_runtimes


def test_no_runtime_names_the_extras():
    with pytest.raises(BackendError, match="not installed") as refused:
        check_installation([])
    assert "dyvte-rt[cpu]" in str(refused.value) and refused.value.unavailable


def test_cpu_and_gpu_runtimes_side_by_side_are_refused():
    with pytest.raises(BackendError, match="shadows the GPU one") as refused:
        check_installation(["onnxruntime", "onnxruntime-gpu"])
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in str(refused.value)


def test_this_machine_has_exactly_the_cpu_runtime():
    assert installed_runtimes() == ["onnxruntime"]
    check_installation()
