"""What a batch buys in decoding, and what batched prefill with mixed exits computes.

    python benchmarks/batch_decode.py --bundle runs/slice4-bundle-int4 --batch 1,2,4 --past 600
    python benchmarks/batch_decode.py --bundle runs/demo-bundle --batch 1,4,8 --past 100 \
        --mixed-exits never,layer:1,router --mixed-exits layer:1,router

Decode: for each batch size B, a KV cache with `--past` rows per sample (zeros: a step's cost
depends on how many rows it attends to, not their values) and one-token steps for all B samples
together, batch sizes interleaved run by run; aggregate tokens/s = B / step time, printed next to
B = 1. Decoding reads every weight once per step whatever B is, so a batch should come close to
B times the tokens while the weights dominate.

--mixed-exits P1,P2,...: one batched prefill of the same image with these policies (ask_batch)
and each alone (ask); the multiply-adds the batch saved against the sum of the per-sample savings,
and what padding cost (a batch computes every segment at its widest sample's length).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from decode_scaling import filled_cache

from dyvte_rt.api.model import DyvteModel

ROOT = Path(__file__).resolve().parent.parent


def decode_rates(model: DyvteModel, batches: list[int], past: int, steps: int, runs: int) -> dict:
    times: dict[int, list[float]] = {b: [] for b in batches}
    for run in range(runs + 1):  # the first run warms up
        for batch in batches if run % 2 else reversed(batches):
            cache = filled_cache(model, past, past + steps + 1, batch)
            tokens = np.full((batch, 1), 5, dtype=np.int64)
            for step in range(steps):
                started = time.perf_counter()
                model.pipeline.forward_tokens(tokens, np.full((batch, 1), past + step), cache)
                if run:
                    times[batch].append(time.perf_counter() - started)
    single = float(np.median(times[batches[0]]))
    rows = {}
    for batch in batches:
        step = float(np.median(times[batch]))
        rows[batch] = {
            "step_ms": 1e3 * step,
            "tokens_per_s": batch / step,
            "vs_first": (batch / step) / (batches[0] / single),
        }
        print(
            f"batch {batch}: {1e3 * step:.1f} ms/step, {batch / step:.1f} tok/s together, "
            f"{rows[batch]['vs_first']:.2f}x batch {batches[0]}",
            flush=True,
        )
    return rows


def mixed_exits(model: DyvteModel, policies: list[str], image: Path, question: str) -> dict:
    alone = [model.ask(image, question, exit=p, max_new_tokens=1) for p in policies]
    together = model.ask_batch([(image, question)] * len(policies), exit=policies, max_new_tokens=1)
    full = sum(a.prefill_macs["full"] for a in alone)
    saved_alone = sum(a.prefill_macs["full"] - a.prefill_macs["actual"] for a in alone)
    computed = together[0].prefill_macs["batch_computed"]
    report = {
        "exit_layers": [a.exit_layer for a in together],
        "same_exits_as_alone": [a.exit_layer for a in alone] == [a.exit_layer for a in together],
        "full_macs": full,
        "saved_alone": saved_alone,
        "saved_batch": full - computed,
        "padding_macs": computed - sum(a.prefill_macs["actual"] for a in together),
    }
    print(
        f"mixed exits {report['exit_layers']}: alone they save {saved_alone / full:.1%} of "
        f"{full / 1e9:.2f} GMAC, the batch saves {report['saved_batch'] / full:.1%} "
        f"(padding {report['padding_macs'] / full:.1%})"
    )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--batch", default="1,2,4", help="comma-separated batch sizes, the first the base")
    parser.add_argument("--past", type=int, default=600, help="KV rows each sample attends to")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mixed-exits", action="append", default=[], metavar="P1,P2,...")
    parser.add_argument("--image", type=Path, default=ROOT / "examples/three_shapes.png")
    parser.add_argument("--question", default="what shape is in the top left?")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    model = DyvteModel.load(args.bundle, threads=args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    report = {"decode": decode_rates(model, batches, args.past, args.steps, args.runs)}
    report["mixed_exits"] = [
        mixed_exits(model, policies.split(","), args.image, args.question) for policies in args.mixed_exits
    ]
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
