"""CPU priority of the threads that run a graph (Linux only; elsewhere these do nothing).

A server encodes an arriving image while other requests decode. On a machine with few cores the
image encoder's threads then take the cores from the decode steps, and a running stream's gap
between tokens grows to the encoder's run (docs/benchmarks.md). Running the encoder's threads at
the lowest priority (nice 19) lets the decode steps take the cores first; the encoder still gets
every cycle they leave.

Linux keeps a nice value per thread, and a thread starts with its creator's: ONNX Runtime starts a
session's worker threads when the session is created, so the threads that appear while one session
opens are that session's, and the thread that calls its runs is lowered on its own.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

LOWEST = 19  # the lowest priority a process may give its own threads without privileges
_TASKS = "/proc/self/task"


def supported() -> bool:
    return sys.platform.startswith("linux") and os.path.isdir(_TASKS)


def thread_ids() -> set[int]:
    """The kernel ids of this process's threads now (empty where unsupported)."""
    if not supported():
        return set()
    return {int(name) for name in os.listdir(_TASKS)}


def nice_of(thread_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, thread_id)


def lower_priority(thread_ids: set[int] | list[int], nice: int = LOWEST) -> int:
    """Give these threads at least `nice`; returns how many were lowered (threads that ended or
    already run lower are skipped: raising a priority back needs privileges)."""
    lowered = 0
    for thread_id in thread_ids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if nice_of(thread_id) < nice:
                os.setpriority(os.PRIO_PROCESS, thread_id, nice)
                lowered += 1
    return lowered


def lower_current_thread_priority(nice: int = LOWEST) -> None:
    """For a worker pool's initializer: the calling thread at `nice` from now on."""
    if supported():
        lower_priority([threading.get_native_id()], nice)


@contextlib.contextmanager
def threads_started_at_low_priority(nice: int = LOWEST) -> Iterator[None]:
    """The threads started inside the block (a session's workers) run at `nice`. Meant for
    loading, when no other part of the process starts threads."""
    before = thread_ids()
    try:
        yield
    finally:
        lower_priority(thread_ids() - before, nice)
