"""Resident memory of a loaded bundle against its weight bytes, after loading and after a request.

    python benchmarks/resident_memory.py --bundle runs/slice4-bundle --max-new-tokens 16

Weight bytes are the bundle's graph files (ONNX + external data). Resident memory is the process's
VmRSS from /proc/self/status (Linux), read before loading (the interpreter, numpy, ONNX Runtime),
after `DyvteModel.load`, and after one request; the ratios count what loading and answering added.
"""

from __future__ import annotations

import json
from pathlib import Path

from single_request import single_request_parser


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> None:
    parser = single_request_parser(__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    import onnxruntime  # noqa: F401 - counted in the baseline, not in the bundle's share

    from dyvte_rt.api.model import DyvteModel

    weights = sum(p.stat().st_size for p in args.bundle.iterdir() if p.suffix in (".onnx", ".data"))
    before = rss_bytes()
    with DyvteModel.load(args.bundle, threads=args.threads) as model:
        loaded = rss_bytes()
        model.ask(
            args.image, args.question, exit=args.exit, max_new_tokens=args.max_new_tokens, ignore_eos=True
        )
        answered = rss_bytes()
    report = {
        "weight_bytes": weights,
        "baseline_rss": before,
        "loaded_over_weights": (loaded - before) / weights,
        "after_request_over_weights": (answered - before) / weights,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
