"""serve_load.py --burst: requests sent together, each burst's TTFTs and latencies reported in the
order answered, against a real `dyvte-rt serve` on the demo bundle."""

import json

from tests.helpers import run_benchmark


def test_bursts_report_each_request_in_the_order_answered(demo_bundle, tmp_path):
    from tests.dyvte_rt.served import free_port

    out = tmp_path / "burst.json"
    done = run_benchmark(
        "serve_load.py", "--bundle", str(demo_bundle),
        "--burst", "3", "--requests", "2", "--warmup-seconds", "1", "--threads", "1",
        "--max-tokens", "4", "--port", str(free_port()), "--json-out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"].values()
    assert run["burst"] == 3 and run["requests"] == 6 and run["errors"] == 0
    assert len(run["bursts"]) == 2
    for burst in run["bursts"]:
        assert len(burst["ttft_ms"]) == 3 and burst["latency_ms"] == sorted(burst["latency_ms"])
        assert all(0 < t <= latency for t, latency in zip(burst["ttft_ms"], burst["latency_ms"], strict=True))
    assert "burst: TTFT" in done.stdout


def test_a_burst_with_a_rate_is_refused(demo_bundle):
    done = run_benchmark(
        "serve_load.py", "--bundle", str(demo_bundle), "--burst", "2", "--rate", "1", timeout=60
    )
    assert done.returncode == 2 and "--burst takes a positive count" in done.stderr
