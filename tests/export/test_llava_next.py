"""LLaVA-NeXT (any-resolution images) end to end on a tiny random checkpoint whose canvases make
tiling and unpadding happen: the runtime's preprocessing against the Hugging Face processor, the
packed visual tokens against Hugging Face's model, the reference against `generate`, and the
exported bundle against the reference for every exit layer."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dyvte_rt.bundle.loaded import Bundle
from dyvte_rt.bundle.manifest import load_manifest
from dyvte_rt.families import llava_next as anyres
from dyvte_rt.inputs.preprocess import prepare_image
from dyvte_rt.inputs.prompt import PromptBuilder
from dyvte_rt.runtime.pipeline import Pipeline
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit, RouterExit
from export.prompting import hf_inputs
from export.reference import DyVTEReference, RouterBank
from tests.helpers import DECODE_STEPS, runtime_vs_reference

QUESTION = "what color is the circle on the left?"
# (height, width): square (2x2 tiles), wide (1x3), tall (3x1), a pair (1x2) and an odd size (2x2,
# unpadded columns)
IMAGE_SIZES = {"square": (64, 64), "wide": (30, 100), "tall": (100, 40), "pair": (30, 60), "odd": (45, 61)}


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory) -> Path:
    from export.tiny_models import build_tiny_llava

    return build_tiny_llava(
        "llama-gqa", tmp_path_factory.mktemp("tiny-next") / "ckpt", seed=5, family="llava-next"
    )


@pytest.fixture(scope="module")
def next_loaded(next_checkpoint):
    from export.loading import load_checkpoint

    return load_checkpoint(str(next_checkpoint))


@pytest.fixture(scope="module")
def next_routers(tmp_path_factory) -> Path:
    """Random (not constant) routers at layers 1 and 2: their decisions depend on the features."""
    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("next-routers") / "routers.safetensors"
    RouterBank(64, (1, 2), width=16).save(path)
    return path


@pytest.fixture(scope="module")
def next_bundle(next_checkpoint, next_routers, tmp_path_factory) -> Path:
    from export.build import BuildConfig, build_bundle

    out = tmp_path_factory.mktemp("next-bundle") / "bundle"
    build_bundle(BuildConfig(model=str(next_checkpoint), out=out, routers=next_routers, quiet=True))
    return out


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    rng = np.random.RandomState(7)
    return {
        name: Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
        for name, (h, w) in IMAGE_SIZES.items()
    }


def test_preprocessing_and_prompt_match_the_hf_processor(next_loaded, next_bundle, images):
    manifest = load_manifest(next_bundle)
    prompts = PromptBuilder(manifest, next_bundle / "tokenizer.json")
    views = set()
    for name, image in images.items():
        inputs = hf_inputs(next_loaded.processor, image, QUESTION)
        prepared = prepare_image(image, manifest.vision)
        expected = inputs["pixel_values"][0].numpy()
        assert prepared.pixel_values.shape == expected.shape, name  # one image: no batch padding
        assert np.abs(prepared.pixel_values - expected).max() <= 1e-6, name
        assert tuple(inputs["image_sizes"][0].tolist()) == IMAGE_SIZES[name]
        ids = prompts.encode(QUESTION, visual_tokens=prepared.visual_tokens)
        assert (ids == inputs["input_ids"].numpy()).all(), name
        views.add(len(expected))
    assert views == {3, 4, 5}  # 1x2/2x1, 1x3/3x1 and 2x2 canvases were all used


def test_packed_visual_tokens_equal_hugging_face_features(next_loaded, images):
    adapter = next_loaded.adapter
    for name, image in images.items():
        inputs = hf_inputs(next_loaded.processor, image, QUESTION)
        with torch.no_grad():
            ours = adapter.image_features(adapter.image_input(inputs))[0]
            hf = next_loaded.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        expected = hf.pooler_output[0]
        assert ours.shape == expected.shape, name
        assert float((ours - expected).abs().max()) <= 1e-6, name


def test_reference_never_matches_hugging_face_generate(next_loaded, images):
    reference = DyVTEReference(next_loaded.adapter)
    for name in ("wide", "tall"):
        inputs = hf_inputs(next_loaded.processor, images[name], QUESTION)
        image = next_loaded.adapter.image_input(inputs)
        with torch.no_grad():
            hf_logits = next_loaded.model(**inputs).logits[0, -1]
            hf_tokens = next_loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
        ours = reference.prefill(inputs["input_ids"], image, NeverExit())
        assert float((ours.logits[0, -1] - hf_logits).abs().max()) <= 1e-4, name
        generated = reference.generate(inputs["input_ids"], image, NeverExit(), max_new_tokens=8)
        n = inputs["input_ids"].shape[1]
        assert generated.tokens == hf_tokens[0, n:].tolist()[: len(generated.tokens)], name


def test_bundle_matches_reference_for_every_exit_policy(next_loaded, next_bundle, next_routers, images):
    routers = RouterBank.load(next_routers)
    reference = DyVTEReference(next_loaded.adapter, routers=routers, candidate_layers=routers.layers)
    exits = set()
    with Bundle.open(next_bundle) as bundle:
        pipeline = Pipeline(bundle)
        manifest = bundle.manifest
        candidates = manifest.exit.candidate_layers
        assert candidates == (1, 2)
        for name in ("square", "wide", "tall"):
            inputs = hf_inputs(next_loaded.processor, images[name], QUESTION)
            image = next_loaded.adapter.image_input(inputs)
            prepared = prepare_image(images[name], manifest.vision)
            policies = [
                NeverExit(),
                *(FixedLayerExit(k) for k in candidates),
                RouterExit(0.5),  # every image exits at layer 1
                RouterExit(0.56),  # square at 1, wide and tall at 2 (p ~0.54-0.61 with seed 11)
                RouterExit(0.58),  # square and tall never, wide at 2
            ]
            for policy in policies:
                worst, got, expected = runtime_vs_reference(
                    pipeline, reference, inputs["input_ids"], image, prepared, policy
                )
                assert got.n_visual == prepared.visual_tokens == expected.n_visual
                if isinstance(policy, RouterExit):  # the runtime asks routers only for this policy
                    assert got.exit_probs == pytest.approx(expected.exit_probs, abs=1e-5)
                    exits.add(got.exit_layer)
                assert worst <= 1e-4, f"{name} {policy.describe()}: {worst:.2e}"
                if got.exit_layer is not None:  # every visual position (base, tiles, newlines) left
                    lengths = got.cache.layer_lengths()
                    n, v, k = got.n_tokens, got.n_visual, got.exit_layer
                    assert lengths[k + 1 :] == [n - v + DECODE_STEPS] * (len(lengths) - k - 1)
    assert exits == {1, 2, None}, f"the routers' decisions no longer cover every case ({exits})"


def test_vision_graph_equals_hugging_face_features(next_loaded, next_bundle, images):
    manifest = load_manifest(next_bundle)
    assert manifest.source.family == "llava-next"
    assert manifest.vision.visual_tokens == anyres.most_visual_tokens(manifest.vision.anyres)
    with Bundle.open(next_bundle) as bundle:
        pipeline = Pipeline(bundle)
        for name, image in images.items():
            prepared = prepare_image(image, manifest.vision)
            features = bundle.backend.download(
                pipeline._run("vision", {"pixel_values": prepared.pixel_values, **prepared.feeds})[
                    "image_features"
                ]
            )
            inputs = hf_inputs(next_loaded.processor, image, QUESTION)
            with torch.no_grad():
                hf = next_loaded.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
            assert np.abs(features[0] - hf.pooler_output[0].numpy()).max() <= 1e-4, name


def test_api_batch_of_differently_sized_images_equals_single_answers(next_bundle, images, tmp_path):
    from dyvte_rt.api.model import DyvteModel

    paths = {}
    for name in ("wide", "tall"):
        paths[name] = tmp_path / f"{name}.png"
        images[name].save(paths[name])
    with DyvteModel.load(next_bundle) as model:
        single = [model.ask(paths[name], QUESTION, exit="layer:1", max_new_tokens=5) for name in paths]
        batch = model.ask_batch([(paths[name], QUESTION) for name in paths], exit="layer:1", max_new_tokens=5)
    assert [a.token_ids for a in batch] == [a.token_ids for a in single]
    assert [a.visual_tokens for a in batch] == [
        anyres.visual_tokens(*IMAGE_SIZES[n], _info(next_bundle)) for n in paths
    ]


def test_cli_counts_visual_tokens_per_image(next_bundle, capsys):
    from dyvte_rt.cli import main as cli_main

    assert cli_main(["inspect", "--bundle", str(next_bundle)]) == 0
    assert "any resolution: 32px tiles" in capsys.readouterr().out
    assert (
        cli_main(["macs", "--bundle", str(next_bundle), "--image", "100x30", "--exit-layer", "1", "--json"])
        == 0
    )
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["visual"] == anyres.visual_tokens(30, 100, _info(next_bundle))
    assert 0 < report["saved_fraction"] < 1


def _info(bundle: Path):
    return load_manifest(bundle, verify_hashes=False).vision.anyres


def test_tensorrt_profiles_cover_every_image_size(next_bundle):
    import dataclasses

    from dyvte_rt.tools.engine_plan import default_settings, plan_engines

    manifest = load_manifest(next_bundle, verify_hashes=False)
    # the planner reads only the graphs' I/O: a concat bundle's vision and embed graphs are these
    concat = dataclasses.replace(
        manifest, kv_flavour="concat", graphs={k: manifest.graphs[k] for k in ("vision", "embed")}
    )
    plan = plan_engines(concat, default_settings(concat, max_context=512))
    (vision,) = plan["graphs"]["vision"]
    info = manifest.vision.anyres
    side, most = info.tile_size, manifest.vision.visual_tokens
    assert vision["serves"] == ["prefill_visual"]
    shapes = {name: {k: list(v) for k, v in bounds.items()} for name, bounds in vision["shapes"].items()}
    assert shapes["pixel_values"]["min"] == [1, 3, side, side]
    assert shapes["pixel_values"]["max"] == [5, 3, side, side]  # base view + 2x2 tiles
    assert shapes["pack_index"]["min"] == [info.feature_side**2]  # base view alone
    assert shapes["pack_index"]["max"] == [most]
    for height, width in IMAGE_SIZES.values():
        assert info.feature_side**2 <= anyres.visual_tokens(height, width, info) <= most
        assert anyres.tile_count(height, width, info) <= 5


def test_mistral_backbone_matches_hugging_face_and_exits(tmp_path, images):
    """LLaVA-NeXT-Mistral's decoder: the reference equals `generate` with `never` and an exit drops
    every visual position."""
    from export.loading import load_checkpoint
    from export.tiny_models import build_tiny_llava

    loaded = load_checkpoint(
        str(build_tiny_llava("mistral", tmp_path / "mistral", seed=2, family="llava-next"))
    )
    reference = DyVTEReference(loaded.adapter)
    inputs = hf_inputs(loaded.processor, images["tall"], QUESTION)
    image = loaded.adapter.image_input(inputs)
    with torch.no_grad():
        hf_tokens = loaded.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    generated = reference.generate(inputs["input_ids"], image, NeverExit(), max_new_tokens=6)
    n = inputs["input_ids"].shape[1]
    assert generated.tokens == hf_tokens[0, n:].tolist()[: len(generated.tokens)]
    exited = reference.prefill(inputs["input_ids"], image, FixedLayerExit(1))
    assert exited.cache.lengths()[-1] == n - int((inputs["input_ids"] == loaded.adapter.image_token_id).sum())
