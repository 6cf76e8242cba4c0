"""Train routers on frozen, cached features and pick the exit threshold.

Features are standardised for training and the standardisation is folded into each router's
first linear layer afterwards, so the exported routers read raw hidden states (large-model hidden
states have outlier dimensions that make unnormalised training unstable).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from dyvte_rt.runtime.compute import DecoderDims, prefill_macs
from export.reference.routers import RouterBank


@dataclass(frozen=True)
class LayerScore:
    layer: int
    exit_label_rate: float  # share of validation samples labelled "exit" at this layer
    router_accuracy: float  # validation accuracy of argmax(router) against the labels
    majority_accuracy: float  # accuracy of always predicting the majority training label


def train_routers(
    features: torch.Tensor,
    labels: torch.Tensor,
    layers: tuple[int, ...],
    width: int,
    epochs: int,
    seed: int = 0,
    lr: float = 3e-3,
    progress=None,
) -> RouterBank:
    """features [n, K, 2D], labels [n, K] -> a RouterBank over `layers` (K of them)."""
    torch.manual_seed(seed)
    hidden = features.shape[-1] // 2
    bank = RouterBank(hidden, layers, width=width)
    mean = features.mean(dim=0)  # [K, 2D]
    std = features.std(dim=0).clamp(min=1e-4)
    optimizer = torch.optim.AdamW(bank.parameters(), lr=lr, weight_decay=1e-4)
    normed = (features - mean) / std
    for epoch in range(epochs):
        loss = torch.zeros(())
        for i, k in enumerate(layers):
            loss = loss + F.cross_entropy(bank.logits(k, normed[:, i]), labels[:, i])
        optimizer.zero_grad(set_to_none=True)
        (loss / len(layers)).backward()
        optimizer.step()
        if progress is not None:
            with torch.no_grad():
                accuracy = np.mean(
                    [
                        (bank.logits(k, normed[:, i]).argmax(-1) == labels[:, i]).float().mean().item()
                        for i, k in enumerate(layers)
                    ]
                )
            progress(epoch, loss.item() / len(layers), float(accuracy))
    with torch.no_grad():  # fold (x - mean) / std into the first linear layer of each router
        for i, k in enumerate(layers):
            first = bank.routers[str(k)].net[0]
            first.bias -= first.weight @ (mean[i] / std[i])
            first.weight /= std[i]
    return bank


@torch.no_grad()
def exit_probabilities(bank: RouterBank, features: torch.Tensor) -> torch.Tensor:
    """features [n, K, 2D] -> p(exit) [n, K]."""
    return torch.stack(
        [bank.logits(k, features[:, i]).softmax(-1)[:, 1] for i, k in enumerate(bank.layers)], dim=1
    )


def score_layers(
    bank: RouterBank, train_labels: torch.Tensor, features: torch.Tensor, labels: torch.Tensor
) -> list[LayerScore]:
    probs = exit_probabilities(bank, features)
    scores = []
    for i, k in enumerate(bank.layers):
        majority = int(train_labels[:, i].float().mean() >= 0.5)
        scores.append(
            LayerScore(
                layer=k,
                exit_label_rate=float(labels[:, i].float().mean()),
                router_accuracy=float(((probs[:, i] >= 0.5).long() == labels[:, i]).float().mean()),
                majority_accuracy=float((labels[:, i] == majority).float().mean()),
            )
        )
    return scores


@dataclass(frozen=True)
class ThresholdPoint:
    threshold: float
    agreement: float  # share of samples whose answer equals the full model's under this threshold
    macs_ratio: float  # Σ actual / Σ full prefill multiply-adds
    mean_exit_layer: float  # last layer that saw the visual tokens


def sweep_thresholds(
    probs: torch.Tensor,
    answer_equal: torch.Tensor,
    layers: tuple[int, ...],
    dims: DecoderDims,
    n_tokens: list[int],
    n_visual: list[int],
    thresholds: np.ndarray | None = None,
    prune_layer: int | None = None,
    n_kept: list[int] | None = None,
) -> list[ThresholdPoint]:
    """Simulate the router policy (first k with p >= t) on held-out samples for each threshold;
    with `prune_layer`, sample s keeps `n_kept[s]` visual tokens after it unless the exit comes first."""
    if thresholds is None:
        thresholds = np.round(
            np.concatenate([np.linspace(0.05, 0.95, 19), [0.97, 0.99, 0.995, 0.999, 1.0]]), 4
        )
    points = []
    for t in thresholds:
        agree, actual, full, exit_layers = 0, 0, 0, []
        for s in range(probs.shape[0]):
            fired = torch.nonzero(probs[s] >= t).flatten()
            index = int(fired[0]) if fired.numel() else None
            k = layers[index] if index is not None else None
            agree += 1 if index is None else int(answer_equal[s, index])
            pruned = prune_layer is not None and (k is None or k > prune_layer)
            macs = prefill_macs(
                dims,
                n_tokens[s],
                n_visual[s],
                k,
                prune_layer if pruned else None,
                n_kept[s] if pruned else None,
            )
            actual, full = actual + macs.actual, full + macs.full
            exit_layers.append(dims.num_layers - 1 if k is None else k)
        points.append(
            ThresholdPoint(float(t), agree / probs.shape[0], actual / full, float(np.mean(exit_layers)))
        )
    return points


def choose_threshold(points: list[ThresholdPoint], target_agreement: float) -> ThresholdPoint:
    """The cheapest threshold whose agreement meets the target (the strictest one if none does)."""
    good = [p for p in points if p.agreement >= target_agreement]
    if not good:
        return max(points, key=lambda p: (p.agreement, -p.macs_ratio))
    return min(good, key=lambda p: (p.macs_ratio, -p.threshold))
