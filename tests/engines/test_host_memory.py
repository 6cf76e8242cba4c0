"""Freed heap pages go back to the OS when the loader asks (glibc's malloc_trim)."""

import ctypes
import ctypes.util
import platform
from pathlib import Path

import pytest

from engines.host_memory import clean_file_mappings, drop_mapped_pages, release_freed_heap

CHUNK, COUNT = 64 << 10, 3000  # below glibc's mmap threshold: served from the heap, not mmap


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_pages_in_the_middle_of_the_heap_are_returned():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    chunks = [libc.malloc(CHUNK) for _ in range(COUNT)]
    for chunk in chunks:
        ctypes.memset(chunk, 1, CHUNK)  # resident
    for chunk in chunks[:-1]:  # the last one pins the heap's top, as ONNX Runtime's packed weights do
        libc.free(chunk)
    held = rss_bytes()
    try:
        assert release_freed_heap()
        assert held - rss_bytes() > CHUNK * COUNT // 2
    finally:
        libc.free(chunks[-1])


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc/self/smaps and madvise: Linux only")
def test_clean_private_file_pages_are_dropped_and_read_back_unchanged_written_ones_are_kept(tmp_path):
    import mmap

    import numpy as np

    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    (tmp_path / "weights.data").write_bytes(data)
    (tmp_path / "written.data").write_bytes(data[: 1 << 20])
    with open(tmp_path / "weights.data", "rb") as clean, open(tmp_path / "written.data", "rb") as dirty:
        # private and writable, as ONNX Runtime maps external data
        mapped = mmap.mmap(clean.fileno(), 0, access=mmap.ACCESS_COPY)
        written = mmap.mmap(dirty.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            assert mapped[:] == data  # every page read: resident
            written[0] = (data[0] + 1) % 256  # one copy-on-write page: no longer the file's
            paths = {path for _, _, path in clean_file_mappings(tmp_path)}
            assert paths == {str((tmp_path / "weights.data").resolve())}
            held = rss_bytes()
            assert drop_mapped_pages(tmp_path) >= len(data)
            assert held - rss_bytes() > len(data) // 2
            assert mapped[:] == data  # faulted back in from the file
            assert written[0] == (data[0] + 1) % 256 and written[1:] == data[1 : 1 << 20]
        finally:
            mapped.close()
            written.close()
