"""The interface every backend implements: a `Backend` owns a device's memory, `Session`s run graphs.

Values stay where the backend keeps them (ONNX Runtime: `OrtValue`s on the CPU or a GPU; TensorRT:
device buffers): a session takes backend values in and hands backend values out, so a runtime
can chain graphs without touching host memory. Host numpy arrays cross only through `upload` and
`download`, which count the bytes they move — the one number that says whether a loop is
device-resident.

The base classes own the lifecycle and the checks: I/O names are compared with what the caller
expects once, when a session opens, never on the decode hot path. Backends implement the small
`_*_impl` hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import BackendError

Value = Any  # a backend's own tensor type (onnxruntime.OrtValue, a device buffer, ...)


@dataclass(frozen=True)
class SessionOptions:
    device: str = "cpu"  # a key of engines.BACKENDS
    intra_op_threads: int = 0  # 0: the backend's default
    # Idle worker threads spin-wait between runs. Off by default: on a machine with few cores the
    # spinning workers take the CPU from the thread that prepares the next run, which halved decode
    # speed on a 2-core machine (docs/benchmarks.md).
    spin: bool = False
    # ONNX Runtime's CPU memory arena keeps the largest activations a run ever needed (a prefill's)
    # for the session's life. Off by default: on the 7B slice it held 0.2 x the weights after one
    # request; without it prefill took 4% longer and decoding no longer (docs/benchmarks.md).
    memory_arena: bool = False
    # Keep the host's resident memory near the bundle's bytes (engines/host_memory.py: freed heap
    # pages returned after loading, each prefill and each request; clean weight pages dropped after
    # loading). glibc on Linux only.
    lean_host_memory: bool = True
    optimization: str = "all"  # none | basic | extended | all
    # A file prefix: ONNX Runtime writes each graph's run op by op (benchmarks/decode_profile.py
    # --ops); empty: off. Other backends ignore it.
    profile: str = ""


@dataclass
class Transfers:
    """Bytes that crossed between host and backend memory, and how often."""

    to_backend: int = 0
    to_host: int = 0
    uploads: int = 0
    downloads: int = 0

    @property
    def total(self) -> int:
        return self.to_backend + self.to_host

    def snapshot(self) -> Transfers:
        return Transfers(self.to_backend, self.to_host, self.uploads, self.downloads)

    def since(self, earlier: Transfers) -> Transfers:
        return Transfers(
            self.to_backend - earlier.to_backend,
            self.to_host - earlier.to_host,
            self.uploads - earlier.uploads,
            self.downloads - earlier.downloads,
        )


class Session(ABC):
    """One graph on one backend."""

    def __init__(
        self, backend: Backend, path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...]
    ) -> None:
        self.backend = backend
        self.path = Path(path)
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._closed = True
        self._open_impl()
        self._closed = False
        self._check_io()

    def run(
        self, feeds: Mapping[str, Value | np.ndarray], into: Mapping[str, Value] | None = None
    ) -> dict[str, Value]:
        """Run the graph on `feeds` (every input, by name; numpy arrays are uploaded and counted).

        `into` binds outputs to existing values the graph writes (an in-place KV buffer); other
        outputs are allocated by the backend. Returns every output by name, as backend values.
        """
        if self._closed:
            raise BackendError(f"session for {self.path.name} is closed")
        values = {
            name: self.backend.upload(value) if isinstance(value, np.ndarray) else value
            for name, value in feeds.items()
        }
        try:
            outputs = self._run_impl(values, into or {})
        except BackendError:
            raise
        except Exception as err:  # a backend's own failure (out of memory, a kernel error)
            raise BackendError(f"{self.path.name} failed: {str(err).strip().splitlines()[0][:300]}") from err
        return dict(zip(self.outputs, outputs, strict=True))

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
    def _run_impl(self, feeds: dict[str, Value], into: Mapping[str, Value]) -> list[Value]: ...

    @abstractmethod
    def _close_impl(self) -> None: ...


class Backend(ABC):
    """A device's memory and the sessions that run on it; counts every host transfer."""

    def __init__(self, options: SessionOptions) -> None:
        self.options = options
        self.transfers = Transfers()

    def open(self, path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Session:
        return self._session_class()(self, path, inputs, outputs)

    def upload(self, array: np.ndarray) -> Value:
        """Host array -> backend value (a copy on a GPU; counted either way)."""
        array = np.ascontiguousarray(array)
        self.transfers.to_backend += array.nbytes
        self.transfers.uploads += 1
        return self._upload_impl(array)

    def download(self, value: Value) -> np.ndarray:
        """Backend value -> a host array of its own (counted)."""
        array = self._download_impl(value)
        self.transfers.to_host += array.nbytes
        self.transfers.downloads += 1
        return array

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Value:
        """Uninitialised backend memory (a KV buffer); nothing crosses from the host."""
        return self._empty_impl(tuple(int(d) for d in shape), np.dtype(dtype))

    def view_rows(self, value: Value, start: int, stop: int) -> Value:
        """Rows start..stop of `value`'s first axis, sharing its memory (a batch slot)."""
        return self._view_rows_impl(value, start, stop)

    def _view_rows_impl(self, value: Value, start: int, stop: int) -> Value:
        raise BackendError(
            f"the {type(self).__name__} backend cannot view part of a buffer",
            hint="serve batches on the CPU backend",
            unavailable=True,
        )

    @abstractmethod
    def _session_class(self) -> type[Session]: ...

    @abstractmethod
    def _upload_impl(self, array: np.ndarray) -> Value: ...

    @abstractmethod
    def _download_impl(self, value: Value) -> np.ndarray: ...

    @abstractmethod
    def _empty_impl(self, shape: tuple[int, ...], dtype: np.dtype) -> Value: ...
