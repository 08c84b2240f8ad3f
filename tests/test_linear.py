"""The linear-layer protocol and exact ring products.

Dealer.linear + Party.linear_offline (P0) + Party.linear (P1) with a weight
mask A and W^ = W + A, bit-exact against integer references mod 2^64 (numpy
uint64 arithmetic wraps mod 2^64; a pure-Python-int reference cross-checks it)
for Conv (stride 2, padding, groups, depthwise, dilation, 1-D, 3-D) and Gemm, the add-of-a-
constant identity map, and worst-case magnitudes at the float64 limb boundary.
ring_bilinear alone is property-tested with hypothesis.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from fssc.compiler.ir.ops import conv_float
from fssc.runtime import lib, ring
from fssc.runtime.keys import KeyReader
from fssc.runtime.prg import Rng, expand
from fssc.runtime.simulate import deal_in_memory, run_parties
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

U64 = np.uint64


# ----------------------------------------------------------------- integer references
def conv_out_size(n, k, s, p0, p1, d):
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


def conv_ref(x: np.ndarray, w: np.ndarray, strides, pads, dilations, group) -> np.ndarray:
    """Conv over Z_2^64 in integer arithmetic (uint64 wraps, or exact Python ints for object arrays)."""
    nd = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    if x.dtype == object:  # np.pad fills object arrays with np.int64(0), which would overflow
        xp = np.vectorize(int, otypes=[object])(xp)
    out = [
        conv_out_size(x.shape[2 + i], w.shape[2 + i], strides[i], pads[i], pads[i + nd], dilations[i])
        for i in range(nd)
    ]
    cg, og = w.shape[1], w.shape[0] // group
    y = np.zeros((x.shape[0], w.shape[0], *out), dtype=x.dtype)
    if x.dtype == object:
        y[...] = 0
    for g in range(group):
        for tap in itertools.product(*[range(k) for k in w.shape[2:]]):
            sl = tuple(
                slice(tap[i] * dilations[i], tap[i] * dilations[i] + (out[i] - 1) * strides[i] + 1, strides[i])
                for i in range(nd)
            )
            xs = xp[(slice(None), slice(g * cg, (g + 1) * cg)) + sl]  # [N, cg, *out]
            wt = w[(slice(g * og, (g + 1) * og), slice(None)) + tuple(tap)]  # [og, cg]
            part = np.tensordot(xs, wt, axes=([1], [1]))  # [N, *out, og]
            y[:, g * og : (g + 1) * og] += np.moveaxis(part, -1, 1)
    return y


def to_pyint(a: np.ndarray) -> np.ndarray:
    return np.vectorize(int, otypes=[object])(ring.signed(a))


def from_pyint(a: np.ndarray) -> np.ndarray:
    return np.array([int(v) % (1 << 64) for v in a.reshape(-1)], dtype=U64).reshape(a.shape)


def conv_fn(attrs):
    """The runtime's conv (im2col and numpy's BLAS), as the generated programs build it."""
    return lib.conv(attrs["strides"], attrs["pads"], attrs["dilations"], attrs["group"])


# ----------------------------------------------------------------- the protocol
def run_linear(fn, k, x, w, bias, y_shape, a_mask=None, xm_target=None):
    """One weighted layer through the protocol. Returns (y = y^ - r_y, P1's online operand x^ - [r_x]_1).

    ``xm_target`` forces P1's online operand x^ - [r_x]_1 = x + [r_x]_0: the secret
    x is chosen as target - [r_x]_0, with [r_x]_0 recomputed from P0's seed.
    """
    rng = Rng()
    x = np.asarray(x, dtype=U64)
    r_x = rng.u64(x.shape)
    A = rng.u64(w.shape) if a_mask is None else a_mask
    w_hat = w + A  # P1's one-time message to P0
    tag = "lin"

    def dealer(D):
        seeds = D.linear_seeds(tag)
        return D.linear(tag, fn, k, r_x, A, y_shape, seeds)

    r_y, k0, k1 = deal_in_memory(dealer)
    if xm_target is not None:
        seeds = KeyReader(k0, party=0).get(tag + ".seeds").tobytes()
        x = xm_target - expand(seeds[:16], x.shape)
    xhat = x + r_x

    def p0(P):
        z0 = P.linear_offline(tag, fn, k, x.shape, w_hat, y_shape)
        return P.linear(tag, None, z0=z0)

    def p1(P):
        return P.linear(tag, xhat, fn, k, w, bias, ring.signed_bits(w))

    # P1's online operand, read from its key stream as Party.linear does
    xm = xhat - KeyReader(k1, party=1).get(tag + ".rx1")
    y0, y1, c0, c1 = run_parties(p0, p1, k0, k1)
    assert (y0 == y1).all()
    assert c0.rounds == c1.rounds == 1, "one round: both halves cross once"
    return y0 - r_y, x, xm


CONVS = [
    # (x shape, w shape, strides, pads, dilations, group)
    ((2, 4, 9, 9), (6, 4, 3, 3), [2, 2], [1, 1, 1, 1], [1, 1], 1),  # stride 2 + padding, odd input
    ((1, 4, 8, 7), (6, 2, 3, 3), [1, 1], [1, 0, 2, 1], [1, 1], 2),  # groups, asymmetric pads
    ((1, 3, 10, 10), (5, 3, 3, 3), [1, 1], [2, 2, 2, 2], [2, 2], 1),  # dilation
    ((2, 8, 8, 8), (8, 1, 3, 3), [2, 2], [1, 1, 1, 1], [1, 1], 8),  # depthwise, stride 2
    ((2, 4, 7, 8), (8, 1, 3, 2), [1, 2], [1, 0, 2, 1], [2, 1], 4),  # depthwise, two filters per channel
    ((1, 1, 6, 6), (3, 1, 2, 2), [1, 1], [0, 0, 0, 0], [1, 1], 1),  # one input channel, group 1
    ((1, 6, 11, 9), (9, 2, 2, 3), [2, 1], [0, 1, 1, 2], [2, 1], 3),  # everything at once
    ((2, 4, 13), (4, 2, 3), [2], [1, 2], [2], 2),  # 1-D
    ((2, 4, 13), (4, 1, 3), [1], [2, 0], [3], 4),  # 1-D depthwise
    ((1, 4, 4, 5, 6), (4, 2, 2, 3, 2), [1, 2, 1], [1, 0, 1, 0, 1, 1], [1, 1, 2], 2),  # 3-D
]


@pytest.mark.parametrize("xs,ws,strides,pads,dil,group", CONVS)
def test_conv_protocol_exact(xs, ws, strides, pads, dil, group):
    gen = np.random.default_rng(sum(xs) + sum(ws))
    attrs = {"strides": strides, "pads": pads, "dilations": dil, "group": group}
    w = ring.unsigned(gen.integers(-(1 << 16), 1 << 16, size=ws))  # weights at scale 12, |w| < 16
    x = ring.unsigned(gen.integers(-(1 << 24), 1 << 24, size=xs))
    k = int(np.prod(ws[1:]))
    y_ref = conv_ref(x, w, strides, pads, dil, group)
    bias = ring.unsigned(gen.integers(-(1 << 30), 1 << 30, size=y_ref.shape))
    y, _, _ = run_linear(conv_fn(attrs), k, x, w, bias, y_ref.shape)
    assert (y == y_ref + bias).all()
    # the float oracle agrees where it is exact (small values)
    yf = conv_float(attrs, ring.signed(x).astype(np.float64), ring.signed(w).astype(np.float64))[0]
    assert (ring.signed(y - bias) == yf).all()


def test_conv_reference_matches_python_ints():
    """The uint64 reference against exact Python integers reduced mod 2^64 (full-ring operands)."""
    gen = np.random.default_rng(1)
    x = gen.integers(0, 1 << 64, size=(1, 4, 6, 5), dtype=U64)
    w = gen.integers(0, 1 << 64, size=(4, 2, 3, 2), dtype=U64)
    args = ([2, 1], [1, 0, 1, 1], [1, 2], 2)
    assert (conv_ref(x, w, *args) == from_pyint(conv_ref(to_pyint(x), to_pyint(w), *args))).all()


@pytest.mark.parametrize("m,kk,n", [(5, 7, 3), (2, 512, 10), (64, 33, 2)])
def test_gemm_protocol_exact(m, kk, n):
    gen = np.random.default_rng(m * kk)
    x = ring.unsigned(gen.integers(-(1 << 30), 1 << 30, size=(m, kk)))
    w = ring.unsigned(gen.integers(-(1 << 15), 1 << 15, size=(kk, n)))
    b = ring.unsigned(gen.integers(-(1 << 40), 1 << 40, size=(m, n)))
    y, _, _ = run_linear(lambda p, q: p @ q, kk, x, w, b, (m, n))
    assert (y == x @ w + b).all()
    assert (y == from_pyint(to_pyint(x).dot(to_pyint(w)) + to_pyint(b))).all()


def test_constant_operand_as_a_masked_wire():
    """A constant of the model owner's in a local op: P1 sends c + r_c, both hold it, the dealer r_c;
    a local op (here a broadcasting add with P0's masked input) then runs on masks and masked values."""
    gen = np.random.default_rng(2)
    c = gen.integers(0, 1 << 64, size=(3, 1, 4), dtype=U64)
    x = gen.integers(0, 1 << 64, size=(5, 4), dtype=U64)

    def dealer(D):
        r_x = D.input("x", x.shape)
        r_c = D.const("c", c.shape)
        return r_c, r_x + r_c

    (r_c, r_y), k0, k1 = deal_in_memory(dealer)

    def party(P):
        xh = P.input("x", x if P.b == 0 else None, x.shape)
        ch = P.const("c", c if P.b == 1 else None, c.shape)
        return ch, xh + ch

    (c0, y0), (c1, y1), chan0, _ = run_parties(party, party, k0, k1)
    assert (c0 == c1).all() and (y0 == y1).all()
    assert (c0 - r_c == c).all() and (y0 - r_y == x + c).all()
    assert not (c0 == c).any(), "P0 sees the constant masked"
    assert chan0.rounds == 2  # P0's input, P1's constant
    assert [t for t, _ in KeyReader(k0, party=0).records()] == ["x.rin"], "P0's keys say nothing of r_c"


# ----------------------------------------------------------------- the limb boundary
def test_plan_limbs_choices():
    # P1 online: full-ring x (64 bits) against small W; the small operand stays whole
    assert ring.plan_limbs(64, 22, 2048) == (21, 3, 21, 1)  # 21 + 21 + 11 = 53: at the boundary
    assert ring.plan_limbs(64, 17, 576) == (27, 3, 16, 1)  # a 3x3x64 conv with 16-bit weights
    assert ring.plan_limbs(64, 21, 4608) == (20, 4, 20, 1)  # 3x3x512 at 20 bits
    # the public weight width (f + 5 + 4 bits + sign = 22): 4 products where k > 2^11
    assert ring.plan_limbs(64, 22, 4608) == (19, 4, 21, 1)
    # P0 offline / D: full ring x full ring, the fewest products (8 and 5; even 20-bit splits: 10 and 6)
    assert ring.plan_limbs(64, 64, 4608) == (16, 4, 24, 3)
    assert ring.plan_limbs(64, 64, 1) == (21, 3, 32, 2)
    assert ring._products(16, 4, 24, 3) == 8 and ring._products(20, 4, 20, 4) == 10
    with pytest.raises(ValueError):
        ring.plan_limbs(64, 64, 1 << 46)


@settings(max_examples=300, deadline=None)
@given(bx=st.integers(1, 64), bw=st.integers(1, 64), logk=st.integers(0, 40), extra=st.integers(0, 1 << 20))
def test_plan_limbs_invariants(bx, bw, logk, extra):
    """Every digit product summed over k terms stays within float64's 2^53."""
    k = (1 << logk) + extra
    lx, nx, lw, nw = ring.plan_limbs(bx, bw, k)
    mx, mw = bx - 1, bw - 1
    assert lx * nx >= mx and lw * nw >= mw  # digits cover the value (top digit <= 2^L in magnitude)
    ex = mx if nx == 1 else lx  # magnitude bits of a digit (a single digit is the whole value)
    ew = mw if nw == 1 else lw
    assert ex + ew + int(np.ceil(np.log2(k))) <= 53
    if mx + mw + int(np.ceil(np.log2(k))) <= 53:
        assert nx == nw == 1


# P1's worst case: its operand x^ - [r_x]_1 is a full-ring element; the top 21-bit digit of -2^63 is
# exactly -2^21, W = -2^21 is the most negative 22-bit weight, and 2048 * 2^21 * 2^21 = 2^53.
X_EXTREMES = [-(1 << 63), (1 << 63) - 1]


def _extreme(gen, shape, bits):
    """Values at the edges of the signed ``bits``-bit range."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    v = gen.choice(np.array([lo, hi, lo + 1, hi - 1], dtype=np.int64), size=shape)
    return ring.unsigned(v)


@pytest.mark.parametrize("kind", ["gemm", "conv"])
def test_linear_worst_case_at_limb_boundary(kind):
    gen = np.random.default_rng(9)
    if kind == "gemm":
        x_shape, w = (4, 2048), _extreme(gen, (2048, 3), 22)
        w[:, 0] = ring.unsigned(np.full(2048, -(1 << 21)))
        fn, k = (lambda p, q: p @ q), 2048
        ref = lambda a: a @ w  # noqa: E731
    else:  # k = 512 channels x 2 x 2 = 2048, groups 2, stride 2
        attrs = {"strides": [2, 2], "pads": [0, 0, 1, 1], "dilations": [1, 1], "group": 2}
        x_shape, w = (1, 1024, 4, 4), _extreme(gen, (4, 512, 2, 2), 22)
        w[0] = ring.unsigned(np.full((512, 2, 2), -(1 << 21)))
        fn, k = conv_fn(attrs), 2048
        ref = lambda a: conv_ref(a, w, [2, 2], [0, 0, 1, 1], [1, 1], 2)  # noqa: E731
    assert ring.signed_bits(w) == 22 and ring.plan_limbs(64, 22, k) == (21, 3, 21, 1)
    target = ring.unsigned(
        gen.choice(np.array(X_EXTREMES + [-(1 << 63) + 1, 0x5555_5555_5555_5555], dtype=np.int64), size=x_shape)
    )
    target.reshape(-1)[: x_shape[-1] * 4] = ring.unsigned(np.int64(-(1 << 63)))  # whole rows at -2^63
    y, x, xm = run_linear(fn, k, np.zeros(x_shape, U64), w, None, ref(np.zeros(x_shape, U64)).shape, xm_target=target)
    assert (xm == target).all(), "P1's online operand is the forced worst case"
    assert (y == ref(x)).all()
    # and P1's product alone, at the boundary
    assert (ring.ring_bilinear(fn, target, w, k, 64, 22) == ref(target)).all()


def test_boundary_is_tight():
    """With strictly sequential float64 summation, the same worst case breaks with one more bit of budget."""
    gen = np.random.default_rng(0)
    K = 2048
    x = np.full((3, K), (1 << 63) - 1, dtype=U64)
    x[1] = U64(1 << 63)
    w = (gen.integers((1 << 21) - (1 << 12), 1 << 21, size=(K, 2)) | 1).astype(np.int64)
    w[:, 1] = -w[:, 1] - 1
    w = ring.unsigned(w)
    seq = lambda a, c: np.cumsum(a[:, :, None] * c[None], axis=1)[:, -1]  # noqa: E731
    assert (ring.ring_bilinear(seq, x, w, K, 64, 22) == x @ w).all()
    budget = ring.MANTISSA_BUDGET
    try:
        ring.MANTISSA_BUDGET = budget + 1
        assert not (ring.ring_bilinear(seq, x, w, K, 64, 22) == x @ w).all()
    finally:
        ring.MANTISSA_BUDGET = budget


@pytest.mark.parametrize("bw,k", [(64, 4608), (64, 64), (40, 64), (22, 2048)])
def test_full_ring_products_extremes(bw, k):
    """P0's and D's full-ring x full-ring products (64, 64), at the extreme values."""
    gen = np.random.default_rng(bw + k)
    x = _extreme(gen, (3, k), 64)
    w = _extreme(gen, (k, 4), bw)
    assert (ring.ring_bilinear(lambda p, q: p @ q, x, w, k, 64, 64) == x @ w).all()
    assert (ring.ring_bilinear(lambda p, q: p @ q, x, w, k, 64, bw) == x @ w).all()
    assert (ring.ring_bilinear(lambda p, q: p @ q, x, w, k) == x @ w).all()  # measured widths


def test_reduction_chunk_choices():
    """Summing a long reduction in pieces saves digit products: full ring x full ring (P0, the dealer) 8 -> 6
    from K = 1,025; the model owner's full ring x 22-bit weights 4 -> 3 from K = 2,304; short ones stay whole."""
    assert ring.reduction_chunk(64, 64, 4608) == 1024 and ring.reduction_chunk(64, 64, 1152) == 1024
    assert ring.reduction_chunk(64, 22, 4608) == 2048 and ring.reduction_chunk(64, 22, 2304) == 2048
    for bx, bw, k in ((64, 64, 576), (64, 22, 2048), (64, 64, 147), (64, 22, 1152), (64, 64, 1)):
        assert ring.reduction_chunk(bx, bw, k) == k
    products = lambda bx, bw, k: ring._products(*ring.plan_limbs(bx, bw, k))  # noqa: E731
    assert (products(64, 64, 4608), products(64, 64, 1024)) == (8, 6)
    assert (products(64, 22, 4608), products(64, 22, 2048)) == (4, 3)


class _WholeSums(lib.Conv):
    """A conv that ignores the pieces it is asked for: what the pieces guard against."""

    def apply(self, px, ws, chunk=None):
        return super().apply(px, ws, None)


@pytest.mark.parametrize("c,group,bw", [(512, 1, 64), (512, 2, 64), (512, 1, 22)])
def test_a_conv_summed_in_pieces_is_exact_at_the_extremes(c, group, bw):
    """K = C/g x 3 x 3 up to 4,608 full-ring (or 22-bit) terms at the extreme values, planned for pieces of
    1,024 (2,048): equal to the uint64 reference; the same digits summed whole are not."""
    gen = np.random.default_rng(c + group + bw)
    x = _extreme(gen, (1, c, 3, 3), 64)
    w = _extreme(gen, (4, c // group, 3, 3), bw)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], group)
    k = c // group * 9
    assert ring.reduction_chunk(64, bw, k) < k
    want = conv_ref(x, w, *args)
    assert (ring.ring_bilinear(lib.conv(*args), x, w, k, 64, bw) == want).all()
    if k == 4608 and bw == 64:  # where whole sums of these digits pass 2^53
        assert not (ring.ring_bilinear(_WholeSums(*args), x, w, k, 64, bw) == want).all()


def test_a_depthwise_conv_with_a_long_kernel_is_summed_in_pieces_exactly():
    """A 33 x 33 depthwise kernel (K = 1,089 taps, full ring x full ring: pieces of 1,024) against uint64."""
    gen = np.random.default_rng(5)
    x = _extreme(gen, (1, 2, 34, 33), 64)
    w = _extreme(gen, (2, 1, 33, 33), 64)
    x[0, 0] = w[0] = U64((1 << 63) - 1)  # channel 0: every digit product at its largest, all of one sign
    args = ([1, 1], [0, 0, 0, 0], [1, 1], 2)
    assert ring.reduction_chunk(64, 64, 1089) == 1024
    assert (ring.ring_bilinear(lib.conv(*args), x, w, 1089, 64, 64) == conv_ref(x, w, *args)).all()


def test_depthwise_taps_in_pieces_equal_the_whole_sum():
    gen = np.random.default_rng(3)
    x = gen.integers(-(1 << 20), 1 << 20, size=(2, 3, 6, 6)).astype(np.float64)
    w = gen.integers(-(1 << 20), 1 << 20, size=(3, 1, 3, 3)).astype(np.float64)
    f = lib.conv([1, 1], [1, 1, 1, 1], [1, 1], 3)
    px = f.prepare(x, w.shape)
    whole = f.apply(px, [w])[0]
    pieces = f.apply(px, [w], 4)[0]
    assert pieces.dtype == np.int64 and (pieces == np.rint(whole).astype(np.int64)).all()


# ----------------------------------------------------------------- ring_bilinear, property-based
def _signed_arrays(shape_st, bits_st):
    @st.composite
    def make(draw):
        shape = draw(shape_st)
        bits = draw(bits_st)
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        arr = draw(hnp.arrays(np.int64, shape, elements=st.integers(lo, hi)))
        return ring.unsigned(arr), bits

    return make()


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    m=st.integers(1, 5),
    k=st.integers(1, 40),
    n=st.integers(1, 5),
    bx=st.integers(1, 64),
    bw=st.integers(1, 64),
    declare=st.booleans(),
)
def test_ring_bilinear_gemm_property(data, m, k, n, bx, bw, declare):
    x, _ = data.draw(_signed_arrays(st.just((m, k)), st.just(bx)))
    w, _ = data.draw(_signed_arrays(st.just((k, n)), st.just(bw)))
    y = ring.ring_bilinear(lambda p, q: p @ q, x, w, k, bx if declare else None, bw if declare else None)
    assert (y == x @ w).all()


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    stride=st.integers(1, 2),
    dil=st.integers(1, 2),
    pad=st.integers(0, 2),
    group=st.sampled_from([1, 2]),
    cg=st.integers(1, 2),
    kh=st.integers(1, 3),
    bw=st.integers(2, 64),
)
def test_ring_bilinear_conv_property(data, stride, dil, pad, group, cg, kh, bw):
    """cg input channels per group (cg = 1: the depthwise path) against the integer reference."""
    x, _ = data.draw(_signed_arrays(st.just((1, cg * group, 7, 6)), st.just(64)))
    w, _ = data.draw(_signed_arrays(st.just((2 * group, cg, kh, 2)), st.just(bw)))
    attrs = {"strides": [stride, 1], "pads": [pad, 0, pad, 1], "dilations": [dil, 1], "group": group}
    k = cg * kh * 2
    y = ring.ring_bilinear(conv_fn(attrs), x, w, k, 64, bw)
    assert (y == conv_ref(x, w, [stride, 1], [pad, 0, pad, 1], [dil, 1], group)).all()


# ----------------------------------------------------------------- weighted ops through the generated programs
def _weighted_graph(kind, x_shape, w, extra_inputs=(), attrs=None, const_left=False):
    from fssc.compiler.ir.graph import Graph, Value
    from fssc.compiler.ir.ops import infer_shapes

    g = Graph(kind)
    g.add_value(Value("x", tuple(x_shape), scale=12))
    g.add_const("w", w.astype(np.float32))
    ins = ["w", "x"] if const_left else ["x", "w"]
    for name, arr in extra_inputs:
        g.add_const(name, arr.astype(np.float32))
        ins.append(name)
    attrs = dict(attrs or {}, wscale=12)
    shapes = [g.values[i].shape for i in ins]
    g.add_value(Value("y", infer_shapes(kind, attrs, shapes)[0], scale=24 if kind != "add" else 12))
    g.ops = [g.make_op(kind, ins, ["y"], attrs)]
    g.inputs, g.outputs = ["x"], ["y"]
    return g


def _secure_run(graph, x):
    from fssc.compiler.reference.interp import run_fixed
    from fssc.compiler.reference.simulation import simulate

    (y,) = simulate(graph, x, reference=False).outputs
    return y, run_fixed(graph, x, raw=True)[0]


@pytest.mark.parametrize("case", ["conv", "gemm", "matmul3d", "matmul_left", "add_const", "sub_const"])
def test_weighted_ops_through_the_programs(case):
    """Every weighted op kind through the generated programs equals the fixed-point interpreter.
    matmul with a 3-D constant reduces over W's second-to-last axis (4096 terms, not its batch of 2)."""
    gen = np.random.default_rng(5)
    if case == "conv":
        x = gen.standard_normal((2, 4, 9, 9))
        g = _weighted_graph(
            "conv",
            x.shape,
            gen.standard_normal((6, 2, 3, 3)),
            [("b", gen.standard_normal(6))],
            {"strides": [2, 2], "pads": [1, 0, 1, 2], "dilations": [1, 2], "group": 2},
        )
    elif case == "gemm":
        x = gen.standard_normal((3, 40))
        g = _weighted_graph("gemm", x.shape, gen.standard_normal((40, 5)), [("b", gen.standard_normal(5))])
    elif case == "matmul3d":
        x = gen.standard_normal((2, 3, 4096)) * 4
        g = _weighted_graph("matmul", x.shape, gen.uniform(-255, 255, size=(2, 4096, 2)))
        g.meta["weight_bound_bits"] = 8  # |W| < 2^8, as `fssc compile --weight-bound-bits 8` records it
    elif case == "matmul_left":
        x = gen.standard_normal((2, 30, 4))
        g = _weighted_graph("matmul", x.shape, gen.standard_normal((5, 30)), const_left=True)
    else:
        x = gen.standard_normal((2, 3, 4))
        g = _weighted_graph(case[:3], x.shape, gen.standard_normal((2, 3, 4)), attrs={})
        g.ops[0].attrs.pop("wscale")
    y, want = _secure_run(g, x)
    assert (y == want).all()


# ----------------------------------------------------------------- limb counts from public bounds
def _with_weights_scaled(graph, factor: float):
    g = graph.clone()
    for v in g.values.values():
        if v.is_const and v.data is not None and v.data.dtype.kind == "f":
            v.data = v.data * factor
    return g


def test_limb_counts_and_program_do_not_depend_on_the_weights():
    """P1's operand width, hence its float64 limb counts and time, comes from the public weight scale and
    the public bound |W| < 2^weight_bound_bits: the same for tiny and for large weights, and so is
    P1's program text and the program hash."""
    from fssc.compiler.backend.codegen import render
    from fssc.compiler.backend.lower import lower
    from tiny_models import tiny_cnn

    graph, _, _ = tiny_cnn(batch=2, size=12)
    progs = [lower(_with_weights_scaled(graph, f)) for f in (1.0, 1e-3, 7.0)]
    limbs = [
        [
            ring.plan_limbs(64, st.p1["w_bits"], ring.reduction_chunk(64, st.p1["w_bits"], st.params["k"]))
            for st in p.linears
            if "w_bits" in st.p1
        ]
        for p in progs
    ]
    assert limbs[0] and limbs[0] == limbs[1] == limbs[2]
    assert len({p.hash for p in progs}) == 1
    assert len({render(p, "party1") for p in progs}) == 1
    # the width is the public one: wscale + bound + sign
    for stmt in progs[0].linears:
        if "w_bits" in stmt.p1:
            op = next(o for o in graph.ops if f"op{o.uid}" == stmt.tag)
            assert stmt.p1["w_bits"] == op.attrs["wscale"] + graph.meta["weight_bound_bits"] + 1


def test_weight_beyond_the_public_bound_is_one_line():
    from fssc.compiler.backend.lower import lower
    from tiny_models import tiny_cnn

    from fssc.errors import FsscError

    graph, _, _ = tiny_cnn(batch=2, size=12)
    big = _with_weights_scaled(graph, 1000.0)
    with pytest.raises(FsscError, match=r"is beyond the public bound 2\^4; recompile with --weight-bound-bits") as e:
        lower(big)
    assert "\n" not in str(e.value)
    lower(big, with_weights=False)  # the dealer's and the data owner's programs need no weights
