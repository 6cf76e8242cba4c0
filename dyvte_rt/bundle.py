"""A loaded bundle: its manifest and one open session per graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyvte_rt.manifest import BundleError, Manifest, SegmentInfo, load_manifest
from engines import Session, SessionOptions, open_session

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    sessions: dict[str, Session]  # graph name -> session

    @classmethod
    def open(
        cls, path: str | Path, options: SessionOptions | None = None, verify_hashes: bool = True
    ) -> Bundle:
        path = Path(path)
        manifest = load_manifest(path, verify_hashes=verify_hashes)
        if manifest.dtype not in NUMPY_DTYPES:
            raise BundleError(f"bundle dtype {manifest.dtype!r} is not supported by this runtime")
        options = options or SessionOptions()
        sessions: dict[str, Session] = {}
        try:
            for name, graph in manifest.graphs.items():
                sessions[name] = open_session(path / graph.file, graph, options)
        except BaseException:
            for session in sessions.values():
                session.close()
            raise
        return cls(path, manifest, sessions)

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
