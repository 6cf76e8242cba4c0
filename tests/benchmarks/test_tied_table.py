"""tied_table.py: two checkpoints that differ only in tying the LM head, exported alike; the tied
bundle is smaller by the table and the report says so."""

import json

from tests.helpers import run_benchmark


def test_the_tied_bundle_is_smaller_by_the_table(tmp_path):
    args = ["--out", str(tmp_path), "--shape", "tiny", "--rounds", "1", "--json"]
    done = run_benchmark("tied_table.py", *args, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    tied, untied = report["tied"], report["untied"]
    table = tied["embed_bytes"] - len((tmp_path / "tiny-tied-int4" / "embed.onnx").read_bytes())
    assert table > 0 and abs(tied["embed_bytes"] - untied["embed_bytes"]) < 1024  # inline or in .data
    assert tied["head_bytes"] < untied["head_bytes"] - table // 2  # the untied head holds its own table
    assert report["saved_bytes"] == untied["bundle_bytes"] - tied["bundle_bytes"] > table // 2
    assert tied["loaded_rss_bytes"] > 0 and untied["after_request_rss_bytes"] > 0
