"""report.json and report.png: where a model stops needing the image, at a glance."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from calibrate.router_training import LayerScore, ThresholdPoint


def write_report(out: Path, report: dict, scores: list[LayerScore], points: list[ThresholdPoint]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    layers = [s.layer for s in scores]
    left.plot(layers, [s.exit_label_rate for s in scores], "o-", label="exit-label rate")
    left.plot(layers, [s.router_accuracy for s in scores], "s-", label="router accuracy")
    left.plot(layers, [s.majority_accuracy for s in scores], ":", color="grey", label="majority baseline")
    left.set(
        xlabel="exit after layer k",
        ylabel="share of held-out samples",
        ylim=(-0.02, 1.02),
        title="Where the image stops mattering",
    )
    left.legend(loc="lower right")
    saved = [1 - p.macs_ratio for p in points]
    right.plot(saved, [p.agreement for p in points], "o-")
    chosen = report["threshold"]
    pick = min(points, key=lambda p: abs(p.threshold - chosen))
    right.plot([1 - pick.macs_ratio], [pick.agreement], "r*", markersize=14, label=f"chosen t={chosen:g}")
    right.axhline(report["target_agreement"], color="grey", linestyle=":", label="target agreement")
    right.set(
        xlabel="prefill multiply-adds saved",
        ylabel="answers equal to the full model's",
        title="Agreement vs compute across thresholds",
    )
    right.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)


def scores_json(scores: list[LayerScore]) -> list[dict]:
    return [asdict(s) for s in scores]


def points_json(points: list[ThresholdPoint]) -> list[dict]:
    return [asdict(p) for p in points]
