"""`dyvte-rt` conventions: exit codes, --json, --bundle, help text; `macs`, `inspect`, `bench`."""

import json

import pytest

from dyvte_rt.cli import main


def test_macs_command_reports_llava_7b_savings(capsys):
    assert main(["macs", "--exit-layer", "15"]) == 0
    out = capsys.readouterr().out
    assert "45.4% saved" in out and "1.83x" in out


def test_macs_json_and_bundle_sizes(capsys, bundles):
    assert main(["macs", "--exit-layer", "15", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["saved_fraction"] == pytest.approx(0.4539, abs=1e-4) and data["layers"] == 32
    assert data["theoretical_speedup"] == pytest.approx(data["full"] / data["actual"])
    assert main(["macs", "--bundle", str(bundles["llama-gqa"]), "--exit-layer", "1", "--json"]) == 0
    tiny = json.loads(capsys.readouterr().out)
    assert (tiny["hidden"], tiny["kv_width"], tiny["layers"], tiny["visual"]) == (64, 32, 4, 16)
    assert 0 < tiny["saved_fraction"] < 1


def test_user_errors_exit_1_and_usage_errors_exit_2(capsys):
    assert main(["macs", "--exit-layer", "32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as usage:
        main(["macs", "--no-such-flag"])
    assert usage.value.code == 2


def test_a_negative_thread_count_is_refused_in_one_line(capsys, demo_bundle, sample_image):
    command = ["infer", "--bundle", str(demo_bundle), "--threads", "-2", str(sample_image), "what shape?"]
    assert main(command) == 1
    expected = "error: threads must be 0 (let dyvte-rt choose) or a positive count, not -2\n"
    assert capsys.readouterr().err == expected


def test_a_negative_seed_is_refused_in_one_line(capsys, demo_bundle, sample_image):
    command = ["infer", "--bundle", str(demo_bundle), "--temperature", "1", "--seed", "-1"]
    assert main([*command, str(sample_image), "what shape?"]) == 1
    assert capsys.readouterr().err == "error: seed must be a non-negative integer, got -1\n"


def test_eval_refuses_a_limit_below_one(capsys, demo_bundle, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "x.png", "question": "what?", "answer": "circle"}\n')
    assert main(["eval", "--bundle", str(demo_bundle), "--data", str(data), "--limit", "-1"]) == 1
    assert capsys.readouterr().err == "error: --limit must be at least 1, not -1\n"


def test_serve_refuses_a_port_it_cannot_listen_on_before_loading_the_model(capsys, monkeypatch, demo_bundle):
    import socket

    import dyvte_rt.cli.serve as serve

    monkeypatch.setattr(serve, "open_model", lambda config: pytest.fail("the model was loaded"))
    assert main(["serve", "--bundle", str(demo_bundle), "--port", "70000"]) == 1
    assert capsys.readouterr().err == "error: --port must lie in 0..65535, not 70000\n"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--bundle", str(demo_bundle), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and err.count("\n") == 1
    assert "choose another --port" in err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            ["--context", "-5"],
            "--context must be at least 1 position, not -5",
        ),  # was ONNX Runtime's traceback
        (["--max-body-mb", "-1"], "--max-body-mb must be positive, not -1.0"),  # refused every request
        (["--max-batch", "0"], "--max-batch must be at least 1, --max-queue and --prefill-chunk at least 0"),
        (  # every request was refused with 401
            ["--api-key", ""],
            "--api-key is empty, so no request could be authorised "
            "(hint: set the variable it comes from, or leave --api-key out)",
        ),
    ],
)
def test_serve_refuses_impossible_limits_before_loading_the_model(
    capsys, monkeypatch, demo_bundle, option, message
):
    import dyvte_rt.cli.serve as serve

    monkeypatch.setattr(serve, "open_model", lambda config: pytest.fail("the model was loaded"))
    assert main(["serve", "--bundle", str(demo_bundle), *option]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


def test_inspect_takes_the_bundle_either_way_and_prints_json(capsys, bundles):
    bundle = str(bundles["qwen2"])
    assert main(["inspect", bundle]) == 0
    positional = capsys.readouterr().out
    assert main(["inspect", "--bundle", bundle]) == 0
    assert capsys.readouterr().out == positional
    assert "exit layers 1, 2" in positional and "segment_00[0-1]" in positional
    assert main(["inspect", "--bundle", bundle, "--json", "--no-verify"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sha256_verified"] is False and data["exit"]["candidate_layers"] == [1, 2]
    assert data["dims"]["num_layers"] == 4 and "segment_00" in data["graphs"]


def test_bench_json_reports_every_policy(capsys, bundles, sample_image, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(sample_image.read_bytes())
    args = ["bench", "--bundle", str(bundles["llama-gqa"]), "--images", str(images), "--json"]
    assert (
        main([*args, "--exit", "never,layer:1", "--runs", "2", "--warmup", "0", "--max-new-tokens", "3"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert set(report["policies"]) == {"never", "layer:1"} and report["runs"] == 2
    never, exit1 = report["policies"]["never"], report["policies"]["layer:1"]
    expected = {
        "prefill_ms_median",
        "ttft_ms_median",
        "decode_tokens_per_s",
        "macs_ratio",
        "theoretical_speedup",
    }
    assert expected <= set(never)
    assert never["macs_ratio"] == 1.0 and never["theoretical_speedup"] == 1.0
    assert exit1["macs_ratio"] < 1 and exit1["theoretical_speedup"] > 1
    assert never["exit_layers"] == {"none": 2} and exit1["exit_layers"] == {"1": 2}
    assert never["prefill_ms_median"] > 0 and never["ttft_ms_median"] >= never["prefill_ms_median"]
    from dyvte_rt.bundle.manifest import load_manifest

    vocab = load_manifest(bundles["llama-gqa"], verify_hashes=False).dims.vocab_size
    assert 0 < never["host_bytes_per_decode_token"] <= 4 * vocab + 1024


def test_bench_needs_one_input_source(bundles):
    with pytest.raises(SystemExit) as usage:
        main(["bench", "--bundle", str(bundles["llama-gqa"])])
    assert usage.value.code == 2


def _all_parsers():
    from calibrate import fixed_layer, routers, shapes, train_demo
    from dyvte_rt.cli.commands import build_parser
    from export import build, tiny_models
    from export.reference import __main__ as reference

    root = build_parser()
    subcommands = next(a for a in root._actions if a.__class__.__name__ == "_SubParsersAction").choices
    return {
        "dyvte-rt": root,
        **{f"dyvte-rt {name}": parser for name, parser in subcommands.items()},
        **{
            m.__name__: m.build_parser()
            for m in (build, reference, routers, fixed_layer, shapes, train_demo, tiny_models)
        },
    }


def test_every_option_of_every_command_explains_itself():
    for name, parser in _all_parsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.dest in ("help", "version", "command"):
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
            shown = formatter._get_help_string(action)
            assert shown.count("default:") <= 1, f"{name}: {action.option_strings}: default stated twice"
        text = parser.format_help()
        assert "default: None" not in text and "DESIGN" not in text, name
