"""`python -m calibrate.prune`: which pruning, with which exit, is cheapest within an accuracy budget.

    python -m calibrate.prune --model runs/demo-bundle --data shapes/data.jsonl --out runs/prune
    python -m calibrate.prune --model runs/demo-bundle --data shapes/data.jsonl --out runs/prune \\
        --write-default runs/demo-bundle

The bundle itself answers every question under every setting (the deployed graphs, torch-free):
prune method x layer K x ratio R, each with no exit, each fixed exit layer and the routers at a
grid of thresholds (simulated from the router probabilities the bundle gives under that prune:
routers after K see the pruned context). Accuracy is exact match against the dataset's answers,
compute is prefill multiply-adds as `dyvte-rt macs` counts them. The report holds every point
(exit only, prune only, combined), the cheapest policy within `--budget` accuracy points of
`never`, the best of each kind beside it — DART on the input embeddings alone (TensorRT Edge-LLM's
way) among them — and report.png, accuracy against compute saved.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dyvte_rt.cli.commandline import config_from, new_parser, run_command, use_config_defaults
from dyvte_rt.cli.extras import require
from dyvte_rt.errors import InputError

DEFAULT_RATIOS = "0.25,0.5,0.75,0.9"
THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class PruneConfig:
    model: Path  # a bundle
    data: Path
    out: Path
    methods: str = "fastv,dart"
    layers: str | None = None  # None: every layer the bundle prunes after
    ratios: str = DEFAULT_RATIOS
    budget: float = 1.0  # accuracy points below never's
    limit: int | None = None
    max_new_tokens: int = 8
    write_default: Path | None = None


@dataclass(frozen=True)
class Point:
    exit: str  # never, layer:K or router
    threshold: float | None  # router only
    prune: str  # none or the prune spec
    accuracy: float
    macs_saved: float  # 1 - Σ actual / Σ full

    @property
    def kind(self) -> str:
        exits = self.exit != "never"
        prunes = self.prune != "none"
        return (
            "combined" if exits and prunes else "exit only" if exits else "prune only" if prunes else "never"
        )

    @property
    def name(self) -> str:
        exit = f"router(t={self.threshold:g})" if self.exit == "router" else self.exit
        return exit + ("" if self.prune == "none" else f" + {self.prune}")


def prune_settings(config: PruneConfig, layers: tuple[int, ...]) -> list[str]:
    """The prune specs swept: every method at every chosen layer and ratio (fastv not at -1)."""
    from dyvte_rt.runtime.prune import METHODS, parse_prune

    methods = [m.strip() for m in config.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise InputError(f"--methods must name {' and/or '.join(METHODS)}, got {config.methods!r}")
    chosen = layers if config.layers is None else tuple(int(k) for k in config.layers.split(","))
    missing = sorted(set(chosen) - set(layers))
    if missing:
        raise InputError(f"--layers {missing}: the bundle prunes after {list(layers)} only")
    try:
        ratios = [float(r) for r in config.ratios.split(",")]
    except ValueError:
        raise InputError(f"--ratios must be comma-separated numbers, got {config.ratios!r}") from None
    specs = [
        f"{method}:{k}:{r:g}"
        for method in methods
        for k in chosen
        for r in ratios
        if method == "dart" or k >= 0
    ]
    for spec in specs:
        parse_prune(spec)  # one line for a ratio outside [0, 1]
    return specs


def calibrate_pruning(config: PruneConfig) -> dict:
    from tqdm import tqdm

    from dyvte_rt.api.model import DyvteModel
    from dyvte_rt.inputs.datasets import read_examples
    from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit, RouterProbe
    from dyvte_rt.runtime.prune import parse_prune
    from dyvte_rt.tools.evaluate import normalize_answer

    if config.budget < 0:
        raise InputError(f"--budget must be at least 0 accuracy points, got {config.budget:g}")
    if not (config.model / "manifest.json").is_file():
        raise InputError(
            f"--model {config.model} is not a bundle", hint="export one with python -m export.build first"
        )
    examples = read_examples(config.data, limit=config.limit)
    if not examples:
        raise InputError(f"{config.data} holds no questions")
    with DyvteModel.load(config.model) as model:
        if model.manifest.prune is None:
            model.pipeline.check_prune(parse_prune("dart:-1:0.5"))  # the one-line re-export message
        specs = ["none", *prune_settings(config, model.manifest.prune.layers)]
        candidates = model.manifest.exit.candidate_layers
        routers = model.pipeline.has_routers
        # per prune spec: correct answers and multiply-adds for never and each exit layer, and the
        # router probabilities (under that prune) to simulate thresholds with
        correct = {s: {e: [] for e in ("never", *candidates)} for s in specs}
        macs = {s: {e: [] for e in ("never", *candidates)} for s in specs}
        probs = {s: [] for s in specs}
        runs = len(examples) * len(specs) * (1 + len(candidates))
        bar = tqdm(total=runs, desc="prune sweep", unit="answer", file=sys.stderr)
        for example in examples:
            want = normalize_answer(example.answer)
            cached: dict = {}  # an exit at or before the prune layer: the same as without the prune
            for spec in specs:
                prune = parse_prune(spec)
                for exit in ("never", *candidates):
                    key = (
                        exit
                        if not prune.active or (exit != "never" and exit <= prune.layer)
                        else (exit, spec)
                    )
                    if key not in cached:
                        policy = (
                            (RouterProbe() if routers else NeverExit())
                            if exit == "never"
                            else FixedLayerExit(exit)
                        )
                        cached[key] = model.ask(
                            example.image,
                            example.question,
                            exit=policy,
                            prune=prune,
                            max_new_tokens=config.max_new_tokens,
                        )
                    answer = cached[key]
                    correct[spec][exit].append(normalize_answer(answer.text) == want)
                    macs[spec][exit].append((answer.prefill_macs["actual"], answer.prefill_macs["full"]))
                    if exit == "never":
                        probs[spec].append(answer.exit_probs)
                    bar.update(1)
        bar.close()
    points = sweep_points(specs, candidates, correct, macs, probs if routers else None)
    never = next(p for p in points if p.kind == "never")
    floor = never.accuracy - config.budget / 100
    within = [p for p in points if p.accuracy >= floor - 1e-12]
    best = max(within, key=lambda p: (p.macs_saved, p.accuracy))
    best_of = {
        kind: max(
            (p for p in within if p.kind == kind), key=lambda p: (p.macs_saved, p.accuracy), default=None
        )
        for kind in ("exit only", "prune only", "combined")
    }
    # DART on the input embeddings alone, as TensorRT Edge-LLM prunes: the cheapest within the
    # budget, else the most accurate (marked as missing it)
    embeddings = [p for p in points if p.exit == "never" and p.prune.startswith("dart:-1:")]
    edge = max(
        embeddings,
        key=lambda p: (
            p.accuracy >= floor - 1e-12,
            p.macs_saved if p.accuracy >= floor - 1e-12 else p.accuracy,
        ),
        default=None,
    )
    report = {
        "bundle": str(config.model),
        "questions": len(examples),
        "budget_points": config.budget,
        "never_accuracy": never.accuracy,
        "chosen": _point_json(best),
        "best": {kind: _point_json(p) if p else None for kind, p in best_of.items()},
        "dart_on_embeddings_alone": (
            {**_point_json(edge), "within_budget": edge.accuracy >= floor - 1e-12} if edge else None
        ),
        "points": [_point_json(p) for p in points],
    }
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(config.out / "report.png", points, best, floor)
    if config.write_default is not None:
        write_default(config.write_default, best)
        report["written_to"] = str(config.write_default)
    return report


def sweep_points(specs, candidates, correct, macs, probs) -> list[Point]:
    """Every (exit, prune) point: never, each fixed exit, and the router at each threshold."""
    from dyvte_rt.runtime.prune import parse_prune

    points = []
    for spec in specs:
        prune = parse_prune(spec)
        for exit in ("never", *candidates):
            if prune.active and exit != "never" and exit <= prune.layer:
                continue  # the exit wins: the same point as the exit alone
            name = "never" if exit == "never" else f"layer:{exit}"
            points.append(Point(name, None, spec, _mean(correct[spec][exit]), _saved(macs[spec][exit])))
        if probs is None:
            continue
        for t in THRESHOLDS:
            right, spent = [], []
            for s, sample_probs in enumerate(probs[spec]):
                fired = next((k for k in candidates if sample_probs.get(k, 0.0) >= t), "never")
                right.append(correct[spec][fired][s])
                spent.append(macs[spec][fired][s])
            points.append(Point("router", t, spec, _mean(right), _saved(spent)))
    return points


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values)


def _saved(pairs: list[tuple[int, int]]) -> float:
    full = sum(f for _, f in pairs)
    return 1.0 - sum(a for a, _ in pairs) / full if full else 0.0


def _point_json(point: Point) -> dict:
    return {**asdict(point), "kind": point.kind, "name": point.name}


def plot(path: Path, points: list[Point], best: Point, floor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(7, 4.5))
    styles = {"exit only": "o", "prune only": "s", "combined": "."}
    for kind, marker in styles.items():
        chosen = [p for p in points if p.kind == kind]
        axes.scatter(
            [p.macs_saved for p in chosen], [p.accuracy for p in chosen], marker=marker, label=kind, alpha=0.6
        )
    never = next(p for p in points if p.kind == "never")
    axes.scatter([0], [never.accuracy], marker="D", color="black", label="never")
    axes.axhline(floor, color="grey", linestyle=":", label="accuracy budget")
    axes.plot([best.macs_saved], [best.accuracy], "r*", markersize=14, label=f"chosen: {best.name}")
    axes.set(xlabel="prefill multiply-adds saved", ylabel="accuracy", title="Exit, pruning and both")
    axes.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_default(bundle: Path, point: Point) -> None:
    """Make `point` the bundle's default: its exit policy (and threshold) and its prune policy."""
    from dyvte_rt.bundle.manifest import load_manifest, write_manifest

    manifest = load_manifest(bundle, verify_hashes=False)
    if manifest.prune is None:
        raise InputError(f"{bundle} was exported before pruning existed", hint="re-export it first")
    exit_info = replace(manifest.exit, default_policy=point.exit)
    if point.threshold is not None:
        exit_info = replace(exit_info, threshold=point.threshold)
    prune = replace(manifest.prune, default_policy=point.prune)
    write_manifest(bundle, replace(manifest, exit=exit_info, prune=prune))


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "python -m calibrate.prune",
        "Sweep visual-token pruning (method x layer x ratio) with and without the exit on a bundle's own "
        "answers, and pick the cheapest policy within an accuracy budget of the full model (report.json, "
        "report.png). The bundle must be exported with pruning (any bundle of this version).",
    )
    parser.add_argument("--model", type=Path, required=True, metavar="BUNDLE", help="the bundle to sweep")
    parser.add_argument("--data", type=Path, required=True, help="data.jsonl with the right answers")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where report.json goes")
    parser.add_argument("--methods", help="comma-separated: fastv, dart")
    parser.add_argument(
        "--layers",
        metavar="K,K",
        help="prune layers to try, e.g. --layers=-1,2 (default: every one the bundle prunes after)",
    )
    parser.add_argument("--ratios", metavar="R,R", help="fractions of the visual tokens removed")
    parser.add_argument(
        "--budget", type=float, metavar="POINTS", help="accuracy points below never's allowed"
    )
    parser.add_argument("--limit", type=int, metavar="N", help="use the first N questions only")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="most tokens per answer")
    parser.add_argument(
        "--write-default",
        type=Path,
        metavar="BUNDLE",
        help="store the chosen policy (exit, threshold, prune) as this bundle's default",
    )
    use_config_defaults(parser, PruneConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        require("calibrate", "python -m calibrate.prune")
        config = config_from(PruneConfig, build_parser().parse_args(argv))
        report = calibrate_pruning(config)
        chosen, never = report["chosen"], report["never_accuracy"]
        print(
            f"chosen: {chosen['name']}: accuracy {100 * chosen['accuracy']:.1f}% "
            f"(never: {100 * never:.1f}%), "
            f"{100 * chosen['macs_saved']:.1f}% of prefill multiply-adds saved; report in {config.out}"
        )

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
