"""`python -m export.build`: graphs, manifest, atomic output and user errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from dyvte_rt.bundle.manifest import MANIFEST_FILE, BundleError, Manifest, load_manifest
from dyvte_rt.errors import InputError
from export.build import BuildConfig, build_bundle, parse_exit_layers
from export.graph_plans import plan_segments
from export.onnx_export import VerificationError
from export.summary import GraphRow, format_summary


def test_bundle_holds_every_graph_and_file_with_hashes(bundles, concat_bundles):
    bundle = bundles["llama-gqa"]
    manifest = load_manifest(bundle)
    names = sorted(manifest.graphs)
    assert names == [
        "dart_rank",
        "embed",
        "exit_gather",
        "fastv_rank",
        "head",
        "segment_00",
        "segment_01",
        "segment_02",
        "vision",
    ]
    assert [(s.first_layer, s.last_layer, s.router) for s in manifest.segments] == [
        (0, 1, None),
        (2, 2, None),
        (3, 3, None),
    ]
    assert set(manifest.files) == {f"{n}.onnx" for n in names} | {"tokenizer.json"}
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*manifest.files, MANIFEST_FILE])
    assert manifest.kv_flavour == "inplace"
    seg = manifest.graphs["segment_00"]
    assert [t.name for t in seg.inputs] == [
        "hidden_states",
        "position_ids",
        "total_lengths",
        "past.0.key",
        "past.0.value",
        "past.1.key",
        "past.1.value",
        "last_index",  # FastV's scores of the segment's last layer come out of it too
    ]
    assert seg.outputs[-1].name == "prune_scores" and seg.outputs[-1].shape == ("batch", "seq")
    assert seg.inputs[3].shape == ("batch", 2, "capacity", 16)  # one preallocated buffer per layer
    assert seg.outputs[1].shape == ("batch", 2, "capacity", 16)  # ... written in place
    concat = load_manifest(concat_bundles["llama-gqa"])
    assert concat.kv_flavour == "concat"
    past = concat.graphs["segment_00"].inputs[2]
    assert past.name == "past.0.key" and past.shape == ("batch", 2, "past", 16)  # dynamic past length
    assert manifest.vision.visual_tokens == 16 and manifest.tokens.image == 4
    assert "ASSISTANT:" in manifest.chat_template


def test_inplace_segments_use_group_query_attention_and_concat_segments_standard_onnx(
    bundles, concat_bundles
):
    import onnx

    def domains(path):
        model = onnx.load(str(path), load_external_data=False)
        return {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}

    inplace = domains(bundles["qwen2"] / "segment_00.onnx")
    assert ("com.microsoft", "GroupQueryAttention") in inplace
    concat = domains(concat_bundles["qwen2"] / "segment_00.onnx")
    assert {domain for domain, _ in concat} == {"ai.onnx"}


def test_routers_are_graphs_of_their_own(router_bundle):
    manifest = load_manifest(router_bundle[0])
    assert [s.router for s in manifest.segments] == ["router_01", "router_02", None]
    router = manifest.graphs["router_01"]
    assert [t.name for t in router.inputs] == ["hidden_states_out", "router_pool", "last_index", "keep_index"]
    assert [t.name for t in router.outputs] == ["router_logits", "hidden_states"]  # + the exit gather
    segment_outputs = [t.name for t in manifest.graphs["segment_00"].outputs]
    assert "router_logits" not in segment_outputs  # decoding runs segments without any router work


def test_each_segment_holds_only_its_own_layers_weights(bundles):
    import onnx

    sizes = {}
    for path in bundles["llama-gqa"].glob("segment_*.onnx"):
        model = onnx.load(str(path))
        sizes[path.stem] = sum(int(__import__("numpy").prod(t.dims)) for t in model.graph.initializer)
    per_layer = sizes["segment_01"]
    assert sizes["segment_00"] == pytest.approx(2 * per_layer, rel=0.01)  # layers 0-1 vs layer 2
    assert sizes["segment_02"] == pytest.approx(per_layer, rel=0.01)


def test_manifest_round_trips_and_loading_is_strict(bundles):
    text = (bundles["qwen2"] / MANIFEST_FILE).read_text()
    manifest = Manifest.from_json(text)
    assert Manifest.from_json(manifest.to_json()) == manifest
    data = json.loads(text)
    cases = {
        "manifest.dims.hidden": lambda d: d["dims"].update(hidden="64"),
        "manifest.exit.threshold": lambda d: d["exit"].pop("threshold"),
        "unknown keys ['surprise']": lambda d: d["tokens"].update(surprise=1),
        "manifest.segments[0].router": lambda d: d["segments"][0].update(router=3),
    }
    for expected, mutate in cases.items():
        broken = json.loads(json.dumps(data))
        mutate(broken)
        with pytest.raises(BundleError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            Manifest.from_json(json.dumps(broken))


def test_newer_schema_version_is_refused(bundles):
    data = json.loads((bundles["qwen2"] / MANIFEST_FILE).read_text())
    data["schema_version"] = 99
    with pytest.raises(BundleError, match="upgrade dyvte-rt"):
        Manifest.from_json(json.dumps(data))


def test_tampered_file_fails_its_hash_check(bundles, tmp_path):
    copy = shutil.copytree(bundles["llama-gqa"], tmp_path / "bundle")
    target = copy / "segment_01.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"segment_01\.onnx does not match its sha256"):
        load_manifest(copy)
    load_manifest(copy, verify_hashes=False)  # same size: only the hash can tell
    (copy / "head.onnx").write_bytes((copy / "head.onnx").read_bytes()[:100])
    with pytest.raises(BundleError, match=r"head\.onnx has 100 bytes"):
        load_manifest(copy, verify_hashes=False)
    (copy / "head.onnx").unlink()
    with pytest.raises(BundleError, match=r"head\.onnx is missing"):
        load_manifest(copy, verify_hashes=False)


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_a_failed_export_leaves_no_output(tiny_checkpoints, tmp_path, monkeypatch):
    import export.onnx_export as onnx_export

    real = onnx_export.verify_plan
    calls = []

    def failing(plan, path, tolerance=None, release_weights=None):
        calls.append(plan.name)
        if plan.name == "segment_00":
            raise VerificationError("segment_00: simulated mismatch")
        return real(plan, path, tolerance, release_weights)

    monkeypatch.setattr(onnx_export, "verify_plan", failing)
    out = tmp_path / "bundle"
    with pytest.raises(VerificationError):
        build_bundle(BuildConfig(model=str(tiny_checkpoints["llama-mha"]), out=out, quiet=True))
    assert calls == ["vision", "embed", "segment_00"]
    assert not out.exists() and not _leftovers(tmp_path, "bundle")


def test_an_interrupted_overwrite_keeps_the_old_bundle(bundles, tiny_checkpoints, tmp_path, monkeypatch):
    import export.onnx_export as onnx_export

    out = shutil.copytree(bundles["llama-gqa"], tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupt(plan, path, tolerance=None, release_weights=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "verify_plan", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_bundle(
            BuildConfig(model=str(tiny_checkpoints["llama-mha"]), out=out, overwrite=True, quiet=True)
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not _leftovers(tmp_path, "bundle")


def test_a_full_disk_is_reported_as_such_and_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    import errno

    import export.onnx_export as onnx_export

    def disk_full(plan, path, tolerance=None, release_weights=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnx_export, "verify_plan", disk_full)
    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match="no space left on the device") as failed:
        build_bundle(BuildConfig(model=str(tiny_checkpoints["llama-mha"]), out=out, quiet=True))
    assert "free some disk space" in failed.value.one_line()
    assert not out.exists() and not _leftovers(tmp_path, "bundle")


def test_routers_default_to_the_checkpoints_own(tmp_path):
    from export.build import routers_path
    from export.loading import DEMO_CHECKPOINT

    shipped = DEMO_CHECKPOINT / "routers.safetensors"
    assert routers_path(BuildConfig(model="demo", out=tmp_path), DEMO_CHECKPOINT) == shipped
    assert routers_path(BuildConfig(model="demo", out=tmp_path, no_routers=True), DEMO_CHECKPOINT) is None
    mine = tmp_path / "mine.safetensors"
    assert routers_path(BuildConfig(model="demo", out=tmp_path, routers=mine), DEMO_CHECKPOINT) == mine
    assert routers_path(BuildConfig(model="x", out=tmp_path), tmp_path) is None  # ships none


def test_existing_output_needs_overwrite(bundles, tiny_checkpoints):
    with pytest.raises(InputError, match="--overwrite"):
        build_bundle(BuildConfig(model=str(tiny_checkpoints["qwen2"]), out=bundles["qwen2"], quiet=True))


def test_routers_missing_a_candidate_layer_are_refused(tiny_checkpoints, tmp_path):
    from export.reference import RouterBank

    RouterBank(64, layers=[2], width=4).save(tmp_path / "routers.safetensors")  # default candidates: 1, 2
    with pytest.raises(InputError, match=r"no router for exit layers \[1\]"):
        build_bundle(
            BuildConfig(
                model=str(tiny_checkpoints["llama-gqa"]),
                out=tmp_path / "b",
                routers=tmp_path / "routers.safetensors",
                quiet=True,
            )
        )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(None, (1, 2, 3, 4, 5, 6)), ("2-4", (2, 3, 4)), ("2..4,6", (2, 3, 4, 6)), ("5, 1", (1, 5)), ("0", (0,))],
)
def test_parse_exit_layers(spec, expected):
    assert parse_exit_layers(spec, 8) == expected


@pytest.mark.parametrize("spec", ["7", "4-2", "x", "1-", ""])
def test_bad_exit_layers_are_input_errors(spec):
    with pytest.raises(InputError):
        parse_exit_layers(spec, 8)


def test_plan_segments_end_at_candidates_at_family_boundaries_and_at_the_last_layer():
    assert plan_segments((1, 2), 4) == [(0, 1), (2, 2), (3, 3)]
    assert plan_segments((), 4) == [(0, 3)]
    assert plan_segments((0, 5), 8) == [(0, 0), (1, 5), (6, 7)]
    # DeepStack: segments also end after each layer a level joins (Qwen3-VL's 0..n-1)
    assert plan_segments((1, 2), 4, (0, 1)) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert plan_segments((5,), 8, (0, 1, 2)) == [(0, 0), (1, 1), (2, 2), (3, 5), (6, 7)]


def test_summary_table_lists_every_graph():
    text = format_summary([GraphRow("vision", 1000, 4096, 1.5, 1e-7), GraphRow("head", 10, 100, 0.2, 0.0)])
    lines = text.splitlines()
    assert lines[2].split() == ["vision", "1,000", "4.0", "KB", "1.5", "1.00e-07"]
    assert lines[3].split() == ["head", "10", "100", "B", "0.2", "0.00e+00"]
    assert lines[-1].split()[:2] == ["total", "1,010"]


def _run_build(args, tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "export.build", *args], capture_output=True, text=True, timeout=180, env=env
    )


def test_cli_llava_7b_without_weights_is_one_line(tmp_path):
    done = _run_build(["--model", "llava-7b", "--out", str(tmp_path / "out")], tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "llava-hf/llava-1.5-7b-hf" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_bad_exit_layers_is_one_line(tmp_path, tiny_checkpoints):
    done = _run_build(
        ["--model", str(tiny_checkpoints["qwen2"]), "--out", str(tmp_path / "o"), "--exit-layers", "9"],
        tmp_path,
    )
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0 and "exit" in done.stderr


def test_cli_help_shows_defaults(tmp_path):
    done = _run_build(["--help"], tmp_path)
    assert done.returncode == 0 and "default: fp32" in done.stdout and "--exit-layers" in done.stdout


def test_a_head_size_group_query_attention_cannot_take_exports_the_concat_flavour(tmp_path, capsys):
    from tests.conftest import tiny_checkpoint

    checkpoint = tiny_checkpoint("llava", "llama-head12", 3)  # head size 12
    with pytest.raises(InputError, match="head size is 12") as refused:
        build_bundle(BuildConfig(model=str(checkpoint), out=tmp_path / "inplace", kv="inplace", quiet=True))
    assert "--kv concat" in refused.value.one_line() and not (tmp_path / "inplace").exists()
    from export.validation import kv_flavour

    assert kv_flavour(None, 12) == "concat" and "not a multiple of 8" in capsys.readouterr().err
    assert kv_flavour(None, 16) == "inplace" and kv_flavour("concat", 16) == "concat"


def test_a_schema_3_manifest_is_read_with_its_image_layout_moved(bundles):
    from dyvte_rt.bundle.manifest import SCHEMA_VERSION

    data = json.loads((bundles["llama-gqa"] / MANIFEST_FILE).read_text())
    old = json.loads(json.dumps(data))
    old["schema_version"] = 3
    old["vision"].pop("layout")
    old["vision"]["anyres"] = None  # as schema 3 wrote a one-view model
    upgraded = Manifest.from_json(json.dumps(old))
    assert upgraded.schema_version == SCHEMA_VERSION and upgraded.vision.layout == {}
    tiled = json.loads(json.dumps(old))
    tiled["vision"]["anyres"] = {
        "grid_pinpoints": [[32, 64]],
        "tile_size": 32,
        "feature_side": 4,
        "newline": True,
    }
    assert Manifest.from_json(json.dumps(tiled)).vision.layout["tile_size"] == 32
    both = json.loads(json.dumps(tiled))
    both["vision"]["patch_grid"] = {"patch_size": 14}
    with pytest.raises(BundleError, match="both anyres and patch_grid"):
        Manifest.from_json(json.dumps(both))


def test_a_layout_the_family_cannot_read_is_refused_naming_the_field(bundles, tmp_path):
    copy = shutil.copytree(bundles["llama-gqa"], tmp_path / "bundle")
    data = json.loads((copy / MANIFEST_FILE).read_text())
    data["vision"]["layout"] = {"tile_size": 32}  # a tiling on a one-view family
    (copy / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"vision\.layout must be empty"):
        load_manifest(copy)
    data["source"]["family"] = "llava-next"  # the family that tiles, with a layout missing fields
    (copy / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"vision\.layout\.grid_pinpoints is missing"):
        load_manifest(copy)
    data["source"]["family"] = "internvl-9"
    (copy / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="family 'internvl-9' is unknown"):
        load_manifest(copy)
