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


def test_public_names_import_lazily_and_the_request_path_never_loads_onnx():
    """`import dyvte_rt` stays light; reading DyvteModel loads the runtime but not onnx (the
    graph tools' library), torch or transformers."""
    code = (
        "import sys, dyvte_rt; light = 'dyvte_rt.api.model' not in sys.modules; "
        "from dyvte_rt import DyvteModel, Answer, SamplingConfig, demo_bundle_dir, Conversation; "
        "import dyvte_rt.serving.engine; "
        "bad = sorted(m for m in ('onnx', 'torch', 'transformers') if m in sys.modules); "
        "print(light, ','.join(bad), DyvteModel.__module__, demo_bundle_dir().name, sep='|')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-800:]
    light, bad, module, _ = done.stdout.strip().split("|")
    assert light == "True" and bad == "" and module == "dyvte_rt.api.model", done.stdout


def test_old_module_paths_still_work_and_warn():
    import importlib
    import warnings

    import pytest

    moved = (("model", "DyvteModel"), ("locations", "demo_bundle_dir"), ("sampling", "SamplingConfig"))
    for old, name in moved:
        sys.modules.pop(f"dyvte_rt.{old}", None)
        with pytest.warns(DeprecationWarning, match=f"dyvte_rt.{old} is deprecated"):
            module = importlib.import_module(f"dyvte_rt.{old}")
        assert getattr(module, name) is getattr(importlib.import_module("dyvte_rt"), name)
        with pytest.raises(AttributeError):
            _ = importlib.import_module("dyvte_rt").no_such_name
        warnings.resetwarnings()
