"""Guard: the runtime packages never import torch or transformers."""

import subprocess
import sys


def test_runtime_packages_do_not_import_torch_or_transformers():
    code = (
        "import sys, dyvte_rt, dyvte_rt.cli, dyvte_rt.runtime.policy, dyvte_rt.runtime.compute, engines; "
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"runtime imported: {done.stdout.strip()} {done.stderr[-500:]}"
