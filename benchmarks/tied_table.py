"""What storing a tied LM head's table once saves: two otherwise equal checkpoints, one tying its
head to the embedding table, exported alike, bytes per graph and resident memory side by side.

    python benchmarks/tied_table.py --out runs/tied-table --json                 # int4
    python benchmarks/tied_table.py --out runs/tied-table --precision fp16 --json

The checkpoints are LLaVA-layout random models with a small vision tower, `--layers` decoder
layers and the vocabulary and width of the model named by --shape (default Qwen2-VL-2B's: 151,936 ×
1536, the table that model ties), so the table is as large as in the released model while the rest
stays small. Resident memory is `benchmarks/resident_memory.py`'s, each load in a fresh process,
the two bundles alternating.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

SHAPES = {  # tied checkpoints' (vocabulary, hidden, heads, kv heads)
    "qwen2-vl-2b": (151_936, 1536, 12, 2),
    "qwen2.5-vl-3b": (151_936, 2048, 16, 2),
    "internvl3-1b": (151_674, 896, 14, 2),
    "tiny": (512, 64, 4, 2),  # for the benchmark's own test
}


def build(out: Path, shape: str, layers: int, tie: bool) -> Path:
    from export.families.llava import TINY_BACKBONES, build_tiny_llava

    vocab, hidden, heads, kv_heads = SHAPES[shape]
    spec = dataclasses.replace(
        TINY_BACKBONES["qwen2"].spec,
        vocab_size=vocab,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        mlp=2 * hidden,
        layers=layers,
        init_std=0.02,  # as released models are initialised: the tiny models' 0.1 fails the int4 gate here
        head_std=0.02,
    )
    return build_tiny_llava("qwen2", out, 0, spec=spec, tie_embeddings=tie)


def graph_bytes(bundle: Path) -> dict[str, int]:
    """Bytes of each graph's own files, as `dyvte-rt inspect` counts them."""
    from dyvte_rt.bundle.manifest import load_manifest
    from dyvte_rt.cli.inspect import graph_bytes as sizes

    return {name: size for name, (_, size) in sizes(load_manifest(bundle, verify_hashes=False)).items()}


def resident(bundle: Path) -> dict:
    script = Path(__file__).with_name("resident_memory.py")
    command = [
        sys.executable,
        str(script),
        "--bundle",
        str(bundle),
        "--max-new-tokens",
        "8",
        "--threads",
        "2",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _median(runs: list[dict], ratio: str) -> int:
    """Median over loads of what the process added (resident_memory.py's ratio × its weight bytes)."""
    added = sorted(r[ratio] * r["weight_bytes"] for r in runs)
    return int(added[len(added) // 2])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the checkpoints and bundles")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-vl-2b")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument(
        "--precision", choices=("int4", "int8", "fp16", "fp32"), default="int4", help="the bundles' weights"
    )
    parser.add_argument("--rounds", type=int, default=2, help="loads of each bundle, alternating")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from export.build import BuildConfig, build_bundle

    bundles = {}
    for tie in (False, True):
        name = "tied" if tie else "untied"
        checkpoint = args.out / f"{args.shape}-{name}"
        if not checkpoint.is_dir():
            build(checkpoint, args.shape, args.layers, tie)
        bundle = args.out / f"{args.shape}-{name}-{args.precision}"
        if not (bundle / "manifest.json").is_file():
            weights = (
                {"quantize": args.precision}
                if args.precision.startswith("int")
                else {"dtype": args.precision}
            )
            build_bundle(
                BuildConfig(model=str(checkpoint), out=bundle, quiet=True, overwrite=True, **weights)
            )
        bundles[name] = bundle
    runs: dict[str, list[dict]] = {name: [] for name in bundles}
    for round_ in range(args.rounds):
        for name in list(bundles) if round_ % 2 == 0 else list(bundles)[::-1]:
            runs[name].append(resident(bundles[name]))
    report = {
        "shape": args.shape,
        "vocab_hidden": SHAPES[args.shape][:2],
        "layers": args.layers,
        "precision": args.precision,
    }
    for name, bundle in bundles.items():
        sizes = graph_bytes(bundle)
        report[name] = {
            "bundle_bytes": sum(f.stat().st_size for f in bundle.iterdir() if f.is_file()),
            "embed_bytes": sizes["embed"],
            "head_bytes": sizes["head"],
            "loaded_rss_bytes": _median(runs[name], "loaded_over_weights"),
            "after_request_rss_bytes": _median(runs[name], "after_request_over_weights"),
        }
    report["saved_bytes"] = report["untied"]["bundle_bytes"] - report["tied"]["bundle_bytes"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name in bundles:
            row = report[name]
            mib = {key: value / 2**20 for key, value in row.items()}
            print(
                f"{name:<7} bundle {mib['bundle_bytes']:8.1f} MiB  embed {mib['embed_bytes']:7.1f}  "
                f"head {mib['head_bytes']:7.1f}  resident loaded {mib['loaded_rss_bytes']:7.1f}  "
                f"after a request {mib['after_request_rss_bytes']:7.1f} MiB"
            )
        print(f"saved {report['saved_bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
