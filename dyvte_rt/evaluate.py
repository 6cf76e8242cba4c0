"""`dyvte-rt eval`: accuracy, exit layers and compute saved of a bundle on a JSONL dataset.

Datasets are read by `dyvte_rt.datasets`.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass

from dyvte_rt.datasets import Example
from dyvte_rt.model import DyvteModel
from dyvte_rt.policy import ExitPolicy


@dataclass(frozen=True)
class EvalReport:
    accuracy: float  # exact match after normalisation, 0-1
    n: int
    mean_exit_layer: float  # last layer that saw the visual tokens (L-1 when they never exit)
    exit_histogram: dict[str, int]  # exit layer (or "none") -> requests
    prefill_macs_saved: float  # 1 - Σ actual / Σ full prefill multiply-adds, 0-1
    policy: str


def normalize_answer(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def evaluate(
    model: DyvteModel,
    examples: list[Example],
    policy: ExitPolicy,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> EvalReport:
    from tqdm import tqdm

    last_layer = model.manifest.dims.num_layers - 1
    correct, exits, full, actual = 0, [], 0, 0
    for example in tqdm(examples, desc="eval", unit="q", disable=not progress, file=sys.stderr):
        answer = model.ask(example.image, example.question, exit=policy, max_new_tokens=max_new_tokens)
        correct += normalize_answer(answer.answer) == normalize_answer(example.answer)
        exits.append(answer.exit_layer)
        full += answer.prefill_macs["full"]
        actual += answer.prefill_macs["actual"]
    histogram = Counter("none" if k is None else str(k) for k in exits)
    return EvalReport(
        accuracy=correct / len(examples),
        n=len(examples),
        mean_exit_layer=sum(last_layer if k is None else k for k in exits) / len(exits),
        exit_histogram=dict(
            sorted(histogram.items(), key=lambda kv: (kv[0] == "none", int(kv[0]) if kv[0] != "none" else 0))
        ),
        prefill_macs_saved=1.0 - actual / full if full else 0.0,
        policy=policy.spec(),
    )
