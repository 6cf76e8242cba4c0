"""Requests that start together: one padded prefill call for all of them, or one call each?

    python benchmarks/batch_prefill.py --bundle runs/demo-bundle --batch 4 --runs 9
    python benchmarks/batch_prefill.py --bundle runs/slice4-bundle-int4 --batch 4 --runs 3

Both ways fill the same `DecodeBatch` (the one decode path of ask_batch and the server): B requests
with the same image, questions of different lengths and mixed exit policies, prefilled either in
one call into adjacent slots ("together", what `DecodeBatch.prefill` does with adjacent slots) or
one call per slot ("apart", what the server does for a request that arrives alone), then decoded
together to `--max-new-tokens`. The two alternate run by run; medians of the prefill wall time and
of the time to the last answer, and whether every answer's tokens agree.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.runtime.batch import DecodeBatch
from dyvte_rt.runtime.decoding import DecodeState
from dyvte_rt.runtime.pipeline import PrefillRequest
from dyvte_rt.runtime.sampling import Sampler, SamplingConfig

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = (
    "what color is the shape in the top left?",
    "how many shapes are there?",
    "what shape is in the top right corner of the picture, please?",
    "where is the blue shape?",
)


def one_batch(model: DyvteModel, requests: list, together: bool, max_new: int) -> tuple[float, float, list]:
    """(prefill seconds, seconds to the last answer, every answer's tokens)."""
    capacity = max(len(r.input_ids) for r in requests) + max_new
    batch = DecodeBatch(model.pipeline, model.pipeline.new_cache(capacity, len(requests)))
    rule = model.stop_rule(max_new, ignore_eos=True)
    entries = [
        (
            slot,
            request,
            DecodeState(model.prompts.tokenizer, Sampler(SamplingConfig()), rule, len(request.input_ids)),
        )
        for slot, request in enumerate(requests)
    ]
    started = time.perf_counter()
    slots = batch.prefill(entries) if together else [batch.prefill([entry])[0] for entry in entries]
    prefilled = time.perf_counter()
    while batch.active:
        batch.step()
    done = time.perf_counter()
    return prefilled - started, done - started, [slot.state.tokens for slot in slots]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--image", type=Path, default=ROOT / "examples/three_shapes.png")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--exit", default="never,layer:1", help="policies, given to the requests in turn")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with DyvteModel.load(args.bundle) as model:
        policies = [model.policy(spec) for spec in args.exit.split(",")]
        requests = []
        for index in range(args.batch):
            ids, image = model._prepare(args.image, QUESTIONS[index % len(QUESTIONS)], args.max_new_tokens)
            requests.append(PrefillRequest(ids[0], image, policies[index % len(policies)]))
        times = {"together": [], "apart": []}
        tokens = {}
        for run in range(args.runs + 1):  # the first round warms up
            for way in ("together", "apart") if run % 2 else ("apart", "together"):
                prefill, total, tokens[way] = one_batch(
                    model, requests, way == "together", args.max_new_tokens
                )
                if run:
                    times[way].append((prefill, total))
    report = {
        "bundle": str(args.bundle),
        "batch": args.batch,
        "runs": args.runs,
        "same_tokens": tokens["together"] == tokens["apart"],
        **{
            way: {
                "prefill_ms": 1e3 * float(np.median([t[0] for t in rows])),
                "total_ms": 1e3 * float(np.median([t[1] for t in rows])),
            }
            for way, rows in times.items()
        },
    }
    report["prefill_apart_over_together"] = report["apart"]["prefill_ms"] / report["together"]["prefill_ms"]
    if args.json:
        print(json.dumps(report))
        return
    for way in ("together", "apart"):
        row = report[way]
        print(f"{way:>9}: prefill {row['prefill_ms']:.1f} ms, all answers {row['total_ms']:.1f} ms")
    ratio, same = report["prefill_apart_over_together"], report["same_tokens"]
    print(f"apart / together prefill: {ratio:.2f}; same tokens: {same}")


if __name__ == "__main__":
    main()
