"""Assemble the manifest's model-describing parts from a loaded checkpoint."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import onnx

from dyvte_rt.bundle.manifest import (
    Dims,
    GraphInfo,
    ImagePreprocess,
    SourceInfo,
    TensorInfo,
    TokenInfo,
    VisionInfo,
)
from dyvte_rt.errors import UnsupportedModelError
from dyvte_rt.families.llava_next import most_visual_tokens
from export.loading import LoadedModel

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.BOOL: "bool",
}


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
        **_pixel_steps(proc),
    )


def _pixel_steps(proc) -> dict:
    """Resampling filter, rescaling, normalisation and RGB conversion of an image processor."""
    normalize = getattr(proc, "do_normalize", False)
    return {
        "resample": int(proc.resample),
        "rescale_factor": float(proc.rescale_factor) if getattr(proc, "do_rescale", False) else None,
        "mean": tuple(float(x) for x in proc.image_mean) if normalize else None,
        "std": tuple(float(x) for x in proc.image_std) if normalize else None,
        "convert_rgb": bool(getattr(proc, "do_convert_rgb", True)),
    }


def patch_grid_vision_info(loaded: LoadedModel) -> VisionInfo:
    """Qwen2-VL family: no fixed size; the processor's pixel budget bounds the patch grid."""
    proc = loaded.processor.image_processor
    model_grid = loaded.adapter.patch_grid
    size = dict(proc.size or {})
    if "shortest_edge" not in size or "longest_edge" not in size:
        raise UnsupportedModelError(f"image size {size} is not a pixel budget (shortest_edge, longest_edge)")
    ours = (model_grid.patch_size, model_grid.temporal_patch_size, model_grid.merge_size)
    theirs = (proc.patch_size, proc.temporal_patch_size, proc.merge_size)
    if ours != theirs:
        raise UnsupportedModelError(
            f"the image processor's patch sizes {theirs} differ from the model's {ours}"
        )
    grid = dataclasses.replace(
        model_grid, min_pixels=int(size["shortest_edge"]), max_pixels=int(size["longest_edge"])
    )
    preprocess = ImagePreprocess(
        resize_shortest_edge=None, crop_height=None, crop_width=None, **_pixel_steps(proc)
    )
    factor = grid.patch_size * grid.merge_size
    side = math.isqrt(grid.max_pixels) // factor * factor  # the largest square the budget allows
    return VisionInfo(
        image_height=side,
        image_width=side,
        visual_tokens=grid.max_pixels // factor**2,
        preprocess=preprocess,
        patch_grid=grid,
    )


def vision_info(loaded: LoadedModel) -> VisionInfo:
    if loaded.adapter.patch_grid is not None:
        return patch_grid_vision_info(loaded)
    vision = loaded.model.config.vision_config
    preprocess = image_preprocess(loaded.processor.image_processor)
    tiling = loaded.adapter.anyres
    sizes = {preprocess.resize_shortest_edge, preprocess.crop_height}
    if tiling is not None and sizes != {vision.image_size}:
        raise UnsupportedModelError(
            f"the image processor's size {preprocess.resize_shortest_edge} / crop {preprocess.crop_height} "
            f"differ from the vision tower's {vision.image_size}: any-resolution tiles need them equal"
        )
    per_view = (vision.image_size // vision.patch_size) ** 2
    return VisionInfo(
        image_height=preprocess.crop_height or vision.image_size,
        image_width=preprocess.crop_width or vision.image_size,
        visual_tokens=most_visual_tokens(tiling) if tiling is not None else per_view,
        preprocess=preprocess,
        anyres=tiling,
    )


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


def graph_info(path: Path) -> GraphInfo:
    """I/O names, dtypes and shapes as the exported graph declares them."""
    model = onnx.load(str(path), load_external_data=False)

    def tensors(values) -> tuple[TensorInfo, ...]:
        out = []
        for value in values:
            kind = value.type.tensor_type
            shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in kind.shape.dim)
            out.append(TensorInfo(value.name, _ONNX_TO_NUMPY.get(kind.elem_type, str(kind.elem_type)), shape))
        return tuple(out)

    return GraphInfo(file=path.name, inputs=tensors(model.graph.input), outputs=tensors(model.graph.output))
