"""Two ONNX Runtime session settings side by side in one process: idle workers spinning or not, or
the CPU memory arena kept or not.

    python benchmarks/session_ab.py --bundle runs/demo-bundle --setting spin --runs 30 --max-new-tokens 16
    python benchmarks/session_ab.py --bundle runs/slice4-bundle --setting memory_arena --runs 4

Loads the bundle twice (the setting off, the runtime's default, and on) and alternates requests
between the two, the order flipping every run; prints median prefill and decode rate of each.
"""

from __future__ import annotations

import time

import numpy as np
from single_request import single_request_parser

from dyvte_rt.api.model import DyvteModel


def main() -> int:
    parser = single_request_parser(__doc__)
    parser.add_argument("--setting", choices=("spin", "memory_arena"), default="spin")
    parser.add_argument("--runs", type=int, default=10, help="measured requests per setting")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    models = {
        on: DyvteModel.load(args.bundle, threads=args.threads, **{args.setting: on}) for on in (False, True)
    }
    rows: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for run in range(args.warmup + args.runs):
        for on in (False, True) if run % 2 else (True, False):
            answer = models[on].ask(
                args.image,
                args.question,
                exit=args.exit,
                max_new_tokens=args.max_new_tokens,
                ignore_eos=True,
            )
            if run >= args.warmup:
                decode_tps = (len(answer.token_ids) - 1) / (answer.timings_ms["decode"] / 1e3)
                rows[on].append((answer.timings_ms["prefill"], decode_tps))
            time.sleep(0.05)
    print(f"{args.bundle}: policy {args.exit}, {args.runs} requests each, {args.threads} threads")
    print(f"| {args.setting} | prefill ms | decode tok/s |\n| --- | ---: | ---: |")
    for on, data in rows.items():
        prefill, decode = np.median(np.array(data), axis=0)
        print(f"| {'on' if on else 'off (default)'} | {prefill:.1f} | {decode:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
