"""The peers harness on a small checkpoint: Hugging Face and ONNX Runtime GenAI beside dyvte-rt.

llama.cpp is left out here: llama-cpp-python compiles llama.cpp from source (minutes on 2 cores);
what the harness hands llama.cpp's image-encoder converter is checked without it.
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


PROBE = """
import sys
import numpy as np
import torch
from transformers import CLIPVisionModel  # as llama.cpp's converter imports it

vit, projector_file, out = sys.argv[1:]
model = CLIPVisionModel.from_pretrained(vit)
names = list(model.state_dict())
layers = len(model.vision_model.encoder.layers)
model.vision_model.encoder.layers = model.vision_model.encoder.layers[:layers - 1]  # the converter's cut
projector = torch.load(projector_file)  # weights_only, as torch loads by default
pixels = torch.from_numpy(np.load(out + ".pixels.npy"))
with torch.no_grad():
    hidden = model.vision_model(pixels).last_hidden_state[:, 1:]  # what the mmproj keeps: no post-norm
    hidden = torch.nn.functional.linear(hidden, projector["multi_modal_projector.linear_1.weight"],
                                        projector["multi_modal_projector.linear_1.bias"])
    hidden = torch.nn.functional.gelu(hidden)
    hidden = torch.nn.functional.linear(hidden, projector["multi_modal_projector.linear_2.weight"],
                                        projector["multi_modal_projector.linear_2.bias"])
np.save(out, hidden.numpy())
print(all(n.startswith("vision_model.") for n in names), layers)
"""


def test_llama_cpp_converter_inputs_carry_the_checkpoints_image_features(tmp_path):
    """What the harness hands llama.cpp's LLaVA-1.5 converter (a CLIPVisionModel directory and a
    llava.projector file), read the way that converter reads them under transformers 5 through
    mmproj_convert.py, gives the checkpoint's own image features (the converter itself needs
    llama.cpp's sources, so it runs in the benchmark, not here)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peer_models import converter_inputs

    from export.families.llava import TINY_BACKBONES, build_random_llava, llama_decoder
    from export.loading import load_checkpoint

    checkpoint = build_random_llava(llama_decoder, TINY_BACKBONES["llama-mha"].spec, tmp_path / "ckpt")
    vit, projector = converter_inputs(checkpoint, tmp_path / "inputs")
    loaded = load_checkpoint(checkpoint)
    size = loaded.model.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.adapter.image_features(pixels)[0].numpy()
    out = tmp_path / "features.npy"
    np.save(str(out) + ".pixels.npy", pixels.numpy())
    (tmp_path / "probe.py").write_text(PROBE)
    command = [sys.executable, str(ROOT / "benchmarks/mmproj_convert.py"), str(tmp_path / "probe.py")]
    done = subprocess.run(
        [*command, str(vit), str(projector), str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names_nested, layers = done.stdout.split()
    assert names_nested == "True"  # the names the converter maps to llama.cpp's (v.blk.N...)
    assert int(layers) == loaded.model.config.vision_config.num_hidden_layers
    assert np.abs(np.load(out)[0] - expected).max() < 1e-5


def test_feature_agreement_sees_a_shifted_token_layout_that_the_plain_cosine_hides():
    """Random-weight towers give nearly one vector for every token: a layout shifted by one token
    (llama.cpp's CLS-last defect) keeps the plain cosine near 1, the centred one falls."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peers import feature_agreement

    rng = np.random.default_rng(0)
    ours = rng.normal(size=64) + 0.05 * rng.normal(size=(16, 64))  # a shared vector + small per-token parts
    same = feature_agreement(ours, ours + 1e-4 * rng.normal(size=ours.shape))
    shifted = feature_agreement(ours, np.roll(ours, 1, axis=0))
    assert same["cosine_min"] > 0.999 and same["centred_cosine_min"] > 0.99
    assert shifted["cosine_median"] > 0.99
    assert shifted["centred_cosine_median"] < 0.5


def test_qwen2vl_gguf_holds_the_checkpoint_s_decoder_as_llama_cpp_s_converter_lays_it_out(tmp_path):
    """The Qwen2.5-VL peer's language model (`peer_models.qwen2vl_gguf_model`): llama.cpp's `qwen2vl`
    architecture, every decoder tensor with its attention biases unpermuted, the rotary sections
    padded to four, and the special tokens libmtmd writes around an image present by name."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peer_models import is_qwen_vl, qwen2vl_gguf_model

    from tests.conftest import tiny_checkpoint

    checkpoint = tiny_checkpoint("qwen2.5-vl", "tiny", 0)
    assert is_qwen_vl(checkpoint)
    path = qwen2vl_gguf_model(checkpoint, "F32", tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    text = config["text_config"]
    reader = gguf.GGUFReader(str(path))

    def field(name):
        value = reader.fields[name]
        return [value.parts[i].tolist() for i in value.data]

    assert bytes(field("general.architecture")[0]).decode() == "qwen2vl"
    sections = text["rope_parameters"]["mrope_section"]
    assert [v[0] for v in field("qwen2vl.rope.dimension_sections")] == [*sections, 0]
    assert field("qwen2vl.block_count")[0][0] == text["num_hidden_layers"]
    tokens = [bytes(t).decode() for t in field("tokenizer.ggml.tokens")]
    assert tokens[config["vision_start_token_id"]] == "<|vision_start|>"
    assert tokens[config["vision_end_token_id"]] == "<|vision_end|>"
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 12 * text["num_hidden_layers"]
    with safe_open(str(next(checkpoint.glob("*.safetensors"))), framework="numpy") as handle:
        for source, target in (
            ("model.layers.0.self_attn.q_proj.bias", "blk.0.attn_q.bias"),
            ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight"),
            ("lm_head.weight", "output.weight"),
        ):
            expected = handle.get_tensor(source)
            got = np.asarray(tensors[target].data).reshape(expected.shape)
            assert np.array_equal(got, expected), target


def test_a_qwen_checkpoint_is_refused_for_peers_the_harness_cannot_build_from_it():
    from tests.conftest import tiny_checkpoint

    checkpoint = tiny_checkpoint("qwen2.5-vl", "tiny", 0)
    command = [sys.executable, str(ROOT / "benchmarks/peers.py"), "--model", str(checkpoint),
               "--bundle", str(checkpoint), "--peers", "hf,llama.cpp-image"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "runs llama.cpp and llama.cpp-image" in done.stderr
