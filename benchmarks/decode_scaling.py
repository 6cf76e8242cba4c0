"""How a decode step's time grows with the context, against reading the added KV once.

    python benchmarks/decode_scaling.py --bundle runs/slice4-bundle --past 600,2400 --steps 8

For each past length P the KV cache is filled to P rows (zeros: a step's cost depends on how many
rows it attends to, not on their values) and one-token decode steps are timed, the lengths
alternating run by run. The machine's read bandwidth is measured in the same run; the growth of a
step from the first to the last length is printed next to the time it takes to read the added keys
and values once at that bandwidth. With the in-place KV flavour a step reads the cache once; with
the concat flavour it also copies it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from limits import memory_bandwidth_gb_per_s

from dyvte_rt.api.model import DyvteModel


def filled_cache(model: DyvteModel, past: int, capacity: int, batch: int = 1):
    """A cache whose every layer holds `past` rows of zeros for each of `batch` samples."""
    pipeline = model.pipeline
    cache = pipeline.new_cache(capacity, batch=batch)
    dims = model.manifest.dims
    if hasattr(cache, "buffers"):
        for buffer in cache.buffers.values():
            buffer.numpy()[...] = 0  # a CPU OrtValue's memory, in place
    else:
        zeros = np.zeros((batch, dims.num_kv_heads, past, dims.head_dim), dtype=cache.dtype)
        for key in cache.values:
            cache.values[key] = model.bundle.backend.upload(zeros)
    cache.lengths[:] = past
    return cache


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--past", default="600,2400", help="comma-separated past lengths")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per past length and run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    pasts = [int(p) for p in args.past.split(",")]
    model = DyvteModel.load(args.bundle, threads=args.threads)
    times: dict[int, list[float]] = {p: [] for p in pasts}
    for run in range(args.runs + 1):  # the first run warms up
        for past in pasts if run % 2 else reversed(pasts):
            cache = filled_cache(model, past, past + args.steps + 1)
            for step in range(args.steps):
                started = time.perf_counter()
                model.pipeline.decode_one_token(5, past + step, cache)
                if run:
                    times[past].append(time.perf_counter() - started)
            del cache
    bandwidth = memory_bandwidth_gb_per_s(threads=args.threads)
    cache = model.pipeline.new_cache(2)
    layers = model.manifest.dims.num_layers
    added = (pasts[-1] - pasts[0]) * cache.row_bytes() * layers
    medians = {p: 1e3 * float(np.median(t)) for p, t in times.items()}
    growth = medians[pasts[-1]] - medians[pasts[0]]
    bound = 1e3 * added / (bandwidth["read"] * 1e9)
    report = {
        "bundle": str(args.bundle),
        "kv_flavour": model.manifest.kv_flavour,
        "step_ms": medians,
        "growth_ms": growth,
        "added_kv_bytes": added,
        "read_bandwidth_gb_per_s": bandwidth["read"],
        "copy_bandwidth_gb_per_s": bandwidth["copy"],
        "read_added_kv_ms": bound,
        "growth_over_read_time": growth / bound,
    }
    print(" | ".join(f"past {p}: {ms:.1f} ms/step" for p, ms in medians.items()))
    print(
        f"growth {growth:.1f} ms for {added / 2**20:.0f} MiB more KV; reading it once at "
        f"{bandwidth['read']:.1f} GB/s takes {bound:.1f} ms -> {growth / bound:.2f}x "
        f"({model.manifest.kv_flavour} KV)"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
