"""What it would cost to give decoding its own graph over the segments' weights (docs/runtime.md).

    python benchmarks/weight_sharing.py --pairs 2

A decode graph spanning all layers would hold the same weights as the prefill segments. This
measures, on a stand-in graph of 7B-sized MatMuls ([4096, 11008] and back, `--pairs` of them), what
two ONNX Runtime sessions over the same weights cost in resident memory and time, each setting in a
fresh process:

- plain: each session loads (and pre-packs) its own copy;
- shared: one memory-mapped copy handed to both sessions as shared initializers, pre-packing off
  (ONNX Runtime's Python API has no shared pre-packed-weights container);
- the same two settings for int4 weights (MatMulNBits, ONNX Runtime's own quantiser, block 32),
  where pre-packing decides the kernel.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D, M = 4096, 11008


def build(directory: Path, pairs: int) -> dict[str, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for i in range(pairs):
        weights += [
            numpy_helper.from_array(rng.standard_normal((D, M), dtype=np.float32) * 0.02, f"up{i}"),
            numpy_helper.from_array(rng.standard_normal((M, D), dtype=np.float32) * 0.02, f"down{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [previous, f"up{i}"], [f"h{i}"]),
            helper.make_node("MatMul", [f"h{i}", f"down{i}"], [f"y{i}"]),
        ]
        previous = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["n", D])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    fp32 = directory / "fp32.onnx"
    onnx.save(model, fp32, save_as_external_data=True, location="fp32.onnx.data", size_threshold=1024)
    quantizer = MatMulNBitsQuantizer(onnx.load(fp32), block_size=32, is_symmetric=True)
    quantizer.process()
    int4 = directory / "int4.onnx"
    quantizer.model.save_model_to_file(str(int4), use_external_data_format=True)
    return {"fp32": fp32, "int4": int4}


def measure(path: Path, setting: str) -> dict:
    """Two sessions over `path` in this process: resident memory and per-call times."""
    import onnx
    import onnxruntime as ort

    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096

    def options(prepack: bool):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        return opts

    before = rss()
    sessions = []
    if setting == "shared":
        graph = onnx.load(str(path), load_external_data=False)
        data = np.memmap(path.parent / graph.graph.initializer[0].external_data[0].value, mode="r")
        values = {}
        for tensor in graph.graph.initializer:
            info = {entry.key: entry.value for entry in tensor.external_data}
            if not info:  # small tensors stay inside the graph
                continue
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            view = np.frombuffer(
                data, dtype=dtype, count=int(info["length"]) // dtype.itemsize, offset=int(info["offset"])
            )
            values[tensor.name] = ort.OrtValue.ortvalue_from_numpy(view.reshape(tuple(tensor.dims)))
        for _ in range(2):
            opts = options(prepack=False)
            for name, value in values.items():
                opts.add_initializer(name, value)
            sessions.append(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))
    else:
        sessions = [
            ort.InferenceSession(str(path), options(True), providers=["CPUExecutionProvider"])
            for _ in range(2)
        ]
    times = {}
    for tokens, repeats in ((1, 7), (512, 2)):
        x = np.random.default_rng(1).standard_normal((tokens, D), dtype=np.float32)
        for session in sessions:
            session.run(None, {"x": x})
        samples = []
        for i in range(repeats):
            started = time.perf_counter()
            sessions[i % 2].run(None, {"x": x})
            samples.append(time.perf_counter() - started)
        times[f"{tokens}_token_ms"] = 1e3 * float(np.median(samples))
    return {"resident_bytes": rss() - before, **times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pairs", type=int, default=2, help="[4096, 11008] MatMul pairs in the stand-in graph"
    )
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--measure", nargs=2, metavar=("GRAPH", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1])))
        return 0
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        graphs = build(Path(directory), args.pairs)
        for precision, path in graphs.items():
            weight_bytes = sum(p.stat().st_size for p in Path(directory).glob(f"{precision}.onnx*"))
            for setting in ("plain", "shared"):
                done = subprocess.run(
                    [sys.executable, __file__, "--measure", str(path), setting],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = json.loads(done.stdout)
                row["resident_over_weights"] = row["resident_bytes"] / weight_bytes
                rows[f"{precision} {setting}"] = row
    print("| weights | two sessions | resident / weights | 1-token call ms | 512-token call ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, row in rows.items():
        precision, setting = name.split()
        print(
            f"| {precision} | {setting} | {row['resident_over_weights']:.2f} | {row['1_token_ms']:.1f} | "
            f"{row['512_token_ms']:.0f} |"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
