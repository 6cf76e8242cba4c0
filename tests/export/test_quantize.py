"""int8/int4 weight-only bundles (ONNX Runtime's quantiser): what was quantised, both formats, the
quality bar, the demo's accuracy and exits. Closeness to the float model for every family, and fp16
bundles, are in the conformance suite."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.bundle.manifest import MANIFEST_FILE, BundleError, load_manifest
from dyvte_rt.runtime.policy import NeverExit
from dyvte_rt.tools.graph_lint import fp16_hazards
from tests.artefacts import export, shared

QUESTION = "what color is the circle on the left?"


VARIANTS = {
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "int4-qdq": {"quantize": "int4", "quant_format": "qdq"},
}


@pytest.fixture(scope="module")
def quantized(tiny_checkpoints):
    """The llama-gqa checkpoint as int8, int4 and int4-qdq bundles (float graphs from the cache)."""
    checkpoint = tiny_checkpoints["llama-gqa"]
    return {
        name: shared(f"bundle-llama-gqa-{name}", lambda out, o=options: export(checkpoint, out, **o))
        for name, options in VARIANTS.items()
    }


def _ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def _weight_matmuls(path: Path) -> int:
    """MatMuls whose second input is a constant (a weight); FastV's scores multiply two activations."""
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    return sum(n.op_type == "MatMul" and n.input[1] in constants for n in graph.node)


def test_quantized_bundles_record_what_was_quantized_and_pass_the_quality_bar(quantized, bundles):
    for name, path in quantized.items():
        manifest = load_manifest(path)
        q = manifest.quantization
        assert manifest.precision == name[:4] and q.bits == int(name[3]) and q.block_size == 32
        embed = {"embed"} if q.format == "matmulnbits" else set()  # GatherBlockQuantized is ONNX Runtime's
        assert set(q.graphs) == {"segment_00", "segment_01", "segment_02", "head", *embed}
        floor = 0.995 if q.bits == 8 else 0.95
        assert all(g.min_cosine >= floor for g in q.graphs.values()), q.graphs
        assert {g: i.precision for g, i in manifest.graphs.items() if i.precision != "fp32"} == {
            g: f"int{q.bits}" for g in q.graphs
        }
        for graph in set(q.graphs) - {"embed"}:
            ops = _ops(path / manifest.graphs[graph].file)
            if q.format == "matmulnbits":
                assert "MatMulNBits" in ops and _weight_matmuls(path / manifest.graphs[graph].file) == 0, (
                    name,
                    graph,
                )
            else:
                assert {"DequantizeLinear", "MatMul"} <= ops and "MatMulNBits" not in ops, (name, graph)
        embed_ops = _ops(path / "embed.onnx")
        assert "MatMulNBits" not in _ops(path / "vision.onnx")
        assert ("GatherBlockQuantized" in embed_ops) == bool(embed) and ("Gather" in embed_ops) != bool(embed)
    fp32 = sum(
        f.bytes for n, f in load_manifest(bundles["llama-gqa"]).files.items() if n.startswith("segment")
    )
    int4 = sum(f.bytes for n, f in load_manifest(quantized["int4"]).files.items() if n.startswith("segment"))
    assert int4 < 0.8 * fp32  # mostly graph structure at this size; weights shrink ~7x


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantised_embedding_table_gathers_the_dequantised_rows(bits, tmp_path):
    """GatherBlockQuantized on the table block_quantize_rows wrote gives exactly the dequantised rows
    (the format ONNX Runtime reads: default zero point 2^(bits-1), two 4-bit values a byte)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import block_quantize_rows, quantize_embedding_gathers

    rng = np.random.default_rng(bits)
    table = rng.standard_normal((40, 64)).astype(np.float32)
    table[3] = 0.0  # an all-zero row: scale 1, rows of zeros
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)],
        "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "n"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, "n", 64])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert quantize_embedding_gathers(model, bits, 32) == 1
    assert [t.name for t in model.graph.initializer] == [f"table_q{bits}", "table_scales"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 3, 39, 7, 7]])
    got = session.run(None, {"ids": ids})[0][0]
    data, scales = block_quantize_rows(table, bits, 32)
    assert scales.shape == (40, 2) and scales[3].tolist() == [1.0, 1.0]
    assert data.nbytes == table.size * bits // 8
    qmax = 2 ** (bits - 1) - 1
    blocks = table.reshape(40, 2, 32)
    step = np.where(np.abs(blocks).max(-1) == 0, 1.0, np.abs(blocks).max(-1) / qmax)
    want = (np.clip(np.rint(blocks / step[..., None]), -qmax - 1, qmax) * step[..., None]).reshape(40, 64)
    assert np.abs(got - want[ids[0]]).max() <= 1e-6
    assert np.abs(got - table[ids[0]]).max() <= (0.2 if bits == 4 else 0.02)


def _prefill_feeds(bundle: Path, prompt) -> dict[str, list[dict[str, np.ndarray]]]:
    """What each graph was fed during one prefill of `prompt`, as host arrays, taken before the run
    (an in-place KV buffer changes during it)."""
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    with DyvteModel.load(bundle) as model:
        backend = model.bundle.backend
        for graph, session in model.bundle.sessions.items():

            def recording(values, into=None, run=session.run, graph=graph):
                host = {k: v if isinstance(v, np.ndarray) else backend.download(v) for k, v in values.items()}
                feeds.setdefault(graph, []).append(host)
                return run(values, into)

            session.run = recording
        model.pipeline.prefill(prompt.input_ids.numpy(), prompt.pixel_values.numpy(), NeverExit())
    return feeds


def test_qdq_form_runs_on_onnx_runtime_and_matches_matmulnbits(quantized, loaded_models, prompt_factory):
    """Graph by graph on what a real prefill feeds them: the embedding differs by design (QDQ keeps
    it float: TensorRT's weight-only path has no quantised Gather), every quantised graph agrees
    (ONNX Runtime fuses the QDQ pairs into MatMulNBits, so both compute alike)."""
    import onnxruntime as ort

    nbits, qdq = quantized["int4"], quantized["int4-qdq"]
    manifest = load_manifest(qdq)
    feeds = _prefill_feeds(qdq, prompt_factory(loaded_models["llama-gqa"], QUESTION))
    graphs = set(manifest.quantization.graphs)
    assert graphs == {"segment_00", "segment_01", "segment_02", "head"} and graphs <= set(feeds)
    for graph in sorted(graphs):
        file = manifest.graphs[graph].file
        sessions = [
            ort.InferenceSession(str(b / file), providers=["CPUExecutionProvider"]) for b in (nbits, qdq)
        ]
        for case in feeds[graph]:
            want, got = (session.run(None, case) for session in sessions)
            for a, b in zip(want, got, strict=True):
                assert np.abs(a - b).max() <= 1e-3, graph


def test_a_graph_below_the_quality_bar_is_refused_unless_forced(tiny_checkpoints, tmp_path, monkeypatch):
    import export.quantize as quantize

    monkeypatch.setitem(quantize.MIN_COSINE, 4, 1.0)  # nothing int4 reaches a cosine of exactly 1
    out = tmp_path / "bundle"
    with pytest.raises(quantize.QualityError, match=r"embed: int4 outputs keep a cosine similarity of 0\.9"):
        export(tiny_checkpoints["llama-mha"], out, quantize="int4")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]
    export(tiny_checkpoints["llama-mha"], out, quantize="int4", force=True)
    assert load_manifest(out).quantization.bits == 4


def test_an_older_runtime_refuses_a_quantized_manifest_with_one_line(quantized, monkeypatch):
    import dyvte_rt.bundle.manifest as manifest_module

    text = (quantized["int4"] / MANIFEST_FILE).read_text()
    monkeypatch.setattr(manifest_module, "SCHEMA_VERSION", 2)  # what the runtime before quantisation read
    with pytest.raises(BundleError) as refused:
        manifest_module.Manifest.from_json(text)
    line = refused.value.one_line()
    assert "schema version 4" in line and "upgrade dyvte-rt" in line and "\n" not in line


def test_the_fp16_lint_finds_what_it_looks_for(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    mask = numpy_helper.from_array(np.full((1, 4), np.finfo(np.float16).min, dtype=np.float16), "mask")
    nodes = [
        helper.make_node("Add", ["scores", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"]),
        helper.make_node("Pow", ["probs", "two"], ["squared"]),
    ]
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float16), "two")
    graph = helper.make_graph(
        nodes,
        "bad",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT16, [1, 4])],
        [helper.make_tensor_value_info("squared", TensorProto.FLOAT16, [1, 4])],
        [mask, two],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    found = " | ".join(fp16_hazards(path))
    assert "softmax in fp16" in found and "normalises in fp16" in found and "overflows" in found


@pytest.fixture(scope="module")
def demo_quantized(demo_bundle):
    """The demo as an int4 bundle, the width that loses most (its float graphs from the graph
    cache; int8 is held to its stricter bar on the tiny checkpoints above)."""
    return {"int4": shared("bundle-demo-int4", lambda out: export("demo", out, quantize="int4"))}


def test_quantized_demo_keeps_its_accuracy_and_its_exits(
    demo_quantized, demo_bundle, fresh_questions, capsys
):
    from tests.helpers import eval_json

    fp32 = eval_json(capsys, demo_bundle, fresh_questions, "--exit", "never", "--limit", "120")
    for bits, bundle in demo_quantized.items():
        never = eval_json(capsys, bundle, fresh_questions, "--exit", "never", "--limit", "120")
        assert never["accuracy"] >= fp32["accuracy"] - 0.02, bits
        routed = eval_json(
            capsys, bundle, fresh_questions, "--limit", "120", "--compare-bundle", str(demo_bundle)
        )
        assert routed["exit_agreement"] >= 0.9 and routed["prefill_macs_saved"] >= 0.4, (bits, routed)


def test_threshold_recalibration_on_a_quantized_bundle(demo_quantized, fresh_questions, tmp_path, capsys):
    from calibrate.threshold import main as threshold_main

    bundle = shutil.copytree(demo_quantized["int4"], tmp_path / "int4")
    assert threshold_main(["--bundle", str(bundle), "--data", str(fresh_questions), "--limit", "40"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["questions"] == 40 and report["agreement"] >= 0.9 and 0 < report["threshold"] <= 1
    assert load_manifest(bundle).exit.threshold == report["threshold"]


def test_quantised_weights_above_the_threshold_go_to_external_data_and_stay_lossless_when_dropped(
    tmp_path, monkeypatch
):
    """A quantised graph's weights are written to external data (above EXTERNAL_WEIGHTS_BYTES), which
    ONNX Runtime memory-maps; dropping those mapped pages after loading (engines/host_memory.py)
    changes no output, as the pages are read back from the file."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import export.quantize as quantize
    from engines.host_memory import clean_file_mappings, drop_mapped_pages

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 512)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", 512])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    source = tmp_path / "float.onnx"
    onnx.save(model, str(source))
    settings = quantize.QuantizeSettings(bits=4)
    inline = tmp_path / "inline"
    inline.mkdir()
    assert quantize.quantize_graph(source, inline / "g.onnx", settings) == ["g.onnx"]  # small: one file
    monkeypatch.setattr(quantize, "EXTERNAL_WEIGHTS_BYTES", 0)
    external = tmp_path / "external"
    external.mkdir()
    assert quantize.quantize_graph(source, external / "g.onnx", settings) == ["g.onnx", "g.onnx.data"]
    # readable by whoever may read the graph (a service account serving a bundle built by another)
    assert (external / "g.onnx.data").stat().st_mode & 0o777 == (external / "g.onnx").stat().st_mode & 0o777
    x = {"x": rng.standard_normal((1, 5, 256)).astype(np.float32)}
    want = ort.InferenceSession(str(inline / "g.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(external / "g.onnx"), options, providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, x)[0], want)
    assert clean_file_mappings(external), "ONNX Runtime did not map the external data"
    assert drop_mapped_pages(external) > 0
    assert np.array_equal(session.run(None, x)[0], want)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_linear_layers_written_as_gemm_are_quantised_too(trans_b, tmp_path):
    """The dynamo exporter writes a linear layer on 2-D activations as Gemm (Qwen2.5-VL's vision
    tower); ONNX Runtime's quantiser reads MatMul weights only, so Gemms become MatMul + Add first:
    quantised, with the Gemm's output within int8 noise."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import QuantizeSettings, quantize_graph

    rng = np.random.default_rng(trans_b)
    weight = rng.standard_normal((64, 96)).astype(np.float32)  # [K, N]
    stored = weight.T.copy() if trans_b else weight
    bias = rng.standard_normal(96).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b)],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 96])],
        [numpy_helper.from_array(stored, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "float.onnx"))
    quantize_graph(tmp_path / "float.onnx", tmp_path / "q.onnx", QuantizeSettings(bits=8))
    assert {"MatMulNBits", "Add"} <= _ops(tmp_path / "q.onnx") and "Gemm" not in _ops(tmp_path / "q.onnx")
    x = rng.standard_normal((7, 64)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    want = x @ weight + bias
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
