"""Per-graph timings of decode steps: where a generated token's time goes.

    python benchmarks/decode_profile.py --bundle runs/slice4-bundle --steps 8
    python benchmarks/decode_profile.py --bundle runs/slice4-bundle --steps 8 --spin
    python benchmarks/decode_profile.py --bundle runs/slice4-bundle-int4 --steps 8 --ops

One prefill (policy --exit), then --steps decode steps; each session call is timed from Python, so
a graph's figure includes ONNX Runtime's call overhead but not the runtime's own Python between
calls (the gap between the sum and the step time). --ops also turns on ONNX Runtime's profiler and
splits the measured steps' time op type by op type (kernel time inside the runs), with what is left
inside ONNX Runtime's runs (its framework between kernels) and outside them (I/O binding, Python).
"""

from __future__ import annotations

import bisect
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from single_request import single_request_parser

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.bundle.loaded import Bundle
from dyvte_rt.inputs.images import load_image
from dyvte_rt.inputs.preprocess import preprocess
from engines.session import SessionOptions


def main() -> int:
    parser = single_request_parser(__doc__)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="prefill + steps, the first unmeasured")
    parser.add_argument("--spin", action="store_true", help="let idle ONNX Runtime threads spin-wait")
    parser.add_argument("--ops", action="store_true", help="also split the steps' time by op type")
    args = parser.parse_args()

    profile_dir = tempfile.TemporaryDirectory(prefix="dyvte-profile-") if args.ops else None
    options = SessionOptions(
        intra_op_threads=args.threads,
        spin=args.spin,
        profile=str(Path(profile_dir.name) / "ort") if profile_dir else "",
    )
    model = DyvteModel(Bundle.open(args.bundle, options))
    calls: dict[str, list[float]] = defaultdict(list)
    timeline: dict[str, list[tuple[bool, float]]] = defaultdict(list)  # per graph, call by call:
    # (in a measured step?, seconds)
    phase = {"measured": False}
    for name, session in model.bundle.sessions.items():
        run = session.run

        def timed(feeds, into=None, run=run, name=name):
            started = time.perf_counter()
            out = run(feeds, into)
            calls[name].append(time.perf_counter() - started)
            timeline[name].append((phase["measured"], calls[name][-1]))
            return out

        session.run = timed
    input_ids = model.prompts.encode(args.question)
    pixels = preprocess(load_image(args.image), model.manifest.vision.preprocess)
    policy = model.policy(args.exit)
    steps: list[float] = []
    for repeat in range(args.repeats):
        prefill = model.pipeline.prefill(input_ids, pixels, policy, capacity=input_ids.shape[1] + args.steps)
        calls.clear()
        phase["measured"] = repeat > 0
        for index in range(args.steps):
            started = time.perf_counter()
            model.pipeline.decode_one_token(5, prefill.n_tokens + index, prefill.cache)
            if repeat:
                steps.append(time.perf_counter() - started)
        phase["measured"] = False
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
    if profile_dir is not None:
        # the parts are sums over the measured steps divided by their count: shares of the mean step
        # (a median step, above, is shorter than the mean when a few steps were slow)
        mean_ms = 1e3 * float(np.mean(steps))
        ops = op_breakdown(model, timeline, len(steps))
        print(f"\n{'op type (measured steps, mean)':34s} {'ms per step':>12s} {'share':>7s}")
        for op, ms in sorted(ops.items(), key=lambda item: -item[1]):
            print(f"{op:34s} {ms:12.2f} {ms / mean_ms:7.1%}")
        print(f"{'(the step, Python included)':34s} {mean_ms:12.2f}")
        profile_dir.cleanup()
    return 0


def op_breakdown(model, timeline: dict[str, list[tuple[bool, float]]], steps: int) -> dict[str, float]:
    """ms per measured step: kernel time by op type (`graph:op` for MatMulNBits, whose share is the
    question), then what each graph's runs spent in ONNX Runtime outside kernels, then the time of
    the session calls outside ONNX Runtime's runs (I/O binding, the call itself)."""
    ops: dict[str, float] = defaultdict(float)
    for name, session in model.bundle.sessions.items():
        events = json.loads(Path(session.end_profiling()).read_text())
        runs = sorted(
            (e["ts"], e["ts"] + e["dur"])
            for e in events
            if e.get("cat") == "Session" and e["name"] == "model_run"
        )
        flags = [flag for flag, _ in timeline.get(name, [])]
        if len(runs) != len(flags):
            raise RuntimeError(f"{name}: {len(runs)} profiled runs against {len(flags)} calls")
        starts = [start for start, _ in runs]
        kernels = 0.0
        for event in events:
            if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
                continue
            index = bisect.bisect_right(starts, event["ts"]) - 1
            if index >= 0 and flags[index] and event["ts"] <= runs[index][1]:
                op = event["args"]["op_name"]
                key = f"{name}:{op}" if op == "MatMulNBits" else op
                ops[key] += event["dur"] / 1e3 / steps
                kernels += event["dur"] / 1e3 / steps
        in_runs = (
            sum(end - start for (start, end), flag in zip(runs, flags, strict=True) if flag) / 1e3 / steps
        )
        if in_runs:
            ops["ONNX Runtime between kernels"] += in_runs - kernels
            called = sum(seconds for flag, seconds in timeline[name] if flag)
            ops["session calls outside runs"] += 1e3 * called / steps - in_runs
    return dict(ops)


if __name__ == "__main__":
    raise SystemExit(main())
