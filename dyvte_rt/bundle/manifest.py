"""The bundle manifest (DESIGN §4): typed, frozen, versioned, strictly loaded.

The runtime reads this instead of guessing anything from the checkpoint. Loading names the bad
field on any mismatch, refuses newer schema versions, and can check every file's sha256.
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

SCHEMA_VERSION = 3  # 2: routers and the exit gather are graphs; KV flavours. 3: quantisation
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
class AnyResInfo:
    """LLaVA-NeXT's any-resolution tiling (dyvte_rt/anyres.py): a base view of the whole image plus
    tiles of it resized onto the best-fitting canvas."""

    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) canvases, multiples of tile_size
    tile_size: int  # side of the base view and of every tile: the vision tower's input
    feature_side: int  # visual tokens per tile side (tile_size // patch_size)
    newline: bool  # an image_newline row closes each row of the unpadded tile map


@dataclass(frozen=True)
class PatchGridInfo:
    """Qwen2-VL / Qwen2.5-VL images (dyvte_rt/patch_grid.py): resized to a multiple of
    patch_size * merge_size within a pixel budget, cut into patches that merge_size² at a time
    become one visual token; positions are multimodal rotary (temporal, height, width)."""

    patch_size: int
    temporal_patch_size: int  # a still image is its frame repeated this many times
    merge_size: int
    min_pixels: int
    max_pixels: int
    window_size: int | None  # Qwen2.5-VL's windowed vision attention, in pixels; None: full attention


@dataclass(frozen=True)
class VisionInfo:
    image_height: int
    image_width: int
    visual_tokens: int  # per image; with `anyres`, the most an image can take (it depends on its size)
    preprocess: ImagePreprocess
    anyres: AnyResInfo | None = None  # None: one fixed-size view per image (LLaVA-1.5)
    patch_grid: PatchGridInfo | None = None  # Qwen2-VL family: patches of a resized image


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


@dataclass(frozen=True)
class SegmentInfo:
    graph: str  # key into Manifest.graphs
    first_layer: int
    last_layer: int
    router: str | None  # the router graph evaluated on this segment's output (prefill only), if any

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

    @property
    def precision(self) -> str:
        """int4 / int8 for quantised bundles, else the dtype."""
        return f"int{self.quantization.bits}" if self.quantization is not None else self.dtype

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

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
        if version < SCHEMA_VERSION:
            raise BundleError(f"{where} has old schema version {version}", hint="re-export the bundle")
        return _build(cls, data, "manifest")


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


# -- strict construction from JSON ------------------------------------------------------------


def _build(cls: type, data: Any, where: str) -> Any:
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
        return _build(hint, value, where)
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
    raise BundleError(f"manifest field {where} must be {getattr(hint, '__name__', hint)}, got {value!r:.60}")
