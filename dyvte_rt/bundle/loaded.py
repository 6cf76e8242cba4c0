"""A loaded bundle: its manifest, the backend it runs on and one open session per graph."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyvte_rt.bundle.manifest import BundleError, Manifest, SegmentInfo, load_manifest
from dyvte_rt.errors import BackendUnavailableError
from engines import Backend, BackendError, Session, SessionOptions, open_backend

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def check_dtype_and_device(bundle_dtype: str, device: str, asked: str | None) -> None:
    """Refuse a bundle built for another precision than asked, and fp16 on CPU unless asked for.

    ONNX Runtime's CPU kernels mostly lack fp16: such a bundle runs, but several times slower than
    its fp32 export, which is never what someone who did not ask for it wants.
    """
    if asked is not None and asked != bundle_dtype:
        raise BundleError(
            f"the bundle was exported as {bundle_dtype}, not {asked}",
            hint=f"re-export it with python -m export.build --dtype {asked}, or drop --dtype",
        )
    if bundle_dtype == "fp16" and device == "cpu" and asked != "fp16":
        raise BundleError(
            "the bundle is fp16, which is meant for GPUs and runs several times slower on the CPU",
            hint="use --device cuda, re-export with --dtype fp32 for the CPU, "
            "or pass --dtype fp16 to run it anyway",
        )


SMALL_MODEL_HIDDEN = 1024  # below this width a CPU thread hand-off costs more than it saves


def default_threads(options: SessionOptions, manifest: Manifest) -> SessionOptions:
    """`intra_op_threads=0` on the CPU: one thread for small models, else the backend's default.

    Measured on the demo model (hidden 128; docs/benchmarks.md): with two threads every operator
    of a one-token step hands work to a second thread that finishes in microseconds, and decoding
    ran 20% slower than on one.
    """
    if (
        options.intra_op_threads == 0
        and options.device == "cpu"
        and manifest.dims.hidden < SMALL_MODEL_HIDDEN
    ):
        return dataclasses.replace(options, intra_op_threads=1)
    return options


def as_runtime_error(err: BackendError) -> BundleError | BackendUnavailableError:
    """A backend's error as the runtime's: a missing backend, or a bundle it cannot use."""
    kind = BackendUnavailableError if err.unavailable else BundleError
    return kind(err.message, hint=err.hint)


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    backend: Backend
    sessions: dict[str, Session]  # graph name -> session

    @classmethod
    def open(
        cls,
        path: str | Path,
        options: SessionOptions | None = None,
        verify_hashes: bool = True,
        dtype: str | None = None,
    ) -> Bundle:
        """`dtype`: the precision the caller expects; a bundle of another one is refused."""
        path = Path(path)
        manifest = load_manifest(path, verify_hashes=verify_hashes)
        if manifest.dtype not in NUMPY_DTYPES:
            raise BundleError(f"bundle dtype {manifest.dtype!r} is not supported by this runtime")
        options = default_threads(options or SessionOptions(), manifest)
        check_dtype_and_device(manifest.dtype, options.device, dtype)
        sessions: dict[str, Session] = {}
        try:
            backend = open_backend(options)
            for name, graph in manifest.graphs.items():
                names = tuple(t.name for t in graph.inputs), tuple(t.name for t in graph.outputs)
                sessions[name] = backend.open(path / graph.file, *names)
        except BaseException as err:
            for session in sessions.values():
                session.close()
            if isinstance(err, BackendError):
                raise as_runtime_error(err) from None
            raise
        return cls(path, manifest, backend, sessions)

    @property
    def float_dtype(self) -> np.dtype:
        return np.dtype(NUMPY_DTYPES[self.manifest.dtype])

    @property
    def segments(self) -> tuple[SegmentInfo, ...]:
        return self.manifest.segments

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
