"""Comparison gates on masked wires.

* Exhaustive at m = 4..8: every masked input u and every mask rho, in one
  vectorised gate call per (gate, m, trunc), against the plaintext formula
  x' = (u - rho) mod 2^m read as signed (docs/protocol.md, section 5), for ReLU with
  and without fused truncation, max / select with a truncated comparison and
  the 2-class label (DReLU revealed to P0 only).
* Randomized at m up to 64 in Z_2^64 with uniform high mask bits.
* MaxPool (the generated programs' max tree over a small IR graph, incl. the separable
  lowering), ArgMax over 2 classes and Clip against numpy on random tensors,
  with window borders (pads, ceil_mode, stride 2, dilation) and ties.

Test data comes from numpy's seeded generator; the protocol's own randomness
is the os.urandom-seeded AES-CTR ``Rng``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from fssc.compiler.ir.graph import Graph, Value
from fssc.compiler.ir.ops import infer_shapes
from fssc.compiler.reference import simulation
from fssc.compiler.reference.interp import run_fixed
from fssc.passes import lower_maxpool
from fssc.passes.base import PassContext
from fssc.runtime import gates, ring
from fssc.runtime.protocol import compare_input
from fssc.runtime.simulate import deal_in_memory, run_parties

U64 = np.uint64
MASK64 = (1 << 64) - 1
TRUNCS = (0, 3, 12)


# ----------------------------------------------------------------- helpers
def _low(bits: int) -> U64:
    return U64((1 << bits) - 1) if bits < 64 else U64(MASK64)


def _rand_u64(gen: np.random.Generator, n: int) -> np.ndarray:
    return gen.integers(0, 1 << 64, size=n, dtype=np.uint64, endpoint=False)


def place(u: np.ndarray, m: int, s: int, gen: np.random.Generator) -> np.ndarray:
    """A ring element whose bits [s, s + m) are u, with uniform bits below and above."""
    noise = _rand_u64(gen, u.size)
    window = _low(m) << U64(s) if m + s < 64 else ~_low(s)
    return (noise & ~window) | ((u.astype(U64) << U64(s)) & window)


def signed_mod(v: np.ndarray, m: int) -> np.ndarray:
    """v mod 2^m read as a signed m-bit integer (int64)."""
    sh = 64 - m  # sign-extend bit m-1 through an arithmetic shift
    return (np.asarray(v, dtype=U64) << U64(sh)).view(np.int64) >> np.int64(sh)


def exact_trunc(xhat: np.ndarray, r: np.ndarray, m: int, s: int) -> np.ndarray:
    """floor(x / 2^s) for x = x^ - r, read as a signed m-bit integer (int64): the exact truncation."""
    return signed_mod((xhat - r) >> U64(s), m)


def carry(xhat: np.ndarray, r: np.ndarray, s: int) -> np.ndarray:
    """The carry of the dropped bits, 1{x^ mod 2^s < r mod 2^s} (int64)."""
    return ((xhat & _low(s)) < (r & _low(s))).astype(np.int64) if s else np.zeros(xhat.shape, np.int64)


def full_pairs(m: int, s: int, gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every (x^, r) mod 2^(m + s), as ring elements with uniform bits above m + s."""
    u, rho = all_pairs(m + s)
    return place(u, m + s, 0, gen), place(rho, m + s, 0, gen)


def random_pairs(m: int, s: int, n: int, gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Uniform masks r and x^ = x + r for uniform x, plus x at the edges of the m-bit range and the carry."""
    r = _rand_u64(gen, n)
    x = _rand_u64(gen, n)
    top = 1 << (m - 1)
    edge = [0, 1, -1, top - 2, top - 1, -top + 1, -top, 2, -2]
    xe = np.array([(e << s) + d for e in edge for d in (0, 1, (1 << s) - 1)] if s else edge, dtype=np.int64)
    x[: xe.size] = ring.unsigned(xe)
    r[xe.size : 2 * xe.size] = ring.unsigned(-xe - 1)  # x^ = x + r with its low bits all ones / zero
    return x + r, r


def in_range(t: np.ndarray, m: int) -> np.ndarray:
    """Where an exact gate must give the ideal result: -2^(m-1) < floor(x / 2^s) < 2^(m-1) - 1
    (range analysis keeps a 2-bit margin)."""
    return (t > -(1 << (m - 1))) & (t < (1 << (m - 1)) - 1)


def all_pairs(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (u, rho) in [0, 2^m)^2, flat."""
    n = 1 << m
    u, rho = np.meshgrid(np.arange(n, dtype=U64), np.arange(n, dtype=U64), indexing="ij")
    return u.reshape(-1), rho.reshape(-1)


def simulate(deal_fn, party_fn, record: bool = False):
    """Deal in memory, run both parties; checks both key streams were consumed to the end."""
    res, k0, k1 = deal_in_memory(deal_fn)

    def wrap(P):
        out = party_fn(P)
        assert P.keys.skip_to_end(), f"party {P.b} left key records unread"
        return out

    y0, y1, c0, c1 = run_parties(wrap, wrap, k0, k1, record=record)
    return res, y0, y1, c0, c1


# ----------------------------------------------------------------- ReLU (exact fused truncation)
def _check_relu(xhat: np.ndarray, r: np.ndarray, m: int, s: int) -> None:
    """Gate output against the exact truncation: ReLU(floor(x / 2^s)) wherever floor(x / 2^s) is in
    the m-bit range, and the gate's formula everywhere (pins the behaviour at the range's edges)."""
    r_out, y0, y1, _, _ = simulate(
        lambda D: D.gate(gates.Relu, "g", r, m, s), lambda P: P.gate(gates.Relu, "g", xhat, m, s)
    )
    assert (y0 == y1).all(), "both parties must open the same masked output"
    y = ring.signed(y0 - r_out)
    t = exact_trunc(xhat, r, m, s)
    ok = in_range(t, m)
    bad = np.flatnonzero(ok & (y != np.maximum(t, 0)))
    assert bad.size == 0, (
        f"m={m} s={s}: {bad.size} wrong, e.g. x^={xhat[bad[0]]} r={r[bad[0]]} got {y[bad[0]]} want {max(t[bad[0]], 0)}"
    )
    assert ok.mean() > 0.4
    # the formula: w = (u - rho - 1) mod 2^m signed, g = 1{w >= 0}: y = g (w + 1 - c) (with s = 0: ReLU(u - rho))
    u, rho = compare_input(xhat, s, m), compare_input(r, s, m)
    if s:
        w = signed_mod(u - rho - U64(1), m)
        want = (w >= 0) * (w + 1 - carry(xhat, r, s))
    else:
        want = np.maximum(signed_mod(u - rho, m), 0)
    assert (y == want).all()


@pytest.mark.parametrize("m,s", [(m, s) for m in range(3, 8) for s in range(4) if m + s <= 9])
def test_relu_exhaustive(m, s):
    """Every masked value and every mask mod 2^(m + s): the carry's DCF and the gate's DCF together."""
    _check_relu(*full_pairs(m, s, np.random.default_rng(1000 * m + s)), m, s)


@pytest.mark.parametrize(
    "m,s", [(m, s) for m in (9, 12, 16, 20, 24, 32, 40, 47, 52, 61, 63, 64) for s in (0, 1, 12, 17) if m + s <= 64]
)
def test_relu_random_wide(m, s):
    gen = np.random.default_rng(7 * m + s)
    _check_relu(*random_pairs(m, s, 3000, gen), m, s)


def test_relu_is_deterministic():
    """Two deals (fresh masks) on the same secret values give the same outputs, exactly floor's."""
    gen = np.random.default_rng(9)
    m, s, n = 20, 12, 4000
    x = ring.unsigned(gen.integers(-(1 << 30), 1 << 30, size=n))
    outs = []
    for _ in range(2):
        r = _rand_u64(gen, n)
        r_out, y0, _, _, _ = simulate(
            lambda D, r=r: D.gate(gates.Relu, "g", r, m, s), lambda P, r=r: P.gate(gates.Relu, "g", x + r, m, s)
        )
        outs.append(ring.signed(y0 - r_out))
    assert (outs[0] == outs[1]).all()
    assert (outs[0] == np.maximum(ring.signed(x) >> s, 0)).all()


# ----------------------------------------------------------------- standalone truncation (exact)
def _check_trunc(xhat: np.ndarray, r: np.ndarray, m: int, s: int) -> None:
    r_out, y0, y1, _, _ = simulate(
        lambda D: D.gate(gates.Trunc, "g", r, m, s), lambda P: P.gate(gates.Trunc, "g", xhat, m, s)
    )
    assert (y0 == y1).all()
    y = ring.signed(y0 - r_out)
    t = exact_trunc(xhat, r, m, s)
    ok = in_range(t, m)
    bad = np.flatnonzero(ok & (y != t))
    assert bad.size == 0, f"m={m} s={s}: {bad.size} wrong, e.g. x^={xhat[bad[0]]} r={r[bad[0]]}"
    assert ok.mean() > 0.4
    # the formula: (u - rho) mod 2^m read as signed, lifted to Z_2^64, minus the carry
    u, rho = compare_input(xhat, s, m), compare_input(r, s, m)
    assert (y == signed_mod(u - rho, m) - carry(xhat, r, s)).all()


@pytest.mark.parametrize("m,s", [(m, s) for m in range(3, 8) for s in range(1, 4) if m + s <= 9])
def test_trunc_exhaustive(m, s):
    _check_trunc(*full_pairs(m, s, np.random.default_rng(3000 * m + s)), m, s)


@pytest.mark.parametrize("m,s", [(20, 12), (33, 19), (40, 24), (52, 12), (47, 17)])
def test_trunc_random_wide(m, s):
    gen = np.random.default_rng(m + 100 * s)
    _check_trunc(*random_pairs(m, s, 4000, gen), m, s)


def test_compare_width_guard():
    with pytest.raises(ValueError):
        compare_input(np.zeros(3, U64), 12, 53)
    with pytest.raises(ValueError):
        compare_input(np.zeros(3, U64), 0, 1)


# ----------------------------------------------------------------- max / select
def _check_max(u, rho, m, s, gen):
    n = u.size
    r_z = place(rho, m, s, gen)
    zhat = place(u, m, s, gen)
    rb, bhat = _rand_u64(gen, n), _rand_u64(gen, n)
    ra, ahat = rb + r_z, bhat + zhat  # a - b has mask r_z and masked value zhat
    r_out, y0, y1, _, _ = simulate(
        lambda D: D.gate(gates.Max, "g", ra, rb, m, s), lambda P: P.gate(gates.Max, "g", ahat, bhat, m, s)
    )
    assert (y0 == y1).all()
    a, b = ahat - ra, bhat - rb
    d = (signed_mod(u - rho, m) >= 0).astype(U64)
    assert ((y0 - r_out) == b + d * (a - b)).all(), f"max m={m} s={s}"
    # d is DReLU of the truncated difference plus the carry of its dropped bits
    t = ring.unsigned(exact_trunc(zhat, r_z, m, s) + carry(zhat, r_z, s))
    assert (d == (signed_mod(t, m) >= 0)).all()


@pytest.mark.parametrize("s", TRUNCS)
@pytest.mark.parametrize("m", range(4, 9))
def test_max_exhaustive(m, s):
    gen = np.random.default_rng(2000 * m + s)
    _check_max(*all_pairs(m), m, s, gen)


@pytest.mark.parametrize("m,s", [(12, 0), (20, 12), (40, 3), (52, 12), (63, 0), (64, 0)])
def test_max_random_wide(m, s):
    gen = np.random.default_rng(m + 100 * s)
    n = 3000
    _check_max(_rand_u64(gen, n) & _low(m), _rand_u64(gen, n) & _low(m), m, s, gen)


def test_max_against_numpy_with_ties():
    """Party.max on random small tensors under uniform masks equals np.maximum, ties included."""
    gen = np.random.default_rng(17)
    shape = (3, 7, 50)
    a = gen.integers(-20, 20, size=shape) << 12
    b = np.where(gen.random(shape) < 0.3, a, gen.integers(-20, 20, size=shape) << 12)
    b.reshape(-1)[:8] = a.reshape(-1)[:8] + [1, -1, 1, -1, 4095, -4095, 4096, -4096]  # 1 LSB apart
    ra, rb = _rand_u64(gen, a.size).reshape(shape), _rand_u64(gen, a.size).reshape(shape)
    ahat, bhat = ring.unsigned(a) + ra, ring.unsigned(b) + rb
    r_out, y0, _, _, _ = simulate(
        lambda D: D.gate(gates.Max, "g", ra, rb, 32, 0), lambda P: P.gate(gates.Max, "g", ahat, bhat, 32, 0)
    )
    assert (ring.signed(y0 - r_out) == np.maximum(a, b)).all()


@pytest.mark.parametrize("m,s", [(6, 0), (7, 3), (30, 12)])
def test_select_two_values(m, s):
    """select opens d * z_j + r_j for every z_j with one d = DReLU(z_0 >> s)."""
    gen = np.random.default_rng(m)
    u, rho = all_pairs(m) if m <= 8 else (_rand_u64(gen, 4000) & _low(m), _rand_u64(gen, 4000) & _low(m))
    n = u.size
    r0, z0hat = place(rho, m, s, gen), place(u, m, s, gen)
    r1, z1hat = _rand_u64(gen, n), _rand_u64(gen, n)
    outs, y0, y1, _, _ = simulate(
        lambda D: D.gate(gates.Select, "g", [r0, r1], m, s), lambda P: P.gate(gates.Select, "g", [z0hat, z1hat], m, s)
    )
    assert all((a == b).all() for a, b in zip(y0, y1, strict=True))
    d = (signed_mod(u - rho, m) >= 0).astype(U64)
    assert ((y0[0] - outs[0]) == d * (z0hat - r0)).all()
    assert ((y0[1] - outs[1]) == d * (z1hat - r1)).all()


# ----------------------------------------------------------------- DReLU to P0 (2-class label)
def _check_drelu(u, rho, m, gen):
    r = place(rho, m, 0, gen)
    zhat = place(u, m, 0, gen)
    _, d0, d1, c0, c1 = simulate(
        lambda D: D.gate(gates.ArgMax2, "g", r, m), lambda P: P.gate(gates.ArgMax2, "g", zhat, m)
    )
    assert d1 is None, "P1 must not get the label"
    assert c1.bytes_received == 0 and c0.messages_sent == 0, "only P1 -> P0 traffic"
    want = (signed_mod(u - rho, m) >= 0).astype(np.int64)
    assert (d0 == want).all()


@pytest.mark.parametrize("m", range(4, 9))
def test_drelu_to_p0_exhaustive(m):
    gen = np.random.default_rng(3000 + m)
    _check_drelu(*all_pairs(m), m, gen)


@pytest.mark.parametrize("m", [16, 33, 64])
def test_drelu_to_p0_random_wide(m):
    gen = np.random.default_rng(m)
    _check_drelu(_rand_u64(gen, 3000) & _low(m), _rand_u64(gen, 3000) & _low(m), m, gen)


# ----------------------------------------------------------------- IR graphs through the generated programs
def one_op_graph(kind, in_shape, attrs, gate, scale=12, out_dtype="float32") -> Graph:
    g = Graph(kind)
    g.add_value(Value("x", tuple(in_shape), scale=scale))
    out_shape = infer_shapes(kind, attrs, [tuple(in_shape)])[0]
    g.add_value(Value("y", out_shape, out_dtype, scale=0 if out_dtype == "int64" else scale))
    op = g.make_op(kind, ["x"], ["y"], attrs)
    op.gate = dict(gate)
    g.ops = [op]
    g.inputs, g.outputs = ["x"], ["y"]
    return g


def run_programs(graph: Graph, x: np.ndarray):
    """The graph's generated programs in process on integer inputs x (ring units at scale 12)."""
    return simulation.simulate(graph, x / 4096.0, reference=False)


def maxpool_ref(x: np.ndarray, attrs: dict) -> np.ndarray:
    """Window max with -inf padding, written out index by index (independent of compiler.ops)."""
    nd = x.ndim - 2
    k = attrs["kernel_shape"]
    s = attrs.get("strides") or [1] * nd
    d = attrs.get("dilations") or [1] * nd
    p = attrs.get("pads") or [0] * (2 * nd)
    ceil = attrs.get("ceil_mode", 0)
    outs = []
    for i in range(nd):
        n, eff = x.shape[2 + i], d[i] * (k[i] - 1) + 1
        span = n + p[i] + p[i + nd] - eff
        o = (-(-span // s[i]) if ceil else span // s[i]) + 1
        if ceil and (o - 1) * s[i] >= n + p[i]:
            o -= 1
        outs.append(o)
    y = np.empty(x.shape[:2] + tuple(outs), dtype=x.dtype)
    for pos in itertools.product(*[range(o) for o in outs]):
        best = None
        for tap in itertools.product(*[range(kk) for kk in k]):
            idx = [pos[i] * s[i] - p[i] + tap[i] * d[i] for i in range(nd)]
            if all(0 <= idx[i] < x.shape[2 + i] for i in range(nd)):
                v = x[(slice(None), slice(None)) + tuple(idx)]
                best = v if best is None else np.maximum(best, v)
        y[(slice(None), slice(None)) + pos] = best
    return y


POOLS = [
    ((2, 3, 9, 9), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),  # ResNet stem, odd size
    ((2, 2, 8, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 0, 0], "ceil_mode": 1}),
    ((1, 2, 7, 10), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1}),
    ((2, 3, 8, 8), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ((2, 2, 9, 9), {"kernel_shape": [3, 3], "strides": [3, 3], "pads": [1, 1, 0, 0]}),
    ((1, 2, 9, 9), {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [2, 2, 2, 2], "dilations": [2, 2]}),
    ((2, 3, 8, 8), {"kernel_shape": [1, 3], "strides": [1, 2], "pads": [0, 1, 0, 1]}),  # separable halves
    ((2, 3, 8, 4), {"kernel_shape": [3, 1], "strides": [2, 1], "pads": [1, 0, 1, 0]}),
    ((2, 3, 11), {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "ceil_mode": 1}),  # 1-D
]


def _pool_graph(shape, attrs, m, lower: bool) -> Graph:
    attrs = {
        "strides": [1] * (len(shape) - 2),
        "dilations": [1] * (len(shape) - 2),
        "pads": [0] * (2 * (len(shape) - 2)),
        "ceil_mode": 0,
        **attrs,
    }
    g = one_op_graph("maxpool", shape, attrs, {"kind": "max", "bits": m})
    if lower:
        g = lower_maxpool.run(g, PassContext(frac_bits=12)).graph
        for op in g.ops:
            op.gate = {"kind": "max", "bits": m}
        for n in g.values:
            g.values[n].scale = 12
    return g


@pytest.mark.parametrize("lower", [False, True])
@pytest.mark.parametrize("shape,attrs", POOLS)
def test_maxpool_exact(shape, attrs, lower):
    """The secure pool equals numpy's window max, ties included."""
    if lower and (len(attrs["kernel_shape"]) != 2 or min(attrs["kernel_shape"]) == 1):
        pytest.skip("lowering splits 2-D pools with both sides > 1")
    gen = np.random.default_rng(abs(hash((shape, lower))) % 2**32)
    x = gen.integers(-6, 6, size=shape) * 4096  # few levels: many ties, incl. whole windows
    x[..., :2] = -7 * 4096  # equal border values next to the padding
    g = _pool_graph(shape, attrs, m=18, lower=lower)
    if lower:
        assert len(g.ops) == 2 and all(min(op.attrs["kernel_shape"]) == 1 for op in g.ops)
    (y,) = run_programs(g, x).outputs
    assert (ring.signed(y) == maxpool_ref(x, attrs)).all()


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("last", [0, 1])
@pytest.mark.parametrize("axis", [1, 0, -1])
def test_argmax_two_classes(axis, last, keepdims):
    gen = np.random.default_rng(axis + 2 + 10 * last + 100 * keepdims)
    rows = 400
    shape = (rows, 2) if axis in (1, -1) else (2, rows)
    x = gen.integers(-(1 << 20), 1 << 20, size=shape)
    x.reshape(-1)[: 2 * 40] = 5  # ties
    flat = np.moveaxis(x, axis, -1)
    flat[50:60, 1] = flat[50:60, 0] + 1  # off by one LSB either way
    flat[60:70, 1] = flat[60:70, 0] - 1
    attrs = {"axis": axis, "keepdims": keepdims, "select_last_index": last}
    g = one_op_graph("argmax", shape, attrs, {"kind": "argmax", "bits": 24}, out_dtype="int64")
    (lab,) = run_programs(g, x).outputs
    want = np.flip(x, axis).argmax(axis) if last else x.argmax(axis)
    if last:
        want = 1 - want
    if keepdims:
        want = np.expand_dims(want, axis)
    assert lab.shape == want.shape and (lab == want).all()
    assert (lab == run_fixed(g, x / 4096.0)[0]).all()


@pytest.mark.parametrize("lo,hi", [(-1.5, 2.25), (0.0, 6.0), (-2.0, None), (None, 0.75), (1.0, 1.0)])
def test_clip(lo, hi):
    gen = np.random.default_rng(3)
    shape = (4, 3, 50)
    x = gen.integers(-8 << 12, 8 << 12, size=shape)
    for i, v in enumerate(b for b in (lo, hi) if b is not None):  # values on and next to the bounds
        x.reshape(-1)[i * 6 : (i + 1) * 6] = int(v * 4096) + np.array([-1, 0, 1, -1, 0, 1])
    attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
    g = one_op_graph("clip", shape, attrs, {"kind": "clip", "bits": 18})
    (y,) = run_programs(g, x).outputs
    want = np.clip(x, -np.inf if lo is None else int(lo * 4096), np.inf if hi is None else int(hi * 4096))
    assert (ring.signed(y) == want).all()
    assert (y == run_fixed(g, x / 4096.0, raw=True)[0]).all()
