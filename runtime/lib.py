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

import builtins
import hashlib
import math

import numpy as np
from fssc.runtime import gates, ring, stmt_profile
from fssc.runtime.geometry import pad_or_crop, pool_attrs, windows
from fssc.runtime.prg import expand
from fssc.runtime.protocol import Dealer, Party

U64 = np.uint64


# ------------------------------------------------------------ bilinear maps
class Conv(ring.Bilinear):
    """ONNX Conv without bias over float64 arrays: x [N, C, *S], w [O, C/g, *k] -> [N, O, *out].

    ``prepare`` lays out x's windows as columns (im2col: [g, C/g * prod(k), N * prod(out)], the batch's
    rows side by side); ``apply`` stacks the w it is given along the output channels and runs one float64
    GEMM per group over the whole batch on numpy's BLAS (each w read once, however small the output).
    Every output is the sum of the K = C/g * prod(k) products its column holds, nothing else, so it is
    exact whenever ring_bilinear's digit plan bounds K products below 2^53; asked for pieces of ``chunk``
    terms (``splits_reduction``), it sums each piece exactly and adds them as integers, so the plan need only
    bound ``chunk`` products. A conv that reads one input channel per group (depthwise) skips the columns:
    it sums the kernel taps' strided views, each times its weight.
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
            return win, out, x.shape[0]
        taps_first = (1, *range(2 + nd, 2 + 2 * nd), 0, *range(2, 2 + nd))  # [C, *k, N, *out]
        cols = np.ascontiguousarray(win.transpose(taps_first))
        return cols.reshape(self.group, -1, x.shape[0] * math.prod(out)), out, x.shape[0]

    splits_reduction = True

    def apply(self, px, ws: list[np.ndarray] | np.ndarray, chunk: int | None = None) -> list[np.ndarray]:
        cols, out, n = px
        ws = ws if isinstance(ws, np.ndarray) else np.stack(ws)  # [len(ws), O, C/g, *k]
        g, o = self.group, ws.shape[1]
        if ws.shape[2] == 1:  # depthwise: windows [N, C = g, *out, *k], each w [C * m, 1, *k]
            return [self._taps(cols, out, w, chunk) for w in ws]
        # [g, len(ws) * O/g, K]: a view of the stack for one group, else the groups' rows gathered
        stacked = ws.reshape(len(ws), g, o // g, -1).swapaxes(0, 1).reshape(g, len(ws) * (o // g), -1)
        K = stacked.shape[-1]
        if chunk is None or chunk >= K:
            y = np.matmul(stacked, cols)  # x [g, K, N P]: one GEMM per group
        else:  # pieces of the reduction, each exact, added as integers
            y = np.zeros((g, stacked.shape[1], cols.shape[-1]), dtype=np.int64)
            for c0 in range(0, K, chunk):
                y += ring.exact_int(np.matmul(stacked[:, :, c0 : c0 + chunk], cols[:, c0 : c0 + chunk]))
        y = y.reshape(g, len(ws), o // g, n, -1)
        return [np.moveaxis(y[:, j], 2, 0).reshape(n, o, *out) for j in range(len(ws))]

    def _taps(self, win: np.ndarray, out, w: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """The depthwise sum over the K = prod(k) taps; with ``chunk``, converted to int64 every ``chunk`` taps."""
        g, o, n, nd = self.group, w.shape[0], win.shape[0], len(out)
        taps = w.reshape(g, o // g, -1)  # [C, m, prod(k)]
        y = np.zeros((n, g, o // g, *out))
        every = chunk or 0
        exact = np.zeros(y.shape, dtype=np.int64) if every else None
        for t, tap in enumerate(np.ndindex(*w.shape[2:])):
            y += win[(..., *tap)][:, :, None] * taps[:, :, t].reshape((g, o // g) + (1,) * nd)
            if exact is not None and (t + 1) % every == 0:
                exact += ring.exact_int(y)
                y[...] = 0
        return (y if exact is None else exact + ring.exact_int(y)).reshape(n, o, *out)


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
# one gate class each (fssc.runtime.gates): the class runs the dealer's or a party's side, by ctx
def relu(ctx, tag: str, x, m: int, trunc: int = 0):
    return gates.Relu.run(ctx, tag, x, m=m, trunc=trunc)


def trunc(ctx, tag: str, x, m: int, shift: int):
    """A truncation no comparison gate absorbs: its own DCF lifts the m-bit result to the ring."""
    return gates.Trunc.run(ctx, tag, x, m=m, shift=shift)


def maxpool(ctx, tag: str, x, kernel_shape, strides, pads, dilations, ceil_mode, m: int):
    window = pool_attrs(kernel_shape, strides, pads, dilations, ceil_mode)
    return gates.MaxPool.run(ctx, tag, x, m=m, **window)


def clip(ctx, tag: str, x, lo: int | None, hi: int | None, m: int):
    """clip(x) = lo + ReLU(x - lo) - ReLU(x - hi), both comparisons in one gate call."""
    return gates.Clip.run(ctx, tag, x, lo=lo, hi=hi, m=m)


def argmax2(ctx, tag: str, x, axis: int, keepdims: int, select_last: int, m: int):
    """Label of a 2-class argmax, revealed to P0 only (None for the dealer and P1)."""
    return gates.ArgMax2.run(ctx, tag, x, axis=axis, keepdims=keepdims, select_last=select_last, m=m)


def argmax(ctx, tag: str, x, axis: int, keepdims: int, select_last: int, m: int):
    """ArgMax over C classes: a tournament of selections that carries the index along (masked index)."""
    return gates.ArgMax.run(ctx, tag, x, axis=axis, keepdims=keepdims, select_last=select_last, m=m)


# ------------------------------------------------------------ local ops
def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def upscale(x, shift: int):
    return ring.upscale(x, shift)


def scale(x, factor: int):
    """x times a public integer, mod 2^64 (a negative factor wraps): linear, so it runs on masks and masked
    values alike; ops whose ring map is a public integer multiple (Neg: -1) lower onto it."""
    return x * U64(factor % (1 << 64))


def reshape(x, shape):
    return x.reshape(tuple(shape))


def pad(x, pads):
    return pad_or_crop(x, pads)


def concat(xs: list[np.ndarray], axis: int):
    return np.concatenate(xs, axis=axis)


def transpose(x, perm: list[int]):
    return np.ascontiguousarray(np.transpose(x, perm))


def slice(x, starts: list[int], ends: list[int], steps: list[int]):  # noqa: A001 (the statement's name)
    """x[starts[i]:ends[i]:steps[i]] on every axis i, indices already clamped into the axis (an end of -1
    with a negative step reaches past the front, so it is written as None)."""
    ix = tuple(builtins.slice(s, None if e < 0 else e, k) for s, e, k in zip(starts, ends, steps, strict=True))
    return np.ascontiguousarray(x[ix])


def take(x, indices, axis: int):
    """Gather along ``axis`` with public non-negative indices (an int or nested lists of ints)."""
    return np.take(x, np.asarray(indices, dtype=np.int64), axis=axis)


def where(a, b, cond):
    """``a`` where the public condition ``cond`` (nested lists of bools, broadcast) holds, else ``b``."""
    return np.where(np.asarray(cond, dtype=bool), a, b)


def sumpool(x, kernel_shape, strides, pads, dilations, ceil_mode):
    w, _, _, nd = windows(x, pool_attrs(kernel_shape, strides, pads, dilations, ceil_mode), 0)
    return w.sum(axis=tuple(range(-nd, 0)), dtype=U64)


def globalsumpool(x):
    return x.sum(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=U64)


def avgpool(x, kernel_shape, strides, pads, dilations, ceil_mode, count_include_pad, wscale):
    """Window sums times the public 1/count at scale ``wscale`` (output scale + wscale)."""
    attrs = pool_attrs(kernel_shape, strides, pads, dilations, ceil_mode)
    w, valid, inpad, nd = windows(x, attrs, 0)
    axes = tuple(range(-nd, 0))
    cnt = (inpad if count_include_pad else valid).sum(axis=axes)
    return w.sum(axis=axes, dtype=U64) * ring.encode(1.0 / cnt, wscale)


def globalavgpool(x, wscale):
    n = int(np.prod(x.shape[2:]))
    return globalsumpool(x) * ring.encode(1.0 / n, wscale)


def reducesum(x, axes, keepdims: int):
    """Sum over the public ``axes`` (ReduceSum): linear, exact mod 2^64."""
    return np.asarray(x.sum(axis=tuple(axes), keepdims=bool(keepdims), dtype=U64))  # an array even for ()


def reducemean(x, axes, keepdims: int, wscale: int):
    """Sum over ``axes`` times the public 1/n at scale ``wscale`` (output scale + wscale), n the elements summed."""
    n = math.prod(x.shape[a] for a in axes)
    return reducesum(x, axes, keepdims) * ring.encode(1.0 / n, wscale)


# ------------------------------------------------------------ secret x secret product
def hmul(ctx, tag: str, x, y):
    """x * y of two secret wires (numpy broadcasting), exact in the ring, one round (gates.HMul)."""
    return gates.HMul.run(ctx, tag, x, y)


# ------------------------------------------------------------ spline gates
def spline(ctx, tag: str, x, m: int, knots, centers, coeffs, lin, shift: int, out_bits: int):
    """A public piecewise polynomial of a masked wire (sigmoid, tanh, SiLU, GELU, erf, HardSigmoid,
    HardSwish): one DCF key over the m-bit input, evaluated at every knot, gives masked selection bits (one
    round), one round opens the selected polynomial at its high scale, an exact truncation by ``shift`` bits
    (on ``out_bits`` bits) brings it to the output scale (gates.Spline)."""
    params = {"knots": knots, "centers": centers, "coeffs": coeffs, "lin": lin, "shift": shift, "out_bits": out_bits}
    return gates.Spline.run(ctx, tag, x, m=m, **params)


# ------------------------------------------------------------ layer normalization
def layernorm(
    ctx,
    tag: str,
    x,
    d_bits: int,
    d_shift: int,
    extra: int,
    eps: int,
    s_bits: int,
    lo: int,
    top: int,
    L: int,
    knots,
    centers,
    coeffs,
    lin,
    shift: int,
    out_bits: int,
    y_bits: int,
    y_shift: int,
):
    """(x - mean) / sqrt(var + eps) over the last axis (gates.LayerNorm): the centred sum C x - sum(x) (local),
    its exact truncations (``extra`` bits more for the numerator than for the variance), its squares' sum (a
    secret x secret product), the inverse square root per row
    (octave gate, mantissa truncation, the spline ``knots``.. ``out_bits`` of sqrt(C / v), a product) and the
    product with the centred values, truncated by ``y_shift`` to the output scale."""
    params = {k: v for k, v in locals().items() if k not in ("ctx", "tag", "x")}
    return gates.LayerNorm.run(ctx, tag, x, **params)


# ------------------------------------------------------------ what a statement may call
# A statement's ``fn``: the bilinear map of a linear statement, the function of a local one. Code generation
# writes only these, and a program read back from its manifest (fssc check, fssc run) may name no other
# (tests/test_trust.py checks that every function here is classified).
BILINEAR_MAPS = frozenset({"conv", "matmul", "matmul_transposed", "matmul_left", "elementwise", "channelwise"})
LOCAL_FUNCTIONS = frozenset(
    {
        "add",
        "sub",
        "upscale",
        "scale",
        "reshape",
        "pad",
        "concat",
        "transpose",
        "slice",
        "take",
        "where",
        "sumpool",
        "globalsumpool",
        "avgpool",
        "globalavgpool",
        "reducesum",
        "reducemean",
    }
)

# the protocol's own functions: wires and linear layers; the weight masks run once per session, not per statement
PROTOCOL_FUNCTIONS = frozenset(
    {"input_wire", "output", "const", "linear_dealer", "linear_offline", "linear_p0", "linear_p1"}
)
SETUP_FUNCTIONS = frozenset({"weight_mask", "masked_weights"})
# what a statement of a generated program calls (every gate statement's function included): timed per statement
# when FSSC_PROFILE is set (fssc bench resnet --profile), left untouched otherwise (fssc.runtime.stmt_profile)
STATEMENT_FUNCTIONS = PROTOCOL_FUNCTIONS | frozenset(gates.STATEMENTS) | LOCAL_FUNCTIONS
stmt_profile.instrument(globals(), sorted(STATEMENT_FUNCTIONS))
