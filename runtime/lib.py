"""What generated programs call: one function per statement kind.

A generated program (``prog/party0/program.py``, ``party1``, ``dealer``) is
straight-line code over these functions. Gate functions take the role's
context first: a ``Dealer`` (walking masks) or a ``Party`` (walking masked
values); both expose the same gate methods, so the dealer's program mirrors
the parties' statement by statement. Local functions (add, reshape, sum
pools...) are linear with public constants and run unchanged on masks and on
masked values.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from fssc.runtime import ring
from fssc.runtime.geometry import pad_or_crop, windows
from fssc.runtime.pooling import max_tree
from fssc.runtime.prg import expand
from fssc.runtime.protocol import Dealer, Party

U64 = np.uint64


# ------------------------------------------------------------ bilinear maps
class Conv(ring.Bilinear):
    """ONNX Conv without bias over float64 arrays: x [N, C, *S], w [O, C/g, *k] -> [N, O, *out].

    ``prepare`` lays out x's windows as columns (im2col: [N, g, C/g * prod(k), prod(out)]); ``apply``
    stacks the w it is given along the output channels and runs one float64 GEMM per batch row and group
    on numpy's BLAS. Every output is the sum of the K = C/g * prod(k) products its column holds, nothing
    else, so it is exact whenever ring_bilinear's digit plan bounds K products below 2^53. A conv that
    reads one input channel per group (depthwise) skips the columns: it sums the kernel taps' strided
    views, each times its weight.
    """

    def __init__(self, strides, pads, dilations, group):
        self.strides, self.pads, self.dilations = list(strides), list(pads), list(dilations)
        self.group = int(group)

    def prepare(self, x: np.ndarray, w_shape: tuple[int, ...]):
        attrs = {
            "kernel_shape": list(w_shape[2:]),
            "strides": self.strides,
            "pads": self.pads,
            "dilations": self.dilations,
            "ceil_mode": 0,
        }
        win, _, _, nd = windows(x, attrs, 0.0)  # a view [N, C, *out, *k]
        out = win.shape[2 : 2 + nd]
        if w_shape[1] == 1:  # one input channel per group: the taps' strided views serve as they are
            return win, out
        taps_first = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))  # [N, C, *k, *out]
        cols = np.ascontiguousarray(win.transpose(taps_first))
        return cols.reshape(x.shape[0], self.group, -1, math.prod(out)), out

    def apply(self, px, ws: list[np.ndarray]) -> list[np.ndarray]:
        cols, out = px
        g, o, n = self.group, ws[0].shape[0], cols.shape[0]
        if ws[0].shape[1] == 1:  # depthwise: windows [N, C = g, *out, *k], each w [C * m, 1, *k]
            return [self._taps(cols, out, w) for w in ws]
        stacked = np.concatenate([w.reshape(g, o // g, -1) for w in ws], axis=1)  # [g, len(ws) * O/g, K]
        y = np.matmul(stacked, cols).reshape(n, g, len(ws), o // g, -1)  # x [N, g, K, P]: one GEMM per row, group
        return [y[:, :, j].reshape(n, o, *out) for j in range(len(ws))]

    def _taps(self, win: np.ndarray, out, w: np.ndarray) -> np.ndarray:
        g, o, n, nd = self.group, w.shape[0], win.shape[0], len(out)
        taps = w.reshape(g, o // g, -1)  # [C, m, prod(k)]
        y = np.zeros((n, g, o // g, *out))
        for t, tap in enumerate(np.ndindex(*w.shape[2:])):
            y += win[(..., *tap)][:, :, None] * taps[:, :, t].reshape((g, o // g) + (1,) * nd)
        return y.reshape(n, o, *out)


def conv(strides, pads, dilations, group) -> Conv:
    return Conv(strides, pads, dilations, group)


def matmul():
    return np.matmul


def matmul_transposed():
    """x^T W (Gemm with transA=1: the data operand [K, M] is read transposed)."""
    return lambda x, w: np.matmul(np.swapaxes(x, -1, -2), w)


def matmul_left():
    return lambda x, w: np.matmul(w, x)


def elementwise():
    return lambda x, w: x * w


def channelwise(ndim: int):
    sh = (1, -1) + (1,) * (ndim - 2)
    return lambda x, w: x * w.reshape(sh)


def weight_mask(setup_seed: bytes, tag: str, shape) -> np.ndarray:
    """A for one weighted layer, expanded from the seed of one deal, which D shares with P1."""
    nonce = int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "little")  # distinct per layer
    return expand(setup_seed, tuple(shape), nonce=nonce)


def masked_weights(W: dict[str, np.ndarray], setup_seed: bytes, shapes: dict[str, list]) -> dict[str, np.ndarray]:
    """P1's one-time setup message: W^ = W + A for each weighted layer (tag -> array)."""
    return {tag: W[tag + ".w"] + weight_mask(setup_seed, tag, shape) for tag, shape in shapes.items()}


# ------------------------------------------------------------ input / output
def input_wire(ctx, tag: str, shape, x: np.ndarray | None = None) -> np.ndarray:
    if isinstance(ctx, Dealer):
        return ctx.input(tag, tuple(shape))
    return ctx.input(tag, x, tuple(shape))


def output(ctx, tag: str, v: np.ndarray):
    """P0: the unmasked result (ring elements); P1: None; D: hands P0 the output mask."""
    if isinstance(ctx, Dealer):
        ctx.output(tag, v)
        return None
    return ctx.output(tag, v)


def const(ctx, tag: str, shape, c: np.ndarray | None = None) -> np.ndarray:
    """A constant operand of a local op, the model owner's: P1 sends c^ = c + r_c (``c`` is P1's encoded
    constant; r_c comes from the dealer), P0 receives it, the dealer returns r_c. From here the constant is
    a masked wire like any other."""
    if isinstance(ctx, Dealer):
        return ctx.const(tag, tuple(shape))
    return ctx.const(tag, c, tuple(shape))


# ------------------------------------------------------------ linear layers
def linear_dealer(D: Dealer, tag: str, r_x, fn, k: int, w_shape, y_shape, seeds: bytes, setup_seed: bytes):
    return D.linear(tag, fn, k, r_x, weight_mask(setup_seed, tag, w_shape), tuple(y_shape), seeds)


def linear_offline(P: Party, tag: str, fn, k: int, x_shape, w_hat, y_shape) -> np.ndarray:
    return P.linear_offline(tag, fn, k, tuple(x_shape), w_hat, tuple(y_shape))


def linear_p0(P: Party, tag: str, z0: np.ndarray) -> np.ndarray:
    return P.linear(tag, None, z0=z0)


def linear_p1(P: Party, tag: str, x, fn, k: int, w, b, w_bits: int) -> np.ndarray:
    return P.linear(tag, x, fn, k, w, b, w_bits)


# ------------------------------------------------------------ comparison gates
def relu(ctx, tag: str, x, m: int, trunc: int = 0):
    return ctx.relu(tag, x, m, trunc)


def trunc(ctx, tag: str, x, m: int, shift: int):
    """A truncation no comparison gate absorbs: its own DCF lifts the m-bit result to the ring."""
    return ctx.trunc(tag, x, m, shift)


def maxpool(ctx, tag: str, x, kernel_shape, strides, pads, dilations, ceil_mode, m: int, cmp_trunc: int = 0):
    attrs = _pool_attrs(kernel_shape, strides, pads, dilations, ceil_mode)
    return max_tree(x, attrs, lambda level, a, b: ctx.max(f"{tag}.L{level}", a, b, m, cmp_trunc))


def clip(ctx, tag: str, x, lo: int | None, hi: int | None, m: int):
    """clip(x) = lo + ReLU(x - lo) - ReLU(x - hi), both comparisons in one gate call.

    lo/hi are public ring encodings; they move masked values only (the dealer
    walks masks, on which public constants vanish).
    """
    party = not isinstance(ctx, Dealer)

    def c(v):
        return U64(v) if party else U64(0)

    shape = x.shape
    flat = x.reshape(-1)
    n = flat.size
    if lo is not None and hi is not None:
        y = ctx.relu(tag, np.concatenate([flat - c(lo), flat - c(hi)]), m, 0)
        out = c(lo) + y[:n] - y[n:]
    elif lo is not None:
        out = c(lo) + ctx.relu(tag, flat - c(lo), m, 0)
    else:
        out = c(hi) - ctx.relu(tag, c(hi) - flat, m, 0)
    return out.reshape(shape)


def argmax2(ctx, tag: str, x, axis: int, keepdims: int, select_last: int, m: int):
    """Label of a 2-class argmax, revealed to P0 only.

    argmax = 1 iff x1 > x0, i.e. 1 - DReLU(x0 - x1) (ties pick class 0); with
    ``select_last`` a tie picks class 1: argmax = DReLU(x1 - x0).
    """
    moved = np.moveaxis(x, axis, -1)
    rest = moved.shape[:-1]
    flat = moved.reshape(-1, 2)
    z = flat[:, 1] - flat[:, 0] if select_last else flat[:, 0] - flat[:, 1]
    d = ctx.drelu_to_p0(tag, z, m)
    if d is None:  # the dealer, and P1: no result
        return None
    lab = (d if select_last else 1 - d).reshape(rest)
    return np.expand_dims(lab, axis) if keepdims else lab


def argmax(ctx, tag: str, x, axis: int, keepdims: int, select_last: int, m: int):
    """ArgMax over C classes: a tournament of selections that carries the index along.

    Each level pairs columns (0,1), (2,3), ...; one select gate per pair
    compares a - b (a wins ties: the first maximum, as numpy) or b - a with
    ``select_last`` (the last maximum), and returns both the winning value and
    its index. Indices start as public constants (mask 0) and end as a masked
    wire; ceil(log2 C) levels, two rounds each. Returns the masked index.
    """
    party = not isinstance(ctx, Dealer)
    moved = np.moveaxis(x, axis, -1)
    rest = moved.shape[:-1]
    vals = [np.ascontiguousarray(moved[..., j]).reshape(-1) for j in range(moved.shape[-1])]
    idx = [np.full(vals[0].shape, j if party else 0, dtype=U64) for j in range(len(vals))]
    level = 0
    while len(vals) > 1:
        pairs = len(vals) // 2
        a = np.concatenate(vals[0 : 2 * pairs : 2])
        b = np.concatenate(vals[1 : 2 * pairs : 2])
        ia = np.concatenate(idx[0 : 2 * pairs : 2])
        ib = np.concatenate(idx[1 : 2 * pairs : 2])
        if select_last:  # b wins unless a > b
            w, wi = ctx.select(f"{tag}.L{level}", [b - a, ib - ia], m, 0)
            v, i = a + w, ia + wi
        else:  # a wins unless b > a
            w, wi = ctx.select(f"{tag}.L{level}", [a - b, ia - ib], m, 0)
            v, i = b + w, ib + wi
        n = vals[0].size
        nv = [v[k * n : (k + 1) * n] for k in range(pairs)]
        ni = [i[k * n : (k + 1) * n] for k in range(pairs)]
        if len(vals) % 2:
            nv.append(vals[-1])
            ni.append(idx[-1])
        vals, idx = nv, ni
        level += 1
    lab = idx[0].reshape(rest)
    return np.expand_dims(lab, axis) if keepdims else lab


# ------------------------------------------------------------ local ops
def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def upscale(x, shift: int):
    return ring.upscale(x, shift)


def reshape(x, shape):
    return x.reshape(tuple(shape))


def pad(x, pads):
    return pad_or_crop(x, pads)


def concat(*xs, axis: int):
    return np.concatenate(xs, axis=axis)


def _pool_attrs(kernel_shape, strides, pads, dilations, ceil_mode):
    return {
        "kernel_shape": list(kernel_shape),
        "strides": list(strides),
        "pads": list(pads),
        "dilations": list(dilations),
        "ceil_mode": int(ceil_mode),
    }


def sumpool(x, kernel_shape, strides, pads, dilations, ceil_mode):
    w, _, _, nd = windows(x, _pool_attrs(kernel_shape, strides, pads, dilations, ceil_mode), 0)
    return w.sum(axis=tuple(range(-nd, 0)), dtype=U64)


def globalsumpool(x):
    return x.sum(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=U64)


def avgpool(x, kernel_shape, strides, pads, dilations, ceil_mode, count_include_pad, wscale):
    """Window sums times the public 1/count at scale ``wscale`` (output scale + wscale)."""
    attrs = _pool_attrs(kernel_shape, strides, pads, dilations, ceil_mode)
    w, valid, inpad, nd = windows(x, attrs, 0)
    axes = tuple(range(-nd, 0))
    cnt = (inpad if count_include_pad else valid).sum(axis=axes)
    return w.sum(axis=axes, dtype=U64) * ring.encode(1.0 / cnt, wscale)


def globalavgpool(x, wscale):
    n = int(np.prod(x.shape[2:]))
    return globalsumpool(x) * ring.encode(1.0 / n, wscale)
