"""What the tools around the runtime say about each family: `inspect`, `macs` per image size,
TensorRT profiles that take every image the family can be given, router calibration."""

import json

import pytest
import torch

from dyvte_rt.bundle.manifest import load_manifest
from dyvte_rt.cli import main as cli_main
from dyvte_rt.families import family_for
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit
from export.prompting import hf_inputs
from export.reference import DyVTEReference, RouterBank
from tests.conformance.cases import PRIMARY
from tests.conformance.conftest import QUESTION, case_bundle

FAMILY_CASES = PRIMARY


def test_inspect_and_macs_describe_each_image(bundle, images, capsys):
    manifest = load_manifest(bundle, verify_hashes=False)
    family = family_for(manifest)
    assert cli_main(["inspect", "--bundle", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert f"family      {manifest.source.family} " in out and family.describe_image() in out
    for name, image in images.items():
        size = f"{image.width}x{image.height}"
        assert (
            cli_main(["macs", "--bundle", str(bundle), "--image", size, "--exit-layer", "1", "--json"]) == 0
        )
        report = json.loads(capsys.readouterr().out)
        assert report["visual"] == family.prepare_image(image).visual_tokens, name
        assert 0 < report["saved_fraction"] < 1


def test_tensorrt_profiles_take_every_image(case, checkpoint, routers, images):
    from dyvte_rt.tools.engine_plan import default_settings, plan_engines

    concat = case_bundle(case, checkpoint, routers, kv="concat")
    manifest = load_manifest(concat, verify_hashes=False)
    plan = plan_engines(manifest, default_settings(manifest, max_context=512))
    family = family_for(manifest)
    vision = plan["graphs"]["vision"]
    if family.vision_per_image:  # one image's own shapes: prefill only
        assert [p["serves"] for p in vision] == [["prefill_visual"]]
    for name, image in images.items():
        prepared = family.prepare_image(image)
        feeds = {"pixel_values": prepared.pixel_values, **prepared.feeds}
        assert any(_takes(profile, feeds) for profile in vision), f"no vision profile takes the {name} image"
    sections = manifest.dims.position_sections
    decode = next(p for p in plan["graphs"]["segment_00"] if p["phase"] == "decode")
    assert len(decode["shapes"]["position_ids"]["max"]) == (3 if sections > 1 else 2)


def _takes(profile: dict, feeds: dict) -> bool:
    """Whether every input's shape lies within the profile's min..max."""
    return all(
        all(lo <= d <= hi for lo, d, hi in zip(bounds["min"], feeds[name].shape, bounds["max"], strict=True))
        for name, bounds in profile["shapes"].items()
    )


def test_label_sweep_is_the_reference_and_routers_train(loaded, images, tmp_path):
    """The label sweep's text-only passes are the reference's exits (positions included), and
    `calibrate.routers` trains routers on the family end to end."""
    from calibrate.collect import answer_ids
    from calibrate.routers import RoutersConfig, calibrate_routers
    from calibrate.shapes import write_dataset
    from calibrate.sweep import sweep

    name = next(iter(images))
    inputs = hf_inputs(loaded.processor, images[name], QUESTION)
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
        loss = torch.nn.functional.cross_entropy
        assert float(result.loss_ratio[i]) == pytest.approx(
            float(loss(logits, answer) / loss(full, answer)), rel=1e-4
        )
    data = write_dataset(tmp_path / "data", 12, seed=9)
    report = calibrate_routers(
        RoutersConfig(model=str(loaded.path), data=data, out=tmp_path / "routers", router_width=8, epochs=5)
    )
    assert sum(report["samples"].values()) == 12 and report["candidate_layers"] == [1, 2]
    assert RouterBank.load(tmp_path / "routers" / "routers.safetensors").layers == (1, 2)
