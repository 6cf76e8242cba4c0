"""`dyvte-rt eval`: accuracy, exit layers and compute saved of a bundle on a JSONL dataset.

Datasets are read by `dyvte_rt.inputs.datasets`.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.inputs.datasets import Example
from dyvte_rt.runtime.policy import ExitPolicy
from dyvte_rt.runtime.prune import NO_PRUNE, PrunePolicy


@dataclass(frozen=True)
class EvalReport:
    accuracy: float  # exact match after normalisation, 0-1
    n: int
    mean_exit_layer: float  # last layer that saw the visual tokens (L-1 when they never exit)
    exit_histogram: dict[str, int]  # exit layer (or "none") -> requests
    prefill_macs_saved: float  # 1 - Σ actual / Σ full prefill multiply-adds, 0-1
    policy: str
    exit_agreement: float | None = None  # with --compare-bundle: same exit layer as the other bundle
    answer_agreement: float | None = None  # ... and the same (normalised) answer
    prune: str = "none"
    mean_visual_kept: float = 0.0  # visual tokens left by the prune, per question with an image


def normalize_answer(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def evaluate(
    model: DyvteModel,
    examples: list[Example],
    policy: ExitPolicy,
    max_new_tokens: int = 8,
    progress: bool = True,
    compare_with: DyvteModel | None = None,
    prune: PrunePolicy = NO_PRUNE,
) -> EvalReport:
    """Accuracy, exits and compute of `model` under `policy`; with `compare_with`, also how often
    another bundle (the float bundle a quantised one came from, say) exits at the same layer and
    gives the same answer under the same policy (each bundle with its own router threshold)."""
    from tqdm import tqdm

    last_layer = model.manifest.dims.num_layers - 1
    correct, exits, full, actual, same_exit, same_answer = 0, [], 0, 0, 0, 0
    kept = []
    for example in tqdm(examples, desc="eval", unit="q", disable=not progress, file=sys.stderr):
        answer = model.ask(
            example.image, example.question, exit=policy, max_new_tokens=max_new_tokens, prune=prune
        )
        if answer.visual_tokens:
            kept.append(answer.visual_tokens_kept)
        correct += normalize_answer(answer.text) == normalize_answer(example.answer)
        exits.append(answer.exit_layer)
        full += answer.prefill_macs["full"]
        actual += answer.prefill_macs["actual"]
        if compare_with is not None:
            other = compare_with.ask(
                example.image,
                example.question,
                exit=policy.spec(),
                max_new_tokens=max_new_tokens,
                prune=prune,
            )
            same_exit += other.exit_layer == answer.exit_layer
            same_answer += normalize_answer(other.text) == normalize_answer(answer.text)
    histogram = Counter("none" if k is None else str(k) for k in exits)
    n = len(examples)
    return EvalReport(
        accuracy=correct / n,
        n=n,
        mean_exit_layer=sum(last_layer if k is None else k for k in exits) / n,
        exit_histogram=dict(
            sorted(histogram.items(), key=lambda kv: (kv[0] == "none", int(kv[0]) if kv[0] != "none" else 0))
        ),
        prefill_macs_saved=1.0 - actual / full if full else 0.0,
        policy=policy.spec(),
        exit_agreement=same_exit / n if compare_with is not None else None,
        answer_agreement=same_answer / n if compare_with is not None else None,
        prune=prune.spec(),
        mean_visual_kept=sum(kept) / len(kept) if kept else 0.0,
    )
