"""Importing TensorRT, or one line that says what to install."""

from __future__ import annotations

from typing import Any

from engines.errors import BackendError

INSTALL_HINT = (
    "on Jetson: TensorRT comes with JetPack (sudo apt install nvidia-tensorrt); on a desktop GPU: "
    "pip install tensorrt (NVIDIA's index) — and cuda-bindings"
)


def tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError("TensorRT is not installed", hint=INSTALL_HINT, unavailable=True) from None
    return trt


def version_tuple(version: str) -> tuple[int, int]:
    """'10.3.0.26' -> (10, 3): engines are portable within neither, so both are checked."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise BackendError(f"cannot read the TensorRT version {version!r}") from None
