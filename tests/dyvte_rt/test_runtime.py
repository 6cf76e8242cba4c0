"""The torch-free runtime: prompts, tokens and answers against the reference and HF."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.errors import DyvteError, InputError, PolicyError
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit
from dyvte_rt.runtime.sampling import Sampler, SamplingConfig
from export.reference import DyVTEReference
from tests.conftest import Lazy

MAX_NEW = 8


@pytest.fixture(scope="module")
def runtime_models(bundles):
    models = Lazy(tuple(bundles), lambda name: DyvteModel.load(bundles[name]))
    yield models
    for model in models.made():
        model.close()


def test_streaming_yields_the_answer_piece_by_piece_and_can_be_replayed(runtime_models, sample_image):
    generation = runtime_models["qwen2"].generate(sample_image, "what shape?", max_new_tokens=MAX_NEW)
    first = iter(generation)
    head = next(first)  # generation has started, not finished
    assert generation.answer is None
    pieces = [head, *first]
    assert len(pieces) >= 2 and "".join(pieces) == generation.answer.text
    assert list(generation) == pieces  # a second pass replays the same pieces
    assert generation.result() is generation.answer


def test_streamed_pieces_decode_incrementally(runtime_models, sample_image, monkeypatch):
    # each piece comes from tokenizers' DecodeStream, never from re-decoding the whole answer
    model = runtime_models["qwen2"]
    calls = []
    monkeypatch.setattr(model.prompts.tokenizer, "decode", lambda *a, **k: calls.append(a) or "")
    answer = model.ask(sample_image, "what shape?", max_new_tokens=MAX_NEW)
    assert answer.text and not calls


def _scripted(monkeypatch, tokens: list[int]) -> None:
    """Every sampler answers `tokens` in turn, whatever the logits."""
    script = iter(tokens)
    monkeypatch.setattr(Sampler, "__call__", lambda self, logits: next(script))


def test_finish_reasons_name_what_ended_the_answer(runtime_models, sample_image, monkeypatch):
    model = runtime_models["llama-gqa"]
    tokenizer, eos = model.prompts.tokenizer, model.manifest.tokens.eos[0]
    red, green, blue = (tokenizer.token_to_id(w) for w in ("red", "green", "blue"))
    _scripted(monkeypatch, [red, green, eos, blue])
    stopped = model.ask(sample_image, "what?", max_new_tokens=10)
    assert stopped.finish_reason == "stop" and stopped.token_ids == [red, green, eos]
    assert stopped.text == "red green"
    _scripted(monkeypatch, [red, green, eos, blue])
    ignoring = model.ask(sample_image, "what?", max_new_tokens=4, ignore_eos=True)
    assert ignoring.finish_reason == "length" and ignoring.token_ids == [red, green, eos, blue]
    _scripted(monkeypatch, [red, green, blue, red])
    generation = model.generate(sample_image, "what?", max_new_tokens=10, stop=["green blue"])
    assert "".join(generation) == generation.answer.text == "red"  # "green" never streamed
    assert generation.answer.finish_reason == "stop" and len(generation.answer.token_ids) == 3
    _scripted(monkeypatch, [red, green, blue])
    assert model.ask(sample_image, "what?", max_new_tokens=3, stop="green red").finish_reason == "length"


def test_kv_cache_and_request_statistics(runtime_models, sample_image):
    model = runtime_models["llama-gqa"]
    full = model.ask(sample_image, "what?", exit="never", max_new_tokens=3, ignore_eos=True)
    early = model.ask(sample_image, "what?", exit="layer:1", max_new_tokens=3, ignore_eos=True)
    dims = model.manifest.dims
    row = 2 * dims.num_kv_heads * dims.head_dim * 4  # one token's keys and values in one layer, fp32
    n, v = full.prompt_tokens, full.visual_tokens
    assert full.kv_cache_bytes == dims.num_layers * (n + 2) * row  # the last token is never fed back
    assert early.kv_cache_bytes == full.kv_cache_bytes - (dims.num_layers - 2) * v * row
    assert full.host_bytes["per_decode_token"] == full.host_bytes["decode"] / 2


def test_stop_at_eos_still_works_with_a_deprecation_warning(runtime_models, sample_image):
    model = runtime_models["llama-gqa"]
    with pytest.warns(DeprecationWarning, match="ignore_eos"):
        answer = model.ask(sample_image, "what?", max_new_tokens=3, stop_at_eos=False)
    assert len(answer.token_ids) == 3
    with pytest.warns(DeprecationWarning, match="Answer.text"):
        assert answer.answer == answer.text


def test_one_model_serves_interleaved_requests_each_with_its_own_policy(
    runtime_models, loaded_models, prompt_factory, sample_image
):
    model, loaded = runtime_models["llama-gqa"], loaded_models["llama-gqa"]
    prompt = prompt_factory(loaded, "what?")
    reference = DyVTEReference(loaded.adapter)
    policies = {"never": NeverExit(), "layer:1": FixedLayerExit(1), "layer:2": FixedLayerExit(2)}
    expected = {
        spec: reference.generate(prompt.input_ids, prompt.pixel_values, policy, max_new_tokens=4)
        for spec, policy in policies.items()
    }
    for spec in ["never", "layer:1", "layer:2", "layer:1", "never", "layer:2"]:
        answer = model.ask(sample_image, "what?", exit=spec, max_new_tokens=4)
        assert answer.exit_layer == expected[spec].exit_layer == (None if spec == "never" else int(spec[6:]))
        assert answer.token_ids == expected[spec].tokens, spec
        assert answer.policy == spec
        full, actual = answer.prefill_macs["full"], answer.prefill_macs["actual"]
        assert (actual == full) if spec == "never" else (actual < full)


def test_user_mistakes_are_project_errors(runtime_models, sample_image, tmp_path):
    model = runtime_models["llama-gqa"]
    with pytest.raises(InputError, match="empty"):
        model.ask(sample_image, "   ")
    with pytest.raises(InputError, match="does not exist"):
        model.ask(tmp_path / "missing.png", "what?")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(InputError, match="cannot read image"):
        model.ask(tmp_path / "text.jpg", "what?")
    with pytest.raises(InputError, match="context of 512"):
        model.ask(sample_image, "what " * 600)
    with pytest.raises(PolicyError, match="no routers"):
        model.ask(sample_image, "what?", exit="router")
    with pytest.raises(PolicyError, match=r"exit layers are 1\.\.2"):
        model.ask(sample_image, "what?", exit="layer:0")
    with pytest.raises(DyvteError, match="does not exist"):
        DyvteModel.load(tmp_path / "no-bundle")


def test_seeded_sampling_is_reproducible_and_degenerates_to_greedy():
    logits = np.random.default_rng(0).normal(size=(1, 50))
    draws = [Sampler(SamplingConfig(temperature=1.0, seed=7))(logits) for _ in range(3)]
    assert len(set(draws)) == 1
    greedy = int(logits.argmax())
    assert Sampler(SamplingConfig(temperature=0.0))(logits) == greedy
    assert Sampler(SamplingConfig(temperature=5.0, top_k=1, seed=1))(logits) == greedy
    assert Sampler(SamplingConfig(temperature=5.0, top_p=1e-9, seed=1))(logits) == greedy
    sampler = Sampler(SamplingConfig(temperature=1.0, top_k=3, seed=3))
    assert {sampler(logits) for _ in range(200)} <= set(np.argsort(-logits[0])[:3].tolist())
    assert Sampler(SamplingConfig(temperature=1.0, top_p=0.0, seed=1))(logits) == greedy  # OpenAI's reading
    for bad in ({"top_p": 1.5}, {"top_p": -0.1}, {"temperature": -1.0}, {"temperature": float("inf")}):
        with pytest.raises(InputError):
            SamplingConfig(**bad)
    with pytest.raises(InputError, match="seed must be a non-negative integer, got -1"):
        SamplingConfig(temperature=1.0, seed=-1)  # numpy's generator raised its own ValueError


def test_sampling_never_sees_nan_whatever_the_temperature_or_the_logits():
    """A temperature of 1e-320 once turned every score into inf - inf = NaN and the sampler raised
    inside the server's engine thread; NaN logits are treated as impossible tokens."""
    logits = np.random.default_rng(1).normal(size=(1, 50))
    greedy = int(logits.argmax())
    for temperature in (1e-320, 5e-324, 1e-30, 1e-3):
        assert Sampler(SamplingConfig(temperature=temperature, seed=0))(logits) == greedy
    broken = logits.copy()
    broken[0, ::2] = np.nan
    assert Sampler(SamplingConfig(temperature=1.0, seed=0))(broken) % 2 == 1  # never a NaN position
    assert Sampler(SamplingConfig(temperature=1.0, seed=0))(np.full((1, 8), np.nan)) in range(8)
    huge = np.array([[1e308, -1e308, 1e308]])
    assert Sampler(SamplingConfig(temperature=0.5, seed=0))(huge) in (0, 2)


def test_running_a_bundle_never_imports_torch_or_transformers(bundles, sample_image):
    code = (
        "import sys; from dyvte_rt.api.model import DyvteModel; "
        f"m = DyvteModel.load({str(bundles['qwen2'])!r}); "
        f"a = m.ask({str(sample_image)!r}, 'what?', max_new_tokens=3); assert a.token_ids; "
        "bad = [x for x in ('torch', 'transformers') if x in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dyvte_rt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_cli_json_schema(bundles, sample_image):
    done = _cli(
        "infer",
        sample_image,
        "what color?",
        "--bundle",
        bundles["llama-gqa"],
        "--exit",
        "layer:1",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {
        "answer",
        "token_ids",
        "exit_layer",
        "prompt_tokens",
        "visual_tokens",
        "timings_ms",
        "prefill_macs",
    } <= set(data)
    assert data["exit_layer"] == 1 and data["visual_tokens"] == 16 and len(data["token_ids"]) <= 5
    timings = data["timings_ms"]
    assert set(timings) == {"preprocess", "vision", "prefill", "switch", "ttft", "decode", "latency"}
    assert 0 <= timings["switch"] <= timings["prefill"]
    assert timings["ttft"] >= timings["preprocess"] + timings["vision"] + timings["prefill"]
    assert data["prefill_macs"]["actual"] < data["prefill_macs"]["full"]


def test_cli_plain_output_is_the_streamed_answer(bundles, sample_image):
    args = ["infer", sample_image, "what color?", "--bundle", bundles["llama-gqa"], "--max-new-tokens", "5"]
    plain, as_json = _cli(*args), _cli(*args, "--json")
    assert plain.returncode == 0 == as_json.returncode and not plain.stderr.strip()
    answer = json.loads(as_json.stdout)["answer"]
    assert answer and plain.stdout == answer + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["infer", "{img}", "what?", "--bundle", "{bundle}", "--exit", "sometimes"], "unknown exit policy"),
        (["infer", "{img}", "  ", "--bundle", "{bundle}"], "question is empty"),
        (["infer", "/no/such.png", "what?", "--bundle", "{bundle}"], "does not exist"),
        (["infer", "{img}", "what?", "--bundle", "/no/bundle"], "does not exist"),
        (["infer", "{img}", "what?"], "no bundle given"),
        (["infer", "{img}", "what?", "--bundle", "{bundle}", "--device", "cuda"], "--dtype fp16"),
        (["infer", "{img}", "what?", "--bundle", "{bundle}", "--top-p", "1.5"], "top-p"),
        (["inspect", "/no/bundle"], "does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(bundles, sample_image, args, message, tmp_path):
    import os

    # no default bundle: neither $DYVTE_RT_BUNDLE nor a demo bundle the quickstart may have exported
    env = {k: v for k, v in os.environ.items() if k != "DYVTE_RT_BUNDLE"} | {"XDG_CACHE_HOME": str(tmp_path)}
    args = [a.format(img=sample_image, bundle=bundles["llama-gqa"]) for a in args]
    done = _cli(*args, env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_cli_inspect_summarises_the_bundle(bundles):
    done = _cli("inspect", bundles["qwen2"])
    assert done.returncode == 0
    assert (
        "exit layers 1, 2" in done.stdout
        and "segment_00[0-1]" in done.stdout
        and "sha256 verified" in done.stdout
    )


def test_cli_reader_leaving_early_is_quiet(bundles):
    # `dyvte-rt inspect B | head -1`: the closed pipe ends the command without a traceback
    child = subprocess.Popen(
        [sys.executable, "-m", "dyvte_rt.cli", "inspect", str(bundles["qwen2"])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child.stdout.close()
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141 and stderr == "", stderr


@pytest.mark.parametrize("spin", [False, True])
def test_worker_spinning_follows_the_option(bundles, spin):
    # spinning idle workers halved decode speed on a 2-core machine, so it is off unless asked for
    with DyvteModel.load(bundles["llama-gqa"], spin=spin, verify_hashes=False) as model:
        for session in model.bundle.sessions.values():
            options = session._session.get_session_options()
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == str(int(spin))


@pytest.mark.parametrize(("asked", "used"), [(0, 1), (2, 2)])
def test_small_models_default_to_one_thread(bundles, asked, used):
    # measured on the demo: for a 128-wide model a second thread slows every operator down
    with DyvteModel.load(bundles["llama-gqa"], threads=asked, verify_hashes=False) as model:
        for session in model.bundle.sessions.values():
            assert session._session.get_session_options().intra_op_num_threads == used
