"""Process-wide CPU allocator setting: keep freed memory for reuse instead of page-faulting it back.

glibc's malloc serves large blocks (a ViT forward's activations: 5-40 MiB each) with ``mmap``
and unmaps them on free, so every forward page-faults its activations in again: 130-270 k minor
faults per ViT-B/16 encoding of 32 images, 8-12 % of its CPU time (docs/benchmarks_speed.md).
:func:`keep_freed_memory` raises the mmap threshold to glibc's maximum (32 MiB), lets the heap
keep up to 1 GiB of freed memory for the next allocation and -- because a CNN training step at
batch 1024 allocates 100-300 MiB activations, above any threshold -- turns ``mmap`` off for the
main heap (``M_MMAP_MAX = 0``; other threads' arenas still map blocks larger than their 64 MiB
heaps): the airbench training step went from ~350 k to ~60 k faults and 1.30x faster
(docs/benchmarks.md §7).  This is the effect PyTorch's CPU tuning guide gets from jemalloc /
tcmalloc, without a preload.  The process just does not hand freed memory back to the OS right
away; peak memory can grow by the heap's fragmentation.

The CLI calls it once at start-up.  No-op off glibc (macOS, Windows, musl) and with
``BACKMIX_VLM_MALLOC=default``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "BACKMIX_VLM_MALLOC"  # "default": leave glibc's malloc alone
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4  # glibc malloc.h
MMAP_THRESHOLD = 32 << 20   # glibc's maximum on 64-bit (larger blocks are still mmapped)
TRIM_THRESHOLD = 1 << 30    # freed memory kept at the top of the heap before trimming
TOP_PAD = 64 << 20          # extra heap grown per sbrk

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as described above (once per process); True when it was applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV, "") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in
                   ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD),
                    (M_MMAP_MAX, 0)))
    return _applied
