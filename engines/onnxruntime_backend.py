"""ONNX Runtime sessions on the CPU, CUDA or ONNX Runtime's TensorRT execution provider."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import BackendError
from engines.session import Backend, Session, SessionOptions, Value

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_RUNTIME_PACKAGES = ("onnxruntime", "onnxruntime-gpu")
_NUMPY_TYPES = {  # OrtValue.data_type() -> numpy dtype
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}
_INSTALL_HINT = {
    "cuda": "on a machine with CUDA: pip uninstall -y onnxruntime && pip install 'dyvte-rt[gpu]'",
    "ort-tensorrt": "on a machine with CUDA and the TensorRT libraries: "
    "pip uninstall -y onnxruntime && pip install 'dyvte-rt[gpu]'",
}


def installed_runtimes() -> dict[str, Path]:
    """The ONNX Runtime distributions installed (normally exactly one), each with its folder."""
    found = {}
    for name in _RUNTIME_PACKAGES:
        try:
            found[name] = Path(metadata.distribution(name).locate_file("")).resolve()
        except metadata.PackageNotFoundError:
            continue
    return found


def check_installation(installed: Mapping[str, Path] | None = None) -> None:
    """Refuse the two broken set-ups with one line each: no ONNX Runtime, or both builds in one folder.

    `onnxruntime` and `onnxruntime-gpu` share one `onnxruntime` import package: installed into the
    same folder, whichever came last overwrote the other's files and the CUDA provider silently
    disappears. In different folders (the GPU build laid over a CPU one with PYTHONPATH, say) the
    first on the path is imported whole, and `providers_for` checks that it has the provider asked for.
    """
    installed = installed_runtimes() if installed is None else installed
    if not installed:
        raise BackendError(
            "ONNX Runtime is not installed",
            hint="pip install 'dyvte-rt[cpu]' (or 'dyvte-rt[gpu]' on a machine with CUDA)",
            unavailable=True,
        )
    if len(installed) > 1 and len(set(installed.values())) < len(installed):
        raise BackendError(
            "both onnxruntime and onnxruntime-gpu are installed, and the CPU package shadows the GPU one",
            hint="pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'dyvte-rt[cpu]' "
            "or 'dyvte-rt[gpu]' (never both)",
            unavailable=True,
        )


def providers_for(device: str) -> list[str]:
    check_installation()
    import onnxruntime as ort

    wanted = _PROVIDERS[device][0]
    if wanted not in ort.get_available_providers():
        raise BackendError(
            f"--device {device} needs ONNX Runtime's {wanted}, which this installation "
            f"({', '.join(installed_runtimes())} from {Path(ort.__file__).parent}) lacks",
            hint=_INSTALL_HINT.get(device),
            unavailable=True,
        )
    if device != "cpu" and hasattr(ort, "preload_dlls"):
        # the CUDA and cuDNN libraries of the nvidia-* pip packages, which the provider's dlopen does
        # not search (ONNX Runtime would log the failure and fall back to the CPU); the runtime never
        # imports torch, which would otherwise have loaded them. Best effort: what it could not load
        # it prints, to stderr here so that a command's JSON on stdout stays whole
        with contextlib.redirect_stdout(sys.stderr), contextlib.suppress(Exception):
            ort.preload_dlls()
    return _PROVIDERS[device]


def tensorrt_provider_options(profiles: list[dict], cache_dir: Path) -> dict[str, str]:
    """ONNX Runtime TensorRT EP options: the planned profiles as explicit shapes (one entry per
    profile, repeated input names, as the EP takes several profiles) and an engine cache, so
    engines are built once per machine instead of at every start."""

    def shapes(bound: str) -> str:
        return ",".join(
            f"{name}:{'x'.join(str(d) for d in shape[bound])}"
            for profile in profiles
            for name, shape in profile["shapes"].items()
        )

    return {
        "trt_profile_min_shapes": shapes("min"),
        "trt_profile_opt_shapes": shapes("opt"),
        "trt_profile_max_shapes": shapes("max"),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
    }


@dataclass(frozen=True)
class RowView:
    """Rows of an `OrtValue`'s first axis, in the same memory: bound to a graph by its address, so a
    batch slot of a KV buffer is a view on a GPU as on the CPU (ONNX Runtime's Python API has no
    sub-tensor view of device memory)."""

    base: Any  # the OrtValue that owns the memory (kept alive by the view)
    ptr: int  # address of the first row
    shape: tuple[int, ...]
    dtype: np.dtype
    device: str  # "cpu" | "cuda"

    def numpy(self) -> np.ndarray:
        """The rows as numpy (a copy of them; CPU values only)."""
        whole = self.base.numpy()
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        start = (self.ptr - self.base.data_ptr()) // row_bytes
        return np.array(whole[start : start + self.shape[0]], copy=True)


class OrtSession(Session):
    """A graph in an `InferenceSession`, run through I/O binding so values stay on the device."""

    backend: OrtBackend

    def _open_impl(self) -> None:
        import onnxruntime as ort

        levels = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        options = self.backend.options
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = levels[options.optimization]
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.log_severity_level = 3
        session_options.enable_cpu_mem_arena = options.memory_arena
        session_options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if options.spin else "0"
        )
        if options.profile:
            session_options.enable_profiling = True
            session_options.profile_file_prefix = f"{options.profile}-{self.path.stem}"
        providers: list = list(self.backend.providers)
        if options.device == "ort-tensorrt":
            from engines.tensorrt.record import ENGINE_DIR, read_graph_profiles

            bundle = self.path.parent
            trt_options = tensorrt_provider_options(
                read_graph_profiles(bundle, self.path.stem), bundle / ENGINE_DIR / "ort-cache"
            )
            providers[0] = (providers[0], trt_options)
        try:
            self._session = ort.InferenceSession(str(self.path), session_options, providers=providers)
        except Exception as err:  # ORT raises its own exception types for unreadable models
            raise BackendError(
                f"cannot load {self.path.name}: {str(err).splitlines()[0][:200]}",
                hint="the file is damaged or truncated; re-export the bundle",
            ) from None

    def end_profiling(self) -> str:
        """Stop ONNX Runtime's profiler (SessionOptions.profile) and return its JSON file."""
        return self._session.end_profiling()

    def _io_names_impl(self) -> tuple[list[str], list[str]]:
        return [i.name for i in self._session.get_inputs()], [o.name for o in self._session.get_outputs()]

    def _run_impl(self, feeds: dict[str, Value], into: Mapping[str, Value]) -> list[Value]:
        binding = self._session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, RowView):
                binding.bind_input(name, value.device, 0, value.dtype.type, list(value.shape), value.ptr)
            else:
                binding.bind_ortvalue_input(name, value)
        device = self.backend.device_type
        for name in self.outputs:
            target = into.get(name)
            if isinstance(target, RowView):
                binding.bind_output(name, target.device, 0, target.dtype.type, list(target.shape), target.ptr)
            elif target is not None:
                binding.bind_ortvalue_output(name, target)
            else:
                binding.bind_output(name, device)
        self._session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _close_impl(self) -> None:
        del self._session


class OrtBackend(Backend):
    """ONNX Runtime on one device: values are `OrtValue`s in the device's memory."""

    def __init__(self, options: SessionOptions) -> None:
        super().__init__(options)
        self.providers = providers_for(options.device)
        self.device_type = "cpu" if options.device == "cpu" else "cuda"
        import onnxruntime as ort

        self._ort = ort

    def _session_class(self) -> type[Session]:
        return OrtSession

    def _upload_impl(self, array: np.ndarray) -> Value:
        return self._ort.OrtValue.ortvalue_from_numpy(array, self.device_type, 0)

    def _download_impl(self, value: Value) -> np.ndarray:
        if isinstance(value, RowView):
            if value.device != "cpu":
                raise BackendError("a view of device memory cannot be downloaded; download its buffer")
            return value.numpy()
        return np.array(value.numpy(), copy=True)  # on the CPU numpy() is a view of ORT's memory

    def _view_rows_impl(self, value: Value, start: int, stop: int) -> Value:
        base, first = (value.base, value.ptr) if isinstance(value, RowView) else (value, value.data_ptr())
        shape = tuple(value.shape) if isinstance(value, RowView) else tuple(value.shape())
        if not 0 <= start < stop <= shape[0]:
            raise BackendError(f"rows {start}..{stop} are outside a buffer of {shape[0]}")
        dtype = value.dtype if isinstance(value, RowView) else np.dtype(_NUMPY_TYPES[value.data_type()])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        return RowView(base, first + start * row_bytes, (stop - start, *shape[1:]), dtype, self.device_type)

    def _empty_impl(self, shape: tuple[int, ...], dtype: np.dtype) -> Value:
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype.type, self.device_type, 0)
