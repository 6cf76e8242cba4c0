"""Exporting graph by graph, each graph's weights read from disk when it needs them."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dyvte_rt.bundle.manifest import load_manifest
from dyvte_rt.errors import InputError, UnsupportedModelError
from export.build import BuildConfig, build_bundle


def test_streamed_export_writes_the_same_graphs_as_loading_everything(bundles, tiny_checkpoints, tmp_path):
    streamed = bundles["qwen2"]  # the session's bundles are exported the streamed way (the default)
    loaded_whole = tmp_path / "whole"
    build_bundle(
        BuildConfig(model=str(tiny_checkpoints["qwen2"]), out=loaded_whole, stream=False, quiet=True)
    )
    files_streamed = load_manifest(streamed).files
    files_whole = load_manifest(loaded_whole).files
    assert files_streamed.keys() == files_whole.keys()
    assert {n: f.sha256 for n, f in files_streamed.items()} == {n: f.sha256 for n, f in files_whole.items()}


def test_a_memory_budget_too_small_for_the_largest_graph_is_refused(tiny_checkpoints, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(
        InputError, match=r"exporting segment_00 .* more than the 0\.5 GiB of --max-memory-gb"
    ):
        build_bundle(
            BuildConfig(model=str(tiny_checkpoints["llama-gqa"]), out=out, max_memory_gb=0.5, quiet=True)
        )
    assert not out.exists()


def _checkpoint_with(tiny_checkpoints, tmp_path, change):
    copy = shutil.copytree(tiny_checkpoints["llama-gqa"], tmp_path / "checkpoint")
    tensors = load_file(str(copy / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


KEY = "language_model.model.layers.2.mlp.up_proj.weight"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop(KEY), "has no tensor for model.language_model.layers.2.mlp.up_proj.weight"),
        (lambda t: t.update({KEY: torch.zeros(3, 3)}), f"checkpoint tensor {KEY} has shape [3, 3]"),
    ],
    ids=["missing", "mis-shaped"],
)
def test_a_missing_or_misshaped_tensor_is_one_line_naming_it(tiny_checkpoints, tmp_path, change, message):
    checkpoint = _checkpoint_with(tiny_checkpoints, tmp_path, change)
    out = tmp_path / "bundle"
    with pytest.raises(UnsupportedModelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_bundle(BuildConfig(model=str(checkpoint), out=out, quiet=True))
    done = subprocess.run(
        [sys.executable, "-m", "export.build", "--model", str(checkpoint), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_a_streamed_random_checkpoint_is_written_in_shards_and_exports(tmp_path, monkeypatch):
    import dataclasses

    import export.families.llava as llava
    from export.families.llava import TINY_BACKBONES, llama_decoder, write_random_llava_streamed

    monkeypatch.setattr(llava, "SHARD_BYTES", 100_000)  # a 7B model's 2 GB shards, scaled to this one
    spec = dataclasses.replace(TINY_BACKBONES["llama-gqa"].spec, layers=3)
    checkpoint = write_random_llava_streamed(
        llama_decoder, spec, tmp_path / "checkpoint", dtype=torch.float16
    )
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == shards
    sizes = [(checkpoint / s).stat().st_size for s in shards]
    assert max(sizes[:-1]) < 100_000 + 70_000  # each shard closes once it reaches the size
    assert any(
        key.startswith("language_model.model.layers.") for key in index["weight_map"]
    )  # the saved layout
    build_bundle(BuildConfig(model=str(checkpoint), out=tmp_path / "bundle", quiet=True))
    assert len(load_manifest(tmp_path / "bundle").segments) == 2  # exits 1..1: layers 0-1 and 2
