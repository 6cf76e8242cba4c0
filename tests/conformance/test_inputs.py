"""What the runtime makes of an image and a question, torch-free, equals the Hugging Face
processor's and model code's: pixel values, prompt ids, visual-token counts, prompt positions."""

import numpy as np

from dyvte_rt.bundle.manifest import load_manifest
from dyvte_rt.families import FAMILIES, family_for
from dyvte_rt.inputs.prompt import PromptBuilder
from export.families import FAMILIES as ADAPTERS
from export.prompting import hf_inputs
from tests.conformance.cases import CASES, PRIMARY
from tests.conformance.conftest import QUESTION

FAMILY_CASES = PRIMARY


def test_every_registered_family_has_a_conformance_case():
    families = {c.family for c in CASES}
    assert families == set(FAMILIES) == {adapter.family for adapter in ADAPTERS.values()}


def test_pixels_prompt_positions_and_token_counts_equal_hugging_face(case, loaded, bundle, images):
    manifest = load_manifest(bundle)
    family = family_for(manifest)
    prompts = PromptBuilder(manifest, bundle / "tokenizer.json")
    counts = set()
    for name, image in images.items():
        inputs = hf_inputs(loaded.processor, image, QUESTION)
        prepared = family.prepare_image(image)
        expected = case.hf_pixels(inputs)
        assert prepared.pixel_values.shape == expected.shape, name
        assert np.abs(prepared.pixel_values - expected).max() <= 1e-5, name
        ids = prompts.encode(QUESTION, visual_tokens=prepared.visual_tokens)
        assert (ids == inputs["input_ids"].numpy()).all(), name
        assert prepared.visual_tokens == family.visual_tokens(image.height, image.width), (
            name
        )  # macs, engines
        assert prepared.visual_tokens <= manifest.vision.visual_tokens, name
        positions, offset = family.prompt_positions(ids[0], prepared)
        want_positions, want_offset = case.hf_positions(loaded, inputs)
        assert (positions == want_positions).all() and offset == want_offset, name
        counts.add(prepared.visual_tokens)
    # a fixed-size view takes one count whatever the image; the others depend on its size
    assert len(counts) == 1 if not family.vision_per_image else len(counts) >= 3


def test_text_only_prompts_equal_hugging_face(loaded, bundle):
    manifest = load_manifest(bundle)
    prompts = PromptBuilder(manifest, bundle / "tokenizer.json")
    for question in (QUESTION, "How MANY shapes, please?!", "ünïcode"):
        inputs = hf_inputs(loaded.processor, None, question)
        assert (prompts.encode(question, with_image=False) == inputs["input_ids"].numpy()).all(), question
        positions, offset = family_for(manifest).prompt_positions(inputs["input_ids"][0].numpy(), None)
        assert (positions == np.arange(inputs["input_ids"].shape[1])).all() and offset == 0
