"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`,
transformers 5.x).

Two things differ from LLaVA. Images of any size become a variable number of patches (the vision
tower's inputs: the patches plus each patch's row and column, and for Qwen2.5-VL the window order
and windows of its windowed attention, all computed by the runtime in numpy:
`dyvte_rt/patch_grid.py`), so the vision graph is run per image with dynamic shapes. And the
decoder's rotary positions have three sections (temporal, height, width): segment graphs take
position ids [3, B, S]; after an exit the text tokens keep theirs (docs/exit-semantics.md).

The vision tower's blocks are called here with one attention over the image instead of
transformers' per-sequence Python loop, which an exported graph cannot hold. Qwen2.5-VL's windowed
blocks attend window by window: the patches are gathered into padded slots [windows, slots] (the
window count is a dynamic axis, the slots per window a constant), attention runs per window with
the empty slots masked, and each patch's row is gathered back, so a windowed block costs what the
windows cost, not a P x P attention. Blocks that attend over the whole image (all of Qwen2-VL's,
Qwen2.5-VL's full-attention ones) take their queries QUERY_BLOCKS slices at a time, so a block's
scores are [heads, P / QUERY_BLOCKS, P] at once instead of [heads, P, P] (1.4 GiB per block at
1280x720). Tests compare the result with transformers' own tower.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from dyvte_rt.bundle import io_names
from dyvte_rt.bundle.manifest import ImagePreprocess, VisionInfo
from dyvte_rt.errors import UnsupportedModelError
from dyvte_rt.families import qwen2_vl as patch_grid
from dyvte_rt.families.presets import QWEN25_VL_7B
from dyvte_rt.families.qwen2_vl import PatchGridInfo
from export.families.base import FamilyAdapter
from export.graph_plans import GraphPlan, RandomInputs
from export.manifest_builder import pixel_steps
from export.parts import VisionPart
from export.tiny_models import (
    TINY_WORDS,
    TinySpec,
    decoder_sizes,
    fast_word_tokenizer,
    preset_decoder_sizes,
    random_model,
    save_tiny,
)

TRACED_GRID = (4, 6)  # merged patches (rows, columns) of the image in traced prompts: 24 visual tokens


class PatchImage(NamedTuple):
    """One image as the torch side passes it: its patches and their grid."""

    pixel_values: torch.Tensor  # [patches, C * T * p * p]
    grid: tuple[int, int, int]  # (frames, rows, columns) of patches

    def to(self, *args, **kwargs) -> PatchImage:
        return PatchImage(self.pixel_values.to(*args, **kwargs), self.grid)


class Qwen2VLAdapter(FamilyAdapter):
    family = "qwen2-vl"
    ALIASES: ClassVar[dict[str, str]] = {"qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct"}
    TINY_VARIANTS = ("tiny",)
    processor_class = "Qwen2VLProcessor"
    position_sections = 3  # the rotary embedding takes [3, B, S] (or [B, S]: all sections equal)
    LEGACY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))  # the Hub's repos

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vision = model.config.vision_config
        window = getattr(vision, "window_size", None)
        patch, merge = int(vision.patch_size), int(vision.spatial_merge_size)
        self._grid = PatchGridInfo(  # the pixel budget is the processor's: manifest_builder fills it in
            patch_size=int(vision.patch_size),
            temporal_patch_size=int(vision.temporal_patch_size),
            merge_size=int(vision.spatial_merge_size),
            min_pixels=0,
            max_pixels=0,
            window_size=int(window) if window else None,
            window_slots=(int(window) // merge // patch * merge) ** 2 if window else None,
        )

    @classmethod
    def load_processor(cls, path: Path, trust_remote_code: bool = False):
        """The checkpoint's processor without its video processor, which transformers builds only
        with torchvision (not installable beside the CPU torch used here)."""
        import transformers

        return load_image_only_processor(path, getattr(transformers, cls.processor_class))

    @property
    def patch_grid(self) -> PatchGridInfo:
        return self._grid

    @property
    def _visual(self) -> nn.Module:
        return self._model.model.visual

    @property
    def vision_modules(self) -> list[nn.Module]:
        return [self._visual]

    # -- images ------------------------------------------------------------------------------

    def image_input(self, inputs) -> PatchImage:
        """The processor's output (pixel_values [patches, ...], image_grid_thw [1, 3]) for one image."""
        grid = tuple(int(x) for x in inputs["image_grid_thw"][0])
        return PatchImage(inputs["pixel_values"], grid)

    def vision_inputs(
        self, pixel_values: torch.Tensor, grid: tuple[int, int, int]
    ) -> tuple[torch.Tensor, ...]:
        """The vision graph's inputs for one image: patches, their positions (and windows)."""
        inputs = [pixel_values, torch.from_numpy(patch_grid.vision_positions(grid, self._grid))]
        if self._grid.window_size is not None:
            window_index, window_ids = patch_grid.vision_windows(grid, self._grid)
            slots = patch_grid.window_slots(window_ids, self._grid.window_slots)
            inputs += [torch.from_numpy(a) for a in (window_index, *slots)]
        return tuple(inputs)

    def image_features(self, image: PatchImage) -> torch.Tensor:
        """[1, V, D]: the visual tokens of one image."""
        return self.vision_graph(*self.vision_inputs(image.pixel_values, image.grid))

    def vision_graph(
        self,
        pixel_values: torch.Tensor,
        vision_positions: torch.Tensor,
        window_index: torch.Tensor | None = None,
        window_gather: torch.Tensor | None = None,
        window_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """patches [P, C*T*p*p], positions [P, 2] (+ window order [V], the patch in each window's
        slot [W, S] and each patch's slot [P]) -> [1, V, D]."""
        visual = self._visual
        apply_rotary = sys.modules[type(visual).__module__].apply_rotary_pos_emb_vision
        hidden = visual.patch_embed(pixel_values)  # [P, E]
        cos, sin = visual.rotary_pos_emb(hidden, vision_positions)  # [P, head_dim]
        windows: tuple[torch.Tensor, torch.Tensor] | None = None
        if window_index is not None:
            unit = self._grid.merge_size**2

            def in_window_order(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(-1, unit, t.shape[-1])[window_index].reshape(-1, t.shape[-1])

            hidden, cos, sin = in_window_order(hidden), in_window_order(cos), in_window_order(sin)
            windows = window_gather, window_slots
        full = set(getattr(visual, "fullatt_block_indexes", None) or [])
        for index, block in enumerate(visual.blocks):
            hidden = _vision_block(block, hidden, cos, sin, None if index in full else windows, apply_rotary)
        merged = visual.merger(hidden)  # [V, D]
        if window_index is not None:  # back to row-major order
            merged = torch.zeros_like(merged).index_copy(0, window_index, merged)
        return merged[None]

    def prompt_positions(self, input_ids: torch.Tensor, image: PatchImage | None) -> tuple[torch.Tensor, int]:
        """Multimodal rotary positions [3, 1, N] of a prompt and the offset decoding continues at."""
        grids = [image.grid] if image is not None else []
        ids = input_ids[0].cpu().numpy()
        positions, offset = patch_grid.prompt_positions(ids, self.image_token_id, grids, self._grid)
        return torch.from_numpy(np.ascontiguousarray(positions))[:, None].to(input_ids.device), offset

    @classmethod
    def build_tiny(cls, variant: str, out: Path, seed: int = 0, **options: Any) -> Path:
        """`tiny`, or (Qwen2.5-VL) `qwen2.5-vl-7b-slice` with `layers` decoder layers; fp32 weights,
        written whole."""
        layers = cls.whole_fp32_tiny_layers(variant, options, ties=True)
        tie = bool(options.get("tie_embeddings", False))
        return build_tiny_qwen_vl(cls.family, out, seed, slice_layers=layers, tie_embeddings=tie)

    @property
    def traced_visual_tokens(self) -> int:
        return TRACED_GRID[0] * TRACED_GRID[1]

    def vision_plan(self, rand: RandomInputs, tolerance: float) -> GraphPlan:
        """One image's patches with their positions (and Qwen2.5-VL's windows). Traced on one grid;
        checked on grids of other sizes and aspect ratios."""
        info = self._grid
        m = info.merge_size
        width = 3 * info.temporal_patch_size * info.patch_size**2

        def image(rows: int, cols: int) -> tuple[torch.Tensor, ...]:
            grid = (1, rows * m, cols * m)
            pixels = rand.randn(rows * cols * m * m, width)
            return self.vision_inputs(pixels, grid)

        names = [io_names.PIXEL_VALUES, io_names.VISION_POSITIONS]
        merged = Dim("merged", min=1, max=1 << 14)
        per_image: tuple = ({0: m * m * merged},)
        if info.window_size is not None:
            names += [io_names.WINDOW_INDEX, io_names.WINDOW_GATHER, io_names.WINDOW_SLOTS]
            windows = Dim("windows", min=1, max=1 << 14)
            per_image = (*per_image, {0: merged}, {0: windows}, {0: m * m * merged})
        return GraphPlan(
            "vision",
            "vision",
            VisionPart(self),
            names,
            [io_names.IMAGE_FEATURES],
            sample=image(*TRACED_GRID),
            dynamic_shapes=({0: m * m * merged}, per_image),  # VisionPart(pixel_values, *per_image)
            dtype=rand.dtype,
            tolerance=tolerance,
            cases=lambda: [image(1, 1), image(5, 3), image(9, 10)],
        )

    def vision_info(self, processor) -> VisionInfo:
        """No fixed size: the processor's pixel budget bounds the patch grid."""
        proc = processor.image_processor
        size = dict(proc.size or {})
        if "shortest_edge" not in size or "longest_edge" not in size:
            raise UnsupportedModelError(
                f"image size {size} is not a pixel budget (shortest_edge, longest_edge)"
            )
        ours = (self._grid.patch_size, self._grid.temporal_patch_size, self._grid.merge_size)
        theirs = (proc.patch_size, proc.temporal_patch_size, proc.merge_size)
        if ours != theirs:
            raise UnsupportedModelError(
                f"the image processor's patch sizes {theirs} differ from the model's {ours}"
            )
        grid = dataclasses.replace(
            self._grid, min_pixels=int(size["shortest_edge"]), max_pixels=int(size["longest_edge"])
        )
        preprocess = ImagePreprocess(
            resize_shortest_edge=None, crop_height=None, crop_width=None, **pixel_steps(proc)
        )
        factor = grid.patch_size * grid.merge_size
        side = math.isqrt(grid.max_pixels) // factor * factor  # the largest square the budget allows
        return VisionInfo(
            image_height=side,
            image_width=side,
            visual_tokens=grid.max_pixels // factor**2,
            preprocess=preprocess,
            layout=dataclasses.asdict(grid),
        )


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2.5-vl"
    ALIASES: ClassVar[dict[str, str]] = {
        "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
        "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    }
    TINY_VARIANTS = ("tiny", "qwen2.5-vl-7b-slice")
    processor_class = "Qwen2_5_VLProcessor"


# Query slices of a full-attention block: the scores of 16 heads over the most patches Qwen's
# processor makes (16,384) stay near 1 GiB per slice, and 1280x720's 4,784 patches take 299 rows.
QUERY_BLOCKS = 16


def _vision_block(block, hidden, cos, sin, windows, apply_rotary) -> torch.Tensor:
    """One vision block: attention over the whole image (or within each window: `windows` =
    (gather [W, S], slots [P])), in fp32 for fp16 graphs, then the MLP."""
    attn = block.attn
    x = block.norm1(hidden)
    length = x.shape[0]
    q, k, v = attn.qkv(x).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary(q, k, cos, sin)
    q, k, v = (t.float() for t in (q, k, v))  # [P, H, head_dim]
    out = _query_blocked_attention(q, k, v) if windows is None else _windowed_attention(q, k, v, *windows)
    hidden = hidden + attn.proj(out.reshape(length, -1).to(x.dtype))
    return hidden + block.mlp(block.norm2(hidden))


def _query_blocked_attention(q, k, v) -> torch.Tensor:
    """[P, H, d] each -> [P, H, d]: attention over all patches, the queries QUERY_BLOCKS slices at
    a time (slice i is rows i*P//n to (i+1)*P//n; an image with fewer patches than slices leaves
    some slices empty, which ONNX Runtime runs as empty tensors)."""
    length = q.shape[0]
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, P, d]
    bounds = [i * length // QUERY_BLOCKS for i in range(QUERY_BLOCKS + 1)]
    slices = [F.scaled_dot_product_attention(q[:, :, a:b], k, v) for a, b in itertools.pairwise(bounds)]
    return torch.cat(slices, dim=2)[0].transpose(0, 1)


def _windowed_attention(q, k, v, gather: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[P, H, d] each -> [P, H, d]: attention within each window, its patches gathered into the
    window's slots (empty slots, -1 in `gather`, are masked as keys; their queries are dropped)."""
    windows, size = gather.shape
    rows = gather.clamp(min=0).reshape(-1)

    def in_slots(t: torch.Tensor) -> torch.Tensor:  # [W, H, S, d]
        return t[rows].reshape(windows, size, t.shape[1], t.shape[2]).transpose(1, 2)

    keys = (gather >= 0)[:, None, None, :]  # [W, 1, 1, S]
    out = F.scaled_dot_product_attention(in_slots(q), in_slots(k), in_slots(v), attn_mask=keys)
    return out.transpose(1, 2).reshape(windows * size, q.shape[1], q.shape[2])[slots]


def load_image_only_processor(path: Path, base: type, **options: Any):
    """A checkpoint's `base` processor (a class with a video processor) built from its image
    processor, tokenizer and chat template alone; `options`: the processor's other arguments."""
    import transformers

    image_processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    template = tokenizer.chat_template
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if template is None and (path / "chat_template.json").is_file():
        template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    return image_only_processor(base)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=template,
        **options,
    )


def image_only_processor(base: type) -> type:
    """`base` (a Qwen VL processor class) that accepts no video processor."""

    class ImageOnlyProcessor(base):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    ImageOnlyProcessor.__name__ = base.__name__
    return ImageOnlyProcessor


# Qwen2-VL's chat format (without its default system turn), as its processor renders it.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Tiny Qwen VL images: 14-pixel patches merged 2 x 2 (as the real models), 4 to 64 visual tokens
QWEN_TINY_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}


# Slices keep the word tokenizer's vocabulary: prefill runs the head on the last token only, so the
# exit's timing does not depend on it, and the slice fits on this machine's disk.
def slice_pixels(preset=QWEN25_VL_7B) -> dict:
    """A preset's pixel budget as the Qwen image processor takes it."""
    layout = preset.vision.layout
    return {"shortest_edge": layout["min_pixels"], "longest_edge": layout["max_pixels"]}


def build_tiny_qwen_vl(
    variant: str,
    out: Path,
    seed: int = 0,
    *,
    slice_layers: int | None = None,
    tie_embeddings: bool = False,
) -> Path:
    """A tiny random Qwen2-VL (`variant` "qwen2-vl") or Qwen2.5-VL ("qwen2.5-vl", windowed vision
    attention in its first block) checkpoint with its image processor, tokenizer and chat template
    (no video processor: transformers builds those only with torchvision). With `slice_layers`, a
    Qwen2.5-VL-7B-shaped slice instead: true sizes and pixel budget, that many decoder layers.
    `tie_embeddings`: the LM head is the embedding table, as in Qwen2-VL-2B."""
    import transformers

    if slice_layers is not None and variant != "qwen2.5-vl":
        raise ValueError(f"the 7B-shaped slice is a qwen2.5-vl model, not {variant}")

    tokenizer, token_ids = qwen_tokenizer()
    spec = TinySpec(kv_heads=2)
    text = {
        **qwen_text(tokenizer, spec),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }
    common = {
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "depth": 2,
    }
    if variant == "qwen2-vl":
        vision = {**common, "embed_dim": 32, "hidden_size": spec.hidden, "num_heads": 4, "mlp_ratio": 2}
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif variant == "qwen2.5-vl":
        vision = {
            **common,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": spec.hidden,
            "window_size": 56,  # 2 x 2 merged patches per window
            "fullatt_block_indexes": [1],
        }
        config_class, model_class = (
            transformers.Qwen2_5_VLConfig,
            transformers.Qwen2_5_VLForConditionalGeneration,
        )
    else:
        raise ValueError(f"unknown Qwen VL variant {variant!r}")
    vision["initializer_range"] = spec.init_std
    pixels, head_std = dict(QWEN_TINY_PIXELS), spec.head_std
    if slice_layers is not None:
        text = {**text, **preset_decoder_sizes(QWEN25_VL_7B, slice_layers)}
        vision = {**vision, **QWEN25_VL_7B.tower, "initializer_range": 0.02}
        pixels, head_std = slice_pixels(), 0.02
    config = config_class(text_config=text, vision_config=vision, **token_ids)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = tie_embeddings
    model = random_model(model_class, config, seed, head_std, tokenizer)
    image_processor = transformers.Qwen2VLImageProcessorPil(size=pixels)
    return save_tiny(out, model, image_processor, tokenizer, QWEN_VL_CHAT_TEMPLATE)


def qwen_tokenizer():
    """The word tokenizer with the Qwen VL special tokens and chat template, and the token ids a
    Qwen VL config names (image_token_id, video_token_id, vision_start/end_token_id)."""
    tokenizer = fast_word_tokenizer(
        TINY_WORDS, QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    )
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    ids = dict(zip(QWEN_SPECIALS, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIALS)), strict=True))
    names = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return tokenizer, {name: ids[token] for name, token in names.items()}


def qwen_text(tokenizer, spec: TinySpec) -> dict:
    """A tiny Qwen VL text config's sizes and special ids (rotary settings are the family's)."""
    return {
        "vocab_size": len(tokenizer),
        **decoder_sizes(spec),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
