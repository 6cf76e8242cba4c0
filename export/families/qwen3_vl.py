"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, transformers 5.x): Qwen2-VL's patch grids and
three-section rotary positions (interleaved across the head by the decoder's own rotary
embedding), a vision tower with learned, interpolated position embeddings, and DeepStack.

The vision graph takes one image's patches, their (row, column) and their four bilinear taps into
the learned position grid with weights (computed by the runtime: `dyvte_rt/families/qwen3_vl.py`),
and gives the visual tokens and the DeepStack levels [1, n, V, D] the tower's intermediate blocks
produce. Level i is added to the visual tokens' hidden states after decoder layer i: segments end
after each such layer (`segment_boundaries`) and the `deepstack_add` graph adds the level where the
visual tokens still are; the reference does the same (docs/exit-semantics.md, DeepStack).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.export import Dim

from dyvte_rt.bundle import io_names
from dyvte_rt.families import qwen2_vl as patch_grid
from dyvte_rt.families.presets import QWEN3_VL_8B
from dyvte_rt.families.qwen3_vl import DeepStackGridInfo, interpolation_taps
from export.families.qwen2_vl import (
    QWEN_VL_CHAT_TEMPLATE,
    TRACED_GRID,
    Qwen2VLAdapter,
    _vision_block,
    qwen_text,
    qwen_tokenizer,
    slice_pixels,
)
from export.graph_plans import GraphPlan, RandomInputs
from export.parts import VisionPart
from export.tiny_models import TinySpec, preset_decoder_sizes, random_model, save_tiny

# Tiny Qwen3-VL images: 16-pixel patches merged 2 x 2 (as the real models), 4 to 64 visual tokens
QWEN3_TINY_PIXELS = {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 64}


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3-vl"
    ALIASES: ClassVar[dict[str, str]] = {
        "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
        "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
        "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
    }
    TINY_VARIANTS = ("tiny", "qwen3-vl-8b-slice")
    processor_class = "Qwen3VLProcessor"
    LEGACY_PREFIXES = ()

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vision = model.config.vision_config
        self._grid = DeepStackGridInfo(
            **dataclasses.asdict(self._grid),
            position_side=math.isqrt(int(vision.num_position_embeddings)),
            deepstack_layers=len(vision.deepstack_visual_indexes),
        )

    @property
    def deepstack_layers(self) -> int:
        return self._grid.deepstack_layers

    @property
    def segment_boundaries(self) -> tuple[int, ...]:
        """Segments end after each decoder layer a DeepStack level joins."""
        return tuple(range(self.deepstack_layers))

    @classmethod
    def build_tiny(cls, variant: str, out: Path, seed: int = 0, **options: Any) -> Path:
        return build_tiny_qwen3_vl(out, seed, slice_layers=cls.whole_fp32_tiny_layers(variant, options))

    # -- images ------------------------------------------------------------------------------

    def vision_inputs(
        self, pixel_values: torch.Tensor, grid: tuple[int, int, int]
    ) -> tuple[torch.Tensor, ...]:
        """The vision graph's inputs for one image: patches, positions, position-grid taps."""
        index, weights = interpolation_taps(grid, self._grid)
        positions = patch_grid.vision_positions(grid, self._grid)
        return (
            pixel_values,
            torch.from_numpy(positions),
            torch.from_numpy(index),
            torch.from_numpy(weights),  # float32 in every bundle: the runtime computes them so
        )

    def image_features(self, image) -> torch.Tensor:
        return self.vision_outputs(image)[0]

    def vision_outputs(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """([1, V, D] visual tokens, [1, n, V, D] DeepStack levels) of one image."""
        return self.vision_graph(*self.vision_inputs(image.pixel_values, image.grid))

    def vision_graph(
        self,
        pixel_values: torch.Tensor,
        vision_positions: torch.Tensor,
        interp_index: torch.Tensor,
        interp_weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self._visual
        apply_rotary = sys.modules[type(visual).__module__].apply_rotary_pos_emb_vision
        hidden = visual.patch_embed(pixel_values)  # [P, E]
        taps = visual.pos_embed(interp_index) * interp_weights[:, :, None].to(hidden.dtype)  # [P, 4, E]
        hidden = hidden + taps.sum(1).to(hidden.dtype)
        cos, sin = visual.rotary_pos_emb(hidden, vision_positions)
        levels = []
        for index, block in enumerate(visual.blocks):
            hidden = _vision_block(block, hidden, cos, sin, None, apply_rotary)
            if index in visual.deepstack_visual_indexes:
                merger = visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(index)]
                levels.append(merger(hidden))  # [V, D]
        return visual.merger(hidden)[None], torch.stack(levels)[None]  # [1, V, D], [1, n, V, D]

    def vision_plan(self, rand: RandomInputs, tolerance: float) -> GraphPlan:
        """One image's patches, positions and position-grid taps; traced on one grid, checked on
        grids of other sizes and aspect ratios."""
        info = self._grid
        m = info.merge_size
        width = 3 * info.temporal_patch_size * info.patch_size**2

        def image(rows: int, cols: int) -> tuple[torch.Tensor, ...]:
            return self.vision_inputs(rand.randn(rows * cols * m * m, width), (1, rows * m, cols * m))

        merged = Dim("merged", min=1, max=1 << 14)
        patches = {0: m * m * merged}
        return GraphPlan(
            "vision",
            "vision",
            VisionPart(self),
            [
                io_names.PIXEL_VALUES,
                io_names.VISION_POSITIONS,
                io_names.INTERP_INDEX,
                io_names.INTERP_WEIGHTS,
            ],
            [io_names.IMAGE_FEATURES, io_names.DEEPSTACK_FEATURES],
            sample=image(*TRACED_GRID),
            dynamic_shapes=(patches, (patches, patches, patches)),  # VisionPart(pixel_values, *per_image)
            dtype=rand.dtype,
            tolerance=tolerance,
            cases=lambda: [image(1, 1), image(5, 3), image(9, 10)],
        )


def build_tiny_qwen3_vl(out: Path, seed: int = 0, *, slice_layers: int | None = None) -> Path:
    """A tiny random Qwen3-VL checkpoint: a 3-block vision tower whose blocks 0 and 1 feed two
    DeepStack levels (into decoder layers 0 and 1 of four, so exits at 0, 1 and 2 fall before, at
    and after the last injection), a 4 x 4 learned position grid, interleaved three-section rotary
    positions; image processor, tokenizer and chat template, no video processor. With
    `slice_layers`, a Qwen3-VL-8B-shaped slice instead: the true decoder widths with that many
    layers, the whole vision tower (27 blocks, three DeepStack levels) and its pixel budget; the
    word tokenizer's vocabulary (prefill runs the head on the last token only)."""
    import transformers

    tokenizer, token_ids = qwen_tokenizer()
    spec = TinySpec(kv_heads=2)
    text = {
        **qwen_text(tokenizer, spec),
        "head_dim": spec.hidden // spec.heads,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    }
    vision = {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": spec.hidden,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0, 1],
        "initializer_range": spec.init_std,
    }
    pixels, head_std, normalisation = dict(QWEN3_TINY_PIXELS), spec.head_std, {}
    if slice_layers is not None:
        preset = QWEN3_VL_8B
        text = {**text, **preset_decoder_sizes(preset, slice_layers), "head_dim": preset.dims.head_dim}
        vision = {**vision, **preset.tower, "initializer_range": 0.02}
        pixels, head_std = slice_pixels(preset), 0.02
        pre = preset.vision.preprocess
        normalisation = {"image_mean": list(pre.mean), "image_std": list(pre.std)}
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids)
    model = random_model(transformers.Qwen3VLForConditionalGeneration, config, seed, head_std, tokenizer)
    image_processor = transformers.Qwen2VLImageProcessorPil(
        size=pixels, patch_size=16, merge_size=2, **normalisation
    )
    return save_tiny(out, model, image_processor, tokenizer, QWEN_VL_CHAT_TEMPLATE)
