"""In-process two-party simulation: dealer, P0 and P1 in one process.

The dealer writes both key streams to memory; the parties run in two threads
connected by queues (the same ``Channel`` interface the TCP transport has),
so the code under test is the code that runs over the network.
:func:`fssc.compiler.reference.simulation.simulate` runs a compiled graph's generated
programs on these pieces.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from fssc.runtime.channel import queue_pair
from fssc.runtime.keys import KeyReader, KeyWriter
from fssc.runtime.protocol import Dealer, Party


def deal_in_memory(fn: Callable[[Dealer], Any], header: dict | None = None):
    """Run ``fn(dealer)`` with a dealer whose randomness is fresh from os.urandom; returns (its result,
    P0's key bytes, P1's key bytes)."""
    header = header or {"program": "sim", "batch": 0}
    w0 = KeyWriter(None, {**header, "party": 0})
    w1 = KeyWriter(None, {**header, "party": 1})
    res = fn(Dealer(w0, w1))
    return res, w0.close(), w1.close()


def run_parties(
    fn0: Callable[[Party], Any],
    fn1: Callable[[Party], Any],
    keys0: bytes,
    keys1: bytes,
    timeout: float = 120.0,
    record: bool = False,
):
    """Run both parties concurrently; returns (result0, result1, chan0, chan1). Errors propagate."""
    c0, c1 = queue_pair(timeout, record)
    out: dict[int, Any] = {}
    errors: list[BaseException] = []

    def go(b, fn, keys, chan):
        try:
            out[b] = fn(Party(b, KeyReader(keys, party=b), chan))
        except BaseException as e:
            errors.append(e)
            chan.close()

    threads = [
        threading.Thread(target=go, args=(0, fn0, keys0, c0)),
        threading.Thread(target=go, args=(1, fn1, keys1, c1)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out[0], out[1], c0, c1
