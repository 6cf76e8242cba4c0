"""One decoder layer's weights as ONNX Runtime MatMulNBits, per block size, accuracy level and layout.

    python benchmarks/matmulnbits_sweep.py                       # LLaVA-1.5-7B's layer shapes
    python benchmarks/matmulnbits_sweep.py --blocks 32,64,128 --levels 0,4 --rounds 5 --json

A decode step reads every weight once for one token, so its time is set by how fast MatMulNBits
streams int4 weights. This builds one layer's matrices (q, k, v, o, gate, up, down; hidden 4096,
MLP 11008 unless told) quantised by ONNX Runtime's own quantiser, as the layer lays them out today
(`separate`: seven MatMulNBits) and fused the way ONNX Runtime GenAI's builder packs them (`fused`:
one QKV and one gate/up MatMulNBits, four in all), and times one token through them (M = 1) with
2 threads and idle spinning off, as dyvte-rt runs. Configurations alternate within each round;
medians over rounds. Prints ms per layer and the read rate it implies (weight bytes / time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def layer_graph(hidden: int, mlp: int, fused: bool, seed: int = 0):
    """A float graph: x [1, hidden] and m [1, mlp] through one layer's matrices, each one an output
    (the down projection reads m, the others x)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    shapes = (
        {
            "qkv": (hidden, 3 * hidden),
            "o": (hidden, hidden),
            "gate_up": (hidden, 2 * mlp),
            "down": (mlp, hidden),
        }
        if fused
        else {
            "q": (hidden, hidden),
            "k": (hidden, hidden),
            "v": (hidden, hidden),
            "o": (hidden, hidden),
            "gate": (hidden, mlp),
            "up": (hidden, mlp),
            "down": (mlp, hidden),
        }
    )
    nodes, initializers, outputs = [], [], []
    for name, (k, n) in shapes.items():
        weight = (rng.standard_normal((k, n), dtype=np.float32) * 0.02).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w_{name}"))
        source = "m" if name == "down" else "x"
        nodes.append(helper.make_node("MatMul", [source, f"w_{name}"], [f"y_{name}"]))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(
        nodes,
        "layer",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden]),
            helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, mlp]),
        ],
        outputs,
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def quantised(model, block: int, level: int):
    """A quantised copy (the quantiser rewrites the model it is given in place)."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quantizer = MatMulNBitsQuantizer(copy, bits=4, block_size=block, is_symmetric=True, accuracy_level=level)
    quantizer.process()
    return quantizer.model.model


def weight_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def session(model, path: Path, threads: int):
    import onnx
    import onnxruntime as ort

    onnx.save(model, str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_one_token(sess, feeds: dict, runs: int) -> float:
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--blocks", default="32,64,128", help="MatMulNBits block sizes")
    parser.add_argument("--levels", default="0,4", help="accuracy levels (4: int8 activations)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20, help="timed tokens per configuration a round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    levels = [int(level) for level in args.levels.split(",")]
    rng = np.random.default_rng(1)
    feeds = {
        "x": rng.standard_normal((1, args.hidden), dtype=np.float32),
        "m": rng.standard_normal((1, args.mlp), dtype=np.float32),
    }
    configs = list(itertools.product(("separate", "fused"), blocks, levels))
    with tempfile.TemporaryDirectory(prefix="dyvte-mmnb-") as tmp:
        floats = {
            layout: layer_graph(args.hidden, args.mlp, layout == "fused") for layout in ("separate", "fused")
        }
        sessions, sizes = {}, {}
        for index, (layout, block, level) in enumerate(configs):
            model = quantised(floats[layout], block, level)
            sizes[layout, block, level] = weight_bytes(model)
            sessions[layout, block, level] = session(model, Path(tmp) / f"{index}.onnx", args.threads)
        timings: dict[tuple, list[float]] = {config: [] for config in configs}
        for round_index in range(args.rounds):
            order = configs if round_index % 2 == 0 else configs[::-1]
            for config in order:
                timings[config].append(time_one_token(sessions[config], feeds, args.runs))
    rows = []
    for config in configs:
        seconds = float(np.median(timings[config]))
        layout, block, level = config
        rows.append(
            {
                "layout": layout,
                "block": block,
                "accuracy_level": level,
                "ms_per_layer": 1e3 * seconds,
                "weight_mb": sizes[config] / 1e6,
                "read_gb_per_s": sizes[config] / seconds / 1e9,
            }
        )
    if args.json:
        print(json.dumps({"rows": rows, "settings": vars(args)}, indent=2))
        return 0
    layer = f"one layer (hidden {args.hidden}, MLP {args.mlp})"
    print(f"{layer}, M = 1, {args.threads} threads, {args.rounds} rounds")
    print("| layout | block | accuracy level | ms per layer | weights MB | read GB/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['layout']} | {r['block']} | {r['accuracy_level']} | {r['ms_per_layer']:.2f} | "
            f"{r['weight_mb']:.1f} | {r['read_gb_per_s']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
