"""fewer_calls.py: the decoder cut into fewer graphs (the router inside its segment, one call per
phase, no prune scores), each composed graph checked against the calls it replaces, and the layouts'
speed-ups reported against the theoretical one."""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.bundle import io_names as names
from tests.helpers import run_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fewer_calls():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fewer_calls

    return fewer_calls


def _run(bundle: Path, *options: str) -> subprocess.CompletedProcess:
    common = ["--bundle", str(bundle), "--tokens", "75", "--visual", "64", "--threads", "1"]
    return run_benchmark("fewer_calls.py", *common, *options, timeout=600)


def test_each_layout_is_timed_and_set_against_the_theoretical_speedup(demo_bundle):
    done = _run(demo_bundle, "--exit-layer", "1", "--rounds", "1", "--calls", "2", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["max_abs_difference"] <= 1e-5
    # as in exit_ceiling.py: 64 of 75 tokens leave 4 of the 6 layers
    assert round(report["theoretical_speedup"], 2) == 2.37
    ms = report["ms"]
    assert all(value > 0 for value in ms.values())
    layouts = report["layouts"]
    assert list(layouts) == [
        "segments",
        "router in segment",
        "one call per phase",
        "one call per phase, no prune scores",
    ]
    for row in layouts.values():
        assert row["speedup"] == row["no_exit_ms"] / row["exit_ms"]
        assert row["of_theory"] == row["speedup"] / report["theoretical_speedup"]
    segments = layouts["segments"]
    assert segments["no_exit_ms"] == ms["segments/no exit"]
    assert segments["exit_ms"] == ms["segments/up to the exit + router"] + ms["segments/after the exit"]
    assert layouts["one call per phase"]["decode_step_ms"] == ms["decode/one call"]


def test_an_exit_layer_without_a_router_is_refused_in_one_line(demo_bundle):
    done = _run(demo_bundle, "--exit-layer", "5", "--rounds", "1", "--calls", "1")
    assert done.returncode == 1
    assert done.stderr.strip() == "layer 5 ends no segment with a router in this bundle"


def test_composed_graphs_give_the_outputs_of_the_calls_they_replace(demo_bundle, tmp_path, fewer_calls):
    with DyvteModel.load(demo_bundle, threads=1) as model:
        graphs = fewer_calls._Graphs(model, tmp_path, exit_layer=1)
        ranges = range(0, 6), range(0, 2), range(2, 6)
        assert graphs.check(75, 11, *ranges) <= 1e-6
        # the check sees a wrong graph: the segments chained in another order
        segments = model.pipeline.segments
        shuffled = [onnx.load(demo_bundle / f"{s.graph}.onnx") for s in [*segments[1:], segments[0]]]
        onnx.save(fewer_calls.chain_segments(shuffled), tmp_path / "shuffled.onnx")
        proto = onnx.load(tmp_path / "shuffled.onnx")
        wrong = model.pipeline.backend.open(
            tmp_path / "shuffled.onnx",
            tuple(v.name for v in proto.graph.input),
            tuple(v.name for v in proto.graph.output),
        )
        graphs.all_layers = wrong
        assert graphs.check(75, 11, *ranges) > 1e-3
        for session in graphs.composed():
            session.close()


def test_without_prune_scores_drops_them_and_only_what_they_needed(demo_bundle, fewer_calls):
    segments = [onnx.load(demo_bundle / f"segment_0{i}.onnx") for i in range(1, 5)]
    chained = fewer_calls.chain_segments(segments)
    scores = [v.name for v in chained.graph.output if v.name.endswith(names.PRUNE_SCORES)]
    assert len(scores) == 3  # segments 1-3 end at candidate layers; the last one has none
    lean = fewer_calls.without_prune_scores(chained)
    outputs = [v.name for v in lean.graph.output]
    assert outputs == [v.name for v in chained.graph.output if v.name not in scores]
    assert names.HIDDEN_OUT in outputs and names.present_name(5, "value") in outputs
    assert len(lean.graph.node) < len(chained.graph.node) - 3 * 10
    assert names.LAST_INDEX not in [v.name for v in lean.graph.input]  # only the scores read it
    read = {name for node in lean.graph.node for name in node.input}
    assert all(tensor.name in read for tensor in lean.graph.initializer)
    onnx.checker.check_model(lean)
