"""fp16 and int4 bundles of every family: sound graphs, answers close to the fp32 reference."""

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.bundle.manifest import load_manifest
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit
from dyvte_rt.tools.graph_lint import fp16_hazards
from export.prompting import hf_inputs
from export.reference import DyVTEReference
from tests.conformance.cases import PRIMARY
from tests.conformance.conftest import QUESTION, case_bundle
from tests.helpers import prefill_cosine, runtime_vs_reference

FAMILY_CASES = PRIMARY
# each family is quantised once, the two widths alternating (test_quantize.py takes both widths and
# the QDQ form on one checkpoint and on the demo)
BITS = {case.id: ("int4", "int8")[index % 2] for index, case in enumerate(PRIMARY)}


def test_fp16_bundles_are_sound_and_match_the_fp32_reference(case, checkpoint, routers, loaded, images):
    """fp16 weights and activations, the vision tower included: no fp16 hazard in any graph, and
    every exit close to the fp32 reference, with the same greedy token."""
    fp16 = case_bundle(case, checkpoint, None, dtype="fp16", exit_layers="1")  # no routers: 6 graphs
    assert load_manifest(fp16).dtype == "fp16"
    assert [hazard for path in sorted(fp16.glob("*.onnx")) for hazard in fp16_hazards(path)] == []
    reference = DyVTEReference(loaded.adapter)
    with DyvteModel.load(fp16, dtype="fp16") as model:
        for name in list(images)[:2]:
            inputs = hf_inputs(loaded.processor, images[name], QUESTION)
            prepared = model.family.prepare_image(images[name])
            for policy in (NeverExit(), FixedLayerExit(1)):
                image = loaded.adapter.image_input(inputs)
                worst, got, expected = runtime_vs_reference(
                    model.pipeline, reference, inputs["input_ids"], image, prepared, policy
                )
                scale = float(expected.logits.abs().max())
                assert worst <= 5e-3 * scale, f"{name} {policy.describe()}: {worst:.2e} of {scale:.2f}"
                assert int(got.logits[0].argmax()) == int(expected.logits[0, -1].argmax())


# Qwen2-VL's decoder and rotary positions are Qwen2.5-VL's; 2.5 adds the windowed vision attention
test_fp16_bundles_are_sound_and_match_the_fp32_reference.family_cases = tuple(
    c for c in PRIMARY if c.family != "qwen2-vl"
)


def test_quantized_bundles_pass_the_quality_bar_and_answer_close_to_float(
    case, checkpoint, routers, loaded, images
):
    bits = BITS[case.id]
    bundle = case_bundle(case, checkpoint, routers, quantize=bits)
    quantization = load_manifest(bundle).quantization
    segments = {segment.graph for segment in load_manifest(bundle).segments}
    assert quantization.bits == int(bits[3:]) and set(quantization.graphs) == {*segments, "head", "embed"}
    assert all(g.min_cosine >= (0.995 if bits == "int8" else 0.95) for g in quantization.graphs.values())
    reference = DyVTEReference(loaded.adapter)
    name = next(iter(images))
    inputs = hf_inputs(loaded.processor, images[name], QUESTION)
    with DyvteModel.load(bundle) as model:
        prepared = model.family.prepare_image(images[name])
        for policy in (NeverExit(), FixedLayerExit(1)):
            cosine = prefill_cosine(model.pipeline, reference, loaded.adapter, inputs, prepared, policy)
            assert cosine > (0.99 if bits == "int8" else 0.9), (bits, policy.describe(), cosine)
