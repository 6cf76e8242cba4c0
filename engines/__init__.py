"""Backends behind one interface (docs/design.md); never imports torch or the runtime.

The runtime chooses a backend by device name through `BACKENDS` (`open_backend`); a backend opens
sessions for graphs and owns the device memory their values live in.
"""

from __future__ import annotations

from engines.errors import BackendError
from engines.registry import BACKENDS, DEVICES, open_backend
from engines.session import Backend, Session, SessionOptions, Transfers, Value

__all__ = [
    "BACKENDS",
    "DEVICES",
    "Backend",
    "BackendError",
    "Session",
    "SessionOptions",
    "Transfers",
    "Value",
    "open_backend",
]
