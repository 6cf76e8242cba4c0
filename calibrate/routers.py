"""`python -m calibrate.routers`: train DyVTE routers on a model's own behaviour, pick a threshold.

    python -m calibrate.routers --model demo --data shapes/data.jsonl --out runs/routers
    python -m export.build --model demo --routers runs/routers/routers.safetensors --out bundle

Labels come from the model itself (docs/calibration.md): exit after layer k is "safe" for a sample when
removing the visual tokens after k keeps ≥ 99% of the answer tokens' argmax and the answer loss
within 3% of the full model's. The threshold is the cheapest one whose held-out answer agreement
with the full model stays at or above --target-agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dyvte_rt.cli.commandline import config_from, new_parser, run_command, use_config_defaults
from dyvte_rt.cli.extras import require
from dyvte_rt.errors import InputError
from export.cli_options import model_options


@dataclass(frozen=True)
class RoutersConfig:
    model: str
    data: Path
    out: Path
    image_root: Path | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    exit_layers: str | None = None
    router_width: int = 256
    compare_widths: str | None = None
    epochs: int = 300
    val_fraction: float = 0.25
    target_agreement: float = 0.99
    limit: int | None = None
    seed: int = 0
    trust_remote_code: bool = False
    prune: str = "none"  # label and train on the model pruned this way


def calibrate_routers(config: RoutersConfig) -> dict:
    """Label, train, pick the threshold, write the routers and the report (report.png needs
    matplotlib: the whole [calibrate] extra is checked first)."""
    require("calibrate", "calibrating routers")
    import torch
    from tqdm import tqdm

    from calibrate.collect import collect
    from calibrate.report import points_json, scores_json, write_report
    from calibrate.router_training import (
        choose_threshold,
        exit_probabilities,
        score_layers,
        sweep_thresholds,
        train_routers,
    )
    from dyvte_rt.inputs.datasets import read_examples
    from dyvte_rt.runtime.prune import parse_prune
    from export.build import parse_exit_layers
    from export.loading import inspect_checkpoint, load_checkpoint

    if config.epochs < 1:
        raise InputError(f"--epochs must be at least 1, not {config.epochs}")
    if not 0 < config.val_fraction < 1:
        raise InputError(f"--val-fraction must lie in (0, 1), got {config.val_fraction}")
    if not 0 < config.target_agreement <= 1:
        raise InputError(f"--target-agreement must lie in (0, 1], got {config.target_agreement}")
    checkpoint = inspect_checkpoint(config.model)
    layers = parse_exit_layers(config.exit_layers, checkpoint.num_layers)
    examples = read_examples(config.data, config.image_root, config.limit)
    if len(examples) < 8:
        raise InputError(
            f"{len(examples)} calibration samples are too few", hint="use at least a few hundred"
        )
    widths = _widths(config)
    prune = parse_prune(config.prune)
    if prune.active and prune.layer >= checkpoint.num_layers - 1:
        raise InputError(f"--prune {prune.spec()}: pruning needs a layer after layer {prune.layer}")
    loaded = load_checkpoint(checkpoint, config.dtype, config.device, config.trust_remote_code)
    config.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = collect(loaded, examples, layers, config.device, prune)
    data.save(config.out / "features.safetensors")
    collect_seconds = time.perf_counter() - started

    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed))
    n_val = max(1, round(config.val_fraction * len(examples)))
    train, val = data.subset(order[n_val:]), data.subset(order[:n_val])
    dims = loaded.adapter.dims
    comparison = {}
    chosen_bank = None
    for width in widths:
        bar = tqdm(total=config.epochs, desc=f"routers w={width}", unit="epoch", file=sys.stderr)

        def progress(epoch: int, loss: float, accuracy: float, bar=bar) -> None:
            bar.update(1)
            bar.set_postfix_str(f"loss {loss:.3f} train acc {100 * accuracy:.1f}%")

        bank = train_routers(
            train.features, train.labels, layers, width, config.epochs, config.seed, progress=progress
        )
        bar.close()
        scores = score_layers(bank, train.labels, val.features, val.labels)
        points = sweep_thresholds(
            exit_probabilities(bank, val.features),
            val.answer_equal,
            layers,
            dims,
            val.n_tokens.tolist(),
            val.n_visual.tolist(),
            prune_layer=prune.layer if prune.active else None,
            n_kept=val.n_kept.tolist() if val.n_kept is not None else None,
        )
        at_target = choose_threshold(points, config.target_agreement)
        comparison[str(width)] = {  # what each width buys on the held-out split, at the same target
            "parameters": bank.num_parameters(),
            "mean_router_accuracy": sum(s.router_accuracy for s in scores) / len(scores),
            "expected_prefill_macs_saved": 1 - at_target.macs_ratio,
            "expected_agreement": at_target.agreement,
        }
        if width == config.router_width:
            chosen_bank, chosen_scores, chosen_points, best = bank, scores, points, at_target
    assert chosen_bank is not None
    chosen_bank.threshold = best.threshold
    chosen_bank.save(config.out / "routers.safetensors")
    model_parameters = sum(p.numel() for p in loaded.model.parameters())
    report = {
        "model": config.model,
        "samples": {"train": len(train.labels), "validation": len(val.labels)},
        "candidate_layers": list(layers),
        "prune": prune.spec(),
        "router_width": config.router_width,
        "router_parameters": chosen_bank.num_parameters(),
        "router_parameters_fraction_of_model": chosen_bank.num_parameters() / model_parameters,
        "per_layer": scores_json(chosen_scores),
        "threshold": best.threshold,
        "target_agreement": config.target_agreement,
        "expected_agreement": best.agreement,
        "expected_mean_exit_layer": best.mean_exit_layer,
        "expected_prefill_macs_saved": 1 - best.macs_ratio,
        "thresholds": points_json(chosen_points),
        "width_comparison": comparison,
        "label_rule": {"token_agreement": ">= 0.99", "answer_loss_ratio": "<= 1.03"},
        "seconds": {
            "labels_and_features": round(collect_seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
    }
    write_report(config.out, report, chosen_scores, chosen_points)
    return report


def _widths(config: RoutersConfig) -> list[int]:
    widths = [config.router_width]
    if config.compare_widths:
        try:
            widths += [int(w) for w in config.compare_widths.split(",") if w.strip()]
        except ValueError:
            raise InputError(
                f"--compare-widths must be a comma-separated list of integers, got {config.compare_widths!r}"
            ) from None
    if min(widths) < 0:
        raise InputError("router widths must be >= 0 (0 = a single linear layer)")
    return list(dict.fromkeys(widths))


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "python -m calibrate.routers",
        "Train DyVTE routers on the model's own behaviour and choose the exit threshold. Writes "
        "routers.safetensors (threshold in its metadata), features.safetensors (cached), report.json and "
        "report.png.",
        parents=[model_options()],
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="data.jsonl ({image, question, answer} per line) or LLaVA conversation JSON",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--image-root",
        type=Path,
        metavar="DIR",
        help="folder the LLaVA JSON's image paths are relative to (default: its own folder)",
    )
    parser.add_argument("--device", help="torch device: cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="precision the model runs in")
    parser.add_argument("--exit-layers", metavar="LAYERS", help="candidate exit layers (default: 1..L-2)")
    parser.add_argument(
        "--router-width",
        type=int,
        help="hidden width of each router (0: one linear layer; the paper uses 2048)",
    )
    parser.add_argument(
        "--compare-widths",
        metavar="WIDTHS",
        help="also train these widths (e.g. '0,64,2048') and compare them in the report",
    )
    parser.add_argument("--epochs", type=int, help="full-batch training epochs")
    parser.add_argument("--val-fraction", type=float, help="held-out share for the threshold")
    parser.add_argument(
        "--target-agreement",
        type=float,
        help="answers that must equal the full model's on the held-out split",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="use the first N samples only")
    parser.add_argument("--seed", type=int, help="training seed")
    parser.add_argument(
        "--prune",
        metavar="SPEC",
        help="recalibrate for a pruned model: labels and features come from the model pruned this way "
        "(fastv:K:R or dart:K:R[:P]; default: none)",
    )
    use_config_defaults(parser, RoutersConfig)
    return parser


def parse_args(argv: list[str] | None) -> RoutersConfig:
    return config_from(RoutersConfig, build_parser().parse_args(argv))


SUMMARY_KEYS = (
    "threshold",
    "expected_agreement",
    "expected_prefill_macs_saved",
    "expected_mean_exit_layer",
    "router_parameters",
)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        require("calibrate", "python -m calibrate.routers")  # before minutes of training, not after
        config = parse_args(argv)
        report = calibrate_routers(config)
        print(json.dumps({k: report[k] for k in SUMMARY_KEYS}, indent=2))
        print(
            f"routers written to {config.out / 'routers.safetensors'}; report in {config.out / 'report.png'}"
        )

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
