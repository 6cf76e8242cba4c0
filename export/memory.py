"""The export's process memory: whether the largest graph fits, each graph's weights in memory only
while it is exported, freed heap handed back to the system, and what the process holds now."""

from __future__ import annotations

import contextlib
import gc
import os

from dyvte_rt.errors import InputError
from engines.host_memory import release_freed_heap

# Peak resident memory of exporting one graph, measured on the LLaVA-1.5-7B-shaped slice
# (docs/benchmarks.md, Export): the graph's weights, the exporter's copies while it writes them, and
# Python, torch and the exporter themselves.
EXPORT_MEMORY_FACTOR = 1.5
EXPORT_BASELINE_GIB = 1.0


def check_memory(plans, loader, max_memory_gb: float | None) -> None:
    """Refuse to start when the largest graph cannot be exported within the memory budget."""
    sizes = {plan.name: loader.parameter_bytes(plan.module.weight_modules()) for plan in plans}
    largest = max(sizes, key=sizes.get)
    needed = EXPORT_MEMORY_FACTOR * sizes[largest] / 2**30 + EXPORT_BASELINE_GIB
    budget = max_memory_gb if max_memory_gb is not None else available_gib()
    if needed > budget:
        where = "--max-memory-gb" if max_memory_gb is not None else "available memory"
        raise InputError(
            f"exporting {largest} ({sizes[largest] / 2**30:.1f} GiB of weights) needs about "
            f"{needed:.1f} GiB, more than the {budget:.1f} GiB of {where}",
            hint="free memory, raise --max-memory-gb, or pass --exit-layers that split the decoder finer",
        )


@contextlib.contextmanager
def plan_weights(loader, plan):
    """The graph's parameters in memory while it is exported (with a loader), dropped after; yields
    a function that drops them sooner (None without a loader: the model stays whole)."""
    if loader is None:
        yield None
        return
    modules = plan.module.weight_modules()
    loader.materialize(modules)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            loader.release(modules)
            release_freed_memory()
            released = True

    try:
        yield release
    finally:
        release()


def release_freed_memory() -> None:
    """Collect garbage and hand the freed heap back to the system: glibc keeps freed blocks for
    reuse, and after a graph's exporter and checks that held gigabytes of a 7B export's memory."""
    gc.collect()
    release_freed_heap()


def resident_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def available_gib() -> float:
    """MemAvailable from /proc/meminfo (Linux); infinite where it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")
