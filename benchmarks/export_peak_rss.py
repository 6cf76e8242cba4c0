"""Peak resident memory of `python -m export.build`, measured in-process.

    python benchmarks/export_peak_rss.py --model runs/llava-7b-slice --out runs/slice-bundle

Builds the bundle exactly as the CLI does, then reports the process's peak RSS (ru_maxrss) next
to the checkpoint's weight size, so "export one part at a time" can be checked against numbers.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from export.build import BuildConfig, build_bundle
from export.summary import format_summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--routers", type=Path, default=None, help="routers file to export with")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None, help="weight-only quantisation")
    args = parser.parse_args()
    weights = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    started = time.perf_counter()
    rows = build_bundle(
        BuildConfig(
            model=args.model,
            out=args.out,
            dtype=args.dtype,
            routers=args.routers,
            quantize=args.quantize,
            overwrite=True,
            quiet=True,
        )
    )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(format_summary(rows))
    print(
        f"checkpoint weights: {weights / 2**30:.2f} GiB; export wall time {seconds:.0f} s; "
        f"peak RSS {peak / 2**30:.2f} GiB ({peak / weights:.2f}x the weights)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
