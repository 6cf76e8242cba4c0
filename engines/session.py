"""The one session interface every backend implements.

The base class owns the lifecycle and the checks: I/O names are compared with what the caller
expects once, when the session opens, never on the decode hot path. Backends implement
`_open_impl`, `_io_names_impl`, `_run_impl` and `_close_impl`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.errors import BackendError


@dataclass(frozen=True)
class SessionOptions:
    device: str = "cpu"  # a key of engines.BACKENDS
    intra_op_threads: int = 0  # 0: the backend's default
    # Idle worker threads spin-wait between runs. Off by default: on a machine with few cores the
    # spinning workers take the CPU from the thread that prepares the next run, which halved decode
    # speed on a 2-core machine (docs/benchmarks.md).
    spin: bool = False
    optimization: str = "all"  # none | basic | extended | all


class Session(ABC):
    def __init__(
        self, path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...], options: SessionOptions
    ) -> None:
        self.path = Path(path)
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.options = options
        self._open_impl()
        self._check_io()
        self._closed = False

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph; `feeds` holds exactly the graph's inputs. Returns every output by name."""
        if self._closed:
            raise RuntimeError(f"session for {self.path.name} is closed")
        return dict(zip(self.outputs, self._run_impl(feeds), strict=True))

    def close(self) -> None:
        if not self._closed:
            self._close_impl()
            self._closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_io(self) -> None:
        actual_in, actual_out = self._io_names_impl()
        if tuple(actual_in) != self.inputs or tuple(actual_out) != self.outputs:
            raise BackendError(
                f"{self.path.name} does not have the inputs/outputs its manifest lists",
                hint="the bundle is damaged or was edited; re-export it",
            )

    @abstractmethod
    def _open_impl(self) -> None: ...

    @abstractmethod
    def _io_names_impl(self) -> tuple[list[str], list[str]]: ...

    @abstractmethod
    def _run_impl(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    @abstractmethod
    def _close_impl(self) -> None: ...
