"""Qwen2-VL and Qwen2.5-VL end to end on tiny random checkpoints: the runtime's preprocessing and
multimodal rotary positions against Hugging Face's processor and model code, the vision tower
(with Qwen2.5-VL's windows) against transformers', the reference against `generate`, and the
exported bundle against the reference for every exit policy."""

import numpy as np
import pytest
import torch
from PIL import Image

from dyvte_rt.bundle.loaded import Bundle
from dyvte_rt.bundle.manifest import load_manifest
from dyvte_rt.families import qwen2_vl as patch_grid
from dyvte_rt.inputs.preprocess import prepare_image
from dyvte_rt.inputs.prompt import PromptBuilder
from dyvte_rt.runtime.pipeline import Pipeline
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit, RouterExit
from export.prompting import hf_inputs
from export.reference import DyVTEReference, RouterBank
from tests.helpers import runtime_vs_reference

QUESTION = "what color is the circle on the left?"
VARIANTS = ("qwen2-vl", "qwen2.5-vl")
# (height, width): wide, tall, tiny (scaled up to the minimum), huge (scaled down to the budget), odd
IMAGE_SIZES = {"wide": (90, 160), "tall": (150, 60), "tiny": (20, 30), "huge": (400, 700), "odd": (97, 131)}


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def qwen(variant, tmp_path_factory):
    """(loaded checkpoint, bundle with random routers at layers 1 and 2, routers file)."""
    from export.build import BuildConfig, build_bundle
    from export.loading import load_checkpoint
    from export.tiny_models import build_tiny_qwen_vl

    root = tmp_path_factory.mktemp(variant)
    checkpoint = build_tiny_qwen_vl(variant, root / "checkpoint", seed=2)
    torch.manual_seed(11)
    RouterBank(64, (1, 2), width=16).save(root / "routers.safetensors")
    build_bundle(
        BuildConfig(
            model=str(checkpoint), out=root / "bundle", routers=root / "routers.safetensors", quiet=True
        )
    )
    return load_checkpoint(str(checkpoint)), root / "bundle", root / "routers.safetensors"


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    rng = np.random.RandomState(3)
    return {
        n: Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for n, (h, w) in IMAGE_SIZES.items()
    }


def test_preprocessing_positions_and_prompt_match_hugging_face(qwen, images):
    loaded, bundle, _ = qwen
    manifest = load_manifest(bundle)
    prompts = PromptBuilder(manifest, bundle / "tokenizer.json")
    info = manifest.vision.patch_grid
    counts, areas = set(), {}
    for name, image in images.items():
        inputs = hf_inputs(loaded.processor, image, QUESTION)
        prepared = prepare_image(image, manifest.vision)
        assert prepared.grid == tuple(inputs["image_grid_thw"][0].tolist()), name
        assert prepared.pixel_values.shape == tuple(inputs["pixel_values"].shape), name
        assert np.abs(prepared.pixel_values - inputs["pixel_values"].numpy()).max() <= 1e-5, name
        ids = prompts.encode(QUESTION, visual_tokens=prepared.visual_tokens)
        assert (ids == inputs["input_ids"].numpy()).all(), name
        grid_thw = inputs["image_grid_thw"]
        hf_positions, hf_delta = loaded.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=grid_thw
        )
        ours, offset = patch_grid.prompt_positions(ids[0], manifest.tokens.image, [prepared.grid], info)
        assert (ours == hf_positions[:, 0].numpy()).all() and offset == int(hf_delta), name
        from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

        positions = get_vision_position_ids(grid_thw, info.merge_size).numpy()
        assert (prepared.feeds["vision_positions"] == positions).all(), name
        if info.window_size is not None:
            index, cu = get_vision_window_index(grid_thw, info.merge_size, info.window_size, info.patch_size)
            assert (prepared.feeds["window_index"] == index.numpy()).all(), name
            starts = np.r_[0, np.flatnonzero(np.diff(prepared.feeds["window_ids"])) + 1, len(positions)]
            assert list(starts) == cu.tolist(), name
        counts.add(prepared.visual_tokens)
        areas[name] = prepared.grid[1] * prepared.grid[2] * info.patch_size**2
    assert areas["tiny"] >= info.min_pixels > 20 * 30  # scaled up to the minimum
    assert areas["huge"] <= info.max_pixels < 400 * 700  # scaled down into the budget
    assert max(counts) <= manifest.vision.visual_tokens


def test_reference_matches_hugging_face(qwen, images):
    loaded, _, _ = qwen
    reference = DyVTEReference(loaded.adapter)
    for name in ("wide", "tall"):
        inputs = hf_inputs(loaded.processor, images[name], QUESTION)
        image = loaded.adapter.image_input(inputs)
        with torch.no_grad():
            hf_features = loaded.model.model.get_image_features(
                inputs["pixel_values"], inputs["image_grid_thw"]
            )
            hf_logits = loaded.model(**inputs).logits[0, -1]
            hf_tokens = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
        with torch.no_grad():
            features = loaded.adapter.image_features(image)[0]
        pooled = hf_features.pooler_output
        pooled = pooled[0] if isinstance(pooled, list | tuple) else pooled
        assert float((features - pooled).abs().max()) <= 1e-5, name
        prefill = reference.prefill(inputs["input_ids"], image, NeverExit())
        assert float((prefill.logits[0, -1] - hf_logits).abs().max()) <= 1e-4, name
        n = inputs["input_ids"].shape[1]
        generated = reference.generate(inputs["input_ids"], image, NeverExit(), max_new_tokens=8)
        assert generated.tokens == hf_tokens[0, n:].tolist()[: len(generated.tokens)], name


def test_bundle_matches_reference_for_every_exit_policy(qwen, images):
    loaded, bundle_dir, routers_file = qwen
    routers = RouterBank.load(routers_file)
    reference = DyVTEReference(loaded.adapter, routers=routers, candidate_layers=routers.layers)
    with Bundle.open(bundle_dir) as bundle:
        pipeline = Pipeline(bundle)
        manifest = bundle.manifest
        assert manifest.dims.position_sections == 3
        assert bundle.manifest.graphs["segment_00"].inputs[1].shape[0] == 3  # position_ids [3, B, S]
        for name in ("wide", "tall", "odd"):
            inputs = hf_inputs(loaded.processor, images[name], QUESTION)
            image = loaded.adapter.image_input(inputs)
            prepared = prepare_image(images[name], manifest.vision)
            policies = [NeverExit(), FixedLayerExit(1), FixedLayerExit(2), RouterExit(0.5)]
            for policy in policies:
                worst, got, expected = runtime_vs_reference(
                    pipeline, reference, inputs["input_ids"], image, prepared, policy
                )
                if isinstance(policy, RouterExit):
                    assert got.exit_probs == pytest.approx(expected.exit_probs, abs=1e-5)
                assert int(got.cache.position_offsets[0]) == expected.cache.position_offset
                assert worst <= 1e-4, f"{name} {policy.describe()}: {worst:.2e}"


def test_fp16_bundle_is_sound_and_matches_the_fp32_reference(qwen, images, tmp_path_factory):
    """fp16 weights and activations, the vision tower (and Qwen2.5-VL's window mask) included:
    no fp16 hazard in any graph, and every exit close to the fp32 reference with the same tokens."""
    from dyvte_rt.api.model import DyvteModel
    from dyvte_rt.tools.graph_lint import fp16_hazards
    from export.build import BuildConfig, build_bundle

    loaded, bundle_dir, _ = qwen
    fp16 = tmp_path_factory.mktemp("qwen-fp16") / "bundle"
    build_bundle(BuildConfig(model=str(bundle_dir.parent / "checkpoint"), out=fp16, dtype="fp16", quiet=True))
    assert load_manifest(fp16).dtype == "fp16"
    assert [hazard for path in sorted(fp16.glob("*.onnx")) for hazard in fp16_hazards(path)] == []
    reference = DyVTEReference(loaded.adapter)
    with DyvteModel.load(fp16, dtype="fp16") as model:
        for name in ("wide", "odd"):
            inputs = hf_inputs(loaded.processor, images[name], QUESTION)
            prepared = prepare_image(images[name], model.pipeline.bundle.manifest.vision)
            for policy in (NeverExit(), FixedLayerExit(1)):
                worst, got, expected = runtime_vs_reference(
                    model.pipeline,
                    reference,
                    inputs["input_ids"],
                    loaded.adapter.image_input(inputs),
                    prepared,
                    policy,
                )
                scale = float(expected.logits.abs().max())
                assert worst <= 5e-3 * scale, f"{name} {policy.describe()}: {worst:.2e} of {scale:.2f}"
                assert int(got.logits[0].argmax()) == int(expected.logits[0, -1].argmax())


def test_api_batch_and_conversation(qwen, images, tmp_path):
    """Differently sized images in one batch (each row with its own position offset) answer as
    alone; a conversation's later turns continue the multimodal positions exactly as one prefill
    of the whole conversation does."""
    from dyvte_rt.api.model import DyvteModel

    loaded, bundle_dir, _ = qwen
    paths = {}
    for name in ("wide", "tall"):
        paths[name] = tmp_path / f"{name}.png"
        images[name].save(paths[name])
    reference = DyVTEReference(loaded.adapter)
    image = loaded.adapter.image_input(hf_inputs(loaded.processor, images["wide"], QUESTION))
    with DyvteModel.load(bundle_dir) as model:
        single = [model.ask(paths[n], QUESTION, exit="layer:1", max_new_tokens=5) for n in paths]
        batch = model.ask_batch([(paths[n], QUESTION) for n in paths], exit="layer:1", max_new_tokens=5)
        assert [a.token_ids for a in batch] == [a.token_ids for a in single]
        visual = prepare_image(images["wide"], model.manifest.vision).visual_tokens
        for exit, policy in (("never", NeverExit()), ("layer:1", FixedLayerExit(1))):
            chat = model.chat(paths["wide"], exit=exit)
            fed: list[int] = []
            for index, question in enumerate((QUESTION, "and the square?")):
                if index == 0:
                    ids = model.prompts.encode(question, visual_tokens=visual)[0].tolist()
                else:
                    ids = model.prompts.encode_next_turn(chat.history, question, with_image=True)[0].tolist()
                answer = chat.ask(question, max_new_tokens=4)
                fed += ids
                expected = reference.generate(torch.tensor([fed]), image, policy, max_new_tokens=4)
                assert answer.token_ids == expected.tokens, (exit, index)
                fed += answer.token_ids if answer.finish_reason == "length" else answer.token_ids[:-1]
            chat.close()


def test_cli_counts_visual_tokens_from_the_image_size(qwen, capsys):
    import json

    from dyvte_rt.cli import main as cli_main

    _, bundle_dir, _ = qwen
    info = load_manifest(bundle_dir, verify_hashes=False).vision.patch_grid
    assert (
        cli_main(["macs", "--bundle", str(bundle_dir), "--image", "160x90", "--exit-layer", "1", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    rows, cols = patch_grid.smart_resize(90, 160, info)
    assert report["visual"] == rows * cols // (info.patch_size * info.merge_size) ** 2
    assert cli_main(["inspect", "--bundle", str(bundle_dir)]) == 0
    assert "14px patches merged 2x2" in capsys.readouterr().out


def test_the_7b_slice_goes_with_qwen25_vl_and_a_layer_count(capsys, tmp_path):
    from export.tiny_models import main

    for argv in (["--layers", "2"], ["--family", "llava", "--layers", "2"], ["--family", "qwen2.5-vl"]):
        with pytest.raises(SystemExit) as exited:
            main(["--backbone", "qwen2.5-vl-7b-slice", "--out", str(tmp_path / "x"), *argv])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "goes with --family qwen2.5-vl and --layers N" in err, argv
    assert not (tmp_path / "x").exists()


def test_qwen25_vl_7b_saving_at_1280x720(capsys):
    from dyvte_rt.cli import main as cli_main

    assert cli_main(["macs", "--family", "qwen2.5-vl", "--image", "1280x720", "--exit-layer", "13"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1196 visual tokens for a 1280x720 image")  # 728 x 1288 pixels, 26 x 46 tokens
    assert "47.7% saved" in out


def test_calibration_labels_and_routers(qwen, images, tmp_path):
    """The label sweep's text-only passes are the reference's exits (positions included), and
    `calibrate.routers` trains routers on the family end to end."""
    from calibrate.collect import answer_ids
    from calibrate.routers import RoutersConfig, calibrate_routers
    from calibrate.shapes import write_dataset
    from calibrate.sweep import sweep

    loaded, _, _ = qwen
    inputs = hf_inputs(loaded.processor, images["wide"], QUESTION)
    image = loaded.adapter.image_input(inputs)
    reference = DyVTEReference(loaded.adapter)
    answer = answer_ids(loaded, "red circle")
    result = sweep(reference, inputs["input_ids"], image, answer, (1, 2))
    full_ids = torch.cat([inputs["input_ids"], answer[None]], dim=1)
    n, a = inputs["input_ids"].shape[1], answer.shape[0]
    full = reference.prefill(full_ids, image, NeverExit()).logits[0, n - 1 : n - 1 + a]
    for i, k in enumerate((1, 2)):
        exited = reference.prefill(full_ids, image, FixedLayerExit(k))
        start = n - exited.n_visual - 1
        logits = exited.logits[0, start : start + a]
        agreement = (logits.argmax(-1) == full.argmax(-1)).float().mean()
        assert float(result.token_agreement[i]) == pytest.approx(float(agreement))
        loss_ratio = torch.nn.functional.cross_entropy(logits, answer) / torch.nn.functional.cross_entropy(
            full, answer
        )
        assert float(result.loss_ratio[i]) == pytest.approx(float(loss_ratio), rel=1e-4)
    data = write_dataset(tmp_path / "data", 12, seed=9)
    report = calibrate_routers(
        RoutersConfig(model=str(loaded.path), data=data, out=tmp_path / "routers", router_width=8, epochs=5)
    )
    assert sum(report["samples"].values()) == 12 and report["candidate_layers"] == [1, 2]
    assert (tmp_path / "routers" / "routers.safetensors").is_file()
    assert RouterBank.load(tmp_path / "routers" / "routers.safetensors").layers == (1, 2)


def test_tensorrt_profiles_span_the_pixel_budget(qwen):
    import dataclasses

    from dyvte_rt.tools.engine_plan import default_settings, plan_engines

    _, bundle_dir, _ = qwen
    manifest = load_manifest(bundle_dir, verify_hashes=False)
    graphs = {k: manifest.graphs[k] for k in ("vision", "segment_00")}
    concat = dataclasses.replace(manifest, kv_flavour="concat", graphs=graphs)
    # the in-place segment's buffers cannot be planned; its position ids can, so plan a concat copy's
    segment = concat.graphs["segment_00"]
    concat.graphs["segment_00"] = dataclasses.replace(segment, inputs=segment.inputs[:2])
    plan = plan_engines(concat, default_settings(concat, max_context=512))
    (vision,) = plan["graphs"]["vision"]
    info = manifest.vision.patch_grid
    unit = info.merge_size**2
    fewest = info.min_pixels // (info.patch_size * info.merge_size) ** 2
    assert tuple(vision["shapes"]["pixel_values"]["min"]) == (unit * fewest, 1176)
    assert tuple(vision["shapes"]["pixel_values"]["max"]) == (unit * manifest.vision.visual_tokens, 1176)
    positions = {p["phase"]: list(p["shapes"]["position_ids"]["max"]) for p in plan["graphs"]["segment_00"]}
    assert positions["decode"] == [3, 1, 1] and positions["prefill_visual"][0] == 3
