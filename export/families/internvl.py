"""InternVL 2.5 / 3 / 3.5 (`InternVLForConditionalGeneration`, transformers 5.x, the `-hf`
checkpoints): an InternViT vision tower, a pixel-shuffle projector and a Qwen2 / Qwen3 / Llama
decoder.

Images are dynamic 448-pixel tiles plus a thumbnail (`dyvte_rt.families.internvl`). The vision
graph takes one image's tiles [T, 3, S, S] and gives their visual tokens [1, T * 256, D] in tile
order: the tower's last hidden state without its CLS token, folded 2 x 2 by the pixel shuffle
(downsample ratio 0.5) and projected. Positions are plain; the prompt wraps the visual tokens in
`<img>` … `</img>`.

Tiny checkpoints: a 2-layer InternViT on 28-pixel tiles (7-pixel patches: 4 visual tokens a tile,
up to 6 tiles and a thumbnail) under a Qwen2 decoder, with the GotOcr2 image processor, a word
tokenizer holding InternVL's special tokens and a Qwen-style chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dyvte_rt.bundle import io_names
from dyvte_rt.bundle.manifest import ImagePreprocess, VisionInfo
from dyvte_rt.errors import UnsupportedModelError
from dyvte_rt.families.internvl import TileInfo, max_views
from dyvte_rt.families.presets import INTERNVL3_8B
from export.families.base import FamilyAdapter
from export.families.llava import LlavaAdapter
from export.families.qwen2_vl import load_image_only_processor
from export.graph_plans import VIEWS, GraphPlan, RandomInputs
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

INTERNVL_SPECIALS = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
INTERNVL_ROLES = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# InternVL's chat format without its default system turn: the image's placeholder, then the text
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_TILE, TINY_PATCH, TINY_MAX_TILES = 28, 7, 6


class InternVLAdapter(FamilyAdapter):
    family = "internvl"
    ALIASES: ClassVar[dict[str, str]] = {
        "internvl3-1b": "OpenGVLab/InternVL3-1B-hf",
        "internvl3-2b": "OpenGVLab/InternVL3-2B-hf",
        "internvl3-8b": "OpenGVLab/InternVL3-8B-hf",
        "internvl3.5-1b": "OpenGVLab/InternVL3_5-1B-HF",
        "internvl3.5-2b": "OpenGVLab/InternVL3_5-2B-HF",
        "internvl3.5-8b": "OpenGVLab/InternVL3_5-8B-HF",
    }
    TINY_VARIANTS = ("tiny", "internvl3-8b-slice")
    # transformers saves InternVL (and the Hub's -hf repositories hold it) in LLaVA's layout
    LEGACY_PREFIXES = LlavaAdapter.LEGACY_PREFIXES

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        if config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not "
                "supported for InternVL (only 'default', which drops the CLS token)"
            )
        if float(config.downsample_ratio) != 0.5:
            raise UnsupportedModelError(
                f"downsample_ratio {config.downsample_ratio} is not supported (only 0.5)"
            )
        vision = config.vision_config
        self._tile = int(vision.image_size[0])
        side = self._tile // int(vision.patch_size[0])
        if tuple(vision.image_size) != (self._tile, self._tile) or side % 2:
            raise UnsupportedModelError(
                f"vision image_size {tuple(vision.image_size)} / patch_size {tuple(vision.patch_size)} "
                "must give a square, even patch grid"
            )
        self._tokens_per_tile = (side // 2) ** 2
        self._layer = config.vision_feature_layer

    @classmethod
    def load_processor(cls, path: Path, trust_remote_code: bool = False):
        """The checkpoint's processor without its video processor (transformers builds that only
        with torchvision, which does not install beside the CPU torch used here)."""
        import transformers

        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        return load_image_only_processor(
            path, transformers.InternVLProcessor, image_seq_length=int(config.image_seq_length)
        )

    @classmethod
    def build_tiny(cls, variant: str, out: Path, seed: int = 0, **options: Any) -> Path:
        """`tiny`, or `internvl3-8b-slice` with `layers` decoder layers; fp32 weights, written whole."""
        return build_tiny_internvl(out, seed, slice_layers=cls.whole_fp32_tiny_layers(variant, options))

    @property
    def vision_modules(self) -> list[nn.Module]:
        return [self._model.model.vision_tower, self._model.model.multi_modal_projector]

    def image_input(self, inputs) -> torch.Tensor:
        """The processor's output for one image: its tiles [T, 3, S, S]."""
        return inputs["pixel_values"]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[1, T * tokens_per_tile, D]: one image's visual tokens, tile after tile."""
        model = self._model.model
        out = model.vision_tower(pixel_values, output_hidden_states=self._layer != -1, return_dict=True)
        hidden = out.last_hidden_state if self._layer == -1 else out.hidden_states[self._layer]
        hidden = hidden[:, 1:]  # drop CLS
        tiles, _, width = hidden.shape
        side = self._tile // int(model.config.vision_config.patch_size[0])
        shuffled = model.pixel_shuffle(hidden.reshape(tiles, side, side, width), scale_factor=0.5)
        features = model.multi_modal_projector(shuffled.reshape(tiles, -1, shuffled.shape[-1]))
        return features.reshape(1, -1, features.shape[-1])

    @property
    def traced_visual_tokens(self) -> int:
        return 3 * self._tokens_per_tile  # two tiles and the thumbnail

    def vision_plan(self, rand: RandomInputs, tolerance: float) -> GraphPlan:
        """One image's tiles; traced on three, checked on one, two and the most an image can take."""
        side = self._tile

        def image(views: int) -> tuple[torch.Tensor]:
            return (rand.randn(views, 3, side, side),)

        most = max_views(self.tile_info({}))
        return GraphPlan(
            "vision",
            "vision",
            VisionPart(self),
            [io_names.PIXEL_VALUES],
            [io_names.IMAGE_FEATURES],
            sample=image(3),
            dynamic_shapes=({0: VIEWS},),
            dtype=rand.dtype,
            tolerance=tolerance,
            cases=lambda: [image(1), image(2), image(most)],
        )

    def tile_info(self, processor_settings: dict) -> TileInfo:
        return TileInfo(
            tile_size=self._tile,
            min_tiles=int(processor_settings.get("min_patches", 1)),
            max_tiles=int(processor_settings.get("max_patches", 12)),
            thumbnail=True,
            tokens_per_tile=self._tokens_per_tile,
            image_start=processor_settings.get("image_start", "<img>"),
            image_end=processor_settings.get("image_end", "</img>"),
        )

    def vision_info(self, processor) -> VisionInfo:
        import dataclasses

        proc = processor.image_processor
        size = dict(proc.size or {})
        if (size.get("height"), size.get("width")) != (self._tile, self._tile):
            raise UnsupportedModelError(
                f"the image processor's size {size} differs from the vision tower's {self._tile} tiles"
            )
        if not getattr(proc, "crop_to_patches", False):
            raise UnsupportedModelError("the image processor does not crop images to tiles (crop_to_patches)")
        if int(processor.image_seq_length) != self._tokens_per_tile:
            raise UnsupportedModelError(
                f"the processor's image_seq_length {processor.image_seq_length} differs from the "
                f"model's {self._tokens_per_tile} visual tokens per tile"
            )
        info = self.tile_info(
            {
                "min_patches": proc.min_patches,
                "max_patches": proc.max_patches,
                "image_start": processor.start_image_token,
                "image_end": processor.end_image_token,
            }
        )
        preprocess = ImagePreprocess(
            resize_shortest_edge=None, crop_height=None, crop_width=None, **pixel_steps(proc)
        )
        return VisionInfo(
            image_height=self._tile,
            image_width=self._tile,
            visual_tokens=self._tokens_per_tile * max_views(info),
            preprocess=preprocess,
            layout=dataclasses.asdict(info),
        )


def build_tiny_internvl(out: Path, seed: int = 0, *, slice_layers: int | None = None) -> Path:
    """A tiny random InternVL checkpoint (`InternVLForConditionalGeneration`, Qwen2 decoder) with
    its image processor, tokenizer and chat template (no video processor). With `slice_layers`, an
    InternVL3-8B-shaped slice instead: the true decoder widths with that many layers, the whole
    InternViT-300M tower on 448-pixel tiles, up to 12 tiles; the word tokenizer's vocabulary (prefill
    runs the head on the last token only, so the exit's timing does not depend on it)."""
    import transformers

    tokenizer = fast_word_tokenizer(TINY_WORDS, INTERNVL_SPECIALS, INTERNVL_ROLES)
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    spec = TinySpec(kv_heads=2)
    tile, patch, max_tiles = TINY_TILE, TINY_PATCH, TINY_MAX_TILES
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    widths, preprocess, head_std = decoder_sizes(spec), {}, spec.head_std
    if slice_layers is not None:
        preset = INTERNVL3_8B
        vision = dict(preset.tower)
        tile, patch = vision.pop("image_size"), vision.pop("patch_size")
        max_tiles = preset.vision.layout["max_tiles"]
        widths = preset_decoder_sizes(preset, slice_layers)
        pre = preset.vision.preprocess
        preprocess, head_std = {"image_mean": list(pre.mean), "image_std": list(pre.std)}, 0.02
    side = tile // patch
    config = transformers.InternVLConfig(
        vision_config={
            **vision,
            "image_size": tile,
            "patch_size": patch,
            "initializer_range": widths["initializer_range"],
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            **widths,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=(side // 2) ** 2,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    model = random_model(transformers.InternVLForConditionalGeneration, config, seed, head_std, tokenizer)
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layer:  # layer scale: let the blocks count
            layer.lambda_1.fill_(1.0)
            layer.lambda_2.fill_(1.0)
        model.model.vision_tower.embeddings.position_embeddings.normal_(0.0, widths["initializer_range"])
        model.model.vision_tower.embeddings.cls_token.normal_(0.0, widths["initializer_range"])
    image_processor = transformers.GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        **preprocess,
    )
    return save_tiny(out, model, image_processor, tokenizer, INTERNVL_CHAT_TEMPLATE)
