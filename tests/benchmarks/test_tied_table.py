"""tied_table.py: two checkpoints that differ only in tying the LM head, exported alike; the tied
bundle is smaller by the table and the report says so."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_tied_bundle_is_smaller_by_the_table(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks/tied_table.py"), "--out", str(tmp_path),
               "--shape", "tiny", "--rounds", "1", "--json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    tied, untied = report["tied"], report["untied"]
    table = tied["embed_bytes"] - len((tmp_path / "tiny-tied-int4" / "embed.onnx").read_bytes())
    assert table > 0 and abs(tied["embed_bytes"] - untied["embed_bytes"]) < 1024  # inline or in .data
    assert tied["head_bytes"] < untied["head_bytes"] - table // 2  # the untied head holds its own table
    assert report["saved_bytes"] == untied["bundle_bytes"] - tied["bundle_bytes"] > table // 2
    assert tied["loaded_rss_bytes"] > 0 and untied["after_request_rss_bytes"] > 0
