"""Device buffers and copies through `cuda-bindings`: the memory a TensorRT backend hands from engine
to engine, without PyTorch or CuPy.

Only what the runtime needs: allocate, upload, download, device-to-device copies on one stream
(the exit switch, `engines.exit_copy`). Imported lazily: without cuda-bindings or a GPU every use
stops with one BackendError naming what to install.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engines.errors import BackendError
from engines.exit_copy import CopyRun


def cudart() -> Any:
    """The CUDA runtime module of cuda-bindings (12.x/13.x layout, or cuda-python's older one)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python before 12.6
        except ImportError:
            raise BackendError(
                "cuda-bindings is not installed",
                hint="pip install cuda-bindings (the driver's CUDA major: 'cuda-bindings<13' for 12)",
                unavailable=True,
            ) from None
    return runtime


def check(result: Any) -> Any:
    """Unwrap a cuda-bindings call's (error, value...) tuple, raising on an error."""
    runtime = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != runtime.cudaError_t.cudaSuccess:
        _, name = runtime.cudaGetErrorName(err)
        raise BackendError(f"CUDA call failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_name() -> str:
    runtime = cudart()
    count = check(runtime.cudaGetDeviceCount())
    if not count:
        raise BackendError("no CUDA device is visible", unavailable=True)
    props = check(runtime.cudaGetDeviceProperties(0))
    name = props.name
    return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")


class Stream:
    def __init__(self) -> None:
        self.handle = check(cudart().cudaStreamCreate())

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle))

    def close(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle))
            self.handle = None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc); freed by `close` or the `with` block."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr: int | None = int(check(cudart().cudaMalloc(self.nbytes)))

    @classmethod
    def from_array(cls, array: np.ndarray, stream: Stream) -> DeviceBuffer:
        buffer = cls(array.nbytes)
        buffer.upload(array, stream)
        return buffer

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        array = np.ascontiguousarray(array)
        self._fits(array.nbytes)
        kind = cudart().cudaMemcpyKind.cudaMemcpyHostToDevice
        check(cudart().cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes, kind, stream.handle))
        stream.synchronize()  # the host array may go away once this returns

    def download(self, shape: tuple[int, ...], dtype: np.dtype, stream: Stream) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        self._fits(out.nbytes)
        kind = cudart().cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(cudart().cudaMemcpyAsync(out.ctypes.data, self.ptr, out.nbytes, kind, stream.handle))
        stream.synchronize()
        return out

    def close(self) -> None:
        if self.ptr is not None:
            check(cudart().cudaFree(self.ptr))
            self.ptr = None

    def _fits(self, nbytes: int) -> None:
        if self.ptr is None:
            raise BackendError("the device buffer was already freed")
        if nbytes > self.nbytes:
            raise BackendError(f"{nbytes} bytes do not fit a device buffer of {self.nbytes}")

    def __enter__(self) -> DeviceBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_runs(
    plan: list[CopyRun], source: DeviceBuffer, target: DeviceBuffer, row_bytes: int, stream: Stream
) -> None:
    """Enqueue the exit switch's copies on `stream` (device to device; returns before they finish)."""
    runtime = cudart()
    kind = runtime.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    for run in plan:
        src, dst, nbytes = run.byte_range(row_bytes)
        if src + nbytes > source.nbytes or dst + nbytes > target.nbytes:
            raise BackendError("an exit copy runs past the end of its buffer")
        check(runtime.cudaMemcpyAsync(target.ptr + dst, source.ptr + src, nbytes, kind, stream.handle))
