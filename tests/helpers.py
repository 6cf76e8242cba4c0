"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python benchmarks/<script> <args>` from the repository's root, its output captured."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def eval_json(capsys, bundle, data, *options: str) -> dict:
    """`dyvte-rt eval --json` in-process; asserts exit code 0 and returns the report."""
    from dyvte_rt.cli import main as cli_main

    assert cli_main(["eval", "--bundle", str(bundle), "--data", str(data), "--json", *options]) == 0
    return json.loads(capsys.readouterr().out)


def prefill_cosine(pipeline, reference, adapter, inputs, prepared, policy) -> float:
    """Cosine similarity of the runtime's prefill logits to the PyTorch reference's (last position):
    how close a quantised bundle answers to the float model."""
    import numpy as np

    want = reference.prefill(inputs["input_ids"], adapter.image_input(inputs), policy).logits[0, -1].numpy()
    got = pipeline.prefill(inputs["input_ids"].numpy(), prepared, policy).logits[0]
    return float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))


DECODE_STEPS = 4


def runtime_vs_reference(pipeline, reference, input_ids, reference_image, runtime_image, policy, prune=None):
    """Prefill `input_ids` ([1, N] torch) through the runtime pipeline and the PyTorch reference
    under `policy`, then DECODE_STEPS teacher-forced decode steps (the reference's greedy tokens
    fed to both) -> (max |logit error| over all of them, runtime prefill, reference prefill).
    Checks on the way that both exit at the same layer, prune the same visual tokens and hold the
    same KV lengths (`prune`: a prune policy, default none)."""
    import numpy as np
    import torch

    from dyvte_rt.runtime.prune import parse_prune

    prune = parse_prune(prune)
    expected = reference.prefill(input_ids, reference_image, policy, prune=prune)
    got = pipeline.prefill(input_ids.numpy(), runtime_image, policy, prune=prune)
    assert got.exit_layer == expected.exit_layer, policy.describe()
    assert got.pruned_after_layer == expected.pruned_after_layer, prune.spec()
    assert got.kept_visual == expected.kept_visual, prune.spec()
    assert got.cache.layer_lengths() == expected.cache.lengths(), policy.describe()
    worst = float(np.abs(got.logits - expected.logits[:, -1].numpy()).max())
    token = int(expected.logits[0, -1].argmax())
    for step in range(DECODE_STEPS):
        position = expected.n_tokens + step
        want = reference.decode_one_token(torch.tensor([[token]]), position, expected.cache)
        have = pipeline.decode_one_token(token, position, got.cache)
        worst = max(worst, float(np.abs(have - want.numpy()).max()))
        token = int(want.argmax())
    return worst, got, expected
