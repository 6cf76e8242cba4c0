"""dyvte-rt side by side with the runtimes people choose between, on the same weights.

    python benchmarks/peers.py --model runs/llava-7b-slice-4 --bundle runs/slice4-bundle \\
        --peers hf,hf-eager,ort-genai,llama.cpp,llama.cpp-image --precision fp32,int4 \\
        --exit never,layer:1 --runs 3

Every peer is built from the one llava-hf checkpoint's language model (`peer_models.py`):
Hugging Face transformers (default attention and eager), ONNX Runtime GenAI with its own model
builder, llama.cpp (llama-cpp-python) from GGUF; dyvte-rt runs the bundles given with --bundle
(one per precision). `llama.cpp-image` is llama.cpp with its own image path: the checkpoint's CLIP
tower and projector converted by llama.cpp's converter into an mmproj GGUF (--mmproj-type), the
image read, preprocessed and encoded by libmtmd, its embeddings decoded between the prompt's text
tokens; the harness compares its image embeddings with dyvte-rt's vision graph's once. A Qwen2-VL
or Qwen2.5-VL checkpoint runs llama.cpp and llama.cpp-image: its decoder as llama.cpp's `qwen2vl`
GGUF, its mmproj by llama.cpp's main converter (F16, F32 or Q8_0), the image's token count the
one both preprocessors give it (--image at 1280x720: 1196). All decode
exactly --max-new-tokens tokens greedily from a prompt of the same token count, with the same
thread count; each system runs in a process of its own, and systems
alternate round by round so that machine drift hits all. The machine's read bandwidth and matmul
throughput are measured in the same run and turned into bounds: a decode step cannot be faster than
reading its weights and KV cache once, a prefill no faster than its multiply-adds at peak
throughput. ONNX Runtime-based systems run with idle-thread spinning off and on (`--spinning`).

Prints a Markdown table; --json prints {"systems", "limits", "settings"} instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from limits import matmul_gflop_per_s, memory_bandwidth_gb_per_s
from peer_models import (
    MMPROJ_TYPES,
    gguf_model,
    is_qwen_vl,
    language_model_dir,
    language_model_name,
    mmproj_model,
    ort_genai_model,
    qwen2vl_gguf_model,
)

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("hf", "hf-eager", "ort-genai", "llama.cpp", "llama.cpp-image")
PRECISIONS = ("fp32", "int8", "int4")
GGUF_FOR = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}
PEER_MODULES = {"ort-genai": "onnxruntime_genai", "llama.cpp": "llama_cpp", "llama.cpp-image": "llama_cpp"}


@dataclass
class System:
    name: str
    spec: dict  # what peer_systems.py measures
    model_bytes: int  # on disk
    bytes_per_token: int  # weights a decode step reads (embedding tables excluded: one row is read)
    kv_bytes_per_position: int  # all layers, keys and values, at the system's KV precision
    precision: str
    notes: str = ""
    rounds: list[dict] = field(default_factory=list)


def main() -> int:
    args = parse_args()
    sys.path.insert(0, str(ROOT))
    from dyvte_rt.api.model import DyvteModel
    from dyvte_rt.bundle.manifest import load_manifest

    bundles = {load_manifest(b, verify_hashes=False).precision: b for b in args.bundle}
    reference_bundle = next(iter(bundles.values()))
    with DyvteModel.load(reference_bundle, verify_hashes=False) as model:
        visual_tokens = model.prepare_image(args.image).visual_tokens  # Qwen2-VL's depend on the image
        prompt = model.prompts.encode(args.question, visual_tokens=visual_tokens)[0]
        prompt_tokens = len(prompt)
        text_before_image = int(np.argmax(prompt == model.manifest.tokens.image))
        dims = model.manifest.dims
    common = {
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "requests": 3,  # two warm-ups (ONNX Runtime's arena and memory patterns settle), one measured
        "image": str(args.image),
        "question": args.question,
        "prompt_tokens": prompt_tokens,
        "visual_tokens": visual_tokens,
        "text_before_image": text_before_image,
        "vocab_size": dims.vocab_size,
    }
    systems = build_systems(args, bundles, common, dims)
    image_check = check_image_features(systems, reference_bundle, args)
    progress(f"{len(systems)} systems, prompt of {prompt_tokens} tokens")
    readings = []  # the machine's limits, measured before every round and at the end: the best is the bound
    for round_index in range(args.runs):
        readings.append(measure_limits(args.threads))
        order = systems[round_index % len(systems) :] + systems[: round_index % len(systems)]
        for system in order if round_index % 2 == 0 else order[::-1]:
            system.rounds.append(run_worker(system.spec))
            progress(f"round {round_index + 1}/{args.runs}: {system.name}")
    readings.append(measure_limits(args.threads))
    limits = {key: max(r[key] for r in readings) for key in readings[0]}
    report = summarise(systems, limits, args, prompt_tokens, visual_tokens, dims)
    if image_check:
        report["settings"]["llama_cpp_image_features"] = image_check
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="the llava-hf checkpoint every peer is built from"
    )
    parser.add_argument(
        "--bundle", type=Path, action="append", required=True, help="a dyvte-rt bundle (repeat per precision)"
    )
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated: {', '.join(PEERS)}")
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, int8, int4")
    parser.add_argument("--exit", default="never", help="dyvte-rt policies, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="rounds; each system is measured once a round")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every system")
    parser.add_argument(
        "--spinning",
        choices=("both", "off"),
        default="both",
        help="ONNX Runtime systems: both settings, or off only",
    )
    parser.add_argument(
        "--gguf-fp", choices=("F32", "F16"), default="F32", help="llama.cpp's unquantised type"
    )
    parser.add_argument(
        "--mmproj-type",
        default="F16",
        help=f"llama.cpp-image: the mmproj's types, comma-separated ({', '.join(MMPROJ_TYPES)}; llama.cpp's "
        "LLaVA-1.5 converter writes F16 or F32, its main converter for Qwen2-VL Q8_0 too)",
    )
    parser.add_argument(
        "--block-size", type=int, default=32, help="int4/int8 block size of ONNX Runtime GenAI"
    )
    parser.add_argument("--image", type=Path, default=ROOT / "examples/three_shapes.png")
    parser.add_argument("--question", default="what shape is in the top left?")
    parser.add_argument(
        "--cache", type=Path, default=ROOT / "runs/peers-cache", help="where peer models are built"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    args.precision = [p.strip() for p in args.precision.split(",") if p.strip()]
    args.mmproj_type = [t.strip() for t in args.mmproj_type.split(",") if t.strip()]
    unknown = sorted(set(args.peers) - set(PEERS)) + sorted(set(args.precision) - set(PRECISIONS))
    unknown += sorted(set(args.mmproj_type) - set(MMPROJ_TYPES))
    if unknown:
        parser.error(f"unknown peers, precisions or mmproj types: {unknown}")
    for path in (args.model, *args.bundle):
        if not path.is_dir():
            parser.error(f"{path} is not a directory (a checkpoint for --model, a bundle for --bundle)")
    if is_qwen_vl(args.model) and set(args.peers) - {"llama.cpp", "llama.cpp-image"}:
        parser.error("for a Qwen2-VL or Qwen2.5-VL checkpoint the harness runs llama.cpp and llama.cpp-image")
    for peer, module in PEER_MODULES.items():
        if peer in args.peers and importlib.util.find_spec(module) is None:
            parser.error(f"the {peer} peer needs {module}: pip install 'dyvte-rt[peers]'")
    return args


def build_systems(args, bundles: dict[str, Path], common: dict, dims) -> list[System]:
    systems: list[System] = []
    kv_row = 2 * dims.num_kv_heads * dims.head_dim * dims.num_layers  # elements per position
    spins = (False, True) if args.spinning == "both" else (False,)
    lm_dir = None
    qwen = is_qwen_vl(args.model)
    if {"ort-genai", "llama.cpp", "llama.cpp-image"} & set(args.peers) and not qwen:
        progress("extracting the language model")
        lm_dir = language_model_dir(args.model, args.cache)
    for precision in args.precision:
        bundle = bundles.get(precision)
        if bundle is not None:
            read = onnx_weight_bytes([*sorted(bundle.glob("segment_*.onnx")), bundle / "head.onnx"])
            for policy in args.exit.split(","):
                for spin in spins:
                    name = f"dyvte-rt {precision} {policy}" + (" spin" if spin else "")
                    spec = {
                        **common,
                        "kind": "dyvte-rt",
                        "path": str(bundle),
                        "policy": policy.strip(),
                        "spin": spin,
                    }
                    systems.append(System(name, spec, dir_bytes(bundle), read, 4 * kv_row, precision))
        if precision == "fp32":
            for peer, attention in (("hf", "sdpa"), ("hf-eager", "eager")):
                if peer in args.peers:
                    spec = {**common, "kind": "hf", "path": str(args.model), "attention": attention}
                    read = hf_language_weight_bytes(args.model)
                    systems.append(System(peer, spec, dir_bytes(args.model), read, 4 * kv_row, precision))
        if "ort-genai" in args.peers:
            progress(f"ONNX Runtime GenAI's builder, {precision}")
            path = ort_genai_model(lm_dir, precision, args.cache, args.block_size)
            read = onnx_weight_bytes([path / "model.onnx"])
            for spin in spins:
                name = f"ort-genai {precision}" + (" spin" if spin else "")
                spec = {**common, "kind": "ort-genai", "path": str(path), "spin": spin}
                systems.append(
                    System(
                        name,
                        spec,
                        dir_bytes(path),
                        read,
                        4 * kv_row,
                        precision,
                        "language model only, no image path",
                    )
                )
        with_image = "llama.cpp-image" in args.peers
        if "llama.cpp" in args.peers or with_image:
            kind = args.gguf_fp if precision == "fp32" else GGUF_FOR[precision]
            progress(f"GGUF {kind}")
            if qwen:
                path = qwen2vl_gguf_model(args.model, kind, args.cache)
            else:
                path = gguf_model(lm_dir, kind, args.cache)
            read = gguf_weight_bytes(path)
            spec = {**common, "kind": "llama.cpp", "path": str(path)}
            kv = 2 * kv_row  # llama.cpp keeps its KV cache in f16
            if "llama.cpp" in args.peers:
                notes = "language model only, no image path"
                systems.append(
                    System(f"llama.cpp {kind}", spec, path.stat().st_size, read, kv, precision, notes)
                )
            for mmproj_type in args.mmproj_type if with_image else []:
                progress(f"llama.cpp's mmproj {mmproj_type}")
                mmproj = mmproj_model(args.model, mmproj_type, args.cache)
                name = f"llama.cpp {kind} + mmproj {mmproj_type}"
                size = path.stat().st_size + mmproj.stat().st_size
                image_spec = {**spec, "mmproj": str(mmproj)}
                notes = "its own image path (libmtmd)"
                systems.append(System(name, image_spec, size, read, kv, precision, notes))
    return systems


def check_image_features(systems: list[System], bundle: Path, args) -> dict | None:
    """llama.cpp's image embeddings for the benchmark's image against dyvte-rt's vision graph's
    (first bundle given): both read the same tower, so a low cosine means the peer is not doing the
    same work (wrong feature layer, class token kept)."""
    from dyvte_rt.api.model import DyvteModel
    from dyvte_rt.bundle.io_names import IMAGE_FEATURES

    peer = next((s for s in systems if s.spec.get("mmproj")), None)
    if peer is None:
        return None
    out = args.cache / "llama-cpp-image-features.npy"
    run_worker({**peer.spec, "requests": 1, "features_out": str(out)})
    theirs = np.load(out)
    with DyvteModel.load(bundle, verify_hashes=False) as model:
        image = model.pipeline.encode_image(model.prepare_image(args.image))
        ours = model.pipeline.backend.download(image.encoded[IMAGE_FEATURES])[0]
    if ours.shape != theirs.shape:
        raise RuntimeError(f"llama.cpp's image embeddings are {theirs.shape}, dyvte-rt's {ours.shape}")
    check = {"tokens": len(ours), **feature_agreement(ours, theirs)}
    progress(
        f"llama.cpp's image embeddings vs dyvte-rt's: cosine median {check['cosine_median']:.4f}, "
        f"about the mean token {check['centred_cosine_median']:.4f}"
    )
    return check


def feature_agreement(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Per-token cosine of two [tokens, hidden] feature sets, as they are and about each one's mean
    token: random-weight towers give nearly the same vector for every token, which hides a
    permutation or a dropped token from the plain cosine but not from the centred one."""

    def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    plain = cosine(ours, theirs)
    centred = cosine(ours - ours.mean(0), theirs - theirs.mean(0))
    return {
        "cosine_min": float(plain.min()),
        "cosine_median": float(np.median(plain)),
        "centred_cosine_min": float(centred.min()),
        "centred_cosine_median": float(np.median(centred)),
    }


def measure_limits(threads: int) -> dict[str, float]:
    return {
        **memory_bandwidth_gb_per_s(threads=threads),
        "matmul_gflop_per_s": matmul_gflop_per_s(threads=threads),
    }


def run_worker(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("peer_systems.py")), json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec['kind']} failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    time.sleep(0.5)  # let the machine settle between processes
    return result


def summarise(
    systems: list[System], limits: dict, args, prompt_tokens: int, visual_tokens: int, dims
) -> dict:
    from dyvte_rt.runtime.compute import DecoderDims, prefill_macs

    decoder = DecoderDims(dims.hidden, dims.num_kv_heads * dims.head_dim, dims.mlp, dims.num_layers)
    out = {}
    for system in systems:
        rows = [row for result in system.rounds for row in result["requests"]]
        median = {
            key: float(np.median([r[key] for r in rows]))
            for key in ("prefill_ms", "ttft_ms", "decode_tokens_per_s")
        }
        vision = [r["vision_ms"] for r in rows if r.get("vision_ms") is not None]
        exit_layer = rows[0].get("exit_layer")  # only dyvte-rt exits
        context = prompt_tokens + args.max_new_tokens // 2  # the mean context of a decode step
        layers_without_image = 0 if exit_layer is None else dims.num_layers - 1 - exit_layer
        kv_positions = context - visual_tokens * layers_without_image / dims.num_layers
        read = system.bytes_per_token + system.kv_bytes_per_position * kv_positions
        macs = prefill_macs(decoder, prompt_tokens, visual_tokens, exit_layer)
        out[system.name] = {
            **median,
            "vision_ms": float(np.median(vision)) if vision else None,
            "peak_rss_mb": max(result["peak_rss_mb"] for result in system.rounds),
            "model_bytes": system.model_bytes,
            "precision": system.precision,
            "bytes_read_per_token": read,
            "decode_bound_tokens_per_s": limits["read"] * 1e9 / read,
            "prefill_bound_ms": 1e3 * 2 * macs.actual / (limits["matmul_gflop_per_s"] * 1e9),
            "spinning": system.spec.get("spin"),
            "notes": system.notes,
            "measured_requests": len(rows),
        }
        out[system.name]["decode_fraction_of_bound"] = (
            out[system.name]["decode_tokens_per_s"] / out[system.name]["decode_bound_tokens_per_s"]
        )
    return {
        "systems": out,
        "limits": {
            "memory_gb_per_s": limits["read"],
            "copy_gb_per_s": limits["copy"],
            "matmul_gflop_per_s": limits["matmul_gflop_per_s"],
        },
        "settings": {
            "threads": args.threads,
            "prompt_tokens": prompt_tokens,
            "max_new_tokens": args.max_new_tokens,
            "greedy": True,
            "eos_ignored": True,
            "runs": args.runs,
            "spinning": "ONNX Runtime systems with idle-thread spinning off and on"
            if args.spinning == "both"
            else "off",
            "block_size": args.block_size,
            "model": str(args.model),
        },
    }


def table(report: dict) -> str:
    s, limits = report["settings"], report["limits"]
    header = "| system | LM prefill ms | vision ms | TTFT ms | decode tok/s | bound tok/s | of bound "
    lines = [
        f"prompt {s['prompt_tokens']} tokens, {s['max_new_tokens']} new tokens (greedy, EOS ignored), "
        f"{s['threads']} threads, {s['runs']} rounds; read bandwidth {limits['memory_gb_per_s']:.1f} GB/s, "
        f"matmul {limits['matmul_gflop_per_s']:.0f} GFLOP/s",
        "",
        header + "| peak RSS MB | model MB | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in report["systems"].items():
        vision = f"{r['vision_ms']:.0f}" if r["vision_ms"] is not None else "–"
        decode = f"{r['decode_tokens_per_s']:.1f} | {r['decode_bound_tokens_per_s']:.1f}"
        memory = f"{r['peak_rss_mb']:.0f} | {r['model_bytes'] / 2**20:.0f}"
        lines.append(
            f"| {name} | {r['prefill_ms']:.0f} | {vision} | {r['ttft_ms']:.0f} | {decode} | "
            f"{r['decode_fraction_of_bound']:.2f} | {memory} | {r['notes']} |"
        )
    return "\n".join(lines)


def onnx_weight_bytes(paths: list[Path]) -> int:
    """Initializer bytes of ONNX graphs, leaving out tables only indexed by Gather (embeddings)."""
    import onnx

    total = 0
    for path in paths:
        graph = onnx.load(str(path), load_external_data=False).graph
        gathered = {node.input[0] for node in graph.node if node.op_type == "Gather"}
        for tensor in graph.initializer:
            if tensor.name in gathered:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            total += int(info["length"]) if "length" in info else len(tensor.raw_data) or tensor.ByteSize()
    return total


def gguf_weight_bytes(path: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")


def hf_language_weight_bytes(checkpoint: Path) -> int:
    from safetensors import safe_open

    itemsize = {"F32": 4, "F16": 2, "BF16": 2}
    total = 0
    for shard in checkpoint.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                target = language_model_name(name)
                if target is not None and "embed_tokens" not in target:
                    tensor = handle.get_slice(name)
                    total += int(np.prod(tensor.get_shape())) * itemsize[tensor.get_dtype()]
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
