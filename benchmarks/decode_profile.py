"""Per-graph timings of decode steps: where a generated token's time goes.

    python benchmarks/decode_profile.py --bundle runs/slice4-bundle --steps 8
    python benchmarks/decode_profile.py --bundle runs/slice4-bundle --steps 8 --spin

One prefill (policy --exit), then --steps decode steps; each session call is timed from Python, so
a graph's figure includes ONNX Runtime's call overhead but not the runtime's own Python between
calls (the gap between the sum and the step time).
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
from single_request import single_request_parser

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.inputs.images import load_image
from dyvte_rt.inputs.preprocess import preprocess


def main() -> int:
    parser = single_request_parser(__doc__)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="prefill + steps, the first unmeasured")
    parser.add_argument("--spin", action="store_true", help="let idle ONNX Runtime threads spin-wait")
    args = parser.parse_args()

    model = DyvteModel.load(args.bundle, threads=args.threads, spin=args.spin)
    calls: dict[str, list[float]] = defaultdict(list)
    for name, session in model.bundle.sessions.items():
        run = session.run

        def timed(feeds, into=None, run=run, name=name):
            started = time.perf_counter()
            out = run(feeds, into)
            calls[name].append(time.perf_counter() - started)
            return out

        session.run = timed
    input_ids = model.prompts.encode(args.question)
    pixels = preprocess(load_image(args.image), model.manifest.vision.preprocess)
    policy = model.policy(args.exit)
    steps: list[float] = []
    for repeat in range(args.repeats):
        prefill = model.pipeline.prefill(input_ids, pixels, policy, capacity=input_ids.shape[1] + args.steps)
        calls.clear()
        for index in range(args.steps):
            started = time.perf_counter()
            model.pipeline.decode_one_token(5, prefill.n_tokens + index, prefill.cache)
            if repeat:
                steps.append(time.perf_counter() - started)
    step_ms = 1e3 * float(np.median(steps))
    spinning = ", spinning" if args.spin else ""
    print(
        f"{args.bundle}: policy {args.exit}, past length {prefill.cache.layer_lengths()[0]}, "
        f"{args.threads} threads{spinning}; median of {len(steps)} steps"
    )
    print(f"{'graph':12s} {'ms per step':>12s}")
    total = 0.0
    for name, times in calls.items():
        per_step = 1e3 * float(np.median(times)) * len(times) / args.steps
        total += per_step
        print(f"{name:12s} {per_step:12.2f}")
    print(f"{'sum':12s} {total:12.2f}\n{'step':12s} {step_ms:12.2f}  ({1e3 / step_ms:.1f} tokens/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
