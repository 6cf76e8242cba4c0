"""exit_ceiling.py: every decoder segment timed at N and N - V tokens on the demo bundle, and the
ceiling an exit's speed-up can reach with these graphs, against the theoretical ratio."""

import json
import subprocess
from pathlib import Path

from tests.helpers import run_benchmark


def _ceiling(bundle: Path, *options: str) -> subprocess.CompletedProcess:
    common = ["--bundle", str(bundle), "--rounds", "1", "--calls", "3", "--threads", "1"]
    return run_benchmark("exit_ceiling.py", *common, *options)


def test_the_ceiling_combines_each_segment_s_times_as_the_exit_would(demo_bundle):
    done = _ceiling(demo_bundle, "--tokens", "75", "--visual", "64", "--exit-layer", "1", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    manifest = json.loads((demo_bundle / "manifest.json").read_text())
    segments = report["segments"]
    # every layer in exactly one segment, in order
    assert [layer for s in segments for layer in range(s["layers"][0], s["layers"][1] + 1)] == list(
        range(manifest["dims"]["num_layers"])
    )
    assert all(s["ms_at_N"] > 0 and s["ms_at_N_minus_V"] > 0 for s in segments)
    full = sum(s["ms_at_N"] for s in segments)
    exited = sum(s["ms_at_N" if s["layers"][1] <= 1 else "ms_at_N_minus_V"] for s in segments)
    assert report["segments_ms_full"] == full and report["segments_ms_exited"] == exited
    assert report["ceiling_speedup"] == full / exited
    # the demo's exit after layer 1 of 6 keeps 64 of 75 tokens out of 4 layers: 2.37x in theory
    assert round(report["theoretical_speedup"], 2) == 2.37
    assert report["ceiling_over_theory"] == report["ceiling_speedup"] / report["theoretical_speedup"]


def test_more_visual_than_prompt_tokens_is_refused(demo_bundle):
    done = _ceiling(demo_bundle, "--tokens", "10", "--visual", "64", "--exit-layer", "1")
    assert done.returncode == 2 and "need 0 < --visual < --tokens" in done.stderr
