"""The last step of an export: the manifest, assembled from the loaded checkpoint, the exported
graphs and what validation decided."""

from __future__ import annotations

from pathlib import Path

import onnx

from dyvte_rt.bundle import io_names
from dyvte_rt.bundle.manifest import (
    SCHEMA_VERSION,
    Dims,
    ExitInfo,
    FileInfo,
    GraphInfo,
    GraphQualityInfo,
    ImagePreprocess,
    Manifest,
    PruneInfo,
    QuantizationInfo,
    SegmentInfo,
    SourceInfo,
    TensorInfo,
    TokenInfo,
    sha256_file,
)
from dyvte_rt.errors import UnsupportedModelError
from export.graph_plans import prune_layers
from export.loading import LoadedModel

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.BOOL: "bool",
}


def assemble_manifest(
    loaded: LoadedModel,
    inputs,  # export.validation.ExportInputs
    plans: list,  # export.graph_plans.GraphPlan
    graphs: dict[str, GraphInfo],
    dtype: str,
    quantization: QuantizationInfo | None,
    files: list[Path],
) -> Manifest:
    """The bundle's manifest; `files` are every file written, hashed here."""
    routers = {p.layers.start: p.name for p in plans if p.role == "router"}
    segments = tuple(
        SegmentInfo(
            p.name,
            p.layers.start,
            p.layers.stop - 1,
            routers.get(p.layers.stop - 1),
            prune_scores=io_names.PRUNE_SCORES in p.output_names,
        )
        for p in plans
        if p.role == "segment"
    )
    ranges = [(s.first_layer, s.last_layer) for s in segments]
    return Manifest(
        schema_version=SCHEMA_VERSION,
        source=source_info(loaded),
        dtype=dtype,
        quantization=quantization,
        kv_flavour=inputs.kv,
        dims=dims_info(loaded),
        vision=loaded.adapter.vision_info(loaded.processor),
        tokens=token_info(loaded),
        chat_template=chat_template(loaded),
        segments=segments,
        exit=ExitInfo(
            candidate_layers=inputs.candidates,
            default_policy=inputs.default_policy.spec(),
            threshold=inputs.threshold,
            router_width=inputs.routers.width if inputs.routers is not None else None,
        ),
        graphs=graphs,
        files={f.name: FileInfo(sha256=sha256_file(f), bytes=f.stat().st_size) for f in files},
        prune=PruneInfo(layers=prune_layers(ranges), default_policy=inputs.default_prune.spec()),
    )


def quantization_info(
    bits: int, block_size: int, quant_format: str, accuracy_level: int, qualities: dict
) -> QuantizationInfo | None:
    """None for a float bundle; else the settings and each quantised graph's measured quality."""
    if not qualities:
        return None
    return QuantizationInfo(
        bits=bits,
        block_size=block_size,
        format=quant_format,
        symmetric=True,
        accuracy_level=accuracy_level,
        graphs={name: GraphQualityInfo(q.min_cosine, q.max_abs_error) for name, q in qualities.items()},
    )


def source_info(loaded: LoadedModel) -> SourceInfo:
    revision = loaded.path.name if loaded.repo_id and loaded.path.parent.name == "snapshots" else None
    return SourceInfo(
        model=loaded.source,
        repo_id=loaded.repo_id,
        revision=revision,
        family=loaded.adapter.family,
        architecture=type(loaded.model).__name__,
    )


def dims_info(loaded: LoadedModel) -> Dims:
    text = loaded.model.config.text_config
    dims = loaded.adapter.dims
    return Dims(
        hidden=dims.hidden,
        num_layers=dims.num_layers,
        num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads,
        head_dim=dims.kv_width // text.num_key_value_heads,
        mlp=dims.mlp,
        vocab_size=text.vocab_size,
        max_positions=text.max_position_embeddings,
        position_sections=loaded.adapter.position_sections,
    )


def image_preprocess(proc) -> ImagePreprocess:
    """The runtime's description of a CLIP-style Hugging Face image processor."""
    size = dict(proc.size or {}) if getattr(proc, "do_resize", False) else {}
    if size and "shortest_edge" not in size:
        raise UnsupportedModelError(f"image resize {size} is not supported (only shortest-edge resizing)")
    crop = dict(proc.crop_size or {}) if getattr(proc, "do_center_crop", False) else {}
    return ImagePreprocess(
        resize_shortest_edge=size.get("shortest_edge"),
        crop_height=crop.get("height"),
        crop_width=crop.get("width"),
        **pixel_steps(proc),
    )


def pixel_steps(proc) -> dict:
    """Resampling filter, rescaling, normalisation and RGB conversion of an image processor."""
    normalize = getattr(proc, "do_normalize", False)
    return {
        "resample": int(proc.resample),
        "rescale_factor": float(proc.rescale_factor) if getattr(proc, "do_rescale", False) else None,
        "mean": tuple(float(x) for x in proc.image_mean) if normalize else None,
        "std": tuple(float(x) for x in proc.image_std) if normalize else None,
        "convert_rgb": bool(getattr(proc, "do_convert_rgb", True)),
    }


def token_info(loaded: LoadedModel) -> TokenInfo:
    tokenizer = loaded.processor.tokenizer
    placeholder = getattr(loaded.processor, "image_token", "<image>")
    return TokenInfo(
        bos=tokenizer.bos_token_id,
        eos=loaded.adapter.eos_token_ids,
        pad=tokenizer.pad_token_id,
        image=loaded.adapter.image_token_id,
        image_placeholder=placeholder,
    )


def chat_template(loaded: LoadedModel) -> str:
    template = getattr(loaded.processor, "chat_template", None) or getattr(
        loaded.processor.tokenizer, "chat_template", None
    )
    if not template:
        raise UnsupportedModelError(f"the checkpoint at {loaded.path} has no chat template")
    return template


def write_tokenizer(loaded: LoadedModel, path: Path) -> None:
    """Copy the checkpoint's tokenizer.json where there is one, else serialise the fast tokenizer."""
    source = loaded.path / "tokenizer.json"
    if source.is_file():
        path.write_bytes(source.read_bytes())
        return
    backend = getattr(loaded.processor.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError(
            "the checkpoint has no fast tokenizer (tokenizer.json) to ship in the bundle"
        )
    backend.save(str(path))


def graph_info(path: Path, precision: str | None = None) -> GraphInfo:
    """I/O names, dtypes and shapes as the exported graph declares them, its weights' precision and
    the other graphs' files it reads (export.shared_table)."""
    from export.shared_table import shared_files

    model = onnx.load(str(path), load_external_data=False)

    def tensors(values) -> tuple[TensorInfo, ...]:
        out = []
        for value in values:
            kind = value.type.tensor_type
            shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in kind.shape.dim)
            out.append(TensorInfo(value.name, _ONNX_TO_NUMPY.get(kind.elem_type, str(kind.elem_type)), shape))
        return tuple(out)

    return GraphInfo(
        file=path.name,
        inputs=tensors(model.graph.input),
        outputs=tensors(model.graph.output),
        precision=precision,
        shared_files=tuple(shared_files(model, path.name)),
    )
