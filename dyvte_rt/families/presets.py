"""The sizes of the released 7B checkpoints each family is measured against, in one place:
`dyvte-rt macs` counts their multiply-adds, `python -m export.tiny_models` builds random-weight
slices of them, and the benchmarks use them. Each preset is what that checkpoint's bundle manifest
would say (decoder dimensions, image preprocessing and layout), plus the vision tower's sizes a
random slice needs; numbers from the checkpoints' own config.json and preprocessor_config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dyvte_rt.bundle.manifest import Dims, ImagePreprocess, VisionInfo
from dyvte_rt.families import Family, make_family

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (not InternVL's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL's filter id


@dataclass(frozen=True)
class ModelPreset:
    name: str  # the --model alias of the checkpoint
    family: str  # its family's registry key
    dims: Dims
    vision: VisionInfo
    tower: dict[str, Any]  # the vision tower's config.json sizes (random slices)
    text_config: dict[str, Any] = field(default_factory=dict)  # more decoder config.json entries
    typical_image: tuple[int, int] | None = None  # (width, height) `macs` counts when none is given

    def family_object(self) -> Family:
        return make_family(self.family, self.vision, self.dims)


def _preprocess(mean=CLIP_MEAN, std=CLIP_STD, resize_crop: int | None = None) -> ImagePreprocess:
    """Bicubic, 1/255 and `mean`/`std`; a shortest-edge resize and centre crop to `resize_crop`
    only for one-view models (the others' layouts size the image)."""
    return ImagePreprocess(
        resize_shortest_edge=resize_crop,
        crop_height=resize_crop,
        crop_width=resize_crop,
        resample=BICUBIC,
        rescale_factor=1 / 255,
        mean=mean,
        std=std,
        convert_rgb=True,
    )


_VICUNA_7B = Dims(  # LLaVA-1.5-7B's and LLaVA-NeXT-Vicuna-7B's decoder (Llama, MHA)
    hidden=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    mlp=11008,
    vocab_size=32064,
    max_positions=4096,
)
_CLIP_L_336 = {  # CLIP ViT-L/14 at 336 pixels
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}

LLAVA_15_7B = ModelPreset(
    name="llava-7b",
    family="llava",
    dims=_VICUNA_7B,
    vision=VisionInfo(336, 336, 576, _preprocess(resize_crop=336)),
    tower=_CLIP_L_336,
    text_config={"rms_norm_eps": 1e-5},
)

LLAVA_NEXT_7B = ModelPreset(
    name="llava-next-7b",
    family="llava-next",
    dims=_VICUNA_7B,
    vision=VisionInfo(
        336,
        336,
        2928,  # the most any image takes: one filling the 672x672 canvas
        _preprocess(resize_crop=336),
        layout={
            "grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            "tile_size": 336,
            "feature_side": 24,
            "newline": True,
        },
    ),
    tower=_CLIP_L_336,
    text_config={"rms_norm_eps": 1e-5},
)

QWEN25_VL_7B = ModelPreset(
    name="qwen2.5-vl-7b",
    family="qwen2.5-vl",
    dims=Dims(
        hidden=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        mlp=18944,
        vocab_size=152064,
        max_positions=128000,
        position_sections=3,
    ),
    vision=VisionInfo(
        3584,
        3584,
        16384,  # the pixel budget's most: 12,845,056 pixels in 28x28 merged patches
        _preprocess(),
        layout={
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "min_pixels": 56 * 56,
            "max_pixels": 28 * 28 * 16384,
            "window_size": 112,
            "window_slots": 64,  # 8 x 8 patches in a 112-pixel window
        },
    ),
    tower={
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    text_config={
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "rms_norm_eps": 1e-6,
    },
    typical_image=(1280, 720),
)

INTERNVL3_8B = ModelPreset(
    name="internvl3-8b",
    family="internvl",
    dims=Dims(  # Qwen2.5-7B
        hidden=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        mlp=18944,
        vocab_size=151674,
        max_positions=32768,
    ),
    vision=VisionInfo(
        448,
        448,
        256 * 13,  # the most any image takes: 12 tiles and the thumbnail
        _preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's, not CLIP's
        layout={
            "tile_size": 448,
            "min_tiles": 1,
            "max_tiles": 12,
            "thumbnail": True,
            "tokens_per_tile": 256,
            "image_start": "<img>",
            "image_end": "</img>",
        },
    ),
    tower={  # InternViT-300M-448px-V2.5
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 448,
        "patch_size": 14,
        "layer_norm_eps": 1e-6,
    },
    text_config={"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "rms_norm_eps": 1e-6},
    typical_image=(1344, 1008),  # 4:3, 12 tiles and the thumbnail: 3,328 visual tokens
)

# Qwen3-VL-8B-Instruct's sizes as its published config.json and preprocessor_config.json give them
# (written from them, not read from a download here: no model hub on this machine)
QWEN3_VL_8B = ModelPreset(
    name="qwen3-vl-8b",
    family="qwen3-vl",
    dims=Dims(
        hidden=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp=12288,
        vocab_size=151936,
        max_positions=262144,
        position_sections=3,
    ),
    vision=VisionInfo(
        4096,
        4096,
        16384,  # the pixel budget's most: 16,777,216 pixels in 32x32 merged patches
        _preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        layout={
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "min_pixels": 65536,
            "max_pixels": 16777216,
            "window_size": None,
            "position_side": 48,
            "deepstack_layers": 3,
        },
    ),
    tower={
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "out_hidden_size": 4096,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    },
    text_config={
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        "rms_norm_eps": 1e-6,
    },
    typical_image=(1280, 720),
)

PRESETS: dict[str, ModelPreset] = {
    p.family: p for p in (LLAVA_15_7B, LLAVA_NEXT_7B, QWEN25_VL_7B, INTERNVL3_8B, QWEN3_VL_8B)
}
