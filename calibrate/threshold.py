"""`python -m calibrate.threshold`: choose a bundle's router threshold from the bundle's own behaviour.

    python -m calibrate.threshold --bundle runs/demo-bundle-int4 --data calib.jsonl --target-agreement 0.99

A quantised (or otherwise altered) bundle's routers see slightly different hidden states than the
ones they were trained on. Rather than retrain them, this runs the bundle itself on a calibration
set: for each question the full model's answer, the answer with the exit at every candidate layer,
and every router's p(exit). It then picks the cheapest threshold whose answers still equal the full
model's on --target-agreement of the questions (the rule `python -m calibrate.routers` uses on the
PyTorch model) and records it in the bundle's manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from dyvte_rt.cli.commandline import config_from, new_parser, run_command, use_config_defaults
from dyvte_rt.cli.extras import require
from dyvte_rt.errors import InputError


@dataclass(frozen=True)
class ThresholdConfig:
    bundle: Path
    data: Path
    target_agreement: float = 0.99
    limit: int | None = None
    max_new_tokens: int = 8
    write: bool = True  # record the threshold in the manifest


def choose_bundle_threshold(config: ThresholdConfig) -> dict:
    import torch
    from tqdm import tqdm

    from calibrate.router_training import choose_threshold, sweep_thresholds
    from dyvte_rt.api.model import DyvteModel
    from dyvte_rt.bundle.manifest import load_manifest, write_manifest
    from dyvte_rt.inputs.datasets import read_examples
    from dyvte_rt.runtime.compute import DecoderDims
    from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit, RouterProbe
    from dyvte_rt.tools.evaluate import normalize_answer

    if not 0 < config.target_agreement <= 1:
        raise InputError(f"--target-agreement must lie in (0, 1], got {config.target_agreement}")
    examples = read_examples(config.data, limit=config.limit)
    with DyvteModel.load(config.bundle) as model:
        if not model.pipeline.has_routers:
            raise InputError(f"{config.bundle} has no routers to calibrate")
        layers = tuple(s.last_layer for s in model.manifest.segments if s.has_router)
        probs, equal, n_tokens, n_visual = [], [], [], []
        for example in tqdm(examples, desc="threshold", unit="q", file=sys.stderr):

            def ask(policy, e=example):
                return model.ask(e.image, e.question, exit=policy, max_new_tokens=config.max_new_tokens)

            full = normalize_answer(ask(NeverExit()).text)
            probe = ask(RouterProbe())
            probs.append([probe.exit_probs[k] for k in layers])
            equal.append([normalize_answer(ask(FixedLayerExit(k)).text) == full for k in layers])
            n_tokens.append(probe.prompt_tokens)
            n_visual.append(probe.visual_tokens)
        dims = model.manifest.dims
        decoder = DecoderDims(dims.hidden, dims.num_kv_heads * dims.head_dim, dims.mlp, dims.num_layers)
    points = sweep_thresholds(torch.tensor(probs), torch.tensor(equal), layers, decoder, n_tokens, n_visual)
    best = choose_threshold(points, config.target_agreement)
    manifest = load_manifest(config.bundle, verify_hashes=False)
    report = {
        "bundle": str(config.bundle),
        "questions": len(examples),
        "previous_threshold": manifest.exit.threshold,
        "threshold": best.threshold,
        "agreement": best.agreement,
        "prefill_macs_saved": 1 - best.macs_ratio,
        "mean_exit_layer": best.mean_exit_layer,
    }
    if config.write:
        write_manifest(
            config.bundle, replace(manifest, exit=replace(manifest.exit, threshold=best.threshold))
        )
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "python -m calibrate.threshold",
        "Choose a bundle's router threshold from the bundle's own answers on a calibration set, and record "
        "it in its manifest (useful after quantising a bundle whose routers were calibrated in float).",
    )
    parser.add_argument("--bundle", type=Path, required=True, metavar="DIR", help="the bundle to calibrate")
    parser.add_argument("--data", type=Path, required=True, help="data.jsonl or LLaVA conversation JSON")
    parser.add_argument(
        "--target-agreement", type=float, help="answers that must equal the bundle's full-model answers"
    )
    parser.add_argument("--limit", type=int, metavar="N", help="use the first N questions only")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="most tokens per answer")
    parser.add_argument(
        "--dry-run", dest="write", action="store_false", help="report, but leave the manifest"
    )
    use_config_defaults(parser, ThresholdConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        require("calibrate", "python -m calibrate.threshold")
        config = config_from(ThresholdConfig, build_parser().parse_args(argv))
        report = choose_bundle_threshold(config)
        print(json.dumps(report, indent=2))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
