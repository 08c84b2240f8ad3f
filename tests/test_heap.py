"""The runtime's memory policy (fssc/runtime/heap.py): a freed large array's memory is reused, already faulted
in, and ``release_freed_memory`` hands it back to the kernel.

* Reuse: in a fresh interpreter, after ``keep_freed_memory()`` a 256 MB array allocated where one was just freed
  takes no page faults to fill; without it (the control) it takes at least one fault per 2 MB page, and more.
* Release: with the policy a freed 256 MB array stays resident; ``release_freed_memory()`` returns it.

That reused memory is not zeroed is safe only if no key or message byte comes from memory nobody wrote:
tests/test_security.py, ``test_no_unwritten_memory_reaches_a_key_or_a_message``.

Oracles: the kernel's fault counter (``getrusage``) and the process's resident size (/proc/self/statm).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHILD = """
import ctypes, os, resource, sys, numpy as np
from fssc.runtime.heap import MMAP_THRESHOLD, _M_MMAP_THRESHOLD, keep_freed_memory, release_freed_memory
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
if sys.argv[1] == "1" and not (keep_freed_memory() and ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)):
    print("unsupported"); sys.exit()  # no mallopt, or a glibc before 2.35 (its threshold stops at 32 MiB)
a = np.ones(32 << 20); del a  # 256 MB, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(32 << 20)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
held = rss_mb(); del b
freed = rss_mb(); release_freed_memory()
print(faults, held - freed, held - rss_mb())
"""


def _child(policy: bool) -> list[str]:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(int(policy))], capture_output=True, text=True, check=True)
    out = r.stdout.split()
    if out == ["unsupported"]:
        pytest.skip("this C library takes no 1 GiB mmap threshold")
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy is glibc's mallopt")
def test_a_freed_large_array_is_reused_already_faulted_in_and_released_on_request():
    faults, dropped_at_free, dropped_at_release = map(float, _child(True))
    assert faults < 4  # the freed block itself, already faulted in
    assert dropped_at_free < 64  # kept by the process...
    assert dropped_at_release > 192  # ...until released
    faults, dropped_at_free, _ = map(float, _child(False))
    assert faults >= 128  # the control: fresh pages, a fault per 4 KB or at best per 2 MB huge page
    assert dropped_at_free > 192  # unmapped at once
