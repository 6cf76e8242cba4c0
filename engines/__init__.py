"""Backends behind one session interface (STYLE.md); never imports torch or the runtime.

The runtime chooses a backend by device name through `BACKENDS`; each entry opens sessions for
that device. ONNX Runtime serves cpu and cuda.
"""

from __future__ import annotations

from engines.errors import BackendError
from engines.registry import BACKENDS, DEVICES, open_session
from engines.session import Session, SessionOptions

__all__ = ["BACKENDS", "DEVICES", "BackendError", "Session", "SessionOptions", "open_session"]
