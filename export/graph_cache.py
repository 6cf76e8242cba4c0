"""`--graph-cache DIR`: graphs an earlier export already produced and verified, found again by a
fingerprint of everything that decides them, so the variants of one checkpoint (KV flavours,
quantised precisions, with or without routers) re-export only the graphs that differ.

A fingerprint covers the graph's plan (role, I/O names, dynamic axes, tracing shapes, layers,
dtype, opset, its KV flavour), the model's class and config (for graphs whose module reads the
model), the bytes of every weight the graph holds, the export
code itself and the versions of torch, transformers, onnx, onnxscript and ONNX Runtime; a quantised
graph's adds its quantisation settings. A hit copies the files and the recorded checks (the
float graph's largest error against its module, a quantised graph's quality, which is held to the
quality bar again); anything else exports as usual and fills the cache. Entries are written to a
temporary directory and renamed into place, so concurrent exports never see half an entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import torch

ENTRY_FILE = "entry.json"
FINGERPRINT_VERSION = 1
_PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu")


@dataclass(frozen=True)
class CacheEntry:
    files: tuple[str, ...]
    parameters: int
    max_abs_error: float
    min_cosine: float | None = None  # quantised graphs: their measured quality
    quantized_max_abs_error: float | None = None


class GraphCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    def get(self, key: str, into: Path) -> CacheEntry | None:
        """Copy an entry's files into `into` and return what was recorded (None: not cached)."""
        folder = self._folder(key)
        try:
            data = json.loads((folder / ENTRY_FILE).read_text())
            entry = CacheEntry(**{**data, "files": tuple(data["files"])})
            for name in entry.files:
                shutil.copyfile(folder / name, into / name)
        except (OSError, ValueError, TypeError, KeyError):
            return None  # absent, or damaged: export it again
        return entry

    def put(self, key: str, source: Path, entry: CacheEntry) -> None:
        """Store `entry.files` from `source` under `key` (a no-op if another export got there first)."""
        folder = self._folder(key)
        if folder.exists():
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
        try:
            for name in entry.files:
                shutil.copyfile(source / name, staging / name)
            (staging / ENTRY_FILE).write_text(json.dumps(asdict(entry)))
            staging.rename(folder)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # a full disk or a race lost: no entry, no harm

    def _folder(self, key: str) -> Path:
        return self.root / key[:2] / key


def plan_fingerprint(plan, adapter, opset: int) -> str:
    """The fingerprint of a float graph: the plan, the model and its weights, the exporter."""
    model = adapter.model
    # the model decides a graph whose module reads it; a router's or the exit gather's graph is
    # decided by its own weights and the shapes it is traced on, whatever model it serves
    reads_model = getattr(plan.module, "model", None) is not None
    digest = hashlib.sha256()
    describe = {
        "version": FINGERPRINT_VERSION,
        "code": code_fingerprint(),
        "plan": [plan.name, plan.role, plan.input_names, plan.output_names, repr(plan.dynamic_shapes)],
        "layers": [plan.layers.start, plan.layers.stop] if plan.layers is not None else None,
        "kv": getattr(plan.module, "kv", None),
        "dtype": str(plan.dtype),
        "tolerance": plan.tolerance,
        "opset": opset,
        "sample": [[tuple(x.shape), str(x.dtype)] for x in plan.sample],
        "model": [type(model).__name__, type(adapter).__name__, model.config.to_json_string()]
        if reads_model
        else None,
    }
    digest.update(json.dumps(describe, sort_keys=True).encode())
    for root in plan.module.fingerprint_modules():
        for module in root.modules():  # each module's own tensors (a loader root may be a wrapper)
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            for name, tensor in own:
                digest.update(f"{type(module).__name__}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def quantized_fingerprint(float_key: str, settings) -> str:
    """The fingerprint of a graph quantised from the float graph `float_key`."""
    return hashlib.sha256(json.dumps([float_key, asdict(settings)], sort_keys=True).encode()).hexdigest()


@cache
def code_fingerprint() -> str:
    """The export code and the versions of the packages that turn a module into a graph."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for package in ("export", "dyvte_rt"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    for name in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            digest.update(f"{name}={metadata.version(name)}".encode())
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
