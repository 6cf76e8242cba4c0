"""`dyvte-rt eval`: accuracy, exit layers and compute saved of a bundle on a JSONL dataset.

The dataset format is the project's: one {"image", "question", "answer"} object per line, image
paths relative to the JSONL file's directory.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dyvte_rt.errors import InputError
from dyvte_rt.model import DyvteModel
from dyvte_rt.policy import ExitPolicy


@dataclass(frozen=True)
class Example:
    image: Path
    question: str
    answer: str


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


def read_jsonl(path: Path, limit: int | None = None) -> list[Example]:
    if not path.is_file():
        raise InputError(f"dataset {path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                example = Example(path.parent / row["image"], str(row["question"]), str(row["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise InputError(
                    f"{path}:{number} is not a {{'image', 'question', 'answer'}} JSON object ({err})"
                ) from None
            examples.append(example)
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise InputError(f"dataset {path} holds no examples")
    return examples


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
