"""`dyvte-rt build-engines` and `inspect --tensorrt-ready` on real bundles of both KV flavours.
TensorRT is not installed here (docs/tensorrt.md): building stops with one line; everything before the
build (readiness, profiles, the plan file) runs."""

import importlib.util
import json

import pytest

from dyvte_rt.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_prints_and_writes_each_graphs_profiles(capsys, concat_bundles):
    bundle = concat_bundles["llama-gqa"]
    code, out, err = _run(
        capsys, "build-engines", "--bundle", str(bundle), "--plan", "--json", "--max-batch", "2"
    )
    assert code == 0, err
    plan = json.loads(out)
    assert json.loads((bundle / "tensorrt" / "plan.json").read_text()) == plan
    graphs = plan["graphs"]
    assert [p["phase"] for p in graphs["segment_00"]] == ["prefill_visual", "prefill_text", "decode"]
    assert len(graphs["vision"]) == 1 and len(graphs["exit_gather"]) == 1
    visual = graphs["segment_00"][0]["shapes"]["hidden_states"]
    assert visual["max"][0] == 2 and visual["opt"][1] == 16 + 64  # the tiny model's 16 visual tokens
    assert plan["buffers"]["kv_bytes"] > 0 and plan["settings"]["max_batch"] == 2


def test_inplace_bundles_are_not_tensorrt_ready(capsys, bundles, concat_bundles):
    code, out, err = _run(capsys, "inspect", "--tensorrt-ready", str(bundles["llama-gqa"]))
    assert code == 1
    assert "GroupQueryAttention" in out and "--kv concat" in out
    assert err.count("\n") == 1 and err.startswith("error:")
    code, out, _ = _run(capsys, "inspect", "--tensorrt-ready", "--json", str(concat_bundles["llama-gqa"]))
    assert code == 0 and json.loads(out)["tensorrt_ready"] is True
    code, _, err = _run(capsys, "build-engines", "--bundle", str(bundles["llama-gqa"]), "--plan")
    assert code == 1 and "--kv concat" in err and err.count("\n") == 1


def test_build_and_run_without_tensorrt_stop_with_one_line(capsys, concat_bundles, sample_image):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: this test is for machines without it")
    bundle = str(concat_bundles["llama-gqa"])
    code, _, err = _run(capsys, "build-engines", "--bundle", bundle)
    assert code == 1 and "TensorRT is not installed" in err and err.count("\n") == 1
    code, _, err = _run(
        capsys, "infer", str(sample_image), "what?", "--bundle", bundle, "--device", "tensorrt"
    )
    assert code == 1 and "TensorRT is not installed" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "build-engines", "--bundle", bundle, "--precision", "fp16")
    assert code == 1 and "this bundle is fp32" in err


def test_golden_outputs_catch_a_backend_that_computes_something_else(capsys, concat_bundles):
    import numpy as np

    bundle = concat_bundles["qwen2"]
    code, _, err = _run(capsys, "build-engines", "--bundle", str(bundle), "--golden")
    assert code == 0, err
    code, out, err = _run(
        capsys, "build-engines", "--bundle", str(bundle), "--check-golden", "--device", "cpu", "--json"
    )
    assert code == 0, err
    rows = json.loads(out)["graphs"]
    assert {r["graph"] for r in rows} >= {"vision", "embed", "segment_00", "exit_gather", "head"}
    assert {r["phase"] for r in rows if r["graph"] == "segment_00"} == {
        "prefill_visual",
        "prefill_text",
        "decode",
    }
    assert all(r["ok"] and r["scale"] > 0 for r in rows)
    path = bundle / "tensorrt" / "golden" / "head.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["decode/out/logits"] = arrays["decode/out/logits"] + 0.5  # what a broken engine would give
    np.savez(path, **arrays)
    code, _, err = _run(capsys, "build-engines", "--bundle", str(bundle), "--check-golden", "--device", "cpu")
    assert code == 1 and "head, decode" in err and err.count("\n") == 1
