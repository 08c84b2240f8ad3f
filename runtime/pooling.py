"""MaxPool as a tree of pairwise max gates, padding skipped.

``max_tree`` is shared by the dealer (on masks), the parties (on masked
values) and the fixed-point interpreter (on plain ring values), so all three
pair the same elements in the same order. At each tree level the window taps
are paired (0,1), (2,3), ...; where both taps of a pair are real elements a
max gate runs, where only one is (padding) it passes through. All gates of a
level go in one call: one protocol step per level, ceil(log2 k) levels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from fssc.runtime.geometry import windows


def max_tree(x: np.ndarray, attrs: dict, pairmax: Callable[[int, np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Window max of x[N,C,*spatial] with ``pairmax(level, a_flat, b_flat)`` as the gate."""
    w, valid, _, nd = windows(x, attrs, 0)
    lead = w.shape[: 2 + nd]
    taps = w.reshape(lead + (-1,))
    vmask = valid.reshape(valid.shape[:nd] + (-1,))
    items = [(np.ascontiguousarray(taps[..., t]), vmask[..., t]) for t in range(taps.shape[-1])]
    level = 0
    while len(items) > 1:
        nxt: list[tuple[np.ndarray, np.ndarray]] = []
        firsts, seconds, spans = [], [], []
        pairs = [(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)]
        for (a, va), (b, vb) in pairs:
            both = va & vb
            firsts.append(a[..., both].reshape(-1))
            seconds.append(b[..., both].reshape(-1))
            spans.append(both)
        flat = (
            pairmax(level, np.concatenate(firsts), np.concatenate(seconds))
            if sum(f.size for f in firsts)
            else np.zeros(0, dtype=x.dtype)
        )
        off = 0
        for ((a, va), (b, vb)), both in zip(pairs, spans, strict=True):
            out = np.where(va, a, b)
            n = firsts[len(nxt)].size
            if n:
                out[..., both] = flat[off : off + n].reshape(a.shape[:2] + (-1,))
            off += n
            nxt.append((out, va | vb))
        if len(items) % 2:
            nxt.append(items[-1])
        items = nxt
        level += 1
    return items[0][0]
