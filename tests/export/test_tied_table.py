"""A checkpoint that ties its LM head to the embedding table gets one quantised table: the head's
MatMulNBits reads the embed graph's bytes (export/shared_table.py). The bytes decide, not the
config: a head that differs from the table keeps its own."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.bundle.manifest import MANIFEST_FILE, load_manifest
from dyvte_rt.cli import main as cli_main
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit
from export.prompting import hf_inputs
from export.reference import DyVTEReference
from tests.artefacts import export, shared
from tests.helpers import prefill_cosine

CASES = {  # bundle -> (family, tiny variant, seed, --quantize)
    "llava-int4": ("llava", "llama-gqa", 1, "int4"),
    "llava-int8": ("llava", "llama-gqa", 1, "int8"),
    "qwen2-vl-int4": ("qwen2-vl", "tiny", 0, "int4"),  # Qwen2-VL-2B ties its head
}
QUESTION = "what color is the circle on the left?"


def tied_checkpoint(family: str, variant: str, seed: int) -> Path:
    from export.tiny_models import build_tiny

    return shared(
        f"checkpoint-{family}-{variant}-{seed}-tied",
        lambda out: build_tiny(family, variant, out, seed, tie_embeddings=True),
    )


@pytest.fixture(scope="module", params=list(CASES))
def tied(request):
    family, variant, seed, bits = CASES[request.param]
    checkpoint = tied_checkpoint(family, variant, seed)
    bundle = shared(f"bundle-{request.param}-tied", lambda out: export(checkpoint, out, quantize=bits))
    return checkpoint, bundle, bits


def _external(tensor) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def test_the_tied_head_reads_the_embed_graphs_table_and_stores_no_copy(tied, capsys):
    _, bundle, _ = tied
    manifest = load_manifest(bundle)
    assert manifest.graphs["head"].shared_files == ("embed.onnx.data",)
    assert not (bundle / "head.onnx.data").exists()
    embed = onnx.load(str(bundle / "embed.onnx"), load_external_data=False)
    gather = next(n for n in embed.graph.node if n.op_type == "GatherBlockQuantized")
    table = {t.name: t for t in embed.graph.initializer}
    head = onnx.load(str(bundle / "head.onnx"), load_external_data=False)
    matmul = next(n for n in head.graph.node if n.op_type == "MatMulNBits")
    weights = {t.name: t for t in head.graph.initializer}
    for head_input, table_input in ((1, 0), (2, 2)):  # B <- the table's data, scales <- its scales
        assert _external(weights[matmul.input[head_input]]) == _external(table[gather.input[table_input]])
    own = sum(len(t.raw_data) for t in head.graph.initializer)
    assert own < (bundle / "embed.onnx.data").stat().st_size  # the norm's scale and constants only

    assert cli_main(["inspect", "--bundle", str(bundle)]) == 0
    assert "shared: embed.onnx.data" in capsys.readouterr().out


def test_the_tied_head_computes_with_the_tables_rows(tied):
    """head(h) = RMSNorm(h) @ table^T with the very rows the embed graph gathers: the shared bytes
    are read in the layout, order and scale the embed graph reads them."""
    _, bundle, bits = tied
    manifest = load_manifest(bundle)
    hidden, vocab = manifest.dims.hidden, manifest.dims.vocab_size
    options = ort.SessionOptions()
    embed = ort.InferenceSession(str(bundle / "embed.onnx"), options, providers=["CPUExecutionProvider"])
    rows = embed.run(
        None,
        {
            "input_ids": np.arange(vocab, dtype=np.int64)[None],
            "image_features": np.zeros((1, 0, hidden), np.float32),
        },
    )[0][0]  # [vocab, hidden]: the dequantised table
    head = ort.InferenceSession(str(bundle / "head.onnx"), options, providers=["CPUExecutionProvider"])
    states = np.random.default_rng(0).standard_normal((1, 3, hidden)).astype(np.float32)
    logits = head.run(None, {"hidden_states_out": states, "last_index": np.array([2])})[0][0]
    head_graph = onnx.load(str(bundle / "head.onnx"), load_external_data=False)
    norm = next(t for t in head_graph.graph.initializer if t.name.endswith("norm.weight"))
    scale = onnx.numpy_helper.to_array(norm)
    last = states[0, 2]
    normed = last / np.sqrt(np.mean(last**2) + 1e-6) * scale
    want = rows @ normed
    cosine = float(logits @ want / np.linalg.norm(logits) / np.linalg.norm(want))
    assert cosine > 0.999, (bits, cosine)  # int8 activations inside MatMulNBits: close, not equal


def test_a_tied_bundle_answers_close_to_the_float_reference(tied):
    from export.loading import load_checkpoint

    checkpoint, bundle, bits = tied
    loaded = load_checkpoint(str(checkpoint))
    image = Path(__file__).resolve().parents[2] / "examples" / "three_shapes.png"
    inputs = hf_inputs(loaded.processor, image, QUESTION)
    reference = DyVTEReference(loaded.adapter)
    with DyvteModel.load(bundle) as model, Image.open(image) as picture:
        prepared = model.family.prepare_image(picture)
        for policy in (NeverExit(), FixedLayerExit(1)):
            cosine = prefill_cosine(model.pipeline, reference, loaded.adapter, inputs, prepared, policy)
            assert cosine > (0.99 if bits == "int8" else 0.9), (bits, policy.describe(), cosine)


def test_a_head_that_is_not_the_table_keeps_its_own(tiny_checkpoints, tmp_path):
    """A config that claims to tie while the checkpoint holds a different head: the head's bytes do
    not match the table's, so it is quantised on its own and nothing is shared."""
    checkpoint = tmp_path / "claims-tied"
    shutil.copytree(tiny_checkpoints["llama-gqa"], checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (checkpoint / "config.json").write_text(json.dumps(config))
    bundle = export(checkpoint, tmp_path / "bundle", quantize="int4")
    assert load_manifest(bundle).graphs["head"].shared_files == ()
    assert "shared_files" not in (bundle / MANIFEST_FILE).read_text()  # older readers see no new key
    head = onnx.load(str(bundle / "head.onnx"), load_external_data=False)
    matmul = next(n for n in head.graph.node if n.op_type == "MatMulNBits")
    weight = next(t for t in head.graph.initializer if t.name == matmul.input[1])
    assert (
        weight.data_location != onnx.TensorProto.EXTERNAL
        or _external(weight)["location"] != "embed.onnx.data"
    )


FLOAT_CASES = {"llava-fp32": "fp32", "llava-fp16": "fp16"}  # the tied llama-gqa checkpoint


@pytest.fixture(scope="module", params=list(FLOAT_CASES))
def tied_float(request):
    checkpoint = tied_checkpoint("llava", "llama-gqa", 1)
    dtype = FLOAT_CASES[request.param]
    bundle = shared(f"bundle-{request.param}-tied", lambda out: export(checkpoint, out, dtype=dtype))
    return checkpoint, bundle, dtype


def test_a_float_tied_head_multiplies_by_the_embed_graphs_table(tied_float):
    """fp32 and fp16: the head reads the table from the embed graph's file through a Transpose and
    keeps the runtime's logits equal to the reference's, with the same greedy tokens."""
    from export.loading import load_checkpoint
    from tests.helpers import runtime_vs_reference

    checkpoint, bundle, dtype = tied_float
    assert load_manifest(bundle).graphs["head"].shared_files == ("embed.onnx.data",)
    embed = onnx.load(str(bundle / "embed.onnx"), load_external_data=False)
    gather = next(n for n in embed.graph.node if n.op_type == "Gather")
    table = next(t for t in embed.graph.initializer if t.name == gather.input[0])
    head = onnx.load(str(bundle / "head.onnx"), load_external_data=False)
    transpose = next(n for n in head.graph.node if n.op_type == "Transpose")
    weight = next(t for t in head.graph.initializer if t.name == transpose.input[0])
    assert _external(weight) == _external(table) and _external(table)["location"] == "embed.onnx.data"
    assert not (bundle / "head.onnx.data").exists()

    loaded = load_checkpoint(str(checkpoint))
    image = Path(__file__).resolve().parents[2] / "examples" / "three_shapes.png"
    inputs = hf_inputs(loaded.processor, image, QUESTION)
    reference = DyVTEReference(loaded.adapter)
    with DyvteModel.load(bundle, dtype=dtype) as model, Image.open(image) as picture:
        prepared = model.family.prepare_image(picture)
        for policy in (NeverExit(), FixedLayerExit(1)):
            worst, got, expected = runtime_vs_reference(
                model.pipeline,
                reference,
                inputs["input_ids"],
                loaded.adapter.image_input(inputs),
                prepared,
                policy,
            )
            scale = max(1.0, float(expected.logits.abs().max()))
            assert worst <= (1e-4 if dtype == "fp32" else 5e-3) * scale, (dtype, policy.describe(), worst)
            assert int(got.logits[0].argmax()) == int(expected.logits[0, -1].argmax())
