"""Golden inputs and outputs: each graph run by ONNX Runtime on the CPU at its profiles' `opt`
shapes, saved in the bundle (`tensorrt/golden/<graph>.npz`), so a machine with another backend
(TensorRT engines, ONNX Runtime on CUDA) compares itself with them in one command:
`dyvte-rt build-engines --bundle DIR --check-golden --device tensorrt`.

Inputs are random but valid: positions count up, indices point inside their rows, the embed
graph's image tokens match its image features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyvte_rt.bundle import io_names as names
from dyvte_rt.bundle.loaded import Bundle
from dyvte_rt.bundle.manifest import BundleError
from engines.tensorrt.record import ENGINE_DIR

GOLDEN_DIR = "golden"


@dataclass(frozen=True)
class GoldenDiff:
    graph: str
    phase: str
    max_abs_error: float
    scale: float  # the largest golden output magnitude, for a relative reading

    @property
    def relative(self) -> float:
        return self.max_abs_error / max(self.scale, 1e-12)


def golden_inputs(bundle: Bundle, graph: str, shapes: dict[str, tuple[int, ...]], seed: int) -> dict:
    """Valid inputs of the given shapes for `graph`."""
    rng = np.random.default_rng(seed)
    info = {t.name: t for t in bundle.manifest.graphs[graph].inputs}
    feeds = {}
    for name, shape in shapes.items():
        dtype = np.dtype(info[name].dtype)
        if name == names.POSITION_IDS:
            past = next((s[2] for n, s in shapes.items() if n.startswith("past.")), 0)
            feeds[name] = np.tile(np.arange(past, past + shape[1], dtype=dtype), (shape[0], 1))
        elif name == names.LAST_INDEX:
            rows = shapes.get(names.HIDDEN_OUT, shapes.get(names.HIDDEN_IN))[1]
            feeds[name] = np.full(shape, rows - 1, dtype=dtype)
        elif name == names.KEEP_INDEX:
            feeds[name] = np.tile(np.arange(shape[1], dtype=dtype), (shape[0], 1))
        elif name == names.INPUT_IDS:
            vocab = bundle.manifest.dims.vocab_size
            ids = rng.integers(0, vocab, size=shape).astype(dtype)
            ids[ids == bundle.manifest.tokens.image] = 0
            ids[:, 1 : 1 + shapes[names.IMAGE_FEATURES][1]] = bundle.manifest.tokens.image
            feeds[name] = ids
        elif name == names.ROUTER_POOL:
            feeds[name] = np.full(shape, 1.0 / shape[1], dtype=dtype)
        elif name == names.SAMPLE_INDEX:
            feeds[name] = np.zeros(shape, dtype=dtype)  # the first sample
        elif name == names.VISUAL_ROWS:  # rows of that sample (repeating where V exceeds them)
            rows = shapes.get(names.PRUNE_SCORES, shapes.get(names.HIDDEN_OUT))[1]
            feeds[name] = (np.arange(shape[1]) % rows).reshape(shape).astype(dtype)
        elif name == names.PRUNE_PIVOTS:
            feeds[name] = np.full(shape, min(8, shapes[names.VISUAL_ROWS][1]), dtype=dtype)
        elif dtype.kind == "f":
            feeds[name] = (rng.standard_normal(shape) * 0.5).astype(dtype)
        else:
            raise BundleError(f"no golden input rule for {graph}'s {name} ({dtype})")
    return feeds


def write_golden(bundle: Bundle, plan: dict, seed: int = 0) -> Path:
    """Run every graph on `bundle`'s backend at each profile's opt shapes and save inputs and outputs."""
    out = bundle.path / ENGINE_DIR / GOLDEN_DIR
    out.mkdir(parents=True, exist_ok=True)
    for graph, profiles in plan["graphs"].items():
        arrays = {}
        for index, profile in enumerate(profiles):
            shapes = {name: tuple(s["opt"]) for name, s in profile["shapes"].items()}
            feeds = golden_inputs(bundle, graph, shapes, seed + index)
            outputs = bundle.sessions[graph].run(feeds)
            arrays.update({f"{profile['phase']}/in/{k}": v for k, v in feeds.items()})
            arrays.update(
                {f"{profile['phase']}/out/{k}": bundle.backend.download(v) for k, v in outputs.items()}
            )
        tmp = out / f"{graph}.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.replace(out / f"{graph}.npz")
    return out


def check_golden(bundle: Bundle) -> list[GoldenDiff]:
    """Run every graph that has golden data on `bundle`'s backend and compare with it."""
    folder = bundle.path / ENGINE_DIR / GOLDEN_DIR
    if not folder.is_dir():
        raise BundleError(
            f"{bundle.path} has no golden outputs",
            hint=f"write them with ONNX Runtime: dyvte-rt build-engines --bundle {bundle.path} --golden",
        )
    diffs = []
    for graph in bundle.manifest.graphs:
        path = folder / f"{graph}.npz"
        if not path.is_file():
            raise BundleError(
                f"golden outputs for {graph} are missing", hint="write them again with --golden"
            )
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        for phase in sorted({k.split("/")[0] for k in arrays}):
            feeds = {k.split("/")[2]: v for k, v in arrays.items() if k.startswith(f"{phase}/in/")}
            outputs = bundle.sessions[graph].run(feeds)
            worst, scale = 0.0, 0.0
            for name, value in outputs.items():
                expected = arrays[f"{phase}/out/{name}"]
                got = bundle.backend.download(value)
                if got.shape != expected.shape:
                    raise BundleError(
                        f"{graph} ({phase}) gave {name} of shape {got.shape}, not {expected.shape}"
                    )
                error = np.abs(got.astype(np.float64) - expected.astype(np.float64))
                worst = max(worst, float(error.max()) if error.size else 0.0)
                scale = max(scale, float(np.abs(expected).max()) if expected.size else 0.0)
            diffs.append(GoldenDiff(graph, phase, worst, scale))
    return diffs
