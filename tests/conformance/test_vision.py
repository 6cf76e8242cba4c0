"""Visual tokens: the adapter's (what the reference and the exporter use) and the bundle's vision
graph (fed by the runtime's preprocessing) equal Hugging Face's own image features."""

import numpy as np
import torch

from dyvte_rt.bundle import io_names
from dyvte_rt.bundle.loaded import Bundle
from export.prompting import hf_inputs
from tests.conformance.cases import PRIMARY
from tests.conformance.conftest import QUESTION

FAMILY_CASES = PRIMARY


def test_adapter_and_vision_graph_equal_hugging_face_features(case, loaded, bundle, images):
    adapter = loaded.adapter
    with Bundle.open(bundle) as opened:
        vision = opened.sessions["vision"]
        for name, image in images.items():
            inputs = hf_inputs(loaded.processor, image, QUESTION)
            with torch.no_grad():
                expected = case.hf_features(loaded, inputs)
                ours = adapter.image_features(adapter.image_input(inputs))[0]
            assert ours.shape == expected.shape, name
            assert float((ours - expected).abs().max()) <= 1e-5, name
            prepared = opened.family.prepare_image(image)
            feeds = {io_names.PIXEL_VALUES: prepared.pixel_values, **prepared.feeds}
            graph = opened.backend.download(vision.run(feeds)[io_names.IMAGE_FEATURES])[0]
            assert graph.shape[0] == prepared.visual_tokens, name
            assert np.abs(graph - expected.numpy()).max() <= 1e-4, name
