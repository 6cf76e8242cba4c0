"""How far a quantised bundle's logits drift from its float bundle's, step by step.

    python benchmarks/quant_drift.py --reference runs/slice4-bundle --bundle runs/slice4-bundle-int4

Both bundles prefill the same prompt, then decode teacher-forced on the float bundle's greedy tokens
(so one early disagreement does not send the two down different paths); per step the logits' cosine
similarity and whether the top-1 tokens agree. Random-weight models make top-1 fragile (their
logits are nearly flat), so this reports rather than gates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from single_request import single_request_parser

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.inputs.images import load_image
from dyvte_rt.inputs.preprocess import preprocess


def logits_trace(
    model: DyvteModel, ids: np.ndarray, pixels: np.ndarray, policy: str, forced: list[int] | None, steps: int
):
    pipeline = model.pipeline
    prefill = pipeline.prefill(ids, pixels, model.policy(policy), capacity=ids.shape[1] + steps + 1)
    trace, tokens = [prefill.logits[0]], []
    for step in range(steps):
        token = forced[step] if forced is not None else int(trace[-1].argmax())
        tokens.append(token)
        trace.append(pipeline.decode_one_token(token, prefill.n_tokens + step, prefill.cache)[0])
    return np.stack(trace), tokens


def main() -> int:
    parser = single_request_parser(__doc__)
    parser.add_argument("--reference", type=Path, required=True, help="the float bundle")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    with DyvteModel.load(args.reference, threads=args.threads) as reference:
        ids = reference.prompts.encode(args.question)
        pixels = preprocess(load_image(args.image), reference.manifest.vision.preprocess)
        want, tokens = logits_trace(reference, ids, pixels, args.exit, None, args.steps)
    with DyvteModel.load(args.bundle, threads=args.threads) as model:
        got, _ = logits_trace(model, ids, pixels, args.exit, tokens, args.steps)
        precision = model.manifest.precision
    cosine = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    top1 = want.argmax(1) == got.argmax(1)
    report = {
        "bundle": str(args.bundle),
        "precision": precision,
        "policy": args.exit,
        "steps": len(cosine),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "top1_agreement": float(top1.mean()),
    }
    print(
        f"{precision} vs {args.reference.name}, {args.exit}, prefill + {args.steps} decode steps: "
        f"logits cosine mean {report['cosine_mean']:.4f} (min {report['cosine_min']:.4f}), "
        f"top-1 agreement {100 * report['top1_agreement']:.0f}%"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
