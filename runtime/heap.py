"""The runtime's memory policy: freed arrays stay in the process for the next one.

glibc serves every allocation above its mmap threshold (128 KB, rising to at most 32 MB as large blocks are
freed) with a fresh ``mmap`` and hands it back with ``munmap`` when freed. The runtime's arrays come and go per
layer, so every layer paid the kernel to map, zero and fault in fresh pages again for those above the threshold
(a ResNet-18 224x224 batch's largest activations, im2col matrices and digit slices; docs/cost-model.md, "Freed
memory", has what it saves). Raising the mmap threshold to 1 GiB and the trim threshold to 2 GiB keeps freed
blocks in the heap, where the next layer reuses them already faulted in. The thresholds are the process's: the
main thread's heap serves blocks up to 1 GiB, a thread's arena those up to its heap size (64 MiB), larger ones
are mapped as before. A process keeps the memory it freed until it exits, or until
``release_freed_memory``: ``fssc serve`` calls it after each session, since sessions running at once in
threads of their own would each keep an arena at its peak (glibc trims a thread's arena only partly).

Security: reused heap memory is not zeroed, as it never was for the smaller arrays; no code path may write to a
key file or send an array it has not filled (tests/test_security.py deals and runs every gate with every
``np.empty`` pre-filled with garbage and glibc's allocations perturbed, and gets the same key bytes and
messages).
"""

from __future__ import annotations

import ctypes
import sys

MMAP_THRESHOLD = 1 << 30  # blocks below this come from the heap
OLD_MMAP_MAX = 32 << 20  # the largest threshold glibc before 2.35 accepts (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # free memory at the heap's top kept up to this (mallopt takes an int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

_done: list[bool] = []


def _libc_function(name: str):
    """glibc's ``name`` from this process's symbols, or None (not Linux, or a C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    return fn


def keep_freed_memory() -> bool:
    """Apply the policy to this process; True if the C library took both thresholds (the mmap one at 1 GiB,
    or at 32 MiB where an older glibc refuses more). A no-op returning False where there is no ``mallopt``.
    Idempotent: every runtime process calls it before its first large array."""
    if _done:
        return _done[0]
    ok = False
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        trim = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        mmap = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) or bool(mallopt(_M_MMAP_THRESHOLD, OLD_MMAP_MAX))
        ok = trim and mmap
    _done.append(ok)
    return ok


def release_freed_memory() -> None:
    """Hand the free memory of every arena back to the kernel (glibc's ``malloc_trim``), for a long-running
    process at the end of a unit of work. A no-op without ``malloc_trim``."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)
