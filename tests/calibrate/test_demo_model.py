"""The shipped demo model: loads as `--model demo`, and scores on questions it never saw."""

from dyvte_rt.cli import main as cli_main
from export.loading import DEMO_CHECKPOINT, load_checkpoint
from tests.conftest import FRESH_N
from tests.helpers import eval_json


def test_demo_weights_are_small_and_visual_tokens_dominate(demo_bundle):
    size = (DEMO_CHECKPOINT / "model.safetensors").stat().st_size
    assert size <= 20 * 2**20
    loaded = load_checkpoint("demo")
    assert loaded.adapter.family == "llava"
    from dyvte_rt.api.model import DyvteModel

    with DyvteModel.load(demo_bundle) as model:
        ids = model.prompts.encode("what color is the shape in the bottom right?")
        visual = int((ids == model.manifest.tokens.image).sum())
        assert visual / ids.shape[1] >= 0.75


def test_demo_scores_at_least_95_percent_on_fresh_questions(demo_bundle, fresh_questions, capsys):
    report = eval_json(capsys, demo_bundle, fresh_questions, "--exit", "never")
    assert report["n"] == FRESH_N and report["accuracy"] >= 0.95
    assert report["exit_histogram"] == {"none": FRESH_N} and report["prefill_macs_saved"] == 0.0


def test_shipped_routers_exit_early_and_keep_the_score(demo_bundle, fresh_questions, capsys):
    """The quickstart's default: the shipped routers (threshold from calibration) on fresh questions."""
    report = eval_json(capsys, demo_bundle, fresh_questions)  # no --exit: the bundle's default, router
    assert report["policy"] == "router"
    assert report["accuracy"] >= 0.95 and report["prefill_macs_saved"] >= 0.4


def test_eval_reports_exit_statistics(demo_bundle, fresh_questions, capsys):
    report = eval_json(capsys, demo_bundle, fresh_questions, "--exit", "layer:2", "--limit", "10")
    assert report["n"] == 10 and report["exit_histogram"] == {"2": 10} and report["mean_exit_layer"] == 2.0
    assert 0.4 < report["prefill_macs_saved"] < 1.0


def test_eval_rejects_a_malformed_dataset(demo_bundle, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "question": "q"}\n')
    assert cli_main(["eval", "--bundle", str(demo_bundle), "--data", str(bad)]) == 1
    assert "bad.jsonl:1" in capsys.readouterr().err
