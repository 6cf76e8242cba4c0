"""ONNX Runtime sessions on the CPU, CUDA or ONNX Runtime's TensorRT execution provider."""

from __future__ import annotations

from importlib import metadata

import numpy as np

from engines.errors import BackendError
from engines.session import Session

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_RUNTIME_PACKAGES = ("onnxruntime", "onnxruntime-gpu")
_INSTALL_HINT = {
    "cuda": "on a machine with CUDA: pip uninstall -y onnxruntime && pip install 'dyvte-rt[gpu]'",
    "ort-tensorrt": "on a machine with CUDA and the TensorRT libraries: "
    "pip uninstall -y onnxruntime && pip install 'dyvte-rt[gpu]'",
}


def installed_runtimes() -> list[str]:
    """The ONNX Runtime distributions pip has installed (normally exactly one)."""
    found = []
    for name in _RUNTIME_PACKAGES:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def check_installation(installed: list[str] | None = None) -> None:
    """Refuse the two broken set-ups with one line each: no ONNX Runtime, or both builds at once.

    With `onnxruntime` and `onnxruntime-gpu` both installed they share one `onnxruntime` import
    package; whichever was installed last wins, and the CUDA provider silently disappears.
    """
    installed = installed_runtimes() if installed is None else installed
    if not installed:
        raise BackendError(
            "ONNX Runtime is not installed",
            hint="pip install 'dyvte-rt[cpu]' (or 'dyvte-rt[gpu]' on a machine with CUDA)",
            unavailable=True,
        )
    if len(installed) > 1:
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
            f"({', '.join(installed_runtimes())}) lacks",
            hint=_INSTALL_HINT.get(device),
            unavailable=True,
        )
    return _PROVIDERS[device]


class OrtSession(Session):
    def _open_impl(self) -> None:
        providers = providers_for(self.options.device)
        import onnxruntime as ort

        levels = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[self.options.optimization]
        options.intra_op_num_threads = self.options.intra_op_threads
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.options.spin else "0")
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # ORT raises its own exception types for unreadable models
            raise BackendError(
                f"cannot load {self.path.name}: {str(err).splitlines()[0][:200]}",
                hint="the file is damaged or truncated; re-export the bundle",
            ) from None

    def _io_names_impl(self) -> tuple[list[str], list[str]]:
        return [i.name for i in self._session.get_inputs()], [o.name for o in self._session.get_outputs()]

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(None, feeds)

    def _close_impl(self) -> None:
        del self._session
