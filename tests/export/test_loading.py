"""`--model` resolution: aliases, local directories, the local HF cache; never a download."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from dyvte_rt.errors import ModelNotFoundError, UnsupportedModelError
from export.families import ALIASES
from export.loading import load_checkpoint, resolve_checkpoint


def _offline_env(hf_home) -> dict[str, str]:
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    return env


def test_llava_7b_without_weights_is_one_line_and_nonzero_exit(tmp_path, sample_image):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "export.reference",
            "--model",
            "llava-7b",
            "--image",
            str(sample_image),
            "--question",
            "what is this?",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_offline_env(tmp_path / "hf"),
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert (
        lines[0].startswith("error: ")
        and "llava-hf/llava-1.5-7b-hf" in lines[0]
        and "hf download" in lines[0]
    )
    assert "Traceback" not in done.stderr


def test_aliases_name_the_llava_hf_repos():
    assert ALIASES["llava-7b"] == "llava-hf/llava-1.5-7b-hf"
    assert ALIASES["llava-13b"] == "llava-hf/llava-1.5-13b-hf"
    assert ALIASES["llava-next-7b"] == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert ALIASES["llava-next-mistral-7b"] == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert ALIASES["qwen2-vl-2b"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert ALIASES["qwen2.5-vl-3b"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert ALIASES["qwen2.5-vl-7b"] == "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.mark.parametrize("alias", ["llava-next-7b", "llava-next-mistral-7b", "qwen2-vl-2b", "qwen2.5-vl-7b"])
def test_llava_next_aliases_without_weights_are_one_line(alias, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_checkpoint(alias)
    message = caught.value.one_line()
    assert ALIASES[alias] in message and "hf download" in message and "\n" not in message


def _fake_hub_cache(hf_home, repo_id: str, checkpoint) -> None:
    """The on-disk layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/}."""
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(checkpoint, repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)


def test_repo_id_in_the_local_cache_resolves_and_loads(tmp_path, tiny_checkpoints, monkeypatch):
    import huggingface_hub.constants as hub_constants

    hf_home = tmp_path / "hf"
    _fake_hub_cache(hf_home, "example/tiny-llava", tiny_checkpoints["llama-gqa"])
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    path, repo_id = resolve_checkpoint("example/tiny-llava")
    assert repo_id == "example/tiny-llava" and (path / "config.json").is_file()
    loaded = load_checkpoint("example/tiny-llava")
    assert loaded.adapter.family == "llava" and loaded.repo_id == "example/tiny-llava"


def test_cached_repo_without_weights_names_the_download(tmp_path, tiny_checkpoints, monkeypatch):
    import huggingface_hub.constants as hub_constants

    hf_home = tmp_path / "hf"
    _fake_hub_cache(hf_home, "example/partial", tiny_checkpoints["llama-gqa"])
    for weights in (hf_home / "hub").rglob("*.safetensors"):
        weights.unlink()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    with pytest.raises(ModelNotFoundError, match="hf download example/partial"):
        resolve_checkpoint("example/partial")


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_checkpoints):
    checkpoint = shutil.copytree(tiny_checkpoints["llama-mha"], tmp_path / "pickled")
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="pickle"):
        load_checkpoint(str(checkpoint))


def test_unregistered_architecture_is_refused(tmp_path, tiny_checkpoints):
    checkpoint = shutil.copytree(tiny_checkpoints["llama-mha"], tmp_path / "other")
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["MysteryForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        load_checkpoint(str(checkpoint))


@pytest.mark.parametrize("spec", ["not a model", "../", "/definitely/missing/dir/x"])
def test_garbage_model_spec_is_a_clear_error(spec, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises((ModelNotFoundError, UnsupportedModelError)):
        load_checkpoint(spec)


def test_sliding_window_decoders_are_refused(tmp_path, tiny_checkpoints):
    checkpoint = shutil.copytree(tiny_checkpoints["qwen2"], tmp_path / "sliding")
    config = json.loads((checkpoint / "config.json").read_text())
    layers = config["text_config"]["num_hidden_layers"]
    config["text_config"].update(
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,
        layer_types=["sliding_attention"] * layers,
    )
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="sliding"):
        load_checkpoint(str(checkpoint))
