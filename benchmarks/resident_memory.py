"""Resident memory of a loaded bundle against its weight bytes, after loading and after requests.

    python benchmarks/resident_memory.py --bundle runs/slice4-bundle --max-new-tokens 16
    python benchmarks/resident_memory.py --bundle runs/slice4-bundle-int4 --compare --rounds 3

Weight bytes are the bundle's graph files (ONNX + external data). Resident memory is the process's
VmRSS from /proc/self/status (Linux), read before loading (the interpreter, numpy, ONNX Runtime),
after `DyvteModel.load`, and after each request; the ratios count what loading and answering added.

`--per-graph` opens the bundle's graphs one at a time in this process, as the loader does (lean),
and reports what each added against its own bytes: the figures to extrapolate to a deeper model.

`--compare` runs the runtime's lean host memory (engines/host_memory.py; the default) against
`lean_memory=False`, each load in a fresh process (glibc's malloc settings are process-wide),
alternating which goes first every round, and reports medians of memory and speed side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from single_request import single_request_parser


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def weight_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.iterdir() if p.suffix in (".onnx", ".data"))


def measure(args, lean: bool) -> dict:
    """One load and `args.requests` requests in this process."""
    import onnxruntime  # noqa: F401 - counted in the baseline, not in the bundle's share

    from dyvte_rt.api.model import DyvteModel

    weights = weight_bytes(args.bundle)
    before = rss_bytes()
    answers, after = [], []
    dtype = json.loads((args.bundle / "manifest.json").read_text())["dtype"]  # fp16 runs here too, slowly
    with DyvteModel.load(args.bundle, threads=args.threads, lean_memory=lean, dtype=dtype) as model:
        loaded = rss_bytes()
        for _ in range(args.requests):
            answer = model.ask(
                args.image, args.question, exit=args.exit, max_new_tokens=args.max_new_tokens, ignore_eos=True
            )
            answers.append(answer)
            after.append(rss_bytes())
    last = answers[-1]
    return {
        "lean_memory": lean,
        "weight_bytes": weights,
        "baseline_rss": before,
        "loaded_over_weights": round((loaded - before) / weights, 4),
        "after_request_over_weights": round((after[-1] - before) / weights, 4),
        "peak_after_request_over_weights": round((max(after) - before) / weights, 4),
        # the last request's timings (the first warms the sessions up)
        "prefill_ms": round(last.timings_ms["prefill"], 1),
        "decode_tokens_per_s": round((len(last.token_ids) - 1) / (last.timings_ms["decode"] / 1e3), 2),
        "token_ids": last.token_ids,
    }


def per_graph(args) -> dict:
    import onnxruntime  # noqa: F401

    from dyvte_rt.bundle.manifest import load_manifest
    from dyvte_rt.cli.inspect import graph_bytes
    from engines import SessionOptions, open_backend
    from engines.host_memory import drop_mapped_pages, release_freed_heap

    manifest = load_manifest(args.bundle)
    backend = open_backend(SessionOptions(intra_op_threads=args.threads))
    rows, sessions, sizes = {}, [], graph_bytes(manifest)
    for name, graph in manifest.graphs.items():
        size = sizes[name][1]
        before = rss_bytes()
        names = tuple(t.name for t in graph.inputs), tuple(t.name for t in graph.outputs)
        sessions.append(backend.open(args.bundle / graph.file, *names))
        drop_mapped_pages(args.bundle)
        release_freed_heap()
        added = rss_bytes() - before
        rows[name] = {"bytes": size, "rss_added": added, "ratio": round(added / max(size, 1), 3)}
    return rows


def compare(args) -> dict:
    rows: dict[bool, list[dict]] = {True: [], False: []}
    for round_ in range(args.rounds):
        for lean in (True, False) if round_ % 2 == 0 else (False, True):
            command = [sys.executable, __file__, "--child", "--lean", str(int(lean)), *child_args(args)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows[lean].append(json.loads(done.stdout))
    same = all(r["token_ids"] == rows[True][0]["token_ids"] for r in rows[True] + rows[False])
    summary = {
        "bundle": str(args.bundle),
        "rounds": args.rounds,
        "requests_per_load": args.requests,
        "same_tokens": same,
    }
    keys = ("loaded_over_weights", "after_request_over_weights", "prefill_ms", "decode_tokens_per_s")
    for lean, data in rows.items():
        summary["lean" if lean else "not_lean"] = {k: statistics.median(r[k] for r in data) for k in keys}
    return summary


def child_args(args) -> list[str]:
    return [
        "--bundle", str(args.bundle), "--image", str(args.image), "--question", args.question,
        "--exit", args.exit, "--threads", str(args.threads), "--max-new-tokens", str(args.max_new_tokens),
        "--requests", str(args.requests),
    ]  # fmt: skip


def main() -> None:
    parser = single_request_parser(__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per load (the last is timed)")
    parser.add_argument("--compare", action="store_true", help="lean host memory on and off, interleaved")
    parser.add_argument("--rounds", type=int, default=3, help="with --compare: loads of each")
    parser.add_argument("--per-graph", action="store_true", help="what each graph adds when it is opened")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lean", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare or args.per_graph:
        print(json.dumps(compare(args) if args.compare else per_graph(args), indent=2))
        return
    report = measure(args, bool(args.lean))
    if not args.child:
        report.pop("token_ids")
    print(json.dumps(report, indent=None if args.child else 2))


if __name__ == "__main__":
    main()
