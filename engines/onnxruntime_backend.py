"""ONNX Runtime sessions on CPU, CUDA or the TensorRT execution provider."""

from __future__ import annotations

import numpy as np

from dyvte_rt.errors import DyvteError
from dyvte_rt.manifest import BundleError
from engines.session import Session

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_INSTALL_HINT = {
    "cuda": "install the GPU build: pip install 'dyvte-rt[gpu]' (onnxruntime-gpu) on a machine with CUDA",
    "tensorrt": "install onnxruntime-gpu with TensorRT support and the TensorRT libraries "
    "(pip install 'dyvte-rt[gpu]')",
}


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    if device not in _PROVIDERS:
        raise DyvteError(f"unknown device {device!r}", hint=f"choose one of {', '.join(_PROVIDERS)}")
    wanted = _PROVIDERS[device][0]
    if wanted not in ort.get_available_providers():
        raise DyvteError(
            f"--device {device} needs ONNX Runtime's {wanted}, which this installation lacks",
            hint=_INSTALL_HINT.get(device),
        )
    return _PROVIDERS[device]


class OrtSession(Session):
    def _open_impl(self) -> None:
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
            self._session = ort.InferenceSession(
                str(self.path), options, providers=providers_for(self.options.device)
            )
        except DyvteError:
            raise
        except Exception as err:  # ORT raises its own exception types for unreadable models
            raise BundleError(
                f"cannot load {self.path.name}: {str(err).splitlines()[0][:200]}",
                hint="the file is damaged or truncated; re-export the bundle",
            ) from None

    def _io_names_impl(self) -> tuple[list[str], list[str]]:
        return [i.name for i in self._session.get_inputs()], [o.name for o in self._session.get_outputs()]

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(None, feeds)

    def _close_impl(self) -> None:
        del self._session
