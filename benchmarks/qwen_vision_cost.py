"""Qwen2.5-VL's vision tower at one image size: multiply-adds counted for the two forms of its
windowed attention, and the vision graph of each given bundle run side by side (wall time; resident
memory of a process that loads the bundle, after loading and at its peak once it has run only the
vision graph).

    python benchmarks/qwen_vision_cost.py --image 1280x720
    python benchmarks/qwen_vision_cost.py --image 1280x720 --bundle runs/qwen-slice4-bundle-masked \
        --bundle runs/qwen-slice4-bundle --runs 2 --json

Counted (the 7B preset's tower; what each graph computes, padding included): `masked` is one
attention over all P patches in every block (the form bundles exported before the slots use),
`slots` attends within each non-empty window's S padded slots in the windowed blocks and over all
patches in the full-attention ones. A FLOP is two multiply-adds. Each bundle runs in its own
process, round by round, bundles alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from dyvte_rt.families import qwen2_vl as patch_grid
from dyvte_rt.families.presets import QWEN25_VL_7B


@dataclass(frozen=True)
class VisionCount:
    patches: int
    windows: int  # non-empty windows
    linear: int  # patch embedding, qkv/proj, MLPs, merger (multiply-adds)
    masked_attention: int  # one P x P attention in every block
    slot_attention: int  # windows x S x S in the windowed blocks, P x P in the full ones

    def tflop(self, form: str) -> float:
        attention = self.masked_attention if form == "masked" else self.slot_attention
        return 2 * (self.linear + attention) / 1e12


def count(width: int, height: int, tower: dict = QWEN25_VL_7B.tower) -> VisionCount:
    info = QWEN25_VL_7B.family_object().layout
    grid = patch_grid.grid_for(height, width, info)
    _, window_ids = patch_grid.vision_windows(grid, info)
    patches, windows = len(window_ids), len(np.unique(window_ids))
    e, inner, depth = tower["hidden_size"], tower["intermediate_size"], tower["depth"]
    full = len(tower["fullatt_block_indexes"])
    m2 = info.merge_size**2
    embed = patches * 3 * info.temporal_patch_size * info.patch_size**2 * e
    block = patches * (4 * e * e + 3 * e * inner)  # qkv + proj, gated MLP
    merger = patches // m2 * (m2 * e * m2 * e + m2 * e * tower["out_hidden_size"])
    one_attention = 2 * patches * patches * e  # scores and values over all heads
    window_attention = 2 * windows * info.window_slots**2 * e
    return VisionCount(
        patches,
        windows,
        embed + depth * block + merger,
        depth * one_attention,
        full * one_attention + (depth - full) * window_attention,
    )


def run_vision(bundle: str, width: int, height: int) -> dict:
    """In this process: load the bundle, prepare a random image, run the vision graph once."""
    from PIL import Image

    from dyvte_rt.bundle import io_names
    from dyvte_rt.bundle.loaded import Bundle

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    with Bundle.open(bundle) as opened:
        loaded = _status_gib("VmRSS")
        prepared = opened.family.prepare_image(Image.fromarray(pixels))
        feeds = {io_names.PIXEL_VALUES: prepared.pixel_values, **prepared.feeds}
        start = time.perf_counter()
        opened.backend.download(opened.sessions["vision"].run(feeds)[io_names.IMAGE_FEATURES])
        seconds = time.perf_counter() - start
    return {"vision_s": seconds, "loaded_rss_gib": loaded, "peak_rss_gib": _status_gib("VmHWM")}


def _status_gib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 2**20


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--image", default="1280x720", help="WIDTHxHEIGHT")
    parser.add_argument("--bundle", action="append", default=[], help="a Qwen2.5-VL bundle (repeatable)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.image.lower().split("x"))
    if args.child:
        print(json.dumps(run_vision(args.child, width, height)))
        return
    counted = count(width, height)
    result = {
        "image": args.image,
        "patches": counted.patches,
        "windows": counted.windows,
        "tflop": {form: round(counted.tflop(form), 3) for form in ("masked", "slots")},
        "bundles": {},
    }
    runs: dict[str, list[dict]] = {b: [] for b in args.bundle}
    for _ in range(args.runs):
        for bundle in args.bundle:
            child = [sys.executable, __file__, "--image", args.image, "--child", bundle]
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            runs[bundle].append(json.loads(out.strip().splitlines()[-1]))
    for bundle, rows in runs.items():
        result["bundles"][bundle] = {
            "vision_s": statistics.median(r["vision_s"] for r in rows),
            "loaded_rss_gib": max(r["loaded_rss_gib"] for r in rows),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in rows),
            "runs": rows,
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.image}: {counted.patches} patches, {counted.windows} windows")
    for form in ("masked", "slots"):
        print(f"  {form:>6}: {counted.tflop(form):.2f} TFLOP")
    for bundle, row in result["bundles"].items():
        print(
            f"  {bundle}: vision {row['vision_s']:.1f} s, resident {row['loaded_rss_gib']:.2f} GiB "
            f"loaded, {row['peak_rss_gib']:.2f} GiB at the peak"
        )


if __name__ == "__main__":
    main()
