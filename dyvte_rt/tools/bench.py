"""`dyvte-rt bench`: policies measured side by side on the same inputs, in one process.

Policies run alternately (round-robin per input and run) so that drift in machine speed hits all
of them alike. The measured prefill speed-up of each policy against the first is reported next to
the theoretical one from prefill multiply-adds (docs/compute.md).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass

import numpy as np

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.inputs.datasets import Example
from dyvte_rt.runtime.policy import ExitPolicy
from dyvte_rt.runtime.prune import NO_PRUNE, PrunePolicy


@dataclass(frozen=True)
class PolicyStats:
    policy: str
    vision_ms_median: float
    vision_ms_p90: float
    prefill_ms_median: float  # embed + decoder segments (with the exit) + head; vision excluded
    prefill_ms_p90: float
    switch_ms_median: float  # within prefill: reading router outputs, deciding, dropping visual tokens
    ttft_ms_median: float  # image preprocessing + vision + prefill + first token
    ttft_ms_p90: float
    decode_tokens_per_s: float  # median over requests of (tokens after the first) / decode time
    exit_layers: dict[str, int]  # exit layer (or "none") -> requests
    macs_ratio: float  # Σ actual / Σ full prefill multiply-adds
    kv_cache_mib: float  # KV cache held at the end of a request (mean)
    host_bytes_per_decode_token: float  # copied between host and backend per decode step (median)
    measured_speedup: float  # first policy's median prefill / this policy's
    theoretical_speedup: float  # this policy's multiply-adds relative to the first's, inverted


@dataclass(frozen=True)
class BenchReport:
    policies: dict[str, PolicyStats]
    runs: int
    warmup: int
    inputs: int
    max_new_tokens: int
    peak_rss_mib: float  # whole process, all policies

    def to_dict(self) -> dict:
        return {**asdict(self), "policies": {k: asdict(v) for k, v in self.policies.items()}}


def setting_name(policy: ExitPolicy, prune: PrunePolicy = NO_PRUNE) -> str:
    """A policy as the report names it: the exit's spec, then `+` and the prune's if there is one."""
    return policy.spec() + (f"+{prune.spec()}" if prune.active else "")


def bench(
    model: DyvteModel,
    examples: list[Example],
    policies: list[ExitPolicy],
    runs: int = 5,
    warmup: int = 1,
    max_new_tokens: int = 16,
    progress: bool = True,
    prunes: list[PrunePolicy] | None = None,
) -> BenchReport:
    """Every exit policy with every prune policy (default: none), the first pair the baseline."""
    from tqdm import tqdm

    settings = [(p, q) for p in policies for q in (prunes or [NO_PRUNE])]
    names = [setting_name(p, q) for p, q in settings]
    samples: dict[str, list[dict]] = {name: [] for name in names}
    total = (warmup + runs) * len(examples) * len(settings)
    bar = tqdm(total=total, desc="bench", unit="req", disable=not progress, file=sys.stderr)
    for run in range(warmup + runs):
        for index, example in enumerate(examples):
            order = np.roll(np.arange(len(settings)), run + index)  # alternate who goes first
            for p in order:
                policy, prune = settings[p]
                answer = model.ask(
                    example.image, example.question, exit=policy, max_new_tokens=max_new_tokens, prune=prune
                )
                bar.update(1)
                if run < warmup:
                    continue
                t = answer.timings_ms
                n_decoded = len(answer.token_ids) - 1
                samples[names[p]].append(
                    {
                        "vision": t["vision"],
                        "prefill": t["prefill"],
                        "switch": t["switch"],
                        "ttft": t["ttft"],
                        "decode_tps": n_decoded / (t["decode"] / 1e3)
                        if n_decoded and t["decode"] > 0
                        else float("nan"),
                        "exit": answer.exit_layer,
                        "full": answer.prefill_macs["full"],
                        "actual": answer.prefill_macs["actual"],
                        "kv_bytes": answer.kv_cache_bytes,
                        "host_bytes": answer.host_bytes["per_decode_token"] if n_decoded else float("nan"),
                    }
                )
    bar.close()
    stats: dict[str, PolicyStats] = {}
    base = names[0]
    base_prefill = float(np.median([s["prefill"] for s in samples[base]]))
    base_ratio = sum(s["actual"] for s in samples[base]) / sum(s["full"] for s in samples[base])
    for name in names:
        rows = samples[name]
        col = {
            key: np.array([r[key] for r in rows], dtype=float)
            for key in ("vision", "prefill", "switch", "ttft", "decode_tps")
        }
        ratio = sum(r["actual"] for r in rows) / sum(r["full"] for r in rows)
        exits: dict[str, int] = {}
        for r in rows:
            key = "none" if r["exit"] is None else str(r["exit"])
            exits[key] = exits.get(key, 0) + 1
        prefill = float(np.median(col["prefill"]))
        stats[name] = PolicyStats(
            policy=name,
            vision_ms_median=float(np.median(col["vision"])),
            vision_ms_p90=float(np.percentile(col["vision"], 90)),
            prefill_ms_median=prefill,
            prefill_ms_p90=float(np.percentile(col["prefill"], 90)),
            switch_ms_median=float(np.median(col["switch"])),
            ttft_ms_median=float(np.median(col["ttft"])),
            ttft_ms_p90=float(np.percentile(col["ttft"], 90)),
            decode_tokens_per_s=float(np.nanmedian(col["decode_tps"]))
            if np.isfinite(col["decode_tps"]).any()
            else float("nan"),
            exit_layers=exits,
            macs_ratio=ratio,
            kv_cache_mib=float(np.mean([r["kv_bytes"] for r in rows])) / 2**20,
            host_bytes_per_decode_token=float(np.nanmedian([r["host_bytes"] for r in rows]))
            if any(np.isfinite(r["host_bytes"]) for r in rows)
            else float("nan"),
            measured_speedup=base_prefill / prefill,
            theoretical_speedup=base_ratio / ratio,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return BenchReport(stats, runs, warmup, len(examples), max_new_tokens, peak)


def format_table(report: BenchReport) -> str:
    width = max(10, *(len(name) for name in report.policies))
    header = (
        f"{'policy':<{width}} {'vision ms':>10} {'prefill ms':>11} {'p90':>8} {'switch ms':>9} "
        f"{'TTFT ms':>9} {'decode tok/s':>13} {'host B/tok':>10} "
        f"{'MACs':>6} {'speed-up':>9} {'theory':>7}  exits"
    )
    lines = [header, "-" * len(header)]
    for s in report.policies.values():
        exits = ", ".join(f"{k}:{v}" for k, v in sorted(s.exit_layers.items()))
        lines.append(
            f"{s.policy:<{width}} {s.vision_ms_median:>10.2f} {s.prefill_ms_median:>11.2f} "
            f"{s.prefill_ms_p90:>8.2f} {s.switch_ms_median:>9.3f} {s.ttft_ms_median:>9.2f} "
            f"{s.decode_tokens_per_s:>13.1f} {s.host_bytes_per_decode_token:>10.0f} "
            f"{s.macs_ratio:>6.2f} "
            f"{s.measured_speedup:>8.2f}x {s.theoretical_speedup:>6.2f}x  {exits}"
        )
    lines.append(
        f"{report.inputs} inputs x {report.runs} runs (+{report.warmup} warm-up) per policy, "
        f"{report.max_new_tokens} new tokens max; peak RSS {report.peak_rss_mib:.0f} MiB"
    )
    return "\n".join(lines)
