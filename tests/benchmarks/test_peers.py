"""The peers harness on a small checkpoint: Hugging Face and ONNX Runtime GenAI beside dyvte-rt.

llama.cpp is left out here: llama-cpp-python compiles llama.cpp from source (minutes on 2 cores).
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A checkpoint too large for the CPU caches (about 70 MB of decoder weights), so that the
    harness's bandwidth bound means something, with its bundle."""
    from export.families.llava import TINY_BACKBONES, build_random_llava, llama_decoder
    from tests.artefacts import export, shared

    spec = dataclasses.replace(TINY_BACKBONES["llama-gqa"].spec, hidden=512, heads=8, kv_heads=4, mlp=2048)
    checkpoint = shared("checkpoint-peers-512", lambda out: build_random_llava(llama_decoder, spec, out))
    bundle = shared("bundle-peers-512", lambda out: export(checkpoint, out, exit_layers="1"))
    return checkpoint, bundle, tmp_path_factory.mktemp("peers") / "cache"


def test_harness_reports_every_system_against_the_machines_limits(small_model):
    checkpoint, bundle, cache = small_model
    command = [
        sys.executable, str(ROOT / "benchmarks/peers.py"),
        "--model", str(checkpoint), "--bundle", str(bundle),
        "--peers", "hf,ort-genai", "--exit", "never,layer:1", "--runs", "1", "--max-new-tokens", "4",
        "--spinning", "off", "--cache", str(cache), "--json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    systems = report["systems"]
    expected = {"dyvte-rt fp32 never", "dyvte-rt fp32 layer:1", "hf", "ort-genai fp32"}
    assert set(systems) == expected
    limits = report["limits"]
    assert limits["memory_gb_per_s"] > 0.5 and limits["matmul_gflop_per_s"] > 1
    for name, system in systems.items():
        for key in ("prefill_ms", "decode_tokens_per_s", "ttft_ms", "peak_rss_mb", "model_bytes"):
            assert system[key] > 0, (name, key)
        assert system["ttft_ms"] >= system["prefill_ms"], name
        # The bounds come from this machine's limits measured in the same run, which noise and the
        # CPU caches blur (a 70 MB model partly fits a large L3): a system may come close to or a
        # little past its bound, never far past it unless the bytes or multiply-adds are miscounted.
        fraction = system["decode_tokens_per_s"] / system["decode_bound_tokens_per_s"]
        assert system["decode_fraction_of_bound"] == pytest.approx(fraction), name
        assert 0 < fraction < 2, name
        assert 0 < system["prefill_bound_ms"] < 2 * system["prefill_ms"], name
    assert (
        systems["ort-genai fp32"]["vision_ms"] is None
        and "no image path" in systems["ort-genai fp32"]["notes"]
    )
    assert systems["dyvte-rt fp32 never"]["vision_ms"] > 0
    assert (
        systems["dyvte-rt fp32 layer:1"]["prefill_bound_ms"]
        < systems["dyvte-rt fp32 never"]["prefill_bound_ms"]
    )
    settings = report["settings"]
    assert settings["threads"] == 2 and settings["greedy"] and settings["eos_ignored"]
    assert settings["prompt_tokens"] == 29
