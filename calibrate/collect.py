"""Run the sweep over a calibration set and cache what router training needs."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calibrate.sweep import sweep
from dyvte_rt.inputs.datasets import Example
from dyvte_rt.runtime.prune import NO_PRUNE, PrunePolicy
from export.loading import LoadedModel
from export.prompting import hf_inputs
from export.reference.model import DyVTEReference


@dataclass
class Collected:
    features: torch.Tensor  # [n, K, 2D]
    labels: torch.Tensor  # [n, K]
    answer_equal: torch.Tensor  # [n, K] bool
    kl_first: torch.Tensor  # [n, K]
    n_tokens: torch.Tensor  # [n]
    n_visual: torch.Tensor  # [n]
    n_kept: torch.Tensor | None = None  # [n] visual tokens a prune left (None: no prune)

    def save(self, path: Path) -> None:
        tensors = {k: v.contiguous() for k, v in vars(self).items() if v is not None}
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: Path) -> Collected:
        return cls(**load_file(str(path)))

    def subset(self, index: torch.Tensor) -> Collected:
        return Collected(**{k: v[index] if v is not None else None for k, v in vars(self).items()})


def answer_ids(loaded: LoadedModel, answer: str) -> torch.Tensor:
    tokenizer = loaded.processor.tokenizer
    ids = tokenizer.encode(" " + answer, add_special_tokens=False)
    return torch.tensor([*ids, *loaded.adapter.eos_token_ids[:1]])


def collect(
    loaded: LoadedModel,
    examples: list[Example],
    layers: tuple[int, ...],
    device: str,
    prune: PrunePolicy = NO_PRUNE,
) -> Collected:
    """Labels and features of every example (of the model pruned by `prune`, if given)."""
    from tqdm import tqdm

    reference = DyVTEReference(loaded.adapter, candidate_layers=layers)
    dtype = next(loaded.model.parameters()).dtype
    rows = []
    exits = total = 0
    bar = tqdm(examples, desc="labels", unit="sample", file=sys.stderr)
    for example in bar:
        inputs = hf_inputs(loaded.processor, example.image, example.question)
        result = sweep(
            reference,
            inputs["input_ids"].to(device),
            loaded.adapter.image_input(inputs).to(device, dtype),
            answer_ids(loaded, example.answer),
            layers,
            prune,
        )
        rows.append(result)
        exits, total = exits + int(result.labels.sum()), total + len(layers)
        bar.set_postfix_str(f"exit labels {100 * exits / total:.0f}%")
    return Collected(
        features=torch.stack([r.features for r in rows]),
        labels=torch.stack([r.labels for r in rows]),
        answer_equal=torch.stack([r.answer_equal for r in rows]),
        kl_first=torch.stack([r.kl_first for r in rows]),
        n_tokens=torch.tensor([r.n_tokens for r in rows]),
        n_visual=torch.tensor([r.n_visual for r in rows]),
        n_kept=torch.tensor([r.n_kept for r in rows]) if prune.active else None,
    )
