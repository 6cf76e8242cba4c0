"""Keep a loaded bundle's resident memory close to its bytes on the host (glibc on Linux).

Two things make a CPU process hold more than its weights once ONNX Runtime has loaded them, and
after every request:
- freed heap pages stay resident: kernels pack their weights (MatMulNBits, MatMul) into buffers of
  their own and free the parsed copies, and without the CPU arena a prefill's activations and a
  request's KV cache are freed after use — glibc's mmap threshold grows with every large block
  freed (up to 32 MiB), so they come from its heap, whose free pages it keeps mapped unless
  `malloc_trim` returns them (free pages in the middle of the heap included). The runtime asks
  after loading, and after each prefill and request large enough to be worth a trim (about
  0.4 ms; `dyvte_rt.bundle.loaded.TRIM_MIN_BYTES`);
- weights in external data are memory-mapped; what a kernel did not pack (MatMulNBits keeps its
  original scales) stays resident once read while packing. Those pages are dropped with
  `madvise(MADV_DONTNEED)`, only in mappings no page of which was ever written: there it loses
  nothing, as a later read faults the page back in from the file.
On an edge device with 4–8 GB shared between CPU and GPU these pages decide what else fits.
Elsewhere (musl, macOS, Windows) every function here does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from pathlib import Path

_MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where the C library lacks its malloc_trim (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_heap() -> bool:
    """Return the heap's free pages to the OS; True when any were returned."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def clean_file_mappings(folder: Path) -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's private mappings of files under `folder` that no page
    was ever written to (no copy-on-write page: `Anonymous: 0 kB` in /proc/self/smaps), so that
    every resident page equals the file's."""
    folder = Path(folder).resolve()
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return []
    found, current = [], None
    for line in lines:
        fields = line.split(maxsplit=5)
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            current = None
            if len(fields) == 6 and fields[1].endswith("p") and Path(fields[5]).is_relative_to(folder):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                current = (start, end, fields[5])
        elif current is not None and fields[0] == "Anonymous:":
            if fields[1] == "0":
                found.append(current)
            current = None
    return found


def drop_mapped_pages(folder: Path) -> int:
    """Drop the resident pages of clean private mappings of files under `folder` (a bundle's
    external weights, which ONNX Runtime maps read-write, private, per tensor); returns the bytes
    of mappings advised (0 where unsupported). A later read faults the pages back in from the file."""
    libc = _libc()
    if libc is None:
        return 0
    advised = 0
    for start, end, _ in clean_file_mappings(folder):
        if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
            advised += end - start
    return advised
