"""The ring Z_{2^64} (numpy uint64, wraparound), fixed-point encoding, and exact
ring products through float64 limbs.

A real v is encoded as round(v * 2^f) mod 2^64. Values are held as uint64;
``signed`` views them as int64 (two's complement) for comparisons and shifts.

Exact products: a bilinear map (conv, GEMM) over Z_{2^64} is computed with
float64 GEMMs/convs on digit slices. A value is split into base-2^L digits,
the low ones unsigned and the top one signed, so a value of B significant
bits (as a signed integer) needs ceil(B/L) digits. A product of an L-bit digit
and an M-bit digit summed over K terms is exact in float64 when
L + M + ceil(log2 K) <= 53 (magnitude bits; see plan_limbs); a map that sums
its reduction in pieces needs that for a piece only (reduction_chunk).
Digit pairs whose shift reaches 64 vanish mod 2^64 and are skipped.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

RING_BITS = 64
MANTISSA_BUDGET = 53  # float64 holds every integer of magnitude <= 2^53


def encode(x, f: int) -> np.ndarray:
    """Reals -> Z_2^64 at scale f (round to nearest)."""
    v = np.rint(np.asarray(x, dtype=np.float64) * float(1 << f))
    return v.astype(np.int64).view(np.uint64)


def decode(u: np.ndarray, f: int) -> np.ndarray:
    """Z_2^64 at scale f -> float64 (two's complement)."""
    return np.asarray(u).view(np.int64).astype(np.float64) / float(1 << f)


def signed(u: np.ndarray) -> np.ndarray:
    return np.asarray(u, dtype=np.uint64).view(np.int64)


def unsigned(s: np.ndarray) -> np.ndarray:
    return np.asarray(s, dtype=np.int64).view(np.uint64)


def signed_bits(u: np.ndarray) -> int:
    """Bits needed to hold every element as a signed integer (incl. sign bit)."""
    s = signed(u)
    if s.size == 0:
        return 1
    hi = int(s.max())
    lo = int(s.min())
    m = max(hi, -lo - 1, 0)
    return m.bit_length() + 1


def digits(u: np.ndarray, width: int, count: int) -> np.ndarray:
    """Split ring elements (read as signed) into ``count`` base-2^width digits as float64, stacked: [count, *shape].

    Low digits are in [0, 2^width); the top digit carries the sign, so
    sum(d_i * 2^(width*i)) equals the signed value exactly when
    width*count covers its significant bits, and equals it mod 2^64 always
    (when width*count >= 64). One array, so the first j digits are one
    contiguous block (``out[:j]``) that a :class:`Bilinear` multiplies at once, without stacking them again.
    """
    s = signed(u).copy()
    out = np.empty((count, *s.shape))
    mask = np.int64((1 << width) - 1)
    for i in range(count):
        if i == count - 1:
            out[i] = s
        else:
            out[i] = s & mask
            s >>= width
    return out


MAX_DIGITS = 16  # more digits than this never gives fewer products


def _products(lx: int, nx: int, lw: int, nw: int) -> int:
    """Digit products a ring product computes (pairs whose shift reaches 64 vanish mod 2^64)."""
    return sum(min(nw, -(-(RING_BITS - lx * i) // lw)) for i in range(nx) if lx * i < RING_BITS)


def plan_limbs(bits_x: int, bits_w: int, k: int) -> tuple[int, int, int, int]:
    """Choose digit widths and counts (Lx, nx, Lw, nw) for exact float64 products.

    ``bits_*`` are signed widths (sign bit included), so magnitudes are below
    2^(bits-1). An unsigned digit of width L is below 2^L, and a signed top
    digit of n digits stays below 2^L when n*L >= bits-1. Every partial sum
    stays below 2^53 when mag_x + mag_w + ceil(log2 k) <= 53. Among the
    splittings that satisfy this, the one with the fewest digit products
    (float64 GEMMs/convs) wins; ties go to fewer digits of w, then of x.
    The choice depends on the widths and k only, never on the values.
    """
    budget = MANTISSA_BUDGET - math.ceil(math.log2(max(k, 1)))
    mx, mw = min(bits_x, RING_BITS) - 1, min(bits_w, RING_BITS) - 1
    if budget < 8:
        raise ValueError(f"reduction length {k} too large for exact float64 products")
    if mx + mw <= budget:
        return max(mx, 1), 1, max(mw, 1), 1
    mx, mw = max(mx, 1), max(mw, 1)
    best = None
    for nw in range(1, min(mw, MAX_DIGITS) + 1):  # split w into nw digits, x into digits as wide as the budget allows
        lw = math.ceil(mw / nw)
        if lw < budget:
            lx = min(budget - lw, mx)
            cand = (_products(lx, math.ceil(mx / lx), lw, nw), nw, lx, math.ceil(mx / lx), lw)
            best = cand if best is None or cand[:2] < best[:2] else best
    for nx in range(1, min(mx, MAX_DIGITS) + 1):  # and the other way round
        lx = math.ceil(mx / nx)
        if lx < budget:
            lw = min(budget - lx, mw)
            nw = math.ceil(mw / lw)
            cand = (_products(lx, nx, lw, nw), nw, lx, nx, lw)
            best = cand if best is None or cand[:2] < best[:2] else best
    assert best is not None  # nx = 1 always fits
    _, nw, lx, nx, lw = best
    return lx, nx, lw, nw


class Bilinear(ABC):
    """A bilinear map over float64 arrays in two steps: ``prepare(x, w_shape)`` rearranges x (a convolution's
    im2col), ``apply(prepared, ws)`` multiplies it by several w at once (one larger GEMM instead of several);
    ``ws`` is a list of w or one array of them stacked along a new first axis (``digits``' layout, which a map
    can multiply without copying them together). :func:`ring_bilinear` prepares each digit of x once and applies
    it to the digits of w it pairs with. Calling the map does both for one w.

    A map whose ``splits_reduction`` is true is also called as ``apply(prepared, ws, chunk)``: it sums its reduction
    in pieces of at most ``chunk`` terms, converts each piece's float64 result (an exact integer) to int64 and adds
    the pieces as int64 (results then int64), so the digit plan need only keep ``chunk`` terms exact
    (``reduction_chunk``).
    """

    splits_reduction: bool = False

    @abstractmethod
    def prepare(self, x: np.ndarray, w_shape: tuple[int, ...]) -> Any: ...

    @abstractmethod
    def apply(self, px: Any, ws: list[np.ndarray] | np.ndarray, chunk: int | None = None) -> list[np.ndarray]: ...

    def __call__(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return self.apply(self.prepare(x, tuple(w.shape)), [w])[0]


MIN_CHUNK = 256  # the shortest reduction piece worth a GEMM of its own


def exact_int(a: np.ndarray) -> np.ndarray:
    """A float64 array of exact integer sums (a digit product's, kept below 2^53 by the plan) as int64: every
    value is an integer already (integer terms, every partial sum exact), so the conversion is exact."""
    return a.astype(np.int64)


def reduction_chunk(bits_x: int, bits_w: int, k: int) -> int:
    """The reduction length to plan digits for (``plan_limbs``): k itself, or the power of two below it that
    needs the fewest digit products when the reduction is summed in pieces that long (pieces added as
    integers; the float64 flops stay those of k terms per product, so fewer products is less work). Ties go to
    the longer piece. Depends on the widths and k only. Example: a full-ring x full-ring product at K = 4608
    takes 8 products in one piece and 6 in pieces of 1,024; the model owner's product with 22-bit weights 4
    and 3."""
    best, fewest = k, _products(*plan_limbs(bits_x, bits_w, k))
    c = 1 << ((k - 1).bit_length() - 1) if k > 1 else 0  # the largest power of two below k
    while c >= MIN_CHUNK:
        n = _products(*plan_limbs(bits_x, bits_w, c))
        if n < fewest:
            best, fewest = c, n
        c //= 2
    return best


def ring_bilinear(
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | Bilinear,
    x: np.ndarray,
    w: np.ndarray,
    k: int,
    bits_x: int | None = None,
    bits_w: int | None = None,
) -> np.ndarray:
    """Exact fn(x, w) over Z_2^64 for a bilinear fn computed in float64.

    ``k`` is the reduction length (terms summed per output). ``bits_*`` bound
    the operands' signed bit widths (measured when not given; pass 64 for a
    full-ring operand such as a masked value). A :class:`Bilinear` fn prepares each digit of x once.
    """
    bx = signed_bits(x) if bits_x is None else bits_x
    bw = signed_bits(w) if bits_w is None else bits_w
    chunk = reduction_chunk(bx, bw, k) if isinstance(fn, Bilinear) and fn.splits_reduction else k
    lx, nx, lw, nw = plan_limbs(bx, bw, chunk)
    dx = digits(x, lx, nx)
    dw = digits(w, lw, nw)
    acc = None
    for i, xi in enumerate(dx):
        js = [j for j in range(nw) if lx * i + lw * j < RING_BITS]  # pairs whose shift reaches 64 vanish: a prefix
        if isinstance(fn, Bilinear):
            px, pw = fn.prepare(xi, tuple(w.shape)), dw[: len(js)]
            parts = fn.apply(px, pw, chunk) if chunk < k else fn.apply(px, pw)
        else:
            parts = [fn(xi, dw[j]) for j in js]
        for j, product in zip(js, parts, strict=True):
            shift = lx * i + lw * j
            part = np.asarray(product)
            shape = part.shape  # flat while summing: a 0-d result stays an array (numpy scalars warn on wrap)
            part = part.reshape(-1)
            part = (part if part.dtype == np.int64 else exact_int(part)).view(np.uint64)  # new, or a Bilinear's own
            if shift:
                np.left_shift(part, np.uint64(shift), out=part)
            acc = part if acc is None else np.add(acc, part, out=acc)
    assert acc is not None  # the (0, 0) digit pair has shift 0
    return acc.reshape(shape)


def fixed_mul(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Elementwise product in Z_2^64 (numpy uint64 wraps)."""
    return np.asarray(x, dtype=np.uint64) * np.asarray(c, dtype=np.uint64)


def trunc(u: np.ndarray, shift: int) -> np.ndarray:
    """Arithmetic (floor) right shift of ring elements read as signed."""
    if shift == 0:
        return np.asarray(u, dtype=np.uint64)
    return (signed(u) >> np.int64(shift)).view(np.uint64)


def upscale(u: np.ndarray, shift: int) -> np.ndarray:
    return np.asarray(u, dtype=np.uint64) << np.uint64(shift)
