"""Which backend serves which device: the one place the runtime's `--device` is resolved."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engines.errors import BackendError
from engines.session import Session, SessionOptions


def _onnxruntime(path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...], options: SessionOptions):
    from engines.onnxruntime_backend import OrtSession

    return OrtSession(path, inputs, outputs, options)


# device -> session factory(path, input names, output names, options)
BACKENDS: dict[str, Callable[..., Session]] = {
    "cpu": _onnxruntime,
    "cuda": _onnxruntime,
    "ort-tensorrt": _onnxruntime,  # ONNX Runtime's TensorRT execution provider
}
DEVICES = tuple(BACKENDS)


def open_session(
    path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...], options: SessionOptions
) -> Session:
    """Open one graph for `options.device`; its I/O names are checked against `inputs`/`outputs`."""
    try:
        factory = BACKENDS[options.device]
    except KeyError:
        raise BackendError(
            f"unknown device {options.device!r}", hint=f"choose one of {', '.join(BACKENDS)}"
        ) from None
    return factory(Path(path), tuple(inputs), tuple(outputs), options)
