"""Side by side in one process: Hugging Face eager generation vs dyvte-rt exit policies.

    python benchmarks/compare_hf.py --model demo --bundle BUNDLE --data DATA.jsonl --exit never,layer:1,router
    python benchmarks/compare_hf.py --model runs/llava-7b-slice-4 --bundle runs/slice4-bundle \\
        --image examples/three_shapes.png --exit never,layer:1,layer:2 --runs 3

Every system answers every input in every run, in rotating order, so machine drift hits all alike.
Both sides decode exactly --max-new-tokens tokens (EOS ignored) so decode rates compare like for
like; HF's TTFT and decode rate come from per-token timestamps of one `generate` call.
Prints a Markdown table; --json-out writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.inputs.datasets import Example, read_jsonl
from export.loading import load_checkpoint
from export.prompting import hf_inputs


class _TokenClock:
    """A `generate` streamer that timestamps each new token (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def hf_request(loaded, example: Example, max_new_tokens: int) -> dict:
    """TTFT (preprocessing + vision + prefill + first token) and decode rate of one HF `generate`,
    both read off per-token timestamps."""
    clock = _TokenClock()
    started = time.perf_counter()
    inputs = hf_inputs(loaded.processor, example.image, example.question)
    with torch.inference_mode():
        loaded.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            streamer=clock,
        )
    times = clock.times
    return {
        "ttft": 1e3 * (times[0] - started),
        "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
    }


def dyvte_request(model: DyvteModel, example: Example, policy: str, max_new_tokens: int) -> dict:
    answer = model.ask(
        example.image, example.question, exit=policy, max_new_tokens=max_new_tokens, ignore_eos=True
    )
    return {
        "ttft": answer.timings_ms["ttft"],
        "prefill": answer.timings_ms["prefill"],
        "vision": answer.timings_ms["vision"],
        "decode_tps": (len(answer.token_ids) - 1) / (answer.timings_ms["decode"] / 1e3),
        "macs_ratio": answer.prefill_macs["actual"] / answer.prefill_macs["full"],
        "exit": answer.exit_layer,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint for the Hugging Face side")
    parser.add_argument("--bundle", type=Path, required=True, help="the same checkpoint exported")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--question", default="what shape is in the top left?")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--exit", default="never,layer:1")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--spin", action="store_true", help="let idle ONNX Runtime threads spin-wait")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    examples = read_jsonl(args.data, args.limit) if args.data else [Example(args.image, args.question, "")]
    loaded = load_checkpoint(args.model)
    loaded.model.set_attn_implementation("eager")
    model = DyvteModel.load(args.bundle, threads=args.threads, spin=args.spin)
    systems = ["hf-eager", *(p.strip() for p in args.exit.split(","))]
    rows: dict[str, list[dict]] = {s: [] for s in systems}
    for run in range(args.warmup + args.runs):
        for index, example in enumerate(examples):
            for offset in range(len(systems)):
                system = systems[(offset + run + index) % len(systems)]
                if system == "hf-eager":
                    row = hf_request(loaded, example, args.max_new_tokens)
                else:
                    row = dyvte_request(model, example, system, args.max_new_tokens)
                if run >= args.warmup:
                    rows[system].append(row)
                time.sleep(0.05)  # let torch's and (with --spin) ONNX Runtime's spinning threads go idle
        print(f"run {run + 1}/{args.warmup + args.runs} done", file=sys.stderr, flush=True)
    summary = {}
    base_ttft = float(np.median([r["ttft"] for r in rows["never"]])) if "never" in rows else None
    base_prefill = float(np.median([r["prefill"] for r in rows["never"]])) if "never" in rows else None
    base_ratio = float(np.mean([r["macs_ratio"] for r in rows["never"]])) if "never" in rows else None
    for system, data in rows.items():
        entry = {
            "ttft_ms_median": float(np.median([r["ttft"] for r in data])),
            "ttft_ms_p90": float(np.percentile([r["ttft"] for r in data], 90)),
            "decode_tokens_per_s": float(np.median([r["decode_tps"] for r in data])),
        }
        if system != "hf-eager":
            entry["prefill_ms_median"] = float(np.median([r["prefill"] for r in data]))
            entry["vision_ms_median"] = float(np.median([r["vision"] for r in data]))
            entry["macs_ratio"] = float(np.mean([r["macs_ratio"] for r in data]))
            entry["exits"] = sorted({str(r["exit"]) for r in data})
            if base_prefill:
                entry["prefill_speedup_vs_never"] = base_prefill / entry["prefill_ms_median"]
                entry["theoretical_speedup_vs_never"] = base_ratio / entry["macs_ratio"]
        summary[system] = entry
    hf = summary["hf-eager"]
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    spinning = " (ONNX Runtime spinning)" if args.spin else ""
    print(
        f"\n{len(examples)} input(s) x {args.runs} runs (+{args.warmup} warm-up), {args.max_new_tokens} new "
        f"tokens, {args.threads} threads{spinning}; peak RSS {peak_gib:.1f} GiB\n"
    )
    print(
        "| system | TTFT ms (median) | TTFT p90 | prefill ms | vision ms | decode tok/s | decode vs HF | "
        "prefill speed-up vs never | theoretical |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for system, e in summary.items():

        def fmt(key: str, spec: str = ".1f", entry=e) -> str:
            return format(entry[key], spec) if key in entry else "–"

        print(
            f"| {system} | {fmt('ttft_ms_median')} | {fmt('ttft_ms_p90')} | {fmt('prefill_ms_median')} | "
            f"{fmt('vision_ms_median')} | {fmt('decode_tokens_per_s')} | "
            f"{e['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.2f}x | "
            f"{fmt('prefill_speedup_vs_never', '.2f')} | {fmt('theoretical_speedup_vs_never', '.2f')} |"
        )
    if base_ttft:
        print(f"\nTTFT of dyvte-rt never vs HF eager: {hf['ttft_ms_median'] / base_ttft:.2f}x faster")
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary}, indent=2)
        )
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
