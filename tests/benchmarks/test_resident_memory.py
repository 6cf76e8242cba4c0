"""resident_memory.py: lean host memory against none, each load in its own process, and what each
graph adds when opened (on the demo's int4 bundle)."""

import json

from tests.helpers import run_benchmark


def run(*args: str) -> dict:
    done = run_benchmark("resident_memory.py", *args, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_compare_and_per_graph_report_what_they_measured():
    from tests.artefacts import export, shared

    bundle = shared("bundle-demo-int4", lambda out: export("demo", out, quantize="int4"))
    report = run(
        "--bundle", str(bundle), "--compare", "--rounds", "1", "--requests", "1", "--max-new-tokens", "4"
    )  # fmt: skip
    assert report["same_tokens"] is True and report["rounds"] == 1
    for side in ("lean", "not_lean"):
        figures = report[side]
        assert figures["prefill_ms"] > 0 and figures["decode_tokens_per_s"] > 0
        assert figures["after_request_over_weights"] > 0
    graphs = run("--bundle", str(bundle), "--per-graph")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(graphs) == set(manifest["graphs"])
    assert all(row["bytes"] > 0 and row["rss_added"] >= 0 for row in graphs.values())
