"""The runtime's gate classes: each names the key records it writes and prices its keys, and both claims
hold for a real deal (record names and payload bytes, party by party)."""

from __future__ import annotations

import pytest
from fssc.runtime import gates
from fssc.runtime.keys import KeyReader, KeyWriter
from fssc.runtime.prg import Rng
from fssc.runtime.protocol import Dealer

N, M = 40, 20


def deal_in_memory(fn, seed: bytes = b"k" * 16):
    """(fn's result, P0's key bytes, P1's key bytes) of a dealer on a fixed AES stream (equal streams, equal keys)."""
    w0 = KeyWriter(None, {"program": "sim", "batch": 0, "party": 0})
    w1 = KeyWriter(None, {"program": "sim", "batch": 0, "party": 1})
    res = fn(Dealer(w0, w1, Rng(seed)))
    return res, w0.close(), w1.close()


def _deal(fn):
    _, k0, k1 = deal_in_memory(fn)
    return [list(KeyReader(k, party=p).records()) for p, k in ((0, k0), (1, k1))]


@pytest.mark.parametrize(
    "gate, shift, call",
    [
        (gates.Relu, 0, lambda D, r: gates.Relu.deal(D, "g", r, M, 0)),
        (gates.Relu, 5, lambda D, r: gates.Relu.deal(D, "g", r, M, 5)),
        (gates.Trunc, 7, lambda D, r: gates.Trunc.deal(D, "g", r, M, 7)),
        (gates.Max, 0, lambda D, r: gates.Max.deal(D, "g", r, r[::-1].copy(), M, 0)),
        (gates.Max, 3, lambda D, r: gates.Max.deal(D, "g", r, r[::-1].copy(), M, 3)),  # a shift without a carry
        (gates.ArgMax2, 0, lambda D, r: gates.ArgMax2.deal(D, "g", r, M)),
    ],
)
def test_records_and_cost_match_a_deal(gate, shift, call):
    r = Rng(b"r" * 16).u64(N)
    recs = _deal(lambda D: call(D, r))
    for party in (0, 1):
        assert [t for t, _ in recs[party]] == gate.records("g", party, shift)
    c = gate.cost(N, M, shift, 1)
    for party, want in ((0, c.key_p0), (1, c.key_p1)):
        got = sum(a.nbytes for _, a in recs[party])
        assert got == pytest.approx(want, abs=1), f"{gate.__name__} party {party}: {got} bytes, cost says {want}"


def test_tree_gates_name_their_levels():
    x = Rng(b"x" * 16).u64((1, 1, 4, 4))
    window = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0], "dilations": [1, 1], "ceil_mode": 0}
    recs = _deal(lambda D: gates.MaxPool.run(D, "p", x, m=M, **window))
    tags = [t for t, _ in recs[0]]
    assert tags == gates.Max.records(gates.level_tag("p", 0), 0) + gates.Max.records(gates.level_tag("p", 1), 0)
    depth, n = 2, 3 * 4  # a 2x2 window: 3 max gates in 2 levels, 4 windows
    assert sum(a.nbytes for _, a in recs[0]) == gates.MaxPool.cost(n, M, 0, depth).key_p0


def test_public_constants_vanish_on_masks():
    """Clip moves masked values by its public bounds; on the dealer's masks they are 0, so its dealing is
    exactly a ReLU's on the same masks (same random stream)."""
    r = Rng(b"c" * 16).u64(8)
    clip, k0, k1 = deal_in_memory(lambda D: gates.Clip.run(D, "c", r, lo=5, hi=None, m=M))
    relu, j0, j1 = deal_in_memory(lambda D: gates.Relu.deal(D, "c", r, M, 0))
    assert (clip == relu).all() and (k0, k1) == (j0, j1)
