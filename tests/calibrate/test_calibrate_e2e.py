"""calibrate -> export -> dyvte-rt eval on the demo model, small enough for CI."""

import json

import pytest

from calibrate.routers import RoutersConfig, calibrate_routers
from calibrate.shapes import write_dataset
from dyvte_rt.cli import main as cli_main
from export.reference import RouterBank
from tests.artefacts import export
from tests.helpers import eval_json


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    data = write_dataset(root / "data", 240, seed=555)
    out = root / "routers"
    report = calibrate_routers(
        RoutersConfig(model="demo", data=data, out=out, router_width=64, compare_widths="0", epochs=200)
    )
    return root, out, report


def test_report_files_and_fields(calibrated):
    _, out, report = calibrated
    assert (out / "report.png").stat().st_size > 10_000
    assert json.loads((out / "report.json").read_text())["threshold"] == report["threshold"]
    assert RouterBank.load(out / "routers.safetensors").threshold == report["threshold"]
    assert {
        "per_layer",
        "expected_prefill_macs_saved",
        "expected_agreement",
        "router_parameters_fraction_of_model",
        "thresholds",
        "expected_mean_exit_layer",
    } <= set(report)
    assert report["router_parameters_fraction_of_model"] < 0.5
    widths = report["width_comparison"]
    assert set(widths) == {"64", "0"} and widths["0"]["parameters"] < widths["64"]["parameters"]
    for entry in widths.values():
        assert 0 <= entry["expected_prefill_macs_saved"] <= 1 and 0 <= entry["expected_agreement"] <= 1


def test_routers_beat_the_majority_baseline_on_held_out_features(calibrated):
    _, _, report = calibrated
    layers = report["per_layer"]
    router = sum(s["router_accuracy"] for s in layers) / len(layers)
    majority = sum(s["majority_accuracy"] for s in layers) / len(layers)
    assert router > majority, (router, majority)


def test_calibrated_bundle_exits_early_and_keeps_its_answers(calibrated, capsys):
    root, out, _ = calibrated
    bundle = root / "bundle"
    export("demo", bundle, routers=out / "routers.safetensors")  # only the router graphs are new
    fresh = write_dataset(root / "fresh", 60, seed=9090)
    results = {policy: eval_json(capsys, bundle, fresh, "--exit", policy) for policy in ("never", "router")}
    assert results["router"]["prefill_macs_saved"] > 0.2
    assert results["router"]["mean_exit_layer"] < results["never"]["mean_exit_layer"]
    assert results["router"]["accuracy"] >= results["never"]["accuracy"] - 0.05


def test_fixed_layer_records_a_default_policy_the_runtime_uses(demo_bundle, tmp_path, capsys):
    import shutil

    from calibrate.fixed_layer import main as fixed_layer_main
    from dyvte_rt.bundle.manifest import load_manifest

    bundle = shutil.copytree(demo_bundle, tmp_path / "bundle")
    data = write_dataset(tmp_path / "data", 40, seed=31337)
    code = fixed_layer_main(
        ["--model", "demo", "--data", str(data), "--max-kl", "0.5", "--bundle", str(bundle)]
    )
    assert code == 0
    chosen = json.loads(capsys.readouterr().out.split("\nrecorded")[0])
    layer = chosen["layer"]
    assert all(kl <= 0.5 for k, kl in chosen["mean_kl"].items() if int(k) >= layer)
    assert load_manifest(bundle).exit.default_policy == f"layer:{layer}"
    image = data.parent / json.loads(data.read_text().splitlines()[0])["image"]
    assert (
        cli_main(["infer", str(image), "how many shapes are there?", "--bundle", str(bundle), "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["exit_layer"] == layer


def test_routers_recalibrate_on_the_pruned_model(tmp_path):
    data = write_dataset(tmp_path / "data", 24, seed=556)
    out = tmp_path / "routers"
    report = calibrate_routers(
        RoutersConfig(model="demo", data=data, out=out, router_width=0, epochs=20, prune="dart:-1:0.75")
    )
    assert report["prune"] == "dart:-1:0.75" and (out / "routers.safetensors").is_file()
    # every point's compute counts the prune: with no exit (threshold 1) it saves what the prune saves
    never = next(p for p in report["thresholds"] if p["threshold"] == 1.0)
    assert never["macs_ratio"] < 0.5
    plain = calibrate_routers(
        RoutersConfig(model="demo", data=data, out=tmp_path / "plain", router_width=0, epochs=20)
    )
    assert next(p for p in plain["thresholds"] if p["threshold"] == 1.0)["macs_ratio"] == 1.0


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--epochs", "0"], "--epochs must be at least 1, not 0"),
        (["--limit", "-1"], "--limit must be at least 1, not -1"),
    ],
)
def test_no_epochs_or_no_samples_are_refused_before_any_work(tmp_path, capsys, option, message):
    from calibrate import routers

    out = tmp_path / "routers"
    data = write_dataset(tmp_path / "data", 8, seed=1)
    assert routers.main(["--model", "demo", "--data", str(data), "--out", str(out), *option]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()
