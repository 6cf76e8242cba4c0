"""Test artefacts (tiny checkpoints, exported bundles) built once and shared by every pytest worker
and by later runs, in a cache keyed by the code that makes them.

    path = shared("bundle-llama-gqa", lambda out: build(checkpoint, out))

The first worker to ask builds the artefact under a file lock while the others wait; everyone else
gets the finished directory. The key hashes the export code, the runtime, the tests' own builders
and the package versions (`export.graph_cache.code_fingerprint`), so changed code builds afresh; a
fresh clone starts empty (`.pytest_cache/` is not committed). Every export also goes through one
graph cache (`--graph-cache`), so the variants of a checkpoint re-export only the graphs that
differ. DYVTE_TEST_CACHE moves the cache elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
CACHE_ENV = "DYVTE_TEST_CACHE"


def cache_key() -> str:
    from export.graph_cache import code_fingerprint

    digest = hashlib.sha256(code_fingerprint().encode())
    for path in sorted((ROOT / "tests").glob("*.py")):  # the tests' own builders
        digest.update(path.read_bytes())
    for path in sorted((ROOT / "export" / "demo_checkpoint").iterdir()):
        digest.update(path.name.encode())
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    base = Path(os.environ.get(CACHE_ENV) or ROOT / ".pytest_cache" / "dyvte-artefacts")
    key = cache_key()
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base / ".prune.lock")):
        for old in base.iterdir():  # artefacts of other code versions
            if old.is_dir() and old.name != key:
                shutil.rmtree(old, ignore_errors=True)
        (base / key).mkdir(exist_ok=True)
    return base / key


_DIR: Path | None = None


def shared(name: str, build: Callable[[Path], object]) -> Path:
    """The directory `build(path)` fills, built once for every worker and run of this code."""
    global _DIR
    _DIR = _DIR or cache_dir()
    target, complete = _DIR / name, _DIR / f"{name}.complete"
    with FileLock(str(_DIR / f"{name}.lock")):
        if complete.is_file() and target.is_dir():
            return target
        shutil.rmtree(target, ignore_errors=True)
        partial = _DIR / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        started = time.perf_counter()
        build(partial)
        partial.rename(target)
        complete.touch()
        worker = os.environ.get("PYTEST_XDIST_WORKER", "-")
        with open(_DIR / "builds.log", "a") as log:  # what the suite's time goes to
            log.write(f"{time.perf_counter() - started:8.1f} s  {name}  ({worker})\n")
    return target


def graph_cache() -> Path:
    global _DIR
    _DIR = _DIR or cache_dir()
    return _DIR / "graphs"


def export(model: str | Path, out: Path, **options) -> Path:
    """`python -m export.build` in-process, quietly, through the shared graph cache."""
    from export.build import BuildConfig, build_bundle

    build_bundle(BuildConfig(model=str(model), out=out, quiet=True, graph_cache=graph_cache(), **options))
    return out
