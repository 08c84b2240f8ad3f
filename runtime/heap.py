"""The runtime's memory policy: freed arrays stay in the process for the next one.

glibc serves every allocation above its mmap threshold (128 KB, rising to at most 32 MB as large blocks are
freed) with a fresh ``mmap`` and hands it back with ``munmap`` when freed. The runtime's arrays are mostly
larger than that (a ResNet-18 224x224 batch's activations, digit slices and DCF blocks), and each comes and goes
per layer, so every layer paid the kernel to map, zero and fault in fresh pages again (docs/cost-model.md,
"Freed memory"). Raising the mmap threshold to 1 GiB and the trim threshold to 2 GiB keeps freed blocks in the
heap, where the next layer reuses them already faulted in. Peak memory is unchanged (the same arrays are live
at the peak); the process keeps its peak until it exits.

Security: reused heap memory is not zeroed, as it never was for the smaller arrays; no code path may write to a
key file or send an array it has not filled (tests/test_security.py deals and runs every gate with every
``np.empty`` pre-filled with garbage and gets the same key bytes and messages).

Only the main arena follows the thresholds: glibc maps a thread's large blocks regardless, so the sessions
``fssc serve`` runs in its worker threads keep the default behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

MMAP_THRESHOLD = 1 << 30  # blocks below this come from the heap
TRIM_THRESHOLD = 2**31 - 1  # free memory at the heap's top kept up to this (mallopt takes an int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

_done: list[bool] = []


def keep_freed_memory() -> bool:
    """Apply the policy to this process (glibc only; elsewhere a no-op). True if glibc took both settings.
    Idempotent: every runtime process calls it at its start."""
    if _done:
        return _done[0]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # musl or no libc found: its own allocator, left alone
            pass
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _done.append(ok)
    return ok
