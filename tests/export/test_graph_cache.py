"""`--graph-cache`: the variants of one checkpoint re-export only the graphs that differ, and a
cached graph is the graph an export would make, with its checks."""

import shutil

import pytest
from safetensors.numpy import load_file, save_file

from dyvte_rt.bundle.manifest import load_manifest
from export.build import BuildConfig, build_bundle


def _build(checkpoint, out, cache, **options):
    calls = []
    import export.onnx_export as onnx_export

    real = onnx_export.export_plan

    def counting(plan, *args, **kwargs):
        calls.append(plan.name)
        return real(plan, *args, **kwargs)

    onnx_export.export_plan = counting
    try:
        build_bundle(BuildConfig(model=str(checkpoint), out=out, quiet=True, graph_cache=cache, **options))
    finally:
        onnx_export.export_plan = real
    return calls


def test_variants_export_only_the_graphs_that_differ(tiny_checkpoints, tmp_path, monkeypatch):
    import export.quantize as quantize

    checkpoint, cache = tiny_checkpoints["llama-mha"], tmp_path / "cache"
    first = _build(checkpoint, tmp_path / "a", cache, exit_layers="1")
    assert first == [
        "vision",
        "embed",
        "segment_00",
        "segment_01",
        "exit_gather",
        "fastv_rank",
        "dart_rank",
        "head",
    ]
    assert _build(checkpoint, tmp_path / "again", cache, exit_layers="1") == []  # all from the cache
    a, again = load_manifest(tmp_path / "a"), load_manifest(tmp_path / "again")
    assert a.files == again.files  # byte for byte the same bundle
    concat = _build(checkpoint, tmp_path / "concat", cache, exit_layers="1", kv="concat")
    assert concat == ["segment_00", "segment_01"]  # only the KV flavour's graphs
    assert _build(checkpoint, tmp_path / "int4", cache, exit_layers="1", quantize="int4") == []  # from floats
    assert load_manifest(tmp_path / "int4").quantization.graphs.keys() == {
        "embed",
        "segment_00",
        "segment_01",
        "head",
    }
    monkeypatch.setitem(quantize.MIN_COSINE, 4, 1.0)  # a cached quantised graph meets today's bar
    with pytest.raises(quantize.QualityError):
        _build(checkpoint, tmp_path / "strict", cache, exit_layers="1", quantize="int4")
    # other weights are other graphs: one changed weight in layer 3 re-exports only its segment
    changed = shutil.copytree(checkpoint, tmp_path / "changed")
    weights = load_file(changed / "model.safetensors")
    weights["language_model.model.layers.3.mlp.down_proj.weight"] *= 1.5
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    assert _build(changed, tmp_path / "changed-bundle", cache, exit_layers="1") == ["segment_01"]
