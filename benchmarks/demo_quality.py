"""Accuracy and compute of a bundle under each exit policy on one question set (Markdown table).

    python -m calibrate.shapes --out runs/shapes-eval --n 1000 --seed 2024
    python benchmarks/demo_quality.py --bundle BUNDLE --data runs/shapes-eval/data.jsonl

Policies default to never, layer:K for every exit layer of the bundle, and router if it has routers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.tools.evaluate import evaluate, read_jsonl


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--exit", default=None, help="comma-separated policies (default: all)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    examples = read_jsonl(args.data)
    rows = []
    with DyvteModel.load(args.bundle) as model:
        if args.exit:
            specs = args.exit.split(",")
        else:
            specs = ["never", *(f"layer:{k}" for k in model.manifest.exit.candidate_layers)]
            specs += ["router"] if model.pipeline.has_routers else []
        for spec in specs:
            report = evaluate(model, examples, model.policy(spec), progress=False)
            rows.append(report)
            print(f"{spec}: {100 * report.accuracy:.1f}%", file=sys.stderr, flush=True)
    never = next((r for r in rows if r.policy == "never"), rows[0])
    print(f"\n{len(examples)} questions from {args.data}\n")
    print(
        "| policy | exact match | vs never (points) | mean exit layer | exit histogram | prefill MACs saved |"
    )
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        histogram = ", ".join(f"{k}: {v}" for k, v in r.exit_histogram.items())
        print(
            f"| {r.policy} | {100 * r.accuracy:.1f}% | {100 * (r.accuracy - never.accuracy):+.1f} | "
            f"{r.mean_exit_layer:.2f} | {histogram} | {100 * r.prefill_macs_saved:.1f}% |"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
