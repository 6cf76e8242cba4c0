"""The bundle manifest (docs/bundle-format.md): typed, frozen, versioned, strictly loaded.

The runtime reads this instead of guessing anything from the checkpoint. Loading names the bad
field on any mismatch, refuses newer schema versions, upgrades the one before, and can check every
file's sha256. A family's image layout is read by the family (`dyvte_rt.families`) when the
manifest loads, with the same strictness.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dyvte_rt.errors import DyvteError

# 2: routers and the exit gather are graphs; KV flavours. 3: quantisation. 4: the family's image
# layout in vision.layout (3 had vision.anyres / vision.patch_grid; `_upgrade_from_3` moves them)
SCHEMA_VERSION = 4
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
KV_FLAVOURS = ("inplace", "concat")  # docs/bundle-format.md


class BundleError(DyvteError):
    """A bundle directory is missing, damaged, or from an incompatible exporter."""


@dataclass(frozen=True)
class SourceInfo:
    model: str  # what --model was given
    repo_id: str | None  # Hugging Face repo id, where known
    revision: str | None  # snapshot commit of a cached repo, where known
    family: str  # adapter registry key, e.g. "llava"
    architecture: str  # e.g. "LlavaForConditionalGeneration"


@dataclass(frozen=True)
class Dims:
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp: int  # SwiGLU intermediate width (compute accounting)
    vocab_size: int
    max_positions: int
    position_sections: int = 1  # 3: multimodal rotary positions [3, B, S] (temporal, height, width)


@dataclass(frozen=True)
class ImagePreprocess:
    """Mirrors the checkpoint's CLIP-style image processor."""

    resize_shortest_edge: int | None  # None: no resize
    crop_height: int | None  # None: no center crop
    crop_width: int | None
    resample: int  # PIL resampling filter id (3 = bicubic)
    rescale_factor: float | None  # None: no rescale
    mean: tuple[float, ...] | None  # None: no normalisation
    std: tuple[float, ...] | None
    convert_rgb: bool


@dataclass(frozen=True)
class VisionInfo:
    image_height: int
    image_width: int
    visual_tokens: int  # per image; where the count depends on the image's size, the most any image takes
    preprocess: ImagePreprocess
    # the family's own image layout (LLaVA-NeXT's tiles, Qwen2-VL's patch grid), read strictly into
    # the family's dataclass by dyvte_rt/families/<family>.py; empty for one fixed-size view
    layout: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenInfo:
    bos: int | None
    eos: tuple[int, ...]
    pad: int | None
    image: int  # image placeholder id; the prompt holds `visual_tokens` of them per image
    image_placeholder: str  # its text, e.g. "<image>"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]  # ints are fixed, strings are dynamic axes


@dataclass(frozen=True)
class GraphInfo:
    file: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    precision: str | None = None  # its weights: fp32 | fp16 | int8 | int4 (None: a manifest from before)
    # other graphs' files it reads weights from (a tied LM head: the embed graph's quantised table)
    shared_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class SegmentInfo:
    graph: str  # key into Manifest.graphs
    first_layer: int
    last_layer: int
    router: str | None  # the router graph evaluated on this segment's output (prefill only), if any
    prune_scores: bool = False  # takes last_index and gives prune_scores (FastV can prune after it)

    @property
    def has_router(self) -> bool:
        return self.router is not None


@dataclass(frozen=True)
class ExitInfo:
    candidate_layers: tuple[int, ...]  # segments end at these layers
    default_policy: str  # "never", "router" or "layer:K"
    threshold: float
    router_width: int | None  # None: the bundle has no routers


@dataclass(frozen=True)
class PruneInfo:
    """Visual-token pruning (docs/exit-semantics.md): where the bundle can prune, and its default."""

    layers: tuple[int, ...]  # layers a prune may follow (-1: the input embeddings, DART only)
    default_policy: str  # "none", "fastv:K:R" or "dart:K:R[:P]"


@dataclass(frozen=True)
class GraphQualityInfo:
    min_cosine: float  # of a quantised graph's outputs against its float graph, verification inputs
    max_abs_error: float


@dataclass(frozen=True)
class QuantizationInfo:
    """Weight-only, block-wise quantisation of some graphs' MatMul weights (docs/quantization.md)."""

    bits: int  # 4 | 8
    block_size: int
    format: str  # "matmulnbits" (ONNX Runtime) | "qdq" (DequantizeLinear + MatMul)
    symmetric: bool
    accuracy_level: int  # MatMulNBits: 4 = int8 activations inside the kernel; 0 = the weights' type
    graphs: dict[str, GraphQualityInfo]  # quantised graph -> its quality against the float graph


@dataclass(frozen=True)
class FileInfo:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    source: SourceInfo
    dtype: str  # "fp32" | "fp16": activations, and the weights quantisation leaves as they are
    quantization: QuantizationInfo | None  # None: every weight in `dtype`
    kv_flavour: str  # "inplace" (GroupQueryAttention, one buffer per layer) | "concat" (standard ONNX)
    dims: Dims
    vision: VisionInfo
    tokens: TokenInfo
    chat_template: str
    segments: tuple[SegmentInfo, ...]
    exit: ExitInfo
    graphs: dict[str, GraphInfo]
    files: dict[str, FileInfo] = field(default_factory=dict)
    prune: PruneInfo | None = None  # None: exported before pruning existed (it cannot prune)

    @property
    def precision(self) -> str:
        """int4 / int8 for quantised bundles, else the dtype."""
        return f"int{self.quantization.bits}" if self.quantization is not None else self.dtype

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        for graph in data["graphs"].values():  # written only where used: older readers know no such key
            if not graph["shared_files"]:
                del graph["shared_files"]
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_FILE) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise BundleError(f"{where} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise BundleError(f"{where} must hold a JSON object")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError(f"{where}: schema_version is missing or not an integer")
        if version > SCHEMA_VERSION:
            raise BundleError(
                f"{where} has schema version {version}; this dyvte-rt reads up to {SCHEMA_VERSION}",
                hint="upgrade dyvte-rt, or re-export the bundle with this version",
            )
        if version == 3:
            data = _upgrade_from_3(data)
        elif version < SCHEMA_VERSION:
            raise BundleError(f"{where} has old schema version {version}", hint="re-export the bundle")
        return build_strict(cls, data, "manifest")


def load_manifest(bundle: Path, verify_hashes: bool = True) -> Manifest:
    """Read `bundle/manifest.json` and check that every listed file is there with its size;
    with `verify_hashes`, also check every file's sha256."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(
            f"bundle directory {bundle} does not exist", hint="export one with python -m export.build"
        )
    path = bundle / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST_FILE}; it is not a dyvte-rt bundle")
    manifest = Manifest.from_json(path.read_text(encoding="utf-8"), str(path))
    from dyvte_rt.families import family_for

    family_for(manifest)  # a family this runtime knows, and a layout it can read
    verify_files(bundle, manifest, hashes=verify_hashes)
    return manifest


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    """Replace a bundle's manifest atomically (the files it lists stay as they are)."""
    staging = Path(bundle) / (MANIFEST_FILE + ".tmp")
    staging.write_text(manifest.to_json(), encoding="utf-8")
    staging.replace(Path(bundle) / MANIFEST_FILE)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_files(bundle: Path, manifest: Manifest, hashes: bool = True) -> None:
    for name, info in manifest.files.items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing from {bundle}", hint="re-export the bundle")
        if path.stat().st_size != info.bytes:
            raise BundleError(
                f"bundle file {name} has {path.stat().st_size} bytes, the manifest says {info.bytes}: "
                f"it is truncated or damaged",
                hint="re-export or re-copy the bundle",
            )
        if hashes and sha256_file(path) != info.sha256:
            raise BundleError(
                f"bundle file {name} does not match its sha256 in the manifest: the bundle is damaged",
                hint="re-export or re-copy the bundle",
            )


def _upgrade_from_3(data: dict) -> dict:
    """Schema 3 -> 4: the optional vision.anyres / vision.patch_grid become vision.layout."""
    vision = data.get("vision")
    if not isinstance(vision, dict):
        return data  # the strict build names the problem
    vision = dict(vision)
    anyres, grid = vision.pop("anyres", None), vision.pop("patch_grid", None)
    if anyres is not None and grid is not None:
        raise BundleError("manifest field vision has both anyres and patch_grid")
    vision["layout"] = anyres if anyres is not None else grid if grid is not None else {}
    return {**data, "vision": vision, "schema_version": SCHEMA_VERSION}


# -- strict construction from JSON ------------------------------------------------------------


def build_strict(cls: type, data: Any, where: str) -> Any:
    """The frozen dataclass `cls` from JSON data: unknown or missing keys and wrong types raise a
    BundleError naming the field (`where` is the path so far, e.g. "manifest.vision")."""
    if not isinstance(data, dict):
        raise BundleError(f"manifest field {where} must be an object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BundleError(f"manifest field {where} has unknown keys {unknown}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise BundleError(f"manifest field {where}.{f.name} is missing")
        values[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
    return cls(**values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except BundleError as err:
                errors.append(err)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        return build_strict(hint, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise BundleError(f"manifest field {where} must be a list")
        return tuple(_convert(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(f"manifest field {where} must be an object")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if hint is Any:  # a JSON value another reader checks (a family's layout)
        return value
    raise BundleError(f"manifest field {where} must be {getattr(hint, '__name__', hint)}, got {value!r:.60}")
