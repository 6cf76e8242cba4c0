"""matmulnbits_sweep.py on small shapes: every configuration is its own quantisation."""

import json

from tests.helpers import run_benchmark


def test_each_block_size_and_layout_is_quantised_and_timed_apart():
    done = run_benchmark(
        "matmulnbits_sweep.py", "--hidden", "128", "--mlp", "256",
        "--blocks", "32,128", "--levels", "0,4", "--rounds", "1", "--runs", "2", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)["rows"]
    configs = {(r["layout"], r["block"], r["accuracy_level"]) for r in rows}
    assert len(configs) == len(rows) == 8
    size = {(r["layout"], r["block"]): r["weight_mb"] for r in rows}
    # block 128 keeps a quarter of block 32's scales; fusing packs the same weights
    assert size["separate", 128] < size["separate", 32]
    assert size["fused", 32] == size["separate", 32] and size["fused", 128] == size["separate", 128]
    assert all(r["ms_per_layer"] > 0 and r["read_gb_per_s"] > 0 for r in rows)
