"""A full-depth LLaVA-1.5-7B-shaped model exported on this machine, then asked a question.

    python benchmarks/full_depth_export.py --work runs/llava-7b-full --quantize int4

Writes a random-weight checkpoint with LLaVA-1.5-7B's true dimensions — all 32 decoder layers,
CLIP ViT-L/14-336 — in fp16 (about 14 GB, tensor by tensor, never held in memory), exports it the
streamed way (`python -m export.build`, each graph's weights read when it is exported) in a process
of its own, and reports its wall time, peak resident memory and disk use next to the largest graph's
weights. Then it answers one question with `never` and with an exit at mid-depth on the CPU. An
fp32 bundle of this model (28 GB) does not fit this machine's memory, so the bundle is quantised
(int4 weights by default; activations and the remaining weights fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def graph_weight_bytes(checkpoint: Path, bundle: Path, itemsize: int = 4) -> dict[str, int]:
    """Each graph's weights as the export holds them (fp32), from the checkpoint's tensor shapes."""
    from safetensors import safe_open

    from dyvte_rt.bundle.manifest import load_manifest

    numel: dict[str, int] = {}
    for shard in checkpoint.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                numel[key] = count
    layer_of = re.compile(r"layers\.(\d+)\.")
    graphs: dict[str, int] = {"vision": 0, "embed": 0, "head": 0}
    manifest = load_manifest(bundle, verify_hashes=False)
    segment_of = {
        layer: s.graph for s in manifest.segments for layer in range(s.first_layer, s.last_layer + 1)
    }
    for key, count in numel.items():
        if key.startswith(("vision_tower.", "multi_modal_projector.")):
            graphs["vision"] += count
        elif "embed_tokens" in key:
            graphs["embed"] += count
        elif (match := layer_of.search(key)) is not None:
            graph = segment_of[int(match.group(1))]
            graphs[graph] = graphs.get(graph, 0) + count
        else:
            graphs["head"] += count
    return {name: count * itemsize for name, count in graphs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", type=Path, required=True, help="directory for the checkpoint and the bundle"
    )
    parser.add_argument("--quantize", choices=("int4", "int8"), default="int4")
    parser.add_argument("--exit-layer", type=int, default=15)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from export.families.llava import TINY_BACKBONES, llama_decoder, write_random_llava_streamed

    checkpoint, bundle = args.work / "checkpoint", args.work / f"bundle-{args.quantize}"
    report: dict = {}
    if not (checkpoint / "config.json").is_file():
        started = time.perf_counter()
        spec = dataclasses.replace(TINY_BACKBONES["llava-7b-slice"].spec, layers=32)
        write_random_llava_streamed(llama_decoder, spec, checkpoint, seed=0, dtype=torch.float16)
        report["checkpoint_write_s"] = time.perf_counter() - started
    report["checkpoint_bytes"] = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    started = time.perf_counter()
    command = [sys.executable, "-m", "export.build", "--model", str(checkpoint), "--out", str(bundle)]
    subprocess.run([*command, "--quantize", args.quantize, "--overwrite"], check=True)
    report["export_s"] = time.perf_counter() - started
    report["export_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    graphs = graph_weight_bytes(checkpoint, bundle)
    largest = max(graphs, key=graphs.get)
    report["largest_graph"] = {"name": largest, "weight_bytes": graphs[largest]}
    report["export_peak_over_target"] = report["export_peak_rss_bytes"] / (1.5 * graphs[largest] + 2**30)
    report["bundle_bytes"] = sum(p.stat().st_size for p in bundle.iterdir())
    report["disk_free_bytes"] = shutil.disk_usage(args.work).free

    from dyvte_rt.api.model import DyvteModel

    answers = {}
    with DyvteModel.load(bundle, threads=2) as model:
        for policy in ("never", f"layer:{args.exit_layer}"):
            answer = model.ask(
                "examples/three_shapes.png", "what shape is in the top left?", exit=policy, max_new_tokens=8
            )
            answers[policy] = {
                "token_ids": answer.token_ids,
                "exit_layer": answer.exit_layer,
                "vision_ms": answer.timings_ms["vision"],
                "prefill_ms": answer.timings_ms["prefill"],
                "decode_tokens_per_s": (len(answer.token_ids) - 1) / (answer.timings_ms["decode"] / 1e3),
                "prefill_macs": answer.prefill_macs,
            }
    report["answers"] = answers
    report["runtime_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
