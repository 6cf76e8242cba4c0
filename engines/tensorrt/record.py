"""What a bundle's TensorRT engines were built for (`tensorrt/engines.json`), checked before use.

A serialized engine runs only on the GPU architecture and the TensorRT version that built it
(unless built version- and hardware-compatible, which this project does not rely on): loading one
elsewhere fails deep inside TensorRT, so the record is compared first and a mismatch is one line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engines.errors import BackendError
from engines.tensorrt.library import version_tuple

RECORD_FORMAT = "dyvte-tensorrt/1"
ENGINE_DIR = "tensorrt"
RECORD_FILE = "engines.json"
PLAN_FILE = "plan.json"  # the profiles `build-engines --plan` chose; ONNX Runtime's TensorRT EP reads them


@dataclass(frozen=True)
class EngineFile:
    file: str  # relative to the engine directory
    sha256: str
    bytes: int
    profiles: list[dict]  # Profile.to_json() of each, in the engine's profile order


@dataclass(frozen=True)
class EngineRecord:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" (Jetson Orin), "9.0" (H100/H200)
    precision: str  # the bundle's dtype: strongly typed networks take the ONNX graph's types
    settings: dict  # EngineSettings as built
    engines: dict[str, EngineFile] = field(default_factory=dict)  # bundle graph -> engine
    format: str = RECORD_FORMAT

    def write(self, bundle: Path) -> Path:
        return _write_json(bundle / ENGINE_DIR / RECORD_FILE, asdict(self))

    @classmethod
    def read(cls, bundle: Path) -> EngineRecord:
        path = bundle / ENGINE_DIR / RECORD_FILE
        if not path.is_file():
            raise BackendError(
                f"{bundle} has no TensorRT engines",
                hint=f"build them: dyvte-rt build-engines --bundle {bundle}",
            )
        try:
            data = json.loads(path.read_text())
            if data.get("format") != RECORD_FORMAT:
                raise BackendError(f"{path} is not a {RECORD_FORMAT} record (format {data.get('format')!r})")
            engines = {name: EngineFile(**info) for name, info in data.pop("engines").items()}
            return cls(**data, engines=engines)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as err:
            raise BackendError(f"{path} is damaged: {err}", hint="rebuild the engines") from None


def check_compatible(record: EngineRecord, tensorrt_version: str, compute_capability: str) -> None:
    """Refuse engines built for another TensorRT (major.minor) or another GPU architecture."""
    if version_tuple(record.tensorrt_version) != version_tuple(tensorrt_version):
        raise BackendError(
            f"the engines were built with TensorRT {record.tensorrt_version}, "
            f"this machine has {tensorrt_version}",
            hint="rebuild them here: dyvte-rt build-engines --bundle DIR",
        )
    if record.compute_capability != compute_capability:
        raise BackendError(
            f"the engines were built for compute capability {record.compute_capability} ({record.gpu_name}), "
            f"this GPU is {compute_capability}",
            hint="rebuild them on this machine: dyvte-rt build-engines --bundle DIR",
        )


def check_files(record: EngineRecord, bundle: Path) -> None:
    """Every engine present, with the size and sha256 it was recorded with."""
    for name, engine in record.engines.items():
        path = bundle / ENGINE_DIR / engine.file
        if not path.is_file() or path.stat().st_size != engine.bytes or sha256(path) != engine.sha256:
            raise BackendError(
                f"the engine for {name} ({path.name}) is missing or changed", hint="rebuild the engines"
            )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_plan(bundle: Path, plan: dict) -> Path:
    return _write_json(bundle / ENGINE_DIR / PLAN_FILE, plan)


def _write_json(path: Path, data: dict) -> Path:
    """Whole or not at all: written beside `path`, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_graph_profiles(bundle: Path, graph: str) -> list[dict]:
    """The profiles planned for `graph` (Profile.to_json() each)."""
    path = bundle / ENGINE_DIR / PLAN_FILE
    if not path.is_file():
        raise BackendError(
            f"{bundle} has no TensorRT profile plan",
            hint=f"write one: dyvte-rt build-engines --bundle {bundle} --plan",
        )
    try:
        return json.loads(path.read_text())["graphs"][graph]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BackendError(
            f"{path} has no profiles for {graph} ({err})", hint="re-run build-engines --plan"
        ) from None
