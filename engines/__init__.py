"""Backends behind one session interface (STYLE.md); never imports torch.

`open_session` picks the backend for a device. ONNX Runtime serves cpu, cuda and tensorrt (its
TensorRT execution provider).
"""

from __future__ import annotations

from pathlib import Path

from dyvte_rt.manifest import GraphInfo
from engines.session import Session, SessionOptions

DEVICES = ("cpu", "cuda", "tensorrt")


def open_session(path: Path, graph: GraphInfo, options: SessionOptions) -> Session:
    from engines.onnxruntime_backend import OrtSession

    return OrtSession(path, graph, options)


__all__ = ["DEVICES", "Session", "SessionOptions", "open_session"]
