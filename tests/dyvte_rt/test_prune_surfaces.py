"""Pruning where a user chooses it: the command line (infer, eval, bench, chat, macs), the Python
API, the server's `prune` field, a bundle from before pruning, and `python -m calibrate.prune`."""

import json
import shutil
from pathlib import Path

import pytest

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.cli import main
from dyvte_rt.errors import PolicyError
from dyvte_rt.runtime.prune import parse_prune

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "examples" / "three_shapes.png"


@pytest.fixture(scope="module")
def model(demo_bundle):
    with DyvteModel.load(demo_bundle) as opened:
        yield opened


def test_infer_json_reports_what_the_prune_kept(capsys, demo_bundle):
    args = ["infer", "--bundle", str(demo_bundle), str(IMAGE), "how many shapes are there?", "--json"]
    assert main([*args, "--exit", "never", "--prune", "dart:-1:0.75"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert pruned["visual_tokens_kept"] == 16 == len(pruned["kept_visual"]) and pruned["visual_tokens"] == 64
    assert pruned["pruned_after_layer"] == -1 and pruned["prune"] == "dart:-1:0.75"
    assert pruned["kept_visual"] == sorted(pruned["kept_visual"]) and max(pruned["kept_visual"]) < 64
    assert main([*args, "--exit", "never"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["kept_visual"] is None and plain["visual_tokens_kept"] == 64
    assert pruned["prefill_macs"]["actual"] < plain["prefill_macs"]["actual"] == plain["prefill_macs"]["full"]
    assert main([*args, "--prune", "fastv:0:0.5"]) == 1  # a layer this bundle cannot prune after
    assert "prunes after layers" in capsys.readouterr().err


def test_eval_bench_and_macs_take_prune(capsys, demo_bundle, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"image": str(IMAGE), "question": "how many shapes are there?", "answer": "three"})
    )
    assert (
        main(["eval", "--bundle", str(demo_bundle), "--data", str(data), "--prune", "fastv:1:0.5", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["prune"] == "fastv:1:0.5" and report["mean_visual_kept"] in (32.0, 64.0)
    args = ["bench", "--bundle", str(demo_bundle), "--data", str(data), "--runs", "1", "--warmup", "0"]
    assert main([*args, "--exit", "never", "--prune", "none,dart:-1:0.5", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert list(bench["policies"]) == ["never", "never+dart:-1:0.5"]
    assert bench["policies"]["never+dart:-1:0.5"]["theoretical_speedup"] > 1.2
    assert main(["macs", "--exit-layer", "15", "--prune", "fastv:2:0.5", "--json"]) == 0
    macs = json.loads(capsys.readouterr().out)
    assert macs["visual_tokens_kept"] == 288 and round(macs["saved_fraction"], 3) == 0.640
    assert main(["macs", "--exit-layer", "2", "--prune", "fastv:2:0.5", "--json"]) == 0  # the exit wins
    assert json.loads(capsys.readouterr().out)["visual_tokens_kept"] == 576


def test_the_api_prunes_per_call_per_sample_and_in_chat(model):
    plain = model.ask(IMAGE, "how many shapes are there?", exit="never", max_new_tokens=4)
    pruned = model.ask(
        IMAGE, "how many shapes are there?", exit="never", prune="fastv:1:0.75", max_new_tokens=4
    )
    assert pruned.visual_tokens_kept == parse_prune("fastv:1:0.75").keep(64) == 16
    assert pruned.prefill_macs["actual"] < plain.prefill_macs["actual"]
    chat = model.chat(IMAGE, exit="never", prune="fastv:1:0.75")
    first = chat.ask("how many shapes are there?", max_new_tokens=4)
    assert first.kept_visual == pruned.kept_visual and first.token_ids == pruned.token_ids
    later = chat.ask("what color is the shape in the top left?", max_new_tokens=4)
    assert chat.layer_lengths[2] < chat.layer_lengths[0] and later.prune == "fastv:1:0.75"
    with pytest.raises(PolicyError, match="unknown prune policy"):
        model.ask(IMAGE, "hi", prune="random:1:0.5")


def test_a_bundle_from_before_pruning_answers_but_refuses_to_prune(demo_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(demo_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["prune"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with DyvteModel.load(old) as opened:
        assert opened.ask(IMAGE, "how many shapes are there?", max_new_tokens=4).kept_visual is None
        with pytest.raises(PolicyError, match="exported before visual-token pruning") as err:
            opened.ask(IMAGE, "how many shapes are there?", prune="dart:-1:0.5")
        assert "re-export" in err.value.one_line()


def test_the_server_takes_a_prune_field(model):
    from starlette.testclient import TestClient

    from dyvte_rt.serving.app import ServerLimits, create_app
    from dyvte_rt.serving.engine import BatchEngine

    engine = BatchEngine(model, max_batch=2, max_queue=4, context=256)
    app = create_app(model, engine, "demo", ServerLimits(max_body_bytes=1 << 20, max_image_memory=64 << 20))
    import base64

    url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "how many?"},
            ],
        }
    ]
    try:
        client = TestClient(app, raise_server_exceptions=False)
        reply = client.post(
            "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 4, "exit": "never", "prune": "dart:-1:0.5"},
        )
        assert reply.status_code == 200, reply.text
        extras = reply.json()["dyvte"]
        assert extras["visual_tokens_kept"] == 32 and extras["pruned_after_layer"] == -1
        assert len(extras["kept_visual"]) == 32
        for bad, message in (("fastv:-1:0.5", "fastv prunes after a decoder layer"), ("x", "unknown prune")):
            reply = client.post("/v1/chat/completions", json={"messages": messages, "prune": bad})
            assert reply.status_code == 400 and message in reply.json()["error"]["message"]
        reply = client.post("/v1/chat/completions", json={"messages": messages, "prune": 5})
        assert reply.status_code == 400 and "prune" in reply.json()["error"]["message"]
    finally:
        engine.stop()


def test_calibrate_prune_sweeps_picks_within_the_budget_and_writes_the_default(demo_bundle, tmp_path):
    from calibrate.prune import main as prune_main
    from calibrate.shapes import write_dataset

    data = write_dataset(tmp_path / "shapes", 12, 31)
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle)
    out = tmp_path / "prune"
    args = ["--model", str(bundle), "--data", str(data), "--out", str(out), "--ratios", "0.5,0.9"]
    assert prune_main([*args, "--layers=-1,1", "--budget", "10", "--write-default", str(bundle)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 1000
    kinds = {p["kind"] for p in report["points"]}
    assert kinds == {"never", "exit only", "prune only", "combined"}
    specs = {p["prune"] for p in report["points"]}
    assert specs == {
        "none",
        "fastv:1:0.5",
        "fastv:1:0.9",
        "dart:-1:0.5",
        "dart:-1:0.9",
        "dart:1:0.5",
        "dart:1:0.9",
    }
    chosen = report["chosen"]
    assert chosen["accuracy"] >= report["never_accuracy"] - 0.1 - 1e-9
    assert chosen["macs_saved"] == max(
        p["macs_saved"] for p in report["points"] if p["accuracy"] >= report["never_accuracy"] - 0.1 - 1e-9
    )
    assert report["dart_on_embeddings_alone"]["prune"].startswith("dart:-1:")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["prune"]["default_policy"] == chosen["prune"]
    assert manifest["exit"]["default_policy"] == chosen["exit"]
    with DyvteModel.load(bundle) as opened:  # the new default is what an answer uses unasked
        answer = opened.ask(IMAGE, "how many shapes are there?", max_new_tokens=4)
        assert answer.prune == chosen["prune"] and answer.policy == chosen["exit"]
    assert prune_main([*args, "--layers", "7"]) == 1


def test_inspect_says_where_a_bundle_prunes(capsys, demo_bundle):
    assert main(["inspect", str(demo_bundle), "--no-verify"]) == 0
    assert "pruning     after layers -1, 1, 2, 3, 4 (-1: the input embeddings, DART only); default none" in (
        capsys.readouterr().out
    )
