"""Image preprocessing and position ids of the torch-free runtime, against Hugging Face's processor.

    python benchmarks/preprocess_speed.py --family qwen2.5-vl --image 1280x720 --runs 20
    python benchmarks/preprocess_speed.py --family llava-next --image 672x672 --runs 20

For an image of the given size (random pixels): the runtime's `prepare_image` (resize, normalise,
patchify or tile, vision positions / windows / packing index) plus, for Qwen, the prompt's
multimodal rotary positions — against Hugging Face's PIL image processor with the same settings
(Qwen2.5-VL-7B's pixel budget; LLaVA-NeXT-7B's canvases), each timed alternately, medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from PIL import Image

from dyvte_rt.bundle.manifest import ImagePreprocess, VisionInfo
from dyvte_rt.cli.macs import LLAVA_NEXT_TILING, QWEN25_VL_GRID, image_size
from dyvte_rt.families import qwen2_vl as patch_grid
from dyvte_rt.inputs.preprocess import prepare_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vision_and_hf(family: str):
    import transformers

    common = {
        "resample": 3,
        "rescale_factor": 1 / 255,
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
        "convert_rgb": True,
    }
    if family == "qwen2.5-vl":
        grid = QWEN25_VL_GRID
        spec = ImagePreprocess(None, None, None, **common)
        vision = VisionInfo(0, 0, grid.max_pixels // 784, spec, patch_grid=grid)
        size = {"shortest_edge": grid.min_pixels, "longest_edge": grid.max_pixels}
        return vision, transformers.Qwen2VLImageProcessorPil(size=size)
    spec = ImagePreprocess(336, 336, 336, **common)
    vision = VisionInfo(336, 336, 2928, spec, anyres=LLAVA_NEXT_TILING)
    pinpoints = [list(p) for p in LLAVA_NEXT_TILING.grid_pinpoints]
    hf = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
    )
    return vision, hf


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=("qwen2.5-vl", "llava-next"), default="qwen2.5-vl")
    parser.add_argument("--image", default="1280x720", help="WIDTHxHEIGHT")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    width, height = image_size(args.image)
    image = Image.fromarray((np.random.RandomState(0).rand(height, width, 3) * 255).astype(np.uint8))
    vision, hf = vision_and_hf(args.family)
    ours, theirs = [], []
    for run in range(args.runs + 1):
        started = time.perf_counter()
        prepared = prepare_image(image, vision)
        if prepared.grid is not None:  # the prompt: a few text tokens around the image's placeholders
            ids = np.r_[np.arange(20), np.full(prepared.visual_tokens, -1), np.arange(30)]
            patch_grid.prompt_positions(ids, -1, [prepared.grid], vision.patch_grid)
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
