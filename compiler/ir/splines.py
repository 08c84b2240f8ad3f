"""Nonlinear activations as public piecewise polynomials: the fit behind every spline gate.

Each function (sigmoid, tanh, SiLU, GELU in its erf and tanh forms, erf, HardSigmoid, HardSwish) becomes a
:class:`fssc.runtime.gates.SplineSpec` for an input at scale ``s_in`` and an output at scale ``s_out``:

* **tails**: outside a fitted range [lo, hi) the function is its limit, computed exactly: a constant
  (sigmoid 0 and 1, tanh and erf -1 and 1, HardSigmoid 0 and 1) or the identity (SiLU, GELU and HardSwish
  for x -> +inf; 0 for x -> -inf). lo and hi are the multiples of 1/2 nearest 0 beyond which the function
  stays within half a unit (2^-(s_out+1)) of its limit;
* **inside** the range, cubic pieces interpolating the function at Chebyshev points (near-minimax,
  deterministic numpy), each centred on an integer M near its middle; the pieces are grown left to right,
  each as long as its fixed-point output stays within ``TOLERANCE`` units of 2^-s_out of the float
  function at every representable input (checked exhaustively; its end found by bisection, at least
  MIN_WIDTH long), which takes fewer knots than halving pieces (each knot costs the gate words
  and a DCF evaluation, runtime/gates.py ``Spline``); HardSigmoid and HardSwish are exact polynomials
  (linear, quadratic) on their middle piece;
* **scales**: a piece computes Y = sum_j B_j (x - M)^j with integer B_j = round(beta_j 2^(c + (d - j) s_in)),
  Y at scale c + d s_in, and the gate outputs floor((Y + 2^(t-1)) / 2^t) (the rounding offset is in B_0)
  with t = c + d s_in - s_out. The truncation compares out_bits bits of Y / 2^t above t, so
  t + out_bits <= 64; out_bits covers the largest |output| with two bits to spare. c is as large as the
  ring allows up to MAX_COEFF_BITS for the exact polynomials of HardSigmoid and HardSwish (their only error
  is the coefficients' rounding), and SMOOTH_COEFF_BITS = 12 for the cubic fits: every bit of t costs the
  gate's exact truncation 16 key bytes per element and party (its carry DCF is over t bits), and below 12
  the rounding would eat into the tolerance enough to need more pieces.

Above f = 13 the input is read at scale min(f, 14) (``input_scale``: a cubic at a higher input scale
would leave too few coefficient bits) and the fits stop refining at 2^-13: the tolerances become
2^(f - 13) units.

The error of the gate's output against the float function at the same (fixed-point) input is then at most
the fit's error + the coefficients' rounding (sum_j 2^-(c + (d-j) s_in + 1) |x - M|^j) + half a unit (the
final rounding), all three inside the tolerance each piece is checked against. :func:`fit` measures it over
every representable input of the fitted range and over the tails up to 64 beyond them (``SplineFit.bound``,
in units of 2^-s_out), and the tests check it; docs/protocol.md states it per function.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
from fssc.runtime import ring
from fssc.runtime.gates import SplineSpec
from numpy.polynomial import Polynomial
from numpy.polynomial import chebyshev as cheb

from fssc.errors import FsscError

DEGREE = 3  # smooth functions: cubic pieces
TOLERANCE = 1.0  # units of 2^-s_out: each piece's worst output error, rounding included
TAIL_TOLERANCE = 0.5  # units of 2^-s_out: the limit's distance from the function beyond the fitted range
FINEST = 13  # the fits stop refining at 2^-FINEST (reals): beyond f = 13 the tolerances are 2^(f - 13) units
MAX_INPUT_SCALE = 14  # a spline reads its input at scale min(f, 14): cubics above it would leave c < 10
MAX_COEFF_BITS = 24  # c: fractional bits of the coefficients beyond the input's (more buys nothing)
SMOOTH_COEFF_BITS = 12  # c of the cubic fits: fewer bits of t to truncate (see the module doc)
MIN_WIDTH = 2.0**-6  # narrowest piece the fit makes (reals)
OUT_MARGIN_BITS = 2  # out_bits = bits of the largest |output| + sign + this margin
MAX_SOFTMAX_CLASSES = 1 << 15  # the reciprocal's fit checks every input up to C + 1 (C = 1,000: 1.4 s)
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(v):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(v, np.float64)))


def _gelu_tanh(v):
    v = np.asarray(v, np.float64)
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


def input_scale(f: int) -> int:
    """The scale a spline reads its input at, for output scale f (plan-fixed-point truncates to it)."""
    return min(f, MAX_INPUT_SCALE)


def _units(s_out: int) -> float:
    """The tolerances' unit scaled to the finest fit: 1 up to s_out = FINEST, 2^(s_out - FINEST) above."""
    return max(1.0, 2.0 ** (s_out - FINEST))


def reference(name: str, attrs: dict | None = None):
    """The float64 function of an activation (ONNX semantics; ``attrs`` for HardSigmoid's alpha and beta and
    Gelu's ``approximate``)."""
    a = attrs or {}
    if name == "sigmoid":
        return _sigmoid
    if name == "tanh":
        return lambda v: np.tanh(np.asarray(v, np.float64))
    if name == "erf":
        return lambda v: _erf(np.asarray(v, np.float64))
    if name == "silu":
        return lambda v: np.asarray(v, np.float64) * _sigmoid(v)
    if name == "gelu":
        if a.get("approximate", "none") == "tanh":
            return _gelu_tanh
        return lambda v: 0.5 * np.asarray(v, np.float64) * (1.0 + _erf(np.asarray(v, np.float64) / math.sqrt(2.0)))
    if name == "hardsigmoid":
        al, be = a.get("alpha", 0.2), a.get("beta", 0.5)
        return lambda v: np.clip(al * np.asarray(v, np.float64) + be, 0.0, 1.0)
    if name == "hardswish":
        return lambda v: np.asarray(v, np.float64) * np.clip(np.asarray(v, np.float64) / 6.0 + 0.5, 0.0, 1.0)
    if name == "exp":  # softmax's numerators: x - max(row) <= 0; 1 from 0 on (never reached above 0)
        return lambda v: np.exp(np.minimum(np.asarray(v, np.float64), 0.0))
    if name == "reciprocal":  # softmax's row sums, in [1, classes]; the edge values outside (never reached)
        top = float(a["classes"]) + 1.0
        return lambda v: 1.0 / np.clip(np.asarray(v, np.float64), 1.0, top)
    raise FsscError(f"no spline for activation {name!r}")


# the limits: (value as x -> -inf, value as x -> +inf); "x" is the identity
_TAILS: dict[str, tuple[float, float | str]] = {
    "sigmoid": (0.0, 1.0),
    "tanh": (-1.0, 1.0),
    "erf": (-1.0, 1.0),
    "silu": (0.0, "x"),
    "gelu": (0.0, "x"),
    "exp": (0.0, 1.0),
}


class SplineFit:
    """A fitted spline: the runtime's spec, the fitted range [lo, hi) and the measured error bound (units of
    2^-s_out, every representable input in the range and the tails up to 64 beyond it)."""

    def __init__(self, spec: SplineSpec, lo: float, hi: float, bound: float, s_in: int, s_out: int):
        self.spec, self.lo, self.hi, self.bound, self.s_in, self.s_out = spec, lo, hi, bound, s_in, s_out


def evaluate(spec: SplineSpec, x: np.ndarray) -> np.ndarray:
    """The spline on ring elements x (signed integers at s_in), as the secure gate computes it (uint64)."""
    xs = ring.signed(np.asarray(x, dtype=np.uint64))
    piece = np.searchsorted(np.asarray(spec.knots, dtype=np.int64), xs, side="right")
    out = np.zeros(xs.shape, dtype=np.uint64)
    xu = xs.view(np.uint64)
    for i in np.unique(piece):
        sel = piece == i
        z = xu[sel] - np.array(spec.centers[i] % (1 << 64), dtype=np.uint64)
        y = np.zeros(z.shape, dtype=np.uint64)
        for b in reversed(spec.coeffs[i]):  # Horner, mod 2^64 (exact: |Y| < 2^63 by construction)
            y = y * z + np.array(b % (1 << 64), dtype=np.uint64)
        hi = ring.signed(y) >> np.int64(spec.shift)
        out[sel] = hi.view(np.uint64) + np.array(spec.lin[i] % (1 << 64), dtype=np.uint64) * xu[sel]
    return out


def _quantize(p: Polynomial, center: int, d: int, s_in: int, c: int, t: int) -> tuple[int, ...]:
    """Integer coefficients B_j of p (a polynomial in the real v) around the integer center (scale s_in)."""
    q = p(Polynomial([center / 2.0**s_in, 1.0])).coef  # p(z + M / 2^s), z = v - M / 2^s
    q = np.concatenate([q, np.zeros(d + 1 - len(q))])
    b = [round(float(q[j]) * 2.0 ** (c + (d - j) * s_in)) for j in range(d + 1)]
    b[0] += 1 << (t - 1)  # round to nearest instead of flooring
    return tuple(b)


def _tail_edge(f, limit, s_out: int, side: int) -> float:
    """The multiple of 1/2 nearest 0 beyond which |f - limit| <= TAIL_TOLERANCE units (checked 64 further)."""
    tol = TAIL_TOLERANCE * _units(s_out) * 2.0**-s_out
    edge = 0.5
    while edge < 64:
        v = side * np.linspace(edge, edge + 64, 1 << 14)
        lim = v if limit == "x" else np.full_like(v, limit)
        if np.abs(f(v) - lim).max() <= tol:
            return side * edge
        edge += 0.5
    raise FsscError(f"no tail within {TAIL_TOLERANCE} units at scale {s_out}")


def _piece_error(f, p: Polynomial, a: int, b: int, d: int, s_in: int, s_out: int, c: int, t: int, want=None):
    """(coefficients, center, worst |error| in units, worst |output| in units) of p on integers [a, b);
    ``want``: f at those integers (x / 2^s_in) if already computed."""
    center = (a + b) // 2
    coeffs = _quantize(p, center, d, s_in, c, t)
    xs = np.arange(a, b, dtype=np.int64)
    spec = SplineSpec((), (center,), (coeffs,), (0,), t, 64)
    got = ring.signed(evaluate(spec, ring.unsigned(xs))).astype(np.float64)
    want = f(xs / 2.0**s_in) if want is None else want
    err = np.abs(got / 2.0**s_out - want).max() * 2.0**s_out
    return coeffs, center, float(err), float(np.abs(got).max())


def _chebyshev_piece(f, ia: int, ib: int, s_in: int, d: int = DEGREE) -> Polynomial:
    """The degree-d polynomial (in the real v) interpolating f at the Chebyshev points of [ia, ib) / 2^s_in."""
    a, b = ia / 2.0**s_in, ib / 2.0**s_in
    mid, half = (a + b) / 2, (b - a) / 2
    cf = cheb.chebinterpolate(lambda u: f(mid + half * u), d)
    return Polynomial(cheb.cheb2poly(cf))(Polynomial([-mid / half, 1 / half]))


def _layout(s_in: int, s_out: int, d: int, biggest: float, most: int = MAX_COEFF_BITS) -> tuple[int, int, int]:
    """(c, t, out_bits) for pieces of degree d whose |output| stays below ``biggest`` (reals)."""
    out_bits = int(biggest * 2.0**s_out + 2).bit_length() + 1 + OUT_MARGIN_BITS
    c = min(most, 64 - out_bits - (d * s_in - s_out))
    t = c + d * s_in - s_out
    if c < 0 or t < 1:
        raise FsscError(f"a degree-{d} spline does not fit the ring at input scale {s_in}, output scale {s_out}")
    return c, t, out_bits


def _assemble(pieces, lin, t: int, out_bits: int, d: int) -> SplineSpec:
    """pieces: [(start integer or None for -inf, center, coeffs)], in order."""
    knots = tuple(int(p[0]) for p in pieces[1:])
    coeffs = tuple(tuple(p[2]) + (0,) * (d + 1 - len(p[2])) for p in pieces)
    return SplineSpec(knots, tuple(int(p[1]) for p in pieces), coeffs, tuple(lin), t, out_bits)


def _const_piece(value: float, s_out: int, t: int) -> tuple[int, ...]:
    """Y = value at scale s_out shifted up by t (plus the rounding offset): the truncation gives it exactly."""
    return ((round(value * 2.0**s_out) << t) + (1 << (t - 1)),)


@functools.lru_cache(maxsize=64)
def _fit(name: str, attr_items: tuple, s_in: int, s_out: int) -> SplineFit:
    attrs = dict(attr_items)
    f = reference(name, attrs)
    if name in ("hardsigmoid", "hardswish"):
        return _fit_hard(name, attrs, f, s_in, s_out)
    if name == "reciprocal":
        return _fit_reciprocal(int(attrs["classes"]), f, s_in, s_out)
    left, right = _TAILS["gelu" if name == "gelu" else name]
    lo, hi = _tail_edge(f, left, s_out, -1), _tail_edge(f, right, s_out, 1)
    if name == "exp":  # its input (x - the row max) is never above 0, where it is 1 exactly: no piece across
        hi = 0.0
    grid = np.linspace(lo, hi, 1 << 14)
    c, t, out_bits = _layout(s_in, s_out, DEGREE, float(np.abs(f(grid)).max()) + 1, SMOOTH_COEFF_BITS)
    ia_all, ib_all = math.ceil(lo * 2**s_in), math.ceil(hi * 2**s_in)
    want = f(np.arange(ia_all, ib_all, dtype=np.int64) / 2.0**s_in)  # f at every integer of the range, once
    tol = TOLERANCE * _units(s_out)
    shortest = max(8, math.ceil(MIN_WIDTH * 2**s_in))

    def piece(ia: int, ib: int):
        p = _chebyshev_piece(f, ia, ib, s_in)
        return _piece_error(f, p, ia, ib, DEGREE, s_in, s_out, c, t, want[ia - ia_all : ib - ia_all])

    inner = []
    worst = 0.0
    ia = ia_all
    while ia < ib_all:  # each piece as long as the tolerance allows: bisection on its end
        ok, bad = min(ia + shortest, ib_all), ib_all + 1
        if piece(ia, ib_all)[2] <= tol:
            ok = ib_all
        while bad - ok > 1 and ok < ib_all:
            mid = (ok + bad) // 2
            ok, bad = (mid, bad) if piece(ia, mid)[2] <= tol else (ok, mid)
        coeffs, center, err, _ = piece(ia, ok)
        inner.append((ia, center, coeffs))
        worst = max(worst, err)
        ia = ok
    inner.sort()
    lin_right = 1 << (s_out - s_in) if right == "x" else 0
    if right == "x" and s_out < s_in:
        raise FsscError(f"spline {name}: output scale {s_out} below input scale {s_in}")
    pieces = [(None, 0, _const_piece(float(left), s_out, t)), *inner]
    # Y = 0 (+ the rounding offset) on an identity tail, whose output is lin x
    right_piece = (1 << (t - 1),) if right == "x" else _const_piece(float(right), s_out, t)
    pieces.append((math.ceil(hi * 2**s_in), 0, right_piece))
    lin = [0] * (len(pieces) - 1) + [lin_right]
    spec = _assemble(pieces, lin, t, out_bits, DEGREE)
    return SplineFit(spec, lo, hi, _measure(spec, f, lo, hi, s_in, s_out, worst), s_in, s_out)


def _fit_hard(name: str, attrs: dict, f, s_in: int, s_out: int) -> SplineFit:
    """HardSigmoid (alpha x + beta clipped to [0, 1]) and HardSwish (x HardSigmoid(x) with 1/6, 1/2): their
    middle piece is their own polynomial, only the coefficients' rounding and the output's are errors."""
    if name == "hardswish":
        al, be, d = 1.0 / 6.0, 0.5, 2
        poly = Polynomial([0.0, be, al])
    else:
        al, be, d = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5)), 1
        poly = Polynomial([be, al])
    if al == 0:  # a constant
        v = min(max(be, 0.0), 1.0) if name == "hardsigmoid" else None
        if v is None:
            raise FsscError("hardswish with alpha 0")
        c, t, out_bits = _layout(s_in, s_out, d, 1.0)
        spec = _assemble([(None, 0, _const_piece(v, s_out, t))], [0], t, out_bits, d)
        return SplineFit(spec, 0.0, 0.0, _measure(spec, f, -1.0, 1.0, s_in, s_out, 0.0), s_in, s_out)
    e0, e1 = sorted((-be / al, (1.0 - be) / al))
    lo_val, hi_val = (0.0, 1.0) if al > 0 else (1.0, 0.0)
    biggest = max(abs(e0), abs(e1)) + 1
    c, t, out_bits = _layout(s_in, s_out, d, biggest)
    ia, ib = math.ceil(e0 * 2**s_in), math.ceil(e1 * 2**s_in)
    coeffs, center, err, _ = _piece_error(f, poly, ia, max(ib, ia + 1), d, s_in, s_out, c, t)
    lin = [0, 0, 0]
    right: tuple[int, ...]
    if name == "hardswish":
        right = (1 << (t - 1),)
        lin[2] = 1 << (s_out - s_in)
    else:
        right = _const_piece(hi_val, s_out, t)
    pieces = [(None, 0, _const_piece(lo_val, s_out, t)), (ia, center, coeffs), (ib, 0, right)]
    spec = _assemble(pieces, lin, t, out_bits, d)
    return SplineFit(spec, e0, e1, _measure(spec, f, e0, e1, s_in, s_out, err), s_in, s_out)


def _halving_pieces(f, edges, s_in: int, s_out: int, d: int, c: int, t: int, tol: float):
    """Pieces of degree d interpolating f at Chebyshev points over [edges[0], edges[-1]) (reals), starting from
    the intervals between consecutive edges, each split in two until every integer of it (scale s_in) is within
    ``tol`` units of 2^-s_out (checked exhaustively; a piece of fewer than 16 integers is kept as it is):
    ([(start integer, center, coeffs)] in order, the worst error)."""
    todo = list(itertools.pairwise(edges))
    inner = []
    worst = 0.0
    while todo:
        lo, hi = todo.pop()
        ia, ib = math.ceil(lo * 2**s_in), math.ceil(hi * 2**s_in)
        p = _chebyshev_piece(f, ia, ib, s_in, d)
        coeffs, center, err, _ = _piece_error(f, p, ia, ib, d, s_in, s_out, c, t)
        if err > tol and (ib - ia) >= 16:
            todo += [((lo + hi) / 2, hi), (lo, (lo + hi) / 2)]
            continue
        inner.append((ia, center, coeffs))
        worst = max(worst, err)
    inner.sort()
    return inner, worst


def _fit_reciprocal(classes: int, f, s_in: int, s_out: int) -> SplineFit:
    """1 / x on [1, classes + 1) (a softmax's row sum: at least the row maximum's e^0 = 1, at most one per
    class): cubic pieces halved until within TOLERANCE units (the finest fit's, as the other smooth splines);
    1 below 1 and 1 / (classes + 1) from classes + 1 on."""
    if not 1 <= classes <= MAX_SOFTMAX_CLASSES:  # the fit checks every input up to C + 1: time grows with C
        raise FsscError(f"softmax over {classes} elements per row: fssc evaluates rows of 1 to {MAX_SOFTMAX_CLASSES}")
    top = classes + 1.0
    c, t, out_bits = _layout(s_in, s_out, DEGREE, 2.0, SMOOTH_COEFF_BITS)
    octaves = [2.0**i for i in range(int(math.log2(top)) + 1) if 2.0**i < top] + [top]  # 1/x's scale grows with x
    inner, worst = _halving_pieces(f, octaves, s_in, s_out, DEGREE, c, t, TOLERANCE * _units(s_out))
    pieces = [
        (None, 0, _const_piece(1.0, s_out, t)),
        *inner,
        (math.ceil(top * 2**s_in), 0, _const_piece(1 / top, s_out, t)),
    ]
    spec = _assemble(pieces, [0] * len(pieces), t, out_bits, DEGREE)
    return SplineFit(spec, 1.0, top, _measure(spec, f, 1.0, top, s_in, s_out, worst), s_in, s_out)


def _measure(spec: SplineSpec, f, lo: float, hi: float, s_in: int, s_out: int, inner: float) -> float:
    """The worst |error| in units of 2^-s_out: every representable input within 8 of the fitted range, and
    samples of the tails up to 64 beyond it."""
    xs = np.arange(math.floor((lo - 8) * 2**s_in), math.ceil((hi + 8) * 2**s_in), dtype=np.int64)
    far = np.round(np.concatenate([np.linspace(lo - 64, lo - 8, 4096), np.linspace(hi + 8, hi + 64, 4096)]) * 2**s_in)
    xs = np.concatenate([xs, far.astype(np.int64)])
    got = ring.signed(evaluate(spec, ring.unsigned(xs))).astype(np.float64) / 2.0**s_out
    return max(inner, float(np.abs(got - f(xs / 2.0**s_in)).max() * 2.0**s_out))


def fit(name: str, attrs: dict | None, s_in: int, s_out: int) -> SplineFit:
    """The spline of activation ``name`` for input scale s_in and output scale s_out (cached: deterministic)."""
    items = tuple(sorted((k, v) for k, v in (attrs or {}).items() if k in ("alpha", "beta", "approximate", "classes")))
    return _fit(name, items, s_in, s_out)


def spline_params(spec: SplineSpec) -> dict:
    """The spline's statement parameters (public: they are the function, part of the architecture)."""
    return {
        "knots": list(spec.knots),
        "centers": list(spec.centers),
        "coeffs": [list(c) for c in spec.coeffs],
        "lin": list(spec.lin),
        "shift": spec.shift,
        "out_bits": spec.out_bits,
    }


# ------------------------------------------------------------------ inverse square root (layer normalization)
RSQRT_MANTISSA_BITS = 16  # L: the mantissa v in [2^L, 2^(L+2)), relative precision 2^-L
RSQRT_OUT_SCALE = 16  # s_h: the spline's output scale (sqrt(C / v) in (sqrt(C) / 2, sqrt(C)])
RSQRT_DEGREE = 2  # quadratic pieces: a cubic at input scale 16 would leave 7 coefficient bits
RSQRT_TOLERANCE = 1.0  # units of 2^-s_h: each piece's worst output error, rounding included


@functools.lru_cache(maxsize=64)
def fit_rsqrt(c: int, L: int = RSQRT_MANTISSA_BITS, s_h: int = RSQRT_OUT_SCALE) -> SplineFit:
    """The spline h(v) = sqrt(c / v) of an integer mantissa in [2^L, 2^(L+2)) read at scale L (v in [1, 4)),
    output at scale s_h: quadratic pieces interpolating at Chebyshev points, split in two until every integer
    of a piece is within RSQRT_TOLERANCE units (checked exhaustively); outside [2^L, 2^(L+2)) (never reached
    by ``RSqrt``) the edge values. ``bound`` is the worst error over every mantissa, in units of 2^-s_h."""
    d = RSQRT_DEGREE

    def f(v):
        return np.sqrt(c / np.asarray(v, np.float64))

    c_bits, t, out_bits = _layout(L, s_h, d, math.sqrt(c) + 1)
    inner, worst = _halving_pieces(f, (1.0, 4.0), L, s_h, d, c_bits, t, RSQRT_TOLERANCE)
    pieces = [
        (None, 0, _const_piece(float(f(1.0)), s_h, t)),
        *inner,
        (4 << L, 0, _const_piece(0.5 * math.sqrt(c), s_h, t)),
    ]
    spec = _assemble(pieces, [0] * len(pieces), t, out_bits, d)
    return SplineFit(spec, 1.0, 4.0, worst, L, s_h)


def octave_fixed(x: np.ndarray, nb: int, lo: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    """What ``gates.Octave`` opens, in the clear: (x 4^(top - i), 2^(top - i)) for x in [4^i, 4^(i+1)) (the
    first piece from 0, the last to 2^nb), as uint64."""
    from fssc.runtime.gates import Octave

    knots = np.asarray(Octave.knots(nb, lo), dtype=np.int64)
    i = lo + np.searchsorted(knots, ring.signed(np.asarray(x, np.uint64)), side="right")
    e = (top - i).astype(np.uint64)
    return np.asarray(x, np.uint64) << (np.uint64(2) * e), np.uint64(1) << e


def rsqrt_fixed(x: np.ndarray, plan) -> np.ndarray:
    """``gates.RSqrt`` in the clear, bit for bit: q h(floor(u / 2^(2 top - L))) mod 2^64."""
    u, q = octave_fixed(x, plan.nb, plan.lo, plan.top)
    v = ring.trunc(u, 2 * plan.top - plan.L)
    return q * evaluate(plan.h, v)


def layernorm_plan(c: int, s_full: int, m_full: int, eps: float, s_out: int):
    """The public plan of a layer normalization over rows of c elements (``gates.LayerNormPlan``).

    D = C x - sum(x) is (C / 2^k) (x - mean) at scale s_full = s_x + k (k = floor(log2 C)), |D| < 2^(m_full - 1)
    (range analysis). D is truncated by the fewest bits d_shift for which S = sum(D_t^2) + eps (eps = epsilon
    C (C / 2^k)^2 4^(s_full - d_shift), at least 1) stays below 2^61 whatever D_t is within its d_bits: the most
    precision the ring leaves for the variance. The octave gate covers [4^lo, 2^nb) with 4^lo <= eps. The
    numerator D_n keeps ``extra`` bits more than D_t, as many as the product's ring headroom allows: D_n R
    (R = 2^(top + s_h) sqrt(C / S)) is y 2^(top + s_h + extra), truncated by top + s_h + extra - s_out."""
    from fssc.runtime.gates import LayerNormPlan, Octave, RSqrtPlan

    k = c.bit_length() - 1
    L, s_h = RSQRT_MANTISSA_BITS, RSQRT_OUT_SCALE
    ybound = 2 * math.sqrt(c) * 2.0**s_out  # |y| <= sqrt(C - 1) (with the gate's relative error: 2 sqrt C)
    y_bits = math.ceil(ybound).bit_length() + 1
    for d_shift in range(m_full - 1):  # d_bits >= 2
        d_bits = m_full - d_shift
        s_d = s_full - d_shift
        eps_int = max(1, round(eps * c * (c / 2**k) ** 2 * 4.0**s_d))
        s_max = c * 4 ** (d_bits - 1) + eps_int
        nb = s_max.bit_length()
        if nb > 61:
            continue
        lo = (eps_int.bit_length() - 1) // 2
        top = max(lo + len(Octave.knots(nb, lo)), (L + 1) // 2)
        if top + s_h + y_bits - s_out > 62 or top + s_h < s_out:
            continue
        extra = min(d_shift, 62 - (top + s_h + y_bits - s_out))  # the numerator's bits beyond D_t's
        rs = RSqrtPlan(nb, lo, top, L, fit_rsqrt(c, L, s_h).spec)
        return LayerNormPlan(d_bits, d_shift, extra, eps_int, rs, y_bits, top + s_h + extra - s_out)
    raise FsscError(f"layer normalization over {c} elements does not fit the ring (|C x - sum x| < 2^{m_full - 1})")
