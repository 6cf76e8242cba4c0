"""dyvte-rt's own runtime on a GPU, checked against the CPU and timed, in one JSON report.

    bash scripts/gpu_runtime_check.sh check          # on the device: -> $OUT/gpu_runtime.json
    python benchmarks/gpu_runtime.py --device cpu --quick --out runs/gpu_runtime.json   # rehearsal

Sections, each recorded on its own (one that fails records its error and the rest still run):
- environment: the card, driver, CUDA, ONNX Runtime and its providers;
- tokens: the demo checkpoint exported here in four variants (fp32/fp16 × in-place/concat KV),
  greedy answers with `--device DEVICE` against `--device cpu` for never, layer:1 and router on the
  bundled example images: token ids must be identical; the routers' exit probabilities are compared
  within fp16's tolerance; on a GPU the fp32 in-place bundle must be refused in one line (ONNX
  Runtime's CUDA GroupQueryAttention is fp16 only);
- batch: `ask_batch` of 4 with mixed exits on DEVICE against single answers on the CPU (the fp16
  in-place bundle on a GPU);
- engine: the server's batch engine (three requests on two slots) on DEVICE against the CPU;
- slice: a LLaVA-1.5-7B-shaped slice (true widths, few decoder layers, fp16 on a GPU, in-place KV)
  exported here: prefill never vs layer:1 against the theoretical ratio, decode ms per token with
  about 600 and 2,400 positions of past, host bytes per decode token, peak device memory against
  the weights and KV buffers, a batch-of-4 decode rate; and, where CUDA is present, the graphed
  PyTorch reference at the same shapes (benchmarks/gpu_check.py) for the ratios;
- cuda_graph: ONNX Runtime's CUDA-graph capture of the slice's decode step (`enable_cuda_graph`
  with I/O binding on fixed buffers) against plain runs, or why it could not be captured.
Exit status 1 when a section failed or a token differed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check import environment, section  # noqa: E402

EXAMPLES = [
    (ROOT / "examples/three_shapes.png", "what color is the shape in the top left?"),
    (ROOT / "examples/two_circles.png", "where is the green shape?"),
    (ROOT / "examples/three_shapes.png", "how many shapes are there?"),
    (ROOT / "examples/two_circles.png", "what color is the circle on the left?"),
]
POLICIES = ("never", "layer:1", "router")
MAX_NEW = 12
FP16_PROB_TOLERANCE = 2e-2  # router probabilities, fp16 against fp32 (docs/quantization.md's bar)


def export_bundle(model: str | Path, out: Path, cache: Path, **options) -> Path:
    from export.build import BuildConfig, build_bundle

    if not (out / "manifest.json").is_file():
        build_bundle(BuildConfig(model=str(model), out=out, graph_cache=cache, quiet=True, **options))
    return out


def load(bundle: Path, device: str):
    from dyvte_rt import DyvteModel

    return DyvteModel.load(bundle, device=device, dtype=None if device != "cpu" else _dtype(bundle))


def _dtype(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["dtype"]


def tokens(work: Path, device: str) -> dict:
    """Greedy answers on `device` against the CPU, for every variant and policy."""
    out: dict = {"cases": 0, "identical": 0, "mismatches": [], "max_exit_prob_diff": {}}
    for dtype in ("fp32", "fp16"):
        for kv in ("inplace", "concat"):
            bundle = export_bundle("demo", work / f"demo-{dtype}-{kv}", work / "graphs", dtype=dtype, kv=kv)
            if device != "cpu" and dtype == "fp32" and kv == "inplace":  # refused by design
                out["refused"] = refusal(bundle, device)
                continue
            with load(bundle, "cpu") as cpu, load(bundle, device) as dev:
                worst = 0.0
                for image, question in EXAMPLES[:2]:
                    for policy in POLICIES:
                        a = cpu.ask(image, question, exit=policy, max_new_tokens=MAX_NEW)
                        b = dev.ask(image, question, exit=policy, max_new_tokens=MAX_NEW)
                        out["cases"] += 1
                        if a.token_ids == b.token_ids and a.exit_layer == b.exit_layer:
                            out["identical"] += 1
                        else:
                            out["mismatches"].append(
                                {"variant": f"{dtype}-{kv}", "policy": policy, "question": question,
                                 "cpu": [a.exit_layer, a.text], "device": [b.exit_layer, b.text]}
                            )  # fmt: skip
                        for layer, p in a.exit_probs.items():
                            worst = max(worst, abs(p - b.exit_probs.get(layer, float("nan"))))
                out["max_exit_prob_diff"][f"{dtype}-{kv}"] = worst
    out["exit_probs_within_tolerance"] = all(
        v <= FP16_PROB_TOLERANCE for v in out["max_exit_prob_diff"].values()
    )
    return out


def refusal(bundle: Path, device: str) -> str:
    from dyvte_rt import DyvteError

    try:
        load(bundle, device).close()
    except DyvteError as err:
        return err.one_line()
    return "not refused"


def batch(work: Path, device: str) -> dict:
    bundle = work / ("demo-fp32-inplace" if device == "cpu" else "demo-fp16-inplace")
    exits = ["never", "layer:1", "router", "layer:2"]
    with load(bundle, "cpu") as cpu, load(bundle, device) as dev:
        alone = [
            cpu.ask(i, q, exit=e, max_new_tokens=MAX_NEW) for (i, q), e in zip(EXAMPLES, exits, strict=True)
        ]
        together = dev.ask_batch(EXAMPLES, exit=exits, max_new_tokens=MAX_NEW)
    same = [
        a.token_ids == b.token_ids and a.exit_layer == b.exit_layer
        for a, b in zip(alone, together, strict=True)
    ]
    return {"requests": len(same), "identical": sum(same), "exit_layers": [a.exit_layer for a in together]}


def engine(work: Path, device: str) -> dict:
    import queue

    from dyvte_rt import SamplingConfig
    from dyvte_rt.runtime.sampling import Sampler
    from dyvte_rt.serving.engine import BatchEngine, ServeRequest

    bundle = work / ("demo-fp32-inplace" if device == "cpu" else "demo-fp16-inplace")
    items = [(i, q, e) for (i, q), e in zip(EXAMPLES[:3], ["router", "never", "layer:1"], strict=True)]
    with load(bundle, "cpu") as cpu, load(bundle, device) as dev:
        alone = [cpu.ask(i, q, exit=e, max_new_tokens=MAX_NEW) for i, q, e in items]
        server = BatchEngine(dev, max_batch=2, max_queue=4, context=256)
        sinks = [queue.Queue() for _ in items]
        try:
            for (image, question, exit), sink in zip(items, sinks, strict=True):
                prepared = dev.prepare_image(image)
                ids = dev.prompts.encode(question, with_image=True, visual_tokens=prepared.visual_tokens)
                emit = lambda kind, payload, sink=sink: sink.put((kind, payload))  # noqa: E731
                rule, sampler = dev.stop_rule(MAX_NEW), Sampler(SamplingConfig())
                server.submit(ServeRequest(ids[0], prepared, dev.policy(exit), rule, sampler, emit))
            done = []
            for sink in sinks:
                while (event := sink.get(timeout=120))[0] not in ("done", "error"):
                    pass
                done.append(event[1])
        finally:
            server.stop()
    same = [getattr(d, "token_ids", None) == a.token_ids for d, a in zip(done, alone, strict=True)]
    return {"requests": len(same), "identical": sum(same)}


class MemoryWatch:
    """Peak device memory in use while it runs, sampled by NVML every 5 ms (None without NVML)."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._used = lambda: pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
        except Exception:  # no NVML: a CPU rehearsal
            self._used = None
        self.baseline = self._used() if self._used else None
        self.peak = self.baseline
        self._stop = threading.Event()

    def __enter__(self) -> MemoryWatch:
        if self._used:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._used())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._used:
            self._thread.join()

    def peak_bytes(self) -> int | None:
        return None if self.baseline is None else self.peak - self.baseline


def bundle_weight_bytes(bundle: Path) -> int:
    return sum(
        p.stat().st_size
        for p in bundle.iterdir()
        if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")
    )


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def repeated_to(model, image, question: str, tokens: int) -> str:
    """`question` repeated until the prompt holds about `tokens` tokens (the past of a long decode)."""
    visual = model.prepare_image(image).visual_tokens
    count = lambda text: model.prompts.encode(text, with_image=True, visual_tokens=visual).shape[1]  # noqa: E731
    one, two = count(question), count(f"{question} {question}")
    repeats = max(1, 1 + (tokens - one) // max(1, two - one))
    return " ".join([question] * repeats)


def slice_(work: Path, device: str, layers: int, runs: int, variant: str = "llava-7b-slice") -> dict:
    import torch

    from export.tiny_models import build_tiny

    dtype = "fp32" if device == "cpu" else "fp16"
    checkpoint = work / f"{variant}-{layers}"
    if not (checkpoint / "config.json").is_file():
        build_tiny(
            "llava",
            variant,
            checkpoint,
            0,
            layers=layers,
            dtype=getattr(torch, {"fp32": "float32", "fp16": "float16"}[dtype]),
        )
    bundle = export_bundle(checkpoint, work / f"{variant}-{layers}-{dtype}", work / "graphs", dtype=dtype,
                           kv="inplace", exit_layers="1", no_routers=True)  # fmt: skip
    image, question = EXAMPLES[0]
    with MemoryWatch() as memory, load(bundle, device) as model:
        samples: dict[str, list] = {"never": [], "layer:1": []}
        for run in range(runs + 1):
            for policy in ("never", "layer:1") if run % 2 else ("layer:1", "never"):  # interleaved
                answer = model.ask(image, question, exit=policy, max_new_tokens=32, ignore_eos=True)
                if run:
                    samples[policy].append(answer)
        never, exited = samples["never"], samples["layer:1"]
        prefill = {p: median([a.timings_ms["prefill"] for a in s]) for p, s in samples.items()}
        per_token = lambda a: a.timings_ms["decode"] / max(1, len(a.token_ids) - 1)  # noqa: E731
        long_question = repeated_to(model, image, question, min(2400, model.manifest.dims.max_positions - 40))
        long = [
            model.ask(image, long_question, exit="never", max_new_tokens=32, ignore_eos=True)
            for _ in range(3)
        ]
        four = [
            model.ask_batch([EXAMPLES[0]] * 4, exit="never", max_new_tokens=32, ignore_eos=True)
            for _ in range(3)
        ]
        kv_bytes = max(a.kv_cache_bytes for a in long)
    rate4 = [4 * (len(b[0].token_ids) - 1) / (b[0].timings_ms["decode"] / 1000) for b in four]
    vocab = model.manifest.dims.vocab_size
    out = {
        "layers": layers,
        "dtype": dtype,
        "visual_tokens": never[0].visual_tokens,
        "prompt_tokens": never[0].prompt_tokens,
        "prefill_ms_median": prefill,
        "exit_speedup": round(prefill["never"] / prefill["layer:1"], 3),
        "theoretical_speedup": round(never[0].prefill_macs["actual"] / exited[0].prefill_macs["actual"], 3),
        "decode_ms_per_token": {
            f"past_{never[0].prompt_tokens}": median([per_token(a) for a in never]),
            f"past_{long[0].prompt_tokens}": median([per_token(a) for a in long]),
        },
        "host_bytes_per_decode_token": median([a.host_bytes["per_decode_token"] for a in never]),
        "host_bytes_bound": 4 * vocab + 1024,
        "batch4_decode_tokens_per_s": median(rate4),
        "weight_bytes": bundle_weight_bytes(bundle),
        "kv_buffer_bytes": kv_bytes,
        "peak_device_bytes": memory.peak_bytes(),
    }
    out["exit_efficiency"] = round(out["exit_speedup"] / out["theoretical_speedup"], 3)
    if device != "cpu":
        from benchmarks.gpu_check import graphed_decoder

        out["graphed_reference"] = graphed_decoder(layers, [1], [576, 2880], runs)
    return out


def cuda_graph(work: Path, device: str, layers: int, runs: int, variant: str = "llava-7b-slice") -> dict:
    """One decode step of the slice's segments run with fixed, bound buffers, plainly and captured."""
    import numpy as np
    import onnxruntime as ort

    dtype = "fp32" if device == "cpu" else "fp16"
    bundle = work / f"{variant}-{layers}-{dtype}"
    manifest = json.loads((bundle / "manifest.json").read_text())
    capacity, past = 1024, 640
    sizes = {"batch": 1, "seq": 1, "capacity": capacity}
    provider = "CPUExecutionProvider" if device == "cpu" else "CUDAExecutionProvider"
    where = "cpu" if device == "cpu" else "cuda"
    out: dict = {}
    for captured in (False, True):
        if captured and device == "cpu":
            out["captured"] = "not tried: CUDA graphs need the CUDA provider"
            break
        options = [(provider, {"enable_cuda_graph": "1"} if captured else {})]
        steps = []
        sessions = []
        for segment in manifest["segments"]:
            spec = manifest["graphs"][segment["graph"]]
            session = ort.InferenceSession(str(bundle / spec["file"]), providers=options)
            binding = session.io_binding()
            values = {}
            for item in spec["inputs"]:
                shape = [sizes.get(d, d) if isinstance(d, str) else d for d in item["shape"]]
                array = np.zeros(shape, dtype=item["dtype"])
                if item["name"] == "position_ids":
                    array[...] = past
                if item["name"] == "total_lengths":
                    array[...] = past + 1
                values[item["name"]] = ort.OrtValue.ortvalue_from_numpy(array, where, 0)
                binding.bind_ortvalue_input(item["name"], values[item["name"]])
            for item in spec["outputs"]:
                name = item["name"]
                if name.startswith("present."):
                    binding.bind_ortvalue_output(name, values["past." + name.removeprefix("present.")])
                else:
                    shape = [sizes.get(d, d) if isinstance(d, str) else d for d in item["shape"]]
                    values[name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, item["dtype"], where, 0)
                    binding.bind_ortvalue_output(name, values[name])
            sessions.append((session, binding, values))
        try:
            for session, binding, _ in sessions:  # warm-up (and capture, when captured)
                session.run_with_iobinding(binding)
            for _ in range(max(20, runs * 4)):
                started = time.perf_counter()
                for session, binding, _ in sessions:
                    session.run_with_iobinding(binding)
                    binding.synchronize_outputs()
                steps.append((time.perf_counter() - started) * 1000)
            out["captured" if captured else "plain"] = {"decode_step_ms_median": median(steps)}
        except Exception as err:
            out["captured" if captured else "plain"] = {"error": f"{type(err).__name__}: {err}"[:500]}
    if isinstance(out.get("captured"), dict) and "decode_step_ms_median" in out["captured"]:
        out["speedup"] = round(
            out["plain"]["decode_step_ms_median"] / out["captured"]["decode_step_ms_median"], 3
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = (
        Path(os.environ["OUT"]) / "gpu_runtime.json"
        if os.environ.get("OUT")
        else ROOT / "runs/gpu_runtime.json"
    )
    parser.add_argument("--out", type=Path, default=default_out, help="where the JSON report goes")
    parser.add_argument(
        "--device", default="cuda", help="the device checked against the CPU (cpu: a rehearsal)"
    )
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 7B-shaped slice")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per policy (after a warm-up)")
    parser.add_argument(
        "--work",
        type=Path,
        help="where bundles are exported (default: a temporary folder); bundles already there are used "
        "as they are, so demo bundles exported on another machine can travel with the run",
    )
    parser.add_argument("--quick", action="store_true", help="skip the 7B-shaped slice (a CPU rehearsal)")
    parser.add_argument(
        "--slice-variant",
        default="llava-7b-slice",
        help="tiny LLaVA variant timed as the slice (llama-gqa: a quick CPU rehearsal of those sections)",
    )
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-runtime-"))
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": args.device}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    timed = (work, args.device, args.layers, args.runs, args.slice_variant)
    sections = {
        "environment": environment,
        "tokens": lambda: tokens(work, args.device),
        "batch": lambda: batch(work, args.device),
        "engine": lambda: engine(work, args.device),
        **({} if args.quick else {"slice": lambda: slice_(*timed), "cuda_graph": lambda: cuda_graph(*timed)}),
    }
    for name, run in sections.items():
        section(report, name, run)
        # written after every section: a run stopped at the device's time limit keeps what it measured
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[gpu_runtime] report written to {args.out}", file=sys.stderr)
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    differ = [
        k
        for k in ("tokens", "batch", "engine")
        if report[k].get("identical") != report[k].get("cases", report[k].get("requests"))
    ]
    if failed or differ:
        print(f"[gpu_runtime] failed: {failed}; tokens differ: {differ}", file=sys.stderr)
    return 1 if failed or differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
