"""Which backend serves which device: the one place the runtime's `--device` is resolved."""

from __future__ import annotations

from collections.abc import Callable

from engines.errors import BackendError
from engines.session import Backend, SessionOptions


def _onnxruntime(options: SessionOptions) -> Backend:
    from engines.onnxruntime_backend import OrtBackend

    return OrtBackend(options)


def _tensorrt(options: SessionOptions) -> Backend:
    from engines.tensorrt.backend import TensorRTBackend

    return TensorRTBackend(options)


# device -> backend factory
BACKENDS: dict[str, Callable[[SessionOptions], Backend]] = {
    "cpu": _onnxruntime,
    "cuda": _onnxruntime,
    "tensorrt": _tensorrt,  # engines built by `dyvte-rt build-engines`, on device buffers
    "ort-tensorrt": _onnxruntime,  # ONNX Runtime's TensorRT execution provider
}
DEVICES = tuple(BACKENDS)


def open_backend(options: SessionOptions) -> Backend:
    """The backend for `options.device`; a missing runtime or provider is one BackendError."""
    try:
        factory = BACKENDS[options.device]
    except KeyError:
        raise BackendError(
            f"unknown device {options.device!r}", hint=f"choose one of {', '.join(BACKENDS)}"
        ) from None
    return factory(options)
