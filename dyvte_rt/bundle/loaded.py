"""A loaded bundle: its manifest, its family, the backend it runs on and one open session per graph."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyvte_rt.bundle.manifest import BundleError, Manifest, SegmentInfo, load_manifest
from dyvte_rt.errors import BackendUnavailableError
from dyvte_rt.families import Family, family_for
from engines import Backend, BackendError, Session, SessionOptions, open_backend
from engines.host_memory import drop_mapped_pages, release_freed_heap
from engines.host_threads import threads_started_at_low_priority

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def check_dtype_and_device(bundle_dtype: str, device: str, asked: str | None) -> None:
    """Refuse a bundle built for another precision than asked, and fp16 on CPU unless asked for.

    ONNX Runtime's CPU kernels mostly lack fp16: such a bundle runs, but several times slower than
    its fp32 export, which is never what someone who did not ask for it wants.
    """
    if asked is not None and asked not in NUMPY_DTYPES:
        raise BundleError(
            f"dtype must be one of {', '.join(NUMPY_DTYPES)}, not {asked!r}",
            hint="int8 and int4 bundles compute in fp32: their weights are what is quantised",
        )
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


# ONNX Runtime's CUDA GroupQueryAttention (the in-place KV flavour's attention) is registered for
# fp16 and bf16 only: an fp32 graph's attention nodes would be placed on the CPU, copying every
# layer's KV cache between host and device at each step
GPU_INPLACE_DTYPES = ("fp16",)


def check_kv_and_device(manifest: Manifest, device: str) -> None:
    """Refuse an in-place fp32 bundle on an ONNX Runtime GPU provider, where it would run its
    attention on the CPU."""
    gpu = device in ("cuda", "ort-tensorrt")
    if gpu and manifest.kv_flavour == "inplace" and manifest.dtype not in GPU_INPLACE_DTYPES:
        raise BundleError(
            f"an in-place KV bundle in {manifest.dtype} cannot run its attention on --device {device}: "
            "ONNX Runtime's CUDA GroupQueryAttention takes fp16 only, so it would fall back to the "
            "CPU and copy the KV cache every step",
            hint="re-export with python -m export.build --dtype fp16 for the GPU, or --kv concat",
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


TRIM_MIN_BYTES = 8 << 20


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    backend: Backend
    sessions: dict[str, Session]  # graph name -> session
    family: Family  # what the runtime asks about images and positions
    lean_memory: bool = True  # freed heap pages returned after each prefill and request (host_memory)
    low_priority: frozenset[str] = frozenset()  # graphs whose worker threads run at the lowest priority

    @classmethod
    def open(
        cls,
        path: str | Path,
        options: SessionOptions | None = None,
        verify_hashes: bool = True,
        dtype: str | None = None,
        low_priority: frozenset[str] = frozenset(),
    ) -> Bundle:
        """`dtype`: the precision the caller expects; a bundle of another one is refused.
        `low_priority`: graphs whose sessions' worker threads run at the lowest CPU priority
        (engines/host_threads.py; a server's image encoder, so decode steps take the cores first)."""
        path = Path(path)
        manifest = load_manifest(path, verify_hashes=verify_hashes)
        if manifest.dtype not in NUMPY_DTYPES:
            raise BundleError(f"bundle dtype {manifest.dtype!r} is not supported by this runtime")
        options = default_threads(options or SessionOptions(), manifest)
        check_dtype_and_device(manifest.dtype, options.device, dtype)
        check_kv_and_device(manifest, options.device)
        sessions: dict[str, Session] = {}
        try:
            backend = open_backend(options)
            for name, graph in manifest.graphs.items():
                names = tuple(t.name for t in graph.inputs), tuple(t.name for t in graph.outputs)
                lowered = threads_started_at_low_priority() if name in low_priority else nullcontext()
                with lowered:
                    sessions[name] = backend.open(path / graph.file, *names)
        except BaseException as err:
            for session in sessions.values():
                session.close()
            if isinstance(err, BackendError):
                raise as_runtime_error(err) from None
            raise
        if options.lean_host_memory:  # what packing left behind (engines/host_memory.py)
            drop_mapped_pages(path)
            release_freed_heap()
        return cls(
            path, manifest, backend, sessions, family_for(manifest), options.lean_host_memory, low_priority
        )

    @property
    def float_dtype(self) -> np.dtype:
        return np.dtype(NUMPY_DTYPES[self.manifest.dtype])

    @property
    def segments(self) -> tuple[SegmentInfo, ...]:
        return self.manifest.segments

    def release_freed_memory(self, freed_bytes: int) -> bool:
        """Return the heap pages a prefill or a finished request freed to the OS (when lean), if it
        freed about `freed_bytes` (its KV cache's, a proxy for its activations too) of at least
        TRIM_MIN_BYTES: below that a trim costs more time (0.4 ms here) than the memory is worth."""
        if self.lean_memory and freed_bytes >= TRIM_MIN_BYTES:
            return release_freed_heap()
        return False

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
