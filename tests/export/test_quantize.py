"""int8/int4 weight-only bundles (ONNX Runtime's quantiser) and sound fp16 bundles."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.bundle.manifest import MANIFEST_FILE, BundleError, load_manifest
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit
from dyvte_rt.tools.graph_lint import fp16_hazards
from export.build import BuildConfig, build_bundle
from export.reference import DyVTEReference

QUESTION = "what color is the circle on the left?"


@pytest.fixture(scope="module")
def quantized(tiny_checkpoints, tmp_path_factory):
    """The llama-gqa checkpoint as int8, int4 and int4-qdq bundles."""
    root = tmp_path_factory.mktemp("quantized")
    checkpoint = str(tiny_checkpoints["llama-gqa"])
    variants = {
        "int8": {"quantize": "int8"},
        "int4": {"quantize": "int4"},
        "int4-qdq": {"quantize": "int4", "quant_format": "qdq"},
    }
    for name, options in variants.items():
        build_bundle(BuildConfig(model=checkpoint, out=root / name, quiet=True, **options))
    return {name: root / name for name in variants}


def _ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def test_quantized_bundles_record_what_was_quantized_and_pass_the_quality_bar(quantized, bundles):
    for name, path in quantized.items():
        manifest = load_manifest(path)
        q = manifest.quantization
        assert manifest.precision == name[:4] and q.bits == int(name[3]) and q.block_size == 32
        assert set(q.graphs) == {"segment_00", "segment_01", "segment_02", "head"}
        floor = 0.995 if q.bits == 8 else 0.95
        assert all(g.min_cosine >= floor for g in q.graphs.values()), q.graphs
        for graph in q.graphs:
            ops = _ops(path / manifest.graphs[graph].file)
            if q.format == "matmulnbits":
                assert "MatMulNBits" in ops and "MatMul" not in ops, (name, graph)
            else:
                assert {"DequantizeLinear", "MatMul"} <= ops and "MatMulNBits" not in ops, (name, graph)
        assert "MatMulNBits" not in _ops(path / "vision.onnx") and "Gather" in _ops(path / "embed.onnx")
    fp32 = sum(
        f.bytes for n, f in load_manifest(bundles["llama-gqa"]).files.items() if n.startswith("segment")
    )
    int4 = sum(f.bytes for n, f in load_manifest(quantized["int4"]).files.items() if n.startswith("segment"))
    assert int4 < 0.8 * fp32  # mostly graph structure at this size; weights shrink ~7x


def test_quantized_bundles_answer_close_to_the_float_model(
    quantized, loaded_models, prompt_factory, sample_image
):
    loaded = loaded_models["llama-gqa"]
    prompt = prompt_factory(loaded, QUESTION)
    reference = DyVTEReference(loaded.adapter)
    for name, path in quantized.items():
        with DyvteModel.load(path) as model:
            for policy in (NeverExit(), FixedLayerExit(1)):
                want = reference.prefill(prompt.input_ids, prompt.pixel_values, policy).logits[0, -1].numpy()
                got = model.pipeline.prefill(
                    prompt.input_ids.numpy(), prompt.pixel_values.numpy(), policy
                ).logits[0]
                cosine = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
                assert cosine > (0.99 if name == "int8" else 0.9), (name, policy.describe(), cosine)
            assert len(model.ask(sample_image, QUESTION, max_new_tokens=4, stop_at_eos=False).token_ids) == 4


def test_qdq_form_runs_on_onnx_runtime_and_matches_matmulnbits(quantized, loaded_models, prompt_factory):
    prompt = prompt_factory(loaded_models["llama-gqa"], QUESTION)
    logits = {}
    for name in ("int4", "int4-qdq"):
        with DyvteModel.load(quantized[name]) as model:
            result = model.pipeline.prefill(
                prompt.input_ids.numpy(), prompt.pixel_values.numpy(), NeverExit()
            )
            logits[name] = result.logits
    assert np.abs(logits["int4"] - logits["int4-qdq"]).max() <= 1e-3


def test_a_graph_below_the_quality_bar_is_refused_unless_forced(tiny_checkpoints, tmp_path, monkeypatch):
    import export.quantize as quantize

    monkeypatch.setitem(quantize.MIN_COSINE, 4, 1.0)  # nothing int4 reaches a cosine of exactly 1
    out = tmp_path / "bundle"
    config = BuildConfig(model=str(tiny_checkpoints["llama-mha"]), out=out, quantize="int4", quiet=True)
    with pytest.raises(
        quantize.QualityError, match=r"segment_00: int4 outputs keep a cosine similarity of 0\.9"
    ):
        build_bundle(config)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]
    build_bundle(BuildConfig(model=config.model, out=out, quantize="int4", force=True, quiet=True))
    assert load_manifest(out).quantization.bits == 4


def test_an_older_runtime_refuses_a_quantized_manifest_with_one_line(quantized, monkeypatch):
    import dyvte_rt.bundle.manifest as manifest_module

    text = (quantized["int4"] / MANIFEST_FILE).read_text()
    monkeypatch.setattr(manifest_module, "SCHEMA_VERSION", 2)  # what the runtime before quantisation read
    with pytest.raises(BundleError) as refused:
        manifest_module.Manifest.from_json(text)
    line = refused.value.one_line()
    assert "schema version 3" in line and "upgrade dyvte-rt" in line and "\n" not in line


@pytest.fixture(scope="module")
def fp16_bundles(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    checkpoint = str(tiny_checkpoints["qwen2"])
    for kv in ("inplace", "concat"):
        build_bundle(BuildConfig(model=checkpoint, out=root / kv, dtype="fp16", kv=kv, quiet=True))
    return {kv: root / kv for kv in ("inplace", "concat")}


def test_fp16_graphs_keep_norms_softmax_rotary_and_masks_in_fp32(fp16_bundles):
    for bundle in fp16_bundles.values():
        graphs = sorted(bundle.glob("*.onnx"))
        assert len(graphs) >= 6
        assert [hazard for path in graphs for hazard in fp16_hazards(path)] == []
        assert load_manifest(bundle).dtype == "fp16"


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


def test_fp16_bundles_run_here_and_match_the_fp32_reference(fp16_bundles, loaded_models, prompt_factory):
    # ONNX Runtime's CPU provider runs fp16 graphs (casting around operators it has no fp16 kernel for)
    loaded = loaded_models["qwen2"]
    prompt = prompt_factory(loaded, QUESTION)
    reference = DyVTEReference(loaded.adapter)
    for kv, bundle in fp16_bundles.items():
        with DyvteModel.load(bundle, dtype="fp16") as model:
            for policy in (NeverExit(), FixedLayerExit(1)):
                want = reference.prefill(prompt.input_ids, prompt.pixel_values, policy).logits[0, -1].numpy()
                result = model.pipeline.prefill(prompt.input_ids.numpy(), prompt.pixel_values.numpy(), policy)
                got = result.logits[0].astype(np.float32)
                assert np.abs(got - want).max() <= 5e-3 * np.abs(want).max(), (kv, policy.describe())
                assert got.argmax() == want.argmax()


@pytest.fixture(scope="module")
def demo_quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-quantized")
    for bits in ("int8", "int4"):
        build_bundle(BuildConfig(model="demo", out=root / bits, quantize=bits, quiet=True))
    return {bits: root / bits for bits in ("int8", "int4")}


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
