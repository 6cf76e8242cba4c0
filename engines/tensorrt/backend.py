"""TensorRT engines behind the `engines.Session` interface, on device buffers (`--device tensorrt`).

One engine per bundle graph (`tensorrt/<graph>.engine`, built by `dyvte-rt build-engines`); one
execution context per optimisation profile, all sharing one scratch allocation (only one runs at a
time, on the backend's one CUDA stream); a run picks the first profile whose ranges hold the
inputs' shapes. Values are `DeviceTensor`s: a device buffer with a shape and a dtype. A
segment's present keys and values go to the two buffers per layer it alternates between
(`buffers.AlternatingBuffers`), sized once for the largest context its profiles allow.

Written against TensorRT 10.x/11.x's Python API and never run: no machine this project is built on
has TensorRT (docs/tensorrt.md). What surrounds it — profiles, buffers, the engine record, the exit copy
on device buffers — is tested, the last on a real GPU by scripts/gpu_check.sh.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from engines.cuda_memory import DeviceBuffer, Stream
from engines.errors import BackendError
from engines.session import Backend, Session, SessionOptions, Value
from engines.tensorrt.buffers import AlternatingBuffers
from engines.tensorrt.builder import device_identity
from engines.tensorrt.library import tensorrt
from engines.tensorrt.profiles import Profile
from engines.tensorrt.record import ENGINE_DIR, EngineRecord, check_compatible, check_files


class DeviceTensor:
    """`shape` of `dtype` at the start of `buffer`; frees the buffer when it owns it (a KV buffer
    of the alternating pair belongs to its session)."""

    def __init__(
        self, buffer: DeviceBuffer, shape: tuple[int, ...], dtype: np.dtype, owns: bool = True
    ) -> None:
        self.buffer, self.shape, self.dtype, self.owns = buffer, tuple(shape), np.dtype(dtype), owns

    @property
    def ptr(self) -> int:
        return self.buffer.ptr

    def __del__(self) -> None:
        if self.owns:
            with contextlib.suppress(BackendError):  # at exit the CUDA context may be gone already
                self.buffer.close()


class TensorRTSession(Session):
    backend: TensorRTBackend

    def _open_impl(self) -> None:
        trt = self.backend.trt
        record = self.backend.record_for(self.path.parent)
        engine_file = record.engines.get(self.path.stem)
        if engine_file is None:
            raise BackendError(
                f"no TensorRT engine was built for {self.path.stem}", hint="rebuild the engines"
            )
        data = (self.path.parent / ENGINE_DIR / engine_file.file).read_bytes()
        self._engine = self.backend.runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise BackendError(
                f"TensorRT cannot load the engine for {self.path.stem}", hint="rebuild the engines"
            )
        self._profiles = [  # input -> (min, max): what a run's shapes are checked against
            {name: (lo, hi) for name, (lo, _, hi) in Profile.from_json(p).shapes.items()}
            for p in engine_file.profiles
        ]
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._contexts, self._scratch_bytes = [], []
        for index in range(self._engine.num_optimization_profiles):
            context = self._engine.create_execution_context(strategy)
            context.set_optimization_profile_async(index, int(self.backend.stream.handle))
            self._contexts.append(context)
            self._scratch_bytes.append(self._engine.get_device_memory_size_for_profile_v2(index))
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._io = ([n for n in names if is_input[n]], [n for n in names if not is_input[n]])
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._kv = AlternatingBuffers(DeviceBuffer)
        self._kv_bytes = {  # present = past + new rows, at the largest the profiles allow
            present: int(np.prod(_present_max(past, self._profiles))) * self._dtypes[present].itemsize
            for past, present in _kv_pairs(self._io[0])
        }

    def _io_names_impl(self) -> tuple[list[str], list[str]]:
        return self._io

    def _run_impl(self, feeds: dict[str, Value], into: Mapping[str, Value]) -> list[Value]:
        index = self._profile_for(feeds)
        context, scratch = self._contexts[index], self._scratch_bytes[index]
        context.set_device_memory(self.backend.scratch(scratch), scratch)
        for name, value in feeds.items():
            context.set_input_shape(name, value.shape)
            context.set_tensor_address(name, value.ptr)
        outputs = []
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            if name in into:
                value = into[name]
            elif name in self._kv_bytes:  # the other buffer of the pair than this step's past
                buffer = self._kv.next(name, self._kv_bytes[name])
                value = DeviceTensor(buffer, shape, self._dtypes[name], owns=False)
            else:
                value = self.backend.empty(shape, self._dtypes[name])
            context.set_tensor_address(name, value.ptr)
            outputs.append(value)
        if not context.execute_async_v3(int(self.backend.stream.handle)):
            raise BackendError(f"TensorRT failed to run {self.path.stem}")
        return outputs

    def _profile_for(self, feeds: dict[str, Value]) -> int:
        for index, bounds in enumerate(self._profiles):
            if all(
                all(lo <= d <= hi for d, lo, hi in zip(feeds[n].shape, *bounds[n], strict=True))
                for n in feeds
            ):
                return index
        shapes = ", ".join(f"{n} {feeds[n].shape}" for n in feeds)
        raise BackendError(
            f"no profile of the {self.path.stem} engine takes {shapes}",
            hint="rebuild the engines with a larger --max-context / --max-batch / --max-text-tokens",
        )

    def _close_impl(self) -> None:
        self._contexts.clear()
        del self._engine


def _kv_pairs(inputs: list[str]) -> list[tuple[str, str]]:
    return [(name, "present." + name[len("past.") :]) for name in inputs if name.startswith("past.")]


def _present_max(past: str, profiles: list[dict]) -> tuple[int, ...]:
    """The largest present [B, H, P + S, hd] any profile allows: past rows and new rows at their maxima."""
    past_max = [max(p[past][1][i] for p in profiles) for i in range(4)]
    seq_max = max(p["hidden_states"][1][1] for p in profiles)
    return (past_max[0], past_max[1], past_max[2] + seq_max, past_max[3])


class TensorRTBackend(Backend):
    def __init__(self, options: SessionOptions) -> None:
        super().__init__(options)
        self.trt = tensorrt()
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.gpu_name, self.compute_capability = device_identity()
        self.stream = Stream()
        self._records: dict[Path, EngineRecord] = {}
        self._scratch: DeviceBuffer | None = None

    def record_for(self, bundle: Path) -> EngineRecord:
        if bundle not in self._records:
            record = EngineRecord.read(bundle)
            check_compatible(record, self.trt.__version__, self.compute_capability)
            check_files(record, bundle)
            self._records[bundle] = record
        return self._records[bundle]

    def scratch(self, nbytes: int) -> int:
        """One scratch allocation shared by every context, grown to the largest asked for (contexts
        run one at a time on the one stream; cudaFree waits for the device)."""
        if self._scratch is None or self._scratch.nbytes < nbytes:
            if self._scratch is not None:
                self._scratch.close()
            self._scratch = DeviceBuffer(max(nbytes, 1))
        return self._scratch.ptr

    def _session_class(self) -> type[Session]:
        return TensorRTSession

    def _upload_impl(self, array: np.ndarray) -> Value:
        return DeviceTensor(DeviceBuffer.from_array(array, self.stream), array.shape, array.dtype)

    def _download_impl(self, value: Value) -> np.ndarray:
        self.stream.synchronize()
        return value.buffer.download(value.shape, value.dtype, self.stream)

    def _empty_impl(self, shape: tuple[int, ...], dtype: np.dtype) -> Value:
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        return DeviceTensor(DeviceBuffer(nbytes), shape, dtype)
