"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`,
transformers 5.x).

Two things differ from LLaVA. Images of any size become a variable number of patches (the vision
tower's inputs: the patches plus each patch's row and column, and for Qwen2.5-VL the window order
and windows of its windowed attention, all computed by the runtime in numpy:
`dyvte_rt/patch_grid.py`), so the vision graph is run per image with dynamic shapes. And the
decoder's rotary positions have three sections (temporal, height, width): segment graphs take
position ids [3, B, S]; after an exit the text tokens keep theirs (DESIGN §3, generalised).

The vision tower's blocks are called here with one attention over the image (windowed where
Qwen2.5-VL windows it, as a mask) instead of transformers' per-window Python loop, which an
exported graph cannot hold; tests compare the result with transformers' own tower.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dyvte_rt.bundle.manifest import PatchGridInfo
from dyvte_rt.families import qwen2_vl as patch_grid
from export.families.base import DecoderAdapter


class PatchImage(NamedTuple):
    """One image as the torch side passes it: its patches and their grid."""

    pixel_values: torch.Tensor  # [patches, C * T * p * p]
    grid: tuple[int, int, int]  # (frames, rows, columns) of patches

    def to(self, *args, **kwargs) -> PatchImage:
        return PatchImage(self.pixel_values.to(*args, **kwargs), self.grid)


class Qwen2VLAdapter(DecoderAdapter):
    family = "qwen2-vl"
    processor_class = "Qwen2VLProcessor"
    position_sections = 3  # the rotary embedding takes [3, B, S] (or [B, S]: all sections equal)
    LEGACY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))  # the Hub's repos

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vision = model.config.vision_config
        window = getattr(vision, "window_size", None)
        self._grid = PatchGridInfo(  # the pixel budget is the processor's: manifest_builder fills it in
            patch_size=int(vision.patch_size),
            temporal_patch_size=int(vision.temporal_patch_size),
            merge_size=int(vision.spatial_merge_size),
            min_pixels=0,
            max_pixels=0,
            window_size=int(window) if window else None,
        )

    @classmethod
    def load_processor(cls, path: Path):
        """The checkpoint's processor without its video processor, which transformers builds only
        with torchvision (not installable beside the CPU torch used here)."""
        import transformers

        image_processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        template = tokenizer.chat_template
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        if template is None and (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text())["chat_template"]
        base = getattr(transformers, cls.processor_class)
        return image_only_processor(base)(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=template
        )

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
            inputs += [torch.from_numpy(a) for a in patch_grid.vision_windows(grid, self._grid)]
        return tuple(inputs)

    def image_features(self, image: PatchImage) -> torch.Tensor:
        """[1, V, D]: the visual tokens of one image."""
        return self.vision_graph(*self.vision_inputs(image.pixel_values, image.grid))

    def vision_graph(
        self,
        pixel_values: torch.Tensor,
        vision_positions: torch.Tensor,
        window_index: torch.Tensor | None = None,
        window_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """patches [P, C*T*p*p], positions [P, 2] (+ window order [V], windows [P]) -> [1, V, D]."""
        visual = self._visual
        apply_rotary = sys.modules[type(visual).__module__].apply_rotary_pos_emb_vision
        hidden = visual.patch_embed(pixel_values)  # [P, E]
        cos, sin = visual.rotary_pos_emb(hidden, vision_positions)  # [P, head_dim]
        windowed: torch.Tensor | None = None
        if window_index is not None:
            unit = self._grid.merge_size**2

            def in_window_order(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(-1, unit, t.shape[-1])[window_index].reshape(-1, t.shape[-1])

            hidden, cos, sin = in_window_order(hidden), in_window_order(cos), in_window_order(sin)
            windowed = window_ids[:, None] == window_ids[None, :]  # [P, P]
        full = set(getattr(visual, "fullatt_block_indexes", None) or [])
        for index, block in enumerate(visual.blocks):
            mask = None if windowed is None or index in full else windowed
            hidden = _vision_block(block, hidden, cos, sin, mask, apply_rotary)
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


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2.5-vl"
    processor_class = "Qwen2_5_VLProcessor"


def _vision_block(block, hidden, cos, sin, mask, apply_rotary) -> torch.Tensor:
    """One vision block: attention over the whole image (or within windows, by `mask` [P, P]),
    in fp32 for fp16 graphs, then the MLP."""
    attn = block.attn
    x = block.norm1(hidden)
    length = x.shape[0]
    q, k, v = attn.qkv(x).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1)[None].float() for t in (q, k, v))  # [1, H, P, head_dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out[0].transpose(0, 1).reshape(length, -1).to(x.dtype)
    hidden = hidden + attn.proj(out)
    return hidden + block.mlp(block.norm2(hidden))


def image_only_processor(base: type) -> type:
    """`base` (a Qwen VL processor class) that accepts no video processor."""

    class ImageOnlyProcessor(base):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    ImageOnlyProcessor.__name__ = base.__name__
    return ImageOnlyProcessor
