"""Image preprocessing and position ids of the torch-free runtime, against Hugging Face's processor.

    python benchmarks/preprocess_speed.py --family qwen2.5-vl --image 1280x720 --runs 20
    python benchmarks/preprocess_speed.py --family llava-next --image 672x672 --runs 20
    python benchmarks/preprocess_speed.py --family internvl --image 1280x720 --runs 20
    python benchmarks/preprocess_speed.py --family qwen3-vl --image 1280x720 --runs 20

For an image of the given size (random pixels): the runtime's `prepare_image` (resize, normalise,
patchify or tile, vision positions / windows / packing index) plus, for Qwen, the prompt's
multimodal rotary positions — against Hugging Face's PIL image processor with the same settings
(the 7B/8B presets': Qwen2.5-VL-7B's and Qwen3-VL-8B's pixel budgets, LLaVA-NeXT-7B's canvases,
InternVL3-8B's tiles), each timed alternately, medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from PIL import Image

from dyvte_rt.cli.macs import image_size
from dyvte_rt.families.presets import PRESETS


def family_and_hf(family: str):
    """The family object of the 7B preset, and Hugging Face's image processor with its settings."""
    import transformers

    preset = PRESETS[family]
    layout = preset.vision.layout
    if family in ("qwen2.5-vl", "qwen3-vl"):
        size = {"shortest_edge": layout["min_pixels"], "longest_edge": layout["max_pixels"]}
        pre = preset.vision.preprocess
        hf = transformers.Qwen2VLImageProcessorPil(
            size=size,
            patch_size=layout["patch_size"],
            merge_size=layout["merge_size"],
            image_mean=list(pre.mean),
            image_std=list(pre.std),
        )
        return preset.family_object(), hf
    if family == "internvl":
        pre = preset.vision.preprocess
        hf = transformers.GotOcr2ImageProcessorPil(
            size={"height": layout["tile_size"], "width": layout["tile_size"]},
            crop_to_patches=True,
            min_patches=layout["min_tiles"],
            max_patches=layout["max_tiles"],
            image_mean=list(pre.mean),
            image_std=list(pre.std),
        )
        return preset.family_object(), hf
    hf = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=layout["grid_pinpoints"],
    )
    return preset.family_object(), hf


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family", choices=("qwen2.5-vl", "qwen3-vl", "internvl", "llava-next"), default="qwen2.5-vl"
    )
    parser.add_argument("--image", default="1280x720", help="WIDTHxHEIGHT")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    width, height = image_size(args.image)
    image = Image.fromarray((np.random.RandomState(0).rand(height, width, 3) * 255).astype(np.uint8))
    family, hf = family_and_hf(args.family)
    ours, theirs = [], []
    for run in range(args.runs + 1):
        started = time.perf_counter()
        prepared = family.prepare_image(image)
        # the prompt's positions: a few text tokens around the image's placeholders
        ids = np.r_[np.arange(20), np.full(prepared.visual_tokens, family.image_token), np.arange(30)]
        family.prompt_positions(ids, prepared)
        mid = time.perf_counter()
        hf(image, return_tensors="np")
        done = time.perf_counter()
        if run:  # the first run warms caches up
            ours.append(1e3 * (mid - started))
            theirs.append(1e3 * (done - mid))
    report = {
        "family": args.family,
        "image": args.image,
        "visual_tokens": prepared.visual_tokens,
        "pixel_values": list(prepared.pixel_values.shape),
        "runtime_ms_median": round(statistics.median(ours), 2),
        "hf_image_processor_ms_median": round(statistics.median(theirs), 2),
        "runs": args.runs,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
