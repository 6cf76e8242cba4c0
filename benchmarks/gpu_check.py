"""What a machine with an NVIDIA GPU can tell us, measured in one run and written as one JSON report.

    bash scripts/gpu_check.sh                       # -> $OUT/gpu_check.json, else runs/gpu_check.json
    python benchmarks/gpu_check.py --out report.json [--layers 32] [--runs 5]

Sections, each recorded on its own (one that fails records its error and the rest still run):
- environment: the GPU, its compute capability and memory, torch / transformers / cuda-bindings,
  the ONNX Runtime providers, whether TensorRT imports;
- reference_7b: the PyTorch DyVTE reference on CUDA at LLaVA-1.5-7B's shapes (random weights, fp16,
  all 32 decoder layers, CLIP ViT-L/14-336, 576 visual + ~60 text tokens): prefill latency with
  `never` and with exits at several layers beside the theoretical ratio (docs/compute.md), decode ms per
  token, and the reference's `never` logits against the plain Hugging Face forward;
- graphed_decoder: the same decoder captured in CUDA graphs (no host overhead, as an engine runs),
  never vs exits, for 576 visual tokens and a LLaVA-NeXT-sized 2,880;
- exit_copy: the TensorRT backend's exit switch (engines.exit_copy + engines.cuda_memory: device
  buffers and device-to-device copies through cuda-bindings) against numpy's gather, with its time;
- onnxruntime_gpu and tensorrt: run where installed, reported as missing where not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VISUAL_TOKENS = 576  # (336 / 14)²
IMAGE_TOKEN_ID = 32000


def section(report: dict, name: str, body: Callable[[], dict]) -> None:
    started = time.perf_counter()
    print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
    try:
        report[name] = body()
    except Exception as err:  # one broken section must not lose the others
        report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
    report[name]["seconds"] = round(time.perf_counter() - started, 1)
    print(f"[gpu_check] {name}: {json.dumps(report[name])[:600]}", file=sys.stderr, flush=True)


def environment() -> dict:
    import torch

    out: dict = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            torch_cuda=torch.version.cuda,
        )
    else:
        out["gpu"] = None
    for package in (
        "transformers",
        "onnxruntime",
        "onnxruntime-gpu",
        "cuda-bindings",
        "tensorrt",
        "polygraphy",
    ):
        try:
            from importlib import metadata

            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    try:  # the build that is imported (the GPU one can be laid over a CPU one with PYTHONPATH)
        import onnxruntime

        out["onnxruntime_imported"] = {
            "version": onnxruntime.__version__,
            "from": str(Path(onnxruntime.__file__).parent),
            "providers": onnxruntime.get_available_providers(),
        }
    except ImportError:
        out["onnxruntime_imported"] = None
    return out


def llava_7b(layers: int):
    """LLaVA-1.5-7B's configuration (dyvte_rt/families/presets.py), with `layers` decoder layers."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from dyvte_rt.families.presets import LLAVA_15_7B

    dims, tower = LLAVA_15_7B.dims, LLAVA_15_7B.tower
    vision = CLIPVisionConfig(**tower, projection_dim=768)
    text = LlamaConfig(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden,
        intermediate_size=dims.mlp,
        num_hidden_layers=layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_kv_heads,
        max_position_embeddings=dims.max_positions,
        **LLAVA_15_7B.text_config,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_ms(fn: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - started))
    return times


def reference_7b(layers: int, exits: list[int], runs: int, decode_tokens: int) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    from dyvte_rt.runtime.compute import prefill_macs
    from dyvte_rt.runtime.policy import parse_policy
    from export.families.llava import LlavaAdapter
    from export.reference.model import DyVTEReference

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of this script
    dtype = torch.float16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    with torch.device(device):
        model = LlavaForConditionalGeneration(llava_7b(layers)).to(dtype).eval()
    build_s = time.perf_counter() - started
    adapter = LlavaAdapter(model)
    reference = DyVTEReference(adapter, candidate_layers=tuple(range(layers - 1)))
    before, after = 5, 55  # text tokens around the image, as in a LLaVA-1.5 chat prompt
    text = torch.randint(4, IMAGE_TOKEN_ID, (1 + before + after,))
    ids = torch.cat([text[: 1 + before], torch.full((VISUAL_TOKENS,), IMAGE_TOKEN_ID), text[1 + before :]])
    ids = ids[None].to(device)  # [1, N]
    pixels = torch.randn(1, 3, 336, 336, dtype=dtype, device=device)
    n_tokens = ids.shape[1]

    policies = ["never", *(f"layer:{k}" for k in exits)]
    for spec in policies:  # warm-up: kernels chosen, memory pools grown
        reference.prefill(ids, pixels, parse_policy(spec))
    times: dict[str, list[float]] = {spec: [] for spec in policies}
    for _ in range(runs):  # interleaved, so drifting clocks touch every policy alike
        for spec in policies:
            times[spec] += cuda_ms(lambda s=spec: reference.prefill(ids, pixels, parse_policy(s)), 1)
    vision_ms = statistics.median(cuda_ms(lambda: reference.embed(ids, pixels), runs))

    never_ms = statistics.median(times["never"])
    prefill = {}
    for spec in policies:
        exit_layer = None if spec == "never" else int(spec.split(":")[1])
        macs = prefill_macs(adapter.dims, n_tokens, VISUAL_TOKENS, exit_layer)
        median = statistics.median(times[spec])
        decoder_never = never_ms - vision_ms
        prefill[spec] = {
            "median_ms": round(median, 2),
            "runs_ms": [round(t, 2) for t in times[spec]],
            "speedup": round(never_ms / median, 3),
            "decoder_speedup": round(decoder_never / (median - vision_ms), 3),
            "theoretical_speedup": round(macs.full / macs.actual, 3),
            "saved_macs_fraction": round(macs.saved_fraction, 3),
        }

    decode = {}
    for spec in ("never", f"layer:{exits[len(exits) // 2]}"):
        result = reference.prefill(ids, pixels, parse_policy(spec))
        step_ms = decode_ms(reference, result, decode_tokens)
        decode[spec] = {"ms_per_token_median": round(statistics.median(step_ms[2:]), 2)}

    # What runtime v1's loop would pay per decode token on a GPU: the whole KV cache to the host and
    # back (numpy in, numpy out), next to the decode step itself.
    result = reference.prefill(ids, pixels, parse_policy("never"))
    cache = [t for pair in zip(result.cache.keys, result.cache.values, strict=True) for t in pair]
    kv_bytes = sum(t.numel() * t.element_size() for t in cache)
    round_trip_ms = statistics.median(cuda_ms(lambda: [t.cpu().to(device) for t in cache], max(3, runs // 2)))
    kv_round_trip = {"kv_bytes": kv_bytes, "round_trip_ms": round(round_trip_ms, 2)}

    hf = model(input_ids=ids, pixel_values=pixels).logits[0, -1].float()
    ours = reference.prefill(ids, pixels, parse_policy("never")).logits[0, -1].float()
    parity = {
        "max_abs_diff": float((hf - ours).abs().max()),
        "logit_scale": float(hf.abs().max()),
        "same_argmax": bool(hf.argmax() == ours.argmax()),
    }
    return {
        "shape": {"layers": layers, "tokens": n_tokens, "visual_tokens": VISUAL_TOKENS, "dtype": str(dtype)},
        "device": device,
        "model_build_s": round(build_s, 1),
        "vision_and_embed_ms": round(vision_ms, 2),
        "prefill": prefill,
        "decode": decode,
        "kv_round_trip_per_token": kv_round_trip,
        "never_vs_hf_forward": parity,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device == "cuda"
        else None,
    }


def graphed_decoder(layers: int, exits: list[int], visual_counts: list[int], runs: int) -> dict:
    """The decoder's GPU time without Python or launch overhead, as an engine would run it: the
    layers (exit: the first k+1 over all N tokens, the rest over the N−V text rows, gathered with an
    index on the device) captured once in a CUDA graph per policy and replayed. The eager reference
    above is bound by the host at batch 1; this is what the exit can save on the GPU."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    from dyvte_rt.runtime.compute import DecoderDims

    torch.set_grad_enabled(False)
    text = llava_7b(layers).text_config
    with torch.device("cuda"):
        decoder = LlamaModel(LlamaConfig(**{**text.to_dict(), "vocab_size": 16})).half().eval()
    dims = DecoderDims(text.hidden_size, text.num_key_value_heads * 128, text.intermediate_size, layers)
    out = {}
    for visual in visual_counts:
        out[f"visual_{visual}"] = graphed_prefills(decoder, dims, visual, exits, runs)
        torch.cuda.empty_cache()
    return out


def graphed_prefills(decoder, dims, visual: int, exits: list[int], runs: int) -> dict:
    import torch

    from dyvte_rt.runtime.compute import prefill_macs
    from export.reference.cache import KVCache
    from export.reference.masks import causal_mask

    before, after = 6, 55  # text rows around the image
    n = before + visual + after
    keep = torch.cat([torch.arange(before), torch.arange(before + visual, n)]).cuda()  # the text rows
    hidden0 = torch.randn(1, n, dims.hidden, dtype=torch.float16, device="cuda") * 0.5  # [1, N, D]
    positions = torch.arange(n, device="cuda")[None]  # [1, N]
    mask_all = causal_mask(n, 0, torch.float16, "cuda")
    mask_text = causal_mask(len(keep), 0, torch.float16, "cuda")

    def forward(exit_layer: int | None, cache: KVCache) -> torch.Tensor:
        hidden, pos, mask = hidden0, positions, mask_all
        for index, layer in enumerate(decoder.layers):
            rotary = decoder.rotary_emb(hidden, position_ids=pos)
            hidden = layer(
                hidden, attention_mask=mask, position_ids=pos, position_embeddings=rotary, cache=cache,
                use_cache=True,
            )  # fmt: skip
            if index == exit_layer:
                hidden, pos, mask = hidden.index_select(1, keep), pos.index_select(1, keep), mask_text
        return decoder.norm(hidden[:, -1:])

    def decode_step(cache: KVCache) -> torch.Tensor:
        """One token after the prompt, reading each layer's cache as the prefill left it."""
        hidden, pos = hidden0[:, -1:], torch.full((1, 1), n, device="cuda")  # [1, 1, D], [1, 1]
        for index, layer in enumerate(decoder.layers):
            rotary = decoder.rotary_emb(hidden, position_ids=pos)
            view = _ReadOnlyCache(cache, index)
            mask = torch.zeros(1, 1, 1, cache.length(index) + 1, dtype=torch.float16, device="cuda")
            hidden = layer(
                hidden, attention_mask=mask, position_ids=pos, position_embeddings=rotary, cache=view,
                use_cache=True,
            )  # fmt: skip
        return decoder.norm(hidden)

    prefill_graphs, decode_graphs = {}, {}
    filled_caches = []  # a replayed graph reads these: they must outlive it
    for exit_layer in [None, *exits]:
        spec = "never" if exit_layer is None else f"layer:{exit_layer}"
        prefill_graphs[spec] = capture(lambda e=exit_layer: forward(e, KVCache(dims.num_layers)))
        filled = KVCache(dims.num_layers)
        forward(exit_layer, filled)
        filled_caches.append(filled)
        decode_graphs[spec] = capture(lambda c=filled: decode_step(c))
    prefill_ms = interleaved_ms(prefill_graphs, runs)
    step_ms = interleaved_ms(decode_graphs, runs)
    never = statistics.median(prefill_ms["never"])
    row: dict = {"tokens": n}
    for spec, samples in prefill_ms.items():
        exit_layer = None if spec == "never" else int(spec.split(":")[1])
        macs = prefill_macs(dims, n, visual, exit_layer)
        median = statistics.median(samples)
        row[spec] = {
            "median_ms": round(median, 3),
            "speedup": round(never / median, 3),
            "theoretical_speedup": round(macs.full / macs.actual, 3),
            "tflop_per_s": round(2 * macs.actual / (median * 1e-3) / 1e12, 1),
            "decode_step_ms": round(statistics.median(step_ms[spec]), 3),
        }
    return row


class _ReadOnlyCache:
    """A decode step's view of a filled cache: returns past + new without storing, so a captured
    step can be replayed at the same context length."""

    def __init__(self, cache, layer: int) -> None:
        self.cache, self.layer = cache, layer

    def update(self, key, value, layer_idx, *args, **kwargs):
        import torch

        past_k, past_v = self.cache.keys[self.layer], self.cache.values[self.layer]
        return torch.cat([past_k, key], dim=2), torch.cat([past_v, value], dim=2)


def capture(fn: Callable[[], object]):
    """`fn` captured in a CUDA graph after a warm-up on a side stream."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def interleaved_ms(graphs: dict, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {spec: [] for spec in graphs}
    for _ in range(runs):  # interleaved, so drifting clocks touch every policy alike
        for spec, graph in graphs.items():
            times[spec] += cuda_ms(graph.replay, 1)
    return times


def decode_ms(reference, result, tokens: int) -> list[float]:
    """Greedy decode steps after `result`'s prefill, each timed (ms)."""
    token = result.logits[:, -1].argmax(dim=-1, keepdim=True)  # [1, 1]
    times = []
    for step in range(tokens):
        sync()
        started = time.perf_counter()
        logits = reference.decode_one_token(token, result.n_tokens + step, result.cache)
        token = logits.argmax(dim=-1, keepdim=True)
        sync()
        times.append(1e3 * (time.perf_counter() - started))
    return times


def exit_copy(runs: int) -> dict:
    from engines.cuda_memory import DeviceBuffer, Stream, copy_runs, device_name
    from engines.exit_copy import exit_copy_plan

    rng = np.random.default_rng(0)
    before, after, dim = 6, 55, 4096
    source_rows = before + VISUAL_TOKENS + after
    text_rows = np.r_[np.arange(before), np.arange(before + VISUAL_TOKENS, source_rows)]
    cases = {
        "batch 1, exits": [text_rows],
        "batch 4, two exit and two stay": [text_rows, np.arange(source_rows), text_rows, np.arange(300)],
    }
    out: dict = {"device": device_name()}
    with Stream() as stream:
        for name, rows in cases.items():
            keep = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)  # as the runtime pads
            for b, r in enumerate(rows):
                keep[b, : len(r)] = r
            hidden = rng.standard_normal((len(rows), source_rows, dim)).astype(np.float16)  # [B, S, D]
            expected = np.take_along_axis(hidden, keep[..., None], axis=1)  # [B, K, D]
            plan = exit_copy_plan(keep, source_rows)
            row_bytes = dim * hidden.itemsize
            with DeviceBuffer.from_array(hidden, stream) as src, DeviceBuffer(expected.nbytes) as dst:
                copy_runs(plan, src, dst, row_bytes, stream)
                got = dst.download(expected.shape, expected.dtype, stream)
                times = []
                for _ in range(runs):
                    started = time.perf_counter()
                    copy_runs(plan, src, dst, row_bytes, stream)
                    stream.synchronize()
                    times.append(1e6 * (time.perf_counter() - started))
            out[name] = {
                "identical_to_numpy_gather": all(  # on the attended rows; padding is not copied
                    np.array_equal(got[b, : len(r)], expected[b, : len(r)]) for b, r in enumerate(rows)
                ),
                "copies": len(plan),
                "bytes": int(expected.nbytes),
                "median_us": round(statistics.median(times), 1),
            }
    return out


def onnxruntime_gpu() -> dict:
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    out: dict = {"version": onnxruntime.__version__, "providers": providers}
    if "CUDAExecutionProvider" not in providers:
        out["ran"] = "no: only the CPU build of ONNX Runtime is installed here"
    else:
        out["ran"] = "provider present: run `dyvte-rt bench --device cuda` on an exported bundle"
    return out


def tensorrt() -> dict:
    try:
        import tensorrt as trt
    except ImportError as err:
        return {"ran": f"no: {err}"}
    return {"ran": "import only", "version": trt.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = (
        Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else ROOT / "runs/gpu_check.json"
    )
    parser.add_argument("--out", type=Path, default=default_out, help="where the JSON report goes")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B-shaped model")
    parser.add_argument("--exits", default="7,15,23", help="exit layers compared with never")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per policy (after a warm-up)")
    parser.add_argument("--decode-tokens", type=int, default=16)
    args = parser.parse_args()
    exits = [int(k) for k in args.exits.split(",")]

    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    section(report, "environment", environment)
    section(report, "reference_7b", lambda: reference_7b(args.layers, exits, args.runs, args.decode_tokens))
    section(
        report,
        "graphed_decoder",
        lambda: graphed_decoder(args.layers, exits, [VISUAL_TOKENS, 2880], args.runs),
    )
    section(report, "exit_copy", lambda: exit_copy(max(args.runs, 20)))
    section(report, "onnxruntime_gpu", onnxruntime_gpu)
    section(report, "tensorrt", tensorrt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[gpu_check] report written to {args.out}", file=sys.stderr)
    return 0 if all("error" not in v for v in report.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
