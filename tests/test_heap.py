"""The runtime's memory policy (fssc/runtime/heap.py): a freed large array's memory is reused, already faulted
in. In a fresh interpreter, after ``keep_freed_memory()`` a 64 MB array allocated where one was just freed takes
no page faults to fill; without it (the control) it takes at least one fault per 2 MB page. That reused memory
is not zeroed is safe only if no key or message byte comes from memory nobody wrote: tests/test_security.py,
``test_no_unwritten_memory_reaches_a_key_or_a_message``.

Oracle: the kernel's fault counter (``getrusage``).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

_FAULTS = """
import resource, sys, numpy as np
from fssc.runtime.heap import keep_freed_memory
if sys.argv[1] == "1":
    assert keep_freed_memory()
a = np.ones(8 << 20); del a  # 64 MB, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(8 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(policy: bool) -> int:
    r = subprocess.run([sys.executable, "-c", _FAULTS, str(int(policy))], capture_output=True, text=True, check=True)
    return int(r.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy is glibc's mallopt")
def test_a_freed_large_array_is_reused_already_faulted_in():
    assert _faults(False) >= 32  # fresh pages: a fault per 4 KB, or per 2 MB huge page at best
    assert _faults(True) < 8
