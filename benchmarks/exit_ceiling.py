"""How fast an exit can make prefill with these graphs: each decoder segment timed alone, with the
prompt's N tokens and with the N − V left after an exit, against the theoretical ratio.

    python benchmarks/exit_ceiling.py --bundle ~/.cache/dyvte-rt/demo-bundle --tokens 75 --visual 64 \
        --exit-layer 1 --threads 2

A prefill that exits after layer k runs the segments up to k on N tokens and the later ones on
N − V. Timing the segment calls alone, interleaved (N and N − V in turn, medians of --rounds rounds
of --calls calls), gives the speed-up an exit would reach if embedding, routers, the switch, the
head and the runtime's Python cost nothing:

    ceiling = Σ_all seg(N) / (Σ_{seg ≤ k} seg(N) + Σ_{seg > k} seg(N − V))

Against the theoretical speed-up (the inverse ratio of multiply-adds, docs/compute.md) it says how
much of the exit's saving the graphs themselves can deliver: on a model whose layers take a fraction
of a millisecond, each call's fixed work (ONNX Runtime's per-node cost of a segment's ~75 nodes)
does not shrink with the tokens, and no change outside the graphs can lift the measured speed-up
above this ceiling.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.runtime.compute import prefill_macs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--tokens", type=int, required=True, help="prompt tokens N")
    parser.add_argument("--visual", type=int, required=True, help="visual tokens V among them")
    parser.add_argument("--exit-layer", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200, help="calls per segment and length in a round")
    parser.add_argument(
        "--memory-arena",
        action="store_true",
        help="ONNX Runtime's CPU memory arena on (the runtime's default: off)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 0 < args.visual < args.tokens:
        parser.error("need 0 < --visual < --tokens")

    with DyvteModel.load(args.bundle, threads=args.threads, memory_arena=args.memory_arena) as model:
        pipeline = model.pipeline
        lengths = (args.tokens, args.tokens - args.visual)
        times = {(s.graph, n): [] for s in pipeline.segments for n in lengths}
        for round_ in range(args.rounds):
            for segment in pipeline.segments:
                for n in lengths if round_ % 2 else lengths[::-1]:
                    times[(segment.graph, n)].append(_segment_ms(pipeline, segment, n, args.calls))
        ms = {key: float(np.median(values)) for key, values in times.items()}
        exit_layer = args.exit_layer
        full = sum(ms[(s.graph, args.tokens)] for s in pipeline.segments)
        exited = sum(
            ms[(s.graph, args.tokens if s.last_layer <= exit_layer else args.tokens - args.visual)]
            for s in pipeline.segments
        )
        macs = prefill_macs(pipeline.decoder_dims, args.tokens, args.visual, exit_layer)
        theory = macs.full / macs.actual
        report = {
            "segments": [
                {
                    "graph": s.graph,
                    "layers": [s.first_layer, s.last_layer],
                    "ms_at_N": ms[(s.graph, args.tokens)],
                    "ms_at_N_minus_V": ms[(s.graph, args.tokens - args.visual)],
                }
                for s in pipeline.segments
            ],
            "tokens": args.tokens,
            "visual": args.visual,
            "exit_layer": exit_layer,
            "segments_ms_full": full,
            "segments_ms_exited": exited,
            "ceiling_speedup": full / exited,
            "theoretical_speedup": theory,
            "ceiling_over_theory": full / exited / theory,
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for row in report["segments"]:
            print(
                f"{row['graph']:<12} layers {row['layers'][0]}-{row['layers'][1]}: "
                f"{row['ms_at_N']:.3f} ms at {args.tokens} tokens, "
                f"{row['ms_at_N_minus_V']:.3f} ms at {args.tokens - args.visual}"
            )
        print(
            f"segments {full:.3f} ms without an exit, {exited:.3f} ms exiting after layer {exit_layer}: "
            f"ceiling {full / exited:.2f}x against {theory:.2f}x in theory "
            f"({full / exited / theory:.2f} of it)"
        )
    return 0


def _segment_ms(pipeline, segment, n: int, calls: int) -> float:
    """Mean time of `calls` calls of one segment on n fresh tokens (a new cache each call, made
    outside the timed call), ms."""
    rng = np.random.default_rng(0)
    hidden = pipeline.backend.upload(rng.standard_normal((1, n, pipeline.dims.hidden), dtype=np.float32))
    positions = np.arange(n, dtype=np.int64)[None]  # [1, n]
    if pipeline.dims.position_sections > 1:  # multimodal rotary positions: [sections, 1, n]
        positions = np.repeat(positions[None], pipeline.dims.position_sections, axis=0)
    position_value = pipeline.backend.upload(positions)
    valid = np.array([n], dtype=np.int64)
    total = 0.0
    for _ in range(calls):
        cache = pipeline.new_cache(n + 8)
        start = time.perf_counter()
        pipeline._segment_call(segment, hidden, position_value, positions, valid, cache)
        total += time.perf_counter() - start
    return total / calls * 1e3


if __name__ == "__main__":
    raise SystemExit(main())
