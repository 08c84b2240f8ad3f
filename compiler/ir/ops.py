"""The registry of IR op kinds: every fact about an op kind, in one entry.

Each kind maps to an :class:`OpDef` with

* ``shape(attrs, in_shapes) -> [out_shape, ...]``, used by the importer and the verifier;
* ``run(attrs, *inputs) -> [outputs]``: the float reference semantics (ONNX's), in float64;
* ``fixed(op, graph, env) -> ring array``: the fixed-point semantics the secure runtime has
  (:func:`fssc.compiler.reference.interp.run_fixed`); a local op's is its runtime function
  itself, on its operands with constants encoded;
* ``role`` (:class:`Role`): how the secure program runs it: a local op, a linear layer with the
  model owner's weights, a comparison gate, or folded away by passes before lowering;
* ``scale`` (:class:`Scale`): what plan-fixed-point does to its scales;
* ``gate`` (:class:`GateSpec`, gate ops only): its gate kind, comparisons, depth, the magnitude
  its comparisons see, the bits it drops, and the runtime gate class
  (:mod:`fssc.runtime.gates`) that deals it, evaluates it and knows its key cost;
* its lowering to statement parameters: ``lower(op, graph[, bits])`` for local and gate ops
  (a local op's parameters start with ``fn``, the :mod:`fssc.runtime.lib` function it calls),
  ``bilinear(op, graph, x)`` for linear layers;
* ``onnx``: the ONNX op type imported one-to-one (no attributes) by the importer's generic path.

Structural constants (reshape targets, pads, clip bounds) are attributes, so
every tensor value in the IR is data. Kinds created by passes (``trunc``,
``affine``, ``upscale``...) are registered here too, so one table serves the
importer, the verifier, the passes, the interpreters, lowering and the cost
model. docs/adding-an-op.md walks through adding a kind.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from fssc.runtime import gates as rgates
from fssc.runtime import lib, ring
from fssc.runtime.geometry import pad_or_crop, pool_params, window_geometry, windows

from fssc.errors import FsscError

if TYPE_CHECKING:
    from fssc.compiler.ir.graph import Graph, Op


class Role(enum.Enum):
    """How the secure program runs an op kind."""

    LOCAL = "local"  # public and linear: one lib function runs on masks and masked values alike
    LINEAR = "linear"  # linear with the model owner's weights: the linear-layer protocol
    GATE = "gate"  # needs comparison gates
    FOLDED = "folded"  # removed (folded, rewritten) by passes before lowering


class Scale(enum.Enum):
    """Plan-fixed-point's rule for an op kind's output scale."""

    PRESERVING = "preserving"  # the input's scale
    ALIGNING = "aligning"  # secret operands upscaled to the highest of their scales
    WEIGHTED = "weighted"  # + wscale = f + weight_extra_bits: the model owner's weights
    PUBLIC_WEIGHTED = "public-weighted"  # + wscale = f: a public multiplier (a pool's 1/k)
    FUSED_TRUNC = "fused-trunc"  # drops the bits above f inside its gate (ReLU)
    SHIFT_DOWN = "shift-down"  # - shift (standalone truncation)
    SHIFT_UP = "shift-up"  # + shift (upscale)
    INTEGER = "integer"  # integers (scale 0)
    PRODUCT = "product"  # s_x + s_y: a product of two secret values (operands above f truncated first if needed)
    SPLINE = "spline"  # input truncated to min(f, 14) if above it, output at f (spline gates)


@dataclass(frozen=True)
class GateSpec:
    """A gate op's comparisons. ``count(op, graph)``: gate evaluations for the whole batch;
    ``depth(op, graph)``: sequential gate layers; ``magnitude(op, graph, inputs)``: the largest |value|
    a comparison sees (ring units, after ``shift``); ``shift(op)``: bits the comparison drops;
    ``runtime(op, graph)``: the runtime gate class of its statement."""

    kind: str
    count: Callable[..., int]
    depth: Callable[..., int]
    magnitude: Callable[..., int]
    runtime: Callable[..., type[rgates.Gate]]
    shift: Callable[..., int] = lambda op: 0


@dataclass(frozen=True)
class Bilinear:
    """A linear layer's map: lib function ``fn(**fn_args)``, reduction length ``k``, the weight and bias
    values, and whether the bias is per channel (axis 1)."""

    fn: str
    fn_args: dict
    k: int
    w: str
    b: str | None
    channel_bias: bool = False


@dataclass(frozen=True)
class OpDef:
    kind: str
    shape: Callable
    run: Callable
    role: Role
    scale: Scale
    fixed: Callable | None = None
    gate: GateSpec | None = None
    lower: Callable | None = None
    bilinear: Callable | None = None
    onnx: str | None = None


OPS: dict[str, OpDef] = {}


def register(kind: str, role: Role, scale: Scale, gate: GateSpec | None = None, onnx: str | None = None):
    """Class decorator: the class's ``shape``, ``run`` and optional ``fixed``, ``lower``, ``bilinear``
    static methods become kind's entry. A local op without ``fixed`` gets its lib function's semantics;
    without ``lower`` it calls lib.<kind> with no parameters."""

    def deco(cls):
        fixed = getattr(cls, "fixed", None)
        lower = getattr(cls, "lower", None)
        if role is Role.LOCAL:
            lower = lower or (lambda op, graph: {"fn": kind})
            fixed = fixed or _local_fixed
        OPS[kind] = OpDef(
            kind, cls.shape, cls.run, role, scale, fixed, gate, lower, getattr(cls, "bilinear", None), onnx
        )
        return cls

    return deco


# ------------------------------------------------------------------ fixed-point helpers
def fixed_scale(graph: Graph, name: str) -> int:
    return graph.values[name].fixed_scale


def secret_and_const(op: Op, graph: Graph, env) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(secret input arrays, constant input arrays as float64) in input order."""
    sec = [env[i] for i in op.inputs if not graph.values[i].is_const]
    con = [graph.values[i].array.astype(np.float64) for i in op.inputs if graph.values[i].is_const]
    return sec, con


def operands_encoded(op: Op, graph: Graph, env) -> list[np.ndarray]:
    """Every operand in order, constants encoded at the secret operand's scale (as lowering's ``const``)."""
    s = next(fixed_scale(graph, i) for i in op.inputs if not graph.values[i].is_const)
    return [env[i] if not graph.values[i].is_const else ring.encode(graph.values[i].data, s) for i in op.inputs]


def _local_fixed(op: Op, graph: Graph, env) -> np.ndarray:
    """A local op's fixed-point semantics: the lib function the secure programs call, on the same operands."""
    from fssc.compiler.backend.contract import bind_operands  # here: both read this registry
    from fssc.runtime import lib

    lower = OPS[op.kind].lower
    assert lower is not None  # every local entry has one (register gives the default)
    p = dict(lower(op, graph))
    name = p.pop("fn")
    return getattr(lib, name)(**bind_operands(name, p, operands_encoded(op, graph, env)), **p)


def _elements(op: Op, graph: Graph) -> int:
    return graph.values[op.inputs[0]].size


def _one(op: Op, graph: Graph) -> int:
    return 1


def _shifted_magnitude(attr: str) -> Callable[..., int]:
    def magnitude(op: Op, graph: Graph, inputs: list[np.ndarray]) -> int:
        x = ring.signed(inputs[0])
        if x.size == 0:
            return 0
        s = op.attrs.get(attr, 0)
        xs = x >> np.int64(s) if s else x
        return int(max(abs(int(xs.max())), abs(int(xs.min()))))

    return magnitude


# ------------------------------------------------------------------ kinds
# ------------------------------------------------------------------ kinds
def _conv_shape(attrs, shapes):
    x, w = shapes[0], shapes[1]
    nd = len(x) - 2
    if len(w) != nd + 2:
        raise FsscError(f"conv weight rank {len(w)} does not match input rank {len(x)}")
    g = attrs.get("group", 1)
    if x[1] != w[1] * g:
        raise FsscError(f"conv input channels {x[1]} != weight channels {w[1]} x group {g}")
    if w[0] % g:
        raise FsscError(f"conv output channels {w[0]} not divisible by group {g}")
    a = dict(attrs, kernel_shape=list(w[2:]), ceil_mode=0)
    _, _, _, _, out = window_geometry(a, x[2:])
    if len(shapes) > 2 and tuple(shapes[2]) != (w[0],):
        raise FsscError(f"conv bias shape {shapes[2]} != ({w[0]},)")
    return [(x[0], w[0], *out)]


def _depthwise_float(attrs, x, w, b=None):
    """Depthwise conv (one filter per channel) as a sum over kernel taps of strided views:
    torch's float64 grouped convolution is ~50x slower for this shape."""
    nd = x.ndim - 2
    k = list(w.shape[2:])
    a = {
        "kernel_shape": k,
        "strides": attrs.get("strides") or [1] * nd,
        "pads": attrs.get("pads") or [0] * (2 * nd),
        "dilations": attrs.get("dilations") or [1] * nd,
        "ceil_mode": 0,
    }
    win, _, _, _ = windows(np.asarray(x, dtype=np.float64), a, 0.0)  # [N, C, *out, *k]
    wf = np.asarray(w, dtype=np.float64).reshape((1, w.shape[0]) + (1,) * nd + tuple(k))
    y = (win * wf).sum(axis=tuple(range(-nd, 0)))
    if b is not None:
        y = y + np.asarray(b, dtype=np.float64).reshape((1, -1) + (1,) * nd)
    return [y]


def conv_float(attrs, x, w, b=None):
    nd = x.ndim - 2
    if attrs.get("group", 1) > 1 and w.shape[1] == 1 and w.shape[0] == x.shape[1]:
        return _depthwise_float(attrs, x, w, b)
    import torch  # here, not at module level: `fssc ir` and error paths need no torch (~1 s to import)
    import torch.nn.functional as F

    p = attrs.get("pads") or [0] * (2 * nd)
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64))
    if any(p):
        padw = []
        for i in reversed(range(nd)):
            padw += [p[i], p[i + nd]]
        xt = F.pad(xt, padw)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    y = fn(
        xt,
        torch.from_numpy(np.asarray(w, dtype=np.float64)),
        None if b is None else torch.from_numpy(np.asarray(b, dtype=np.float64)),
        stride=attrs.get("strides") or 1,
        dilation=attrs.get("dilations") or 1,
        groups=attrs.get("group", 1),
    )
    return [y.numpy()]


def _ring_conv(attrs, nd: int) -> lib.Conv:
    """The exact digit products of a conv in the fixed-point semantics: the runtime's own float64 conv
    (numpy im2col and one BLAS GEMM per x digit for all the w digits it pairs with; no torch). Every digit
    product is a sum of integers that ring_bilinear's digit plan keeps below 2^53, exact in float64 in any
    summation order, so this equals any other exact float64 conv bit for bit."""
    return lib.conv(
        attrs.get("strides") or [1] * nd,
        attrs.get("pads") or [0] * (2 * nd),
        attrs.get("dilations") or [1] * nd,
        attrs.get("group", 1),
    )


@register("conv", Role.LINEAR, Scale.WEIGHTED)
class Conv:
    shape = staticmethod(_conv_shape)
    run = staticmethod(conv_float)

    @staticmethod
    def fixed(op, graph, env):
        x = env[op.inputs[0]]
        w = graph.values[op.inputs[1]].array.astype(np.float64)
        ws = op.attrs["wscale"]
        k = int(np.prod(w.shape[1:]))  # reduction length per output
        y = ring.ring_bilinear(_ring_conv(op.attrs, x.ndim - 2), x, ring.encode(w, ws), k)
        if len(op.inputs) > 2:
            b = graph.values[op.inputs[2]].array.astype(np.float64)
            y = y + ring.encode(b, fixed_scale(graph, op.inputs[0]) + ws).reshape((1, -1) + (1,) * (x.ndim - 2))
        return y

    @staticmethod
    def bilinear(op, graph, x_name):
        a, ins = op.attrs, op.inputs
        w = graph.values[ins[1]]
        args = {"strides": a["strides"], "pads": a["pads"], "dilations": a["dilations"], "group": a.get("group", 1)}
        return Bilinear("conv", args, int(np.prod(w.shape[1:])), ins[1], ins[2] if len(ins) > 2 else None, True)


def _gemm_dims(attrs, a, b):
    m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
    k2, n = (b[1], b[0]) if attrs.get("transB", 0) else (b[0], b[1])
    return m, k, k2, n


@register("gemm", Role.LINEAR, Scale.WEIGHTED)
class Gemm:
    @staticmethod
    def shape(attrs, shapes):
        if len(shapes[0]) != 2 or len(shapes[1]) != 2:
            raise FsscError(f"gemm needs 2-D operands, got {shapes[0]} and {shapes[1]}")
        m, k, k2, n = _gemm_dims(attrs, shapes[0], shapes[1])
        if k != k2:
            raise FsscError(f"gemm inner dimensions differ: {k} vs {k2}")
        if len(shapes) > 2:
            np.broadcast_shapes(tuple(shapes[2]), (m, n))
        return [(m, n)]

    @staticmethod
    def run(attrs, a, b, c=None):
        a = a.T if attrs.get("transA", 0) else a
        b = b.T if attrs.get("transB", 0) else b
        y = attrs.get("alpha", 1.0) * (a.astype(np.float64) @ b.astype(np.float64))
        if c is not None:
            y = y + attrs.get("beta", 1.0) * c
        return [y]

    @staticmethod
    def fixed(op, graph, env):
        a = op.attrs
        x = env[op.inputs[0]]
        x = x.T if a.get("transA", 0) else x
        w = graph.values[op.inputs[1]].array.astype(np.float64)
        w = (w.T if a.get("transB", 0) else w) * a.get("alpha", 1.0)
        y = ring.ring_bilinear(lambda p, q: p @ q, x, ring.encode(w, a["wscale"]), w.shape[0])
        if len(op.inputs) > 2:
            c = graph.values[op.inputs[2]].array.astype(np.float64) * a.get("beta", 1.0)
            y = y + ring.encode(c, fixed_scale(graph, op.inputs[0]) + a["wscale"])
        return y

    @staticmethod
    def bilinear(op, graph, x_name):
        a, ins = op.attrs, op.inputs
        if any(key in a for key in ("alpha", "beta", "transB")):
            raise FsscError(f"gemm %{op.name} is not canonical (the canonicalize pass should have run)")
        fn = "matmul_transposed" if a.get("transA") else "matmul"  # x^T W when the data operand is [K, M]
        return Bilinear(fn, {}, graph.values[ins[1]].shape[0], ins[1], ins[2] if len(ins) > 2 else None)


@register("matmul", Role.LINEAR, Scale.WEIGHTED)
class MatMul:
    @staticmethod
    def shape(attrs, shapes):
        try:
            return [_matmul_shape(shapes[0], shapes[1])]
        except ValueError as e:
            raise FsscError(f"matmul shapes {shapes[0]} x {shapes[1]}: {e}") from None

    @staticmethod
    def run(attrs, a, b):
        return [np.matmul(a.astype(np.float64), b.astype(np.float64))]

    @staticmethod
    def fixed(op, graph, env):
        ws = op.attrs["wscale"]
        a_name, b_name = op.inputs
        if graph.values[b_name].is_const:
            w = graph.values[b_name].array.astype(np.float64)
            k = w.shape[-2] if w.ndim > 1 else w.shape[0]  # x @ W reduces over W's second-to-last axis
            return ring.ring_bilinear(np.matmul, env[a_name], ring.encode(w, ws), k)
        w = graph.values[a_name].array.astype(np.float64)
        return ring.ring_bilinear(lambda p, q: np.matmul(q, p), env[b_name], ring.encode(w, ws), w.shape[-1])

    @staticmethod
    def bilinear(op, graph, x_name):
        ins = op.inputs
        if graph.values[ins[0]].is_const:
            return Bilinear("matmul_left", {}, graph.values[ins[0]].shape[-1], ins[0], None)
        shp = graph.values[ins[1]].shape  # [.., K, N] or [K]: the reduction runs over K
        return Bilinear("matmul", {}, shp[-2] if len(shp) > 1 else shp[0], ins[1], None)


def _matmul_shape(a, b):
    a, b = list(a), list(b)
    if len(a) == 1:
        a = [1] + a
        squeeze_a = True
    else:
        squeeze_a = False
    squeeze_b = len(b) == 1
    if squeeze_b:
        b = b + [1]
    if a[-1] != b[-2]:
        raise ValueError("inner dimensions differ")
    batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    out = list(batch) + [a[-2], b[-1]]
    if squeeze_a:
        out.pop(-2)
    if squeeze_b:
        out.pop(-1)
    return tuple(out)


def _bcast_shape(attrs, shapes):
    try:
        return [np.broadcast_shapes(*[tuple(s) for s in shapes])]
    except ValueError:
        raise FsscError(f"shapes {list(map(tuple, shapes))} do not broadcast") from None


def _binary_float(fn: Callable) -> staticmethod:
    """Float semantics of an elementwise binary op (numpy broadcasting, float64)."""
    return staticmethod(lambda attrs, a, b: [fn(a.astype(np.float64), b)])


@register("add", Role.LOCAL, Scale.ALIGNING, onnx="Add")
class Add:
    shape = staticmethod(_bcast_shape)
    run = _binary_float(np.add)


@register("sub", Role.LOCAL, Scale.ALIGNING, onnx="Sub")
class Sub:
    shape = staticmethod(_bcast_shape)
    run = _binary_float(np.subtract)


@register("mul", Role.LINEAR, Scale.WEIGHTED)
class Mul:
    """x * c with the model owner's constant c (elementwise, broadcast)."""

    shape = staticmethod(_bcast_shape)
    run = _binary_float(np.multiply)

    @staticmethod
    def fixed(op, graph, env):
        (x,), (c,) = secret_and_const(op, graph, env)
        return ring.fixed_mul(x, ring.encode(c, op.attrs["wscale"]))

    @staticmethod
    def bilinear(op, graph, x_name):
        return Bilinear("elementwise", {}, 1, next(i for i in op.inputs if graph.values[i].is_const), None)


def _same_shape(attrs, shapes):
    return [tuple(shapes[0])]


@register(
    "relu",
    Role.GATE,
    Scale.FUSED_TRUNC,
    GateSpec(
        rgates.Relu.kind,
        count=_elements,
        depth=_one,
        magnitude=_shifted_magnitude("trunc"),
        runtime=lambda op, graph: rgates.Relu,
        shift=lambda op: op.attrs.get("trunc", 0),
    ),
    onnx="Relu",
)
class Relu:
    """One comparison per element on x >> trunc (fused exact truncation when trunc > 0)."""

    shape = staticmethod(_same_shape)

    @staticmethod
    def run(attrs, x):
        return [np.maximum(x, 0)]

    @staticmethod
    def fixed(op, graph, env):
        x = env[op.inputs[0]]
        return ring.unsigned(np.maximum(ring.signed(ring.trunc(x, op.attrs.get("trunc", 0))), 0))

    @staticmethod
    def lower(op, graph, bits):
        return {"m": bits, "trunc": op.attrs.get("trunc", 0)}


def _clip_count(op, graph):
    return graph.values[op.inputs[0]].size * sum(1 for b in ("min", "max") if b in op.attrs)


def _clip_magnitude(op, graph, inputs):
    x = ring.signed(inputs[0])
    if x.size == 0:
        return 0
    s = graph.values[op.inputs[0]].scale or 0
    mags = []
    for b in ("min", "max"):
        if b in op.attrs:
            bound = np.clip(op.attrs[b] * 2.0**s, -(2.0**62), 2.0**62)
            d = x.astype(np.float64) - bound
            mags.append(float(np.abs(d).max()))
    return int(max(mags)) if mags else 0


def _clip_bound(v, s):
    if v is None:
        return None
    return int(ring.encode(np.clip(v, -(2.0**62) / 2**s, 2.0**62 / 2**s), s).view(np.uint64))


@register(
    "clip",
    Role.GATE,
    Scale.PRESERVING,
    GateSpec(
        rgates.Clip.kind, count=_clip_count, depth=_one, magnitude=_clip_magnitude, runtime=lambda o, g: rgates.Clip
    ),
)
class Clip:
    """Two comparisons per element (against min and against max; one for a one-sided clip)."""

    shape = staticmethod(_same_shape)

    @staticmethod
    def run(attrs, x):
        lo, hi = attrs.get("min"), attrs.get("max")
        y = x.astype(np.float64)
        if lo is not None:
            y = np.maximum(y, lo)
        if hi is not None:
            y = np.minimum(y, hi)
        return [y]

    @staticmethod
    def fixed(op, graph, env):
        s = fixed_scale(graph, op.inputs[0])
        x = ring.signed(env[op.inputs[0]])
        lim = np.iinfo(np.int64)
        lo = max(float(lim.min), min(float(lim.max), op.attrs.get("min", -np.inf) * 2.0**s))
        hi = max(float(lim.min), min(float(lim.max), op.attrs.get("max", np.inf) * 2.0**s))
        lo = lim.min if lo <= lim.min else int(np.rint(lo))
        hi = lim.max if hi >= lim.max else int(np.rint(hi))
        return ring.unsigned(np.clip(x, lo, hi))

    @staticmethod
    def lower(op, graph, bits):
        s = graph.values[next(i for i in op.inputs if not graph.values[i].is_const)].scale
        return {"lo": _clip_bound(op.attrs.get("min"), s), "hi": _clip_bound(op.attrs.get("max"), s), "m": bits}


def _pool_shape(attrs, shapes):
    x = shapes[0]
    if len(x) < 3:
        raise FsscError(f"pooling needs [N,C,spatial...] input, got {x}")
    if len(attrs["kernel_shape"]) != len(x) - 2:
        raise FsscError(f"kernel_shape {attrs['kernel_shape']} does not match input {x}")
    _, _, _, _, out = window_geometry(attrs, x[2:])
    return [(x[0], x[1], *out)]


def _window_valid_counts(op, in_shape) -> np.ndarray:
    """Real (non-padding) taps per output window, shape [*out]."""
    dummy = np.zeros((1, 1) + tuple(in_shape[2:]), dtype=np.int8)
    _, valid, _, nd = windows(dummy, op.attrs, 0)
    return valid.reshape(valid.shape[:nd] + (-1,)).sum(axis=-1)


def _maxpool_count(op, graph):
    x = graph.values[op.inputs[0]]
    n, c = x.shape[0], x.shape[1]
    return int(n * c * (_window_valid_counts(op, x.shape) - 1).sum())


def _maxpool_depth(op, graph):
    k = int(np.prod(op.attrs["kernel_shape"]))
    return max(1, int(np.ceil(np.log2(k))))


def _spread(hi: np.ndarray, lo: np.ndarray) -> int:
    """The largest hi - lo (ring values, in float64: the difference of two int64 can overflow int64), the
    largest |a - b| a max or selection gate compares."""
    return int((hi.astype(np.float64) - lo.astype(np.float64)).max())


def _maxpool_magnitude(op, graph, inputs):
    """Every comparison input a - b lies within [min, max] - [min, max] of its window."""
    x = ring.signed(inputs[0])
    if x.size == 0:
        return 0
    lo = np.iinfo(np.int64)
    wmax, _, _, nd = windows(x, op.attrs, lo.min)
    wmin, _, _, _ = windows(x, op.attrs, lo.max)
    axes = tuple(range(-nd, 0))
    return _spread(wmax.max(axis=axes), wmin.min(axis=axes))


@register(
    "maxpool",
    Role.GATE,
    Scale.PRESERVING,
    GateSpec(
        rgates.MaxPool.kind,
        count=_maxpool_count,
        depth=_maxpool_depth,
        magnitude=_maxpool_magnitude,
        runtime=lambda op, graph: rgates.MaxPool,
    ),
)
class MaxPool:
    """A tree of max gates over each window, padding skipped: a window with v real taps costs v - 1 gates.
    Every gate compares the full difference a - b: a truncated comparison could pick either of two values
    closer than its step, at random (docs/protocol.md, "Max and selection")."""

    shape = staticmethod(_pool_shape)

    @staticmethod
    def run(attrs, x):
        w, _, _, nd = windows(x.astype(np.float64), attrs, -np.inf)
        return [w.max(axis=tuple(range(-nd, 0)))]

    @staticmethod
    def fixed(op, graph, env):  # exact max; the secure gate tree gives the same values
        w, _, _, nd = windows(ring.signed(env[op.inputs[0]]), op.attrs, np.iinfo(np.int64).min)
        return ring.unsigned(w.max(axis=tuple(range(-nd, 0))))

    @staticmethod
    def lower(op, graph, bits):
        return {**pool_params(op.attrs), "m": bits}


@register("avgpool", Role.LOCAL, Scale.PUBLIC_WEIGHTED)
class AvgPool:
    shape = staticmethod(_pool_shape)

    @staticmethod
    def run(attrs, x):
        w, valid, inpad, nd = windows(x.astype(np.float64), attrs, 0.0)
        axes = tuple(range(-nd, 0))
        cnt = (inpad if attrs.get("count_include_pad", 0) else valid).sum(axis=axes)
        return [w.sum(axis=axes) / cnt]

    @staticmethod
    def lower(op, graph):
        a = op.attrs
        return {
            "fn": "avgpool",
            **pool_params(a),
            "count_include_pad": a.get("count_include_pad", 0),
            "wscale": a["wscale"],
        }


@register("globalavgpool", Role.LOCAL, Scale.PUBLIC_WEIGHTED, onnx="GlobalAveragePool")
class GlobalAvgPool:
    @staticmethod
    def shape(attrs, shapes):
        x = shapes[0]
        return [(x[0], x[1]) + (1,) * (len(x) - 2)]

    @staticmethod
    def run(attrs, x):
        return [x.astype(np.float64).mean(axis=tuple(range(2, x.ndim)), keepdims=True)]

    @staticmethod
    def lower(op, graph):
        return {"fn": "globalavgpool", "wscale": op.attrs["wscale"]}


@register("sumpool", Role.LOCAL, Scale.PRESERVING)
class SumPool:
    """Window sums (zero padding): an average pool whose 1/k was folded away."""

    shape = staticmethod(_pool_shape)

    @staticmethod
    def run(attrs, x):
        w, _, _, nd = windows(x.astype(np.float64), attrs, 0.0)
        return [w.sum(axis=tuple(range(-nd, 0)))]

    @staticmethod
    def lower(op, graph):
        return {"fn": "sumpool", **pool_params(op.attrs)}


@register("globalsumpool", Role.LOCAL, Scale.PRESERVING)
class GlobalSumPool:
    shape = GlobalAvgPool.shape

    @staticmethod
    def run(attrs, x):
        return [x.astype(np.float64).sum(axis=tuple(range(2, x.ndim)), keepdims=True)]


def _reduce_shape(attrs, shapes):
    """ReduceSum / ReduceMean: ``axes`` (non-negative, distinct; the importer resolves negative and empty
    ones) dropped, or kept as 1 with ``keepdims``."""
    x, axes = tuple(shapes[0]), list(attrs["axes"])
    if any(not 0 <= a < len(x) for a in axes) or len(set(axes)) != len(axes):
        raise FsscError(f"reduce axes {axes} are not distinct axes of a rank-{len(x)} input")
    if attrs["keepdims"]:
        return [tuple(1 if i in axes else d for i, d in enumerate(x))]
    return [tuple(d for i, d in enumerate(x) if i not in axes)]


def reduce_count(graph: Graph, op: Op) -> int:
    """Elements each output of a reduce op sums (1 for no axes)."""
    x = graph.values[op.inputs[0]].shape
    return int(np.prod([x[a] for a in op.attrs["axes"]], dtype=np.int64))


@register("reducesum", Role.LOCAL, Scale.PRESERVING)
class ReduceSum:
    """Sum over public axes (ONNX ReduceSum; ReduceMean whose 1/n fold-public-scaling moved into the next
    linear layer): linear, so lib.reducesum runs on masks and masked values alike; exact on the ring."""

    shape = staticmethod(_reduce_shape)

    @staticmethod
    def run(attrs, x):
        return [x.astype(np.float64).sum(axis=tuple(attrs["axes"]), keepdims=bool(attrs["keepdims"]))]

    @staticmethod
    def lower(op, graph):
        return {"fn": "reducesum", "axes": list(op.attrs["axes"]), "keepdims": int(op.attrs["keepdims"])}


@register("reducemean", Role.LOCAL, Scale.PUBLIC_WEIGHTED)
class ReduceMean:
    """Mean over public axes (ONNX ReduceMean; GlobalAveragePool is the one over the spatial axes): the exact
    ring sum of n elements times the public 1/n encoded at ``wscale`` fractional bits, like the pools.

    Error bound: with S the real sum of the encoded inputs, the output (scale s + wscale, no bits lost)
    is S * round(2^wscale / n) / 2^wscale, off the exact mean S / n by at most |S| * 2^-(wscale + 1)
    (the rounding of 1/n; at most n * 2^-(wscale + 1) of the largest |input|; zero when n is a power of
    two not above 2^wscale). The truncation plan-fixed-point places after it adds its own (under one
    unit of the scale it truncates to). fold-public-scaling turns a mean that feeds a conv or gemm into a
    ``reducesum`` and moves the 1/n into that layer's weights instead."""

    shape = staticmethod(_reduce_shape)

    @staticmethod
    def run(attrs, x):
        return [x.astype(np.float64).mean(axis=tuple(attrs["axes"]), keepdims=bool(attrs["keepdims"]))]

    @staticmethod
    def lower(op, graph):
        a = op.attrs
        return {"fn": "reducemean", "axes": list(a["axes"]), "keepdims": int(a["keepdims"]), "wscale": a["wscale"]}


def batchnorm_affine(attrs, scale, bias, mean, var) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization as y = x * a + b per channel: a = scale / sqrt(var + eps), b = bias - mean * a
    (eps from the node's attribute)."""
    a = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + attrs.get("epsilon", 1e-5))
    return a, np.asarray(bias, np.float64) - np.asarray(mean, np.float64) * a


def _channel_affine(op, graph, x, a, b):
    sh = (1, -1) + (1,) * (x.ndim - 2)
    ws = op.attrs["wscale"]
    return x * ring.encode(a, ws).reshape(sh) + ring.encode(b, fixed_scale(graph, op.inputs[0]) + ws).reshape(sh)


def _per_channel_shape(kind: str) -> Callable:
    """Shape rule of x[N, C, ...] with per-channel parameters of shape (C,): the output is x's shape."""

    def shape(attrs, shapes):
        x = shapes[0]
        for s in shapes[1:]:
            if tuple(s) != (x[1],):
                raise FsscError(f"{kind} parameter shape {tuple(s)} != ({x[1]},)")
        return [tuple(x)]

    return shape


@register("batchnorm", Role.FOLDED, Scale.WEIGHTED)
class BatchNorm:
    """Folded into the conv before it, or rewritten as ``affine`` (fold-batchnorm)."""

    shape = staticmethod(_per_channel_shape("batchnorm"))

    @staticmethod
    def run(attrs, x, scale, bias, mean, var):
        sh = (1, -1) + (1,) * (x.ndim - 2)
        a, b = batchnorm_affine(attrs, scale, bias, mean, var)
        return [x * a.reshape(sh) + b.reshape(sh)]

    @staticmethod
    def fixed(op, graph, env):
        (x,), params = secret_and_const(op, graph, env)
        return _channel_affine(op, graph, x, *batchnorm_affine(op.attrs, *params))


@register("affine", Role.LINEAR, Scale.WEIGHTED)
class Affine:
    """y = x * a[c] + b[c], per channel (axis 1): a BatchNorm with no conv to fold into."""

    shape = staticmethod(_per_channel_shape("affine"))

    @staticmethod
    def run(attrs, x, a, b):
        sh = (1, -1) + (1,) * (x.ndim - 2)
        return [x.astype(np.float64) * a.reshape(sh) + b.reshape(sh)]

    @staticmethod
    def fixed(op, graph, env):
        (x,), (a, b) = secret_and_const(op, graph, env)
        return _channel_affine(op, graph, x, a, b)

    @staticmethod
    def bilinear(op, graph, x_name):
        args = {"ndim": len(graph.values[x_name].shape)}
        return Bilinear("channelwise", args, 1, op.inputs[1], op.inputs[2], True)


def _lower_reshape(op, graph):
    return {"fn": "reshape", "shape": list(graph.values[op.outputs[0]].shape)}


@register("flatten", Role.LOCAL, Scale.PRESERVING)
class Flatten:
    lower = staticmethod(_lower_reshape)

    @staticmethod
    def shape(attrs, shapes):
        x = shapes[0]
        ax = attrs.get("axis", 1)
        ax = ax + len(x) if ax < 0 else ax
        return [(int(np.prod(x[:ax], dtype=np.int64)), int(np.prod(x[ax:], dtype=np.int64)))]

    @staticmethod
    def run(attrs, x):
        ax = attrs.get("axis", 1)
        ax = ax + x.ndim if ax < 0 else ax
        return [x.reshape(int(np.prod(x.shape[:ax], dtype=np.int64)), -1)]


@register("reshape", Role.LOCAL, Scale.PRESERVING)
class Reshape:
    lower = staticmethod(_lower_reshape)

    @staticmethod
    def shape(attrs, shapes):
        out = tuple(attrs["shape"])
        if int(np.prod(out, dtype=np.int64)) != int(np.prod(shapes[0], dtype=np.int64)):
            raise FsscError(f"reshape {tuple(shapes[0])} -> {out}: sizes differ")
        return [out]

    @staticmethod
    def run(attrs, x):
        return [x.reshape(attrs["shape"])]


@register("concat", Role.LOCAL, Scale.ALIGNING)
class Concat:
    @staticmethod
    def shape(attrs, shapes):
        ax = attrs["axis"]
        r = len(shapes[0])
        ax = ax + r if ax < 0 else ax
        out = list(shapes[0])
        for s in shapes[1:]:
            if len(s) != r or any(s[i] != out[i] for i in range(r) if i != ax):
                raise FsscError(f"concat shapes {list(map(tuple, shapes))} differ off axis {ax}")
            out[ax] += s[ax]
        return [tuple(out)]

    @staticmethod
    def run(attrs, *xs):
        return [np.concatenate(xs, axis=attrs["axis"])]

    @staticmethod
    def lower(op, graph):
        return {"fn": "concat", "axis": op.attrs["axis"]}


@register("transpose", Role.LOCAL, Scale.PRESERVING)
class Transpose:
    """ONNX Transpose: axis i of the output is axis perm[i] of the input (lib.transpose)."""

    @staticmethod
    def shape(attrs, shapes):
        x, perm = shapes[0], list(attrs["perm"])
        if sorted(perm) != list(range(len(x))):
            raise FsscError(f"transpose perm {perm} is not a permutation of the {len(x)} axes of {tuple(x)}")
        return [tuple(x[p] for p in perm)]

    @staticmethod
    def run(attrs, x):
        return [lib.transpose(x, attrs["perm"])]

    @staticmethod
    def lower(op, graph):
        return {"fn": "transpose", "perm": list(op.attrs["perm"])}


@register("slice", Role.LOCAL, Scale.PRESERVING)
class Slice:
    """x[starts[i]:ends[i]:steps[i]] on every axis i (lib.slice): the importer writes ONNX Slice's clamped
    indices (and Split's parts) per axis, an end of -1 with a negative step meaning past the front."""

    @staticmethod
    def shape(attrs, shapes):
        x = shapes[0]
        st, en, sp = attrs["starts"], attrs["ends"], attrs["steps"]
        if not len(st) == len(en) == len(sp) == len(x) or 0 in sp:
            raise FsscError(f"slice starts {st} ends {en} steps {sp} do not fit {tuple(x)}")
        return [tuple(len(range(s, e, k)) for s, e, k in zip(st, en, sp, strict=True))]

    @staticmethod
    def run(attrs, x):
        return [lib.slice(x, attrs["starts"], attrs["ends"], attrs["steps"])]

    @staticmethod
    def lower(op, graph):
        return {"fn": "slice", **{k: list(op.attrs[k]) for k in ("starts", "ends", "steps")}}


@register("gather", Role.LOCAL, Scale.PRESERVING)
class Gather:
    """ONNX Gather with public constant indices (non-negative after import) along ``axis`` (lib.take)."""

    @staticmethod
    def shape(attrs, shapes):
        x, ax, idx = shapes[0], attrs["axis"], np.asarray(attrs["indices"], dtype=np.int64)
        if not 0 <= ax < len(x) or (idx.size and not (idx.min() >= 0 and idx.max() < x[ax])):
            raise FsscError(f"gather indices outside axis {ax} of {tuple(x)}")
        return [tuple(x[:ax]) + idx.shape + tuple(x[ax + 1 :])]

    @staticmethod
    def run(attrs, x):
        return [lib.take(x, attrs["indices"], attrs["axis"])]

    @staticmethod
    def lower(op, graph):
        return {"fn": "take", "indices": op.attrs["indices"], "axis": op.attrs["axis"]}


@register("where", Role.LOCAL, Scale.ALIGNING)
class Where:
    """ONNX Where with a public constant condition ``cond`` (booleans, broadcast with both operands): each
    element is the first operand's where ``cond`` holds, else the second's. A selection fixed by public
    positions is linear, so it runs on masked values and masks alike (lib.where); a constant operand is the
    model owner's (a ``const`` wire, as in Add)."""

    @staticmethod
    def shape(attrs, shapes):
        cond = np.shape(attrs["cond"])
        try:
            return [np.broadcast_shapes(cond, *[tuple(s) for s in shapes])]
        except ValueError:
            raise FsscError(
                f"where: condition {cond} and operands {list(map(tuple, shapes))} do not broadcast"
            ) from None

    @staticmethod
    def run(attrs, a, b):
        return [np.where(np.asarray(attrs["cond"], dtype=bool), a.astype(np.float64), b)]

    @staticmethod
    def lower(op, graph):
        return {"fn": "where", "cond": op.attrs["cond"]}


@register("pad", Role.LOCAL, Scale.PRESERVING)
class Pad:
    """Zero padding; ``pads`` = [begin_0.., end_0..] over all axes (negative crops)."""

    @staticmethod
    def shape(attrs, shapes):
        x = shapes[0]
        p = attrs["pads"]
        r = len(x)
        out = tuple(x[i] + p[i] + p[i + r] for i in range(r))
        if any(d < 0 for d in out):
            raise FsscError(f"pad {p} crops {tuple(x)} below zero")
        return [out]

    @staticmethod
    def run(attrs, x):
        return [pad_or_crop(x, attrs["pads"])]

    @staticmethod
    def lower(op, graph):
        return {"fn": "pad", "pads": op.attrs["pads"]}


def _classes(op, graph) -> int:
    x = graph.values[op.inputs[0]]
    return x.shape[op.attrs.get("axis", 0) % len(x.shape)]


def _argmax_count(op, graph):
    return (graph.values[op.inputs[0]].size // _classes(op, graph)) * (_classes(op, graph) - 1)


def _argmax_depth(op, graph):
    return max(1, int(np.ceil(np.log2(_classes(op, graph)))))


def _argmax_magnitude(op, graph, inputs):
    x = ring.signed(inputs[0])
    if x.size == 0:
        return 0
    ax = op.attrs.get("axis", 0)
    return _spread(x.max(axis=ax), x.min(axis=ax))


@register(
    "argmax",
    Role.GATE,
    Scale.INTEGER,
    GateSpec(
        rgates.ArgMax.kind,
        count=_argmax_count,
        depth=_argmax_depth,
        magnitude=_argmax_magnitude,
        runtime=lambda op, graph: rgates.ArgMax2 if _classes(op, graph) == 2 else rgates.ArgMax,
    ),
)
class ArgMax:
    """C - 1 selections per row (a tournament that also selects the index); for C = 2 a single DReLU of
    l1 - l0 gives the label, to P0 only."""

    @staticmethod
    def shape(attrs, shapes):
        x = list(shapes[0])
        ax = attrs.get("axis", 0)
        ax = ax + len(x) if ax < 0 else ax
        if attrs.get("keepdims", 1):
            x[ax] = 1
        else:
            x.pop(ax)
        return [tuple(x)]

    @staticmethod
    def run(attrs, x):
        ax = attrs.get("axis", 0)
        keep = attrs.get("keepdims", 1)
        if attrs.get("select_last_index", 0):
            xf = np.flip(x, axis=ax)
            idx = x.shape[ax] - 1 - np.argmax(xf, axis=ax)
        else:
            idx = np.argmax(x, axis=ax)
        if keep:
            idx = np.expand_dims(idx, ax)
        return [idx.astype(np.int64)]

    @staticmethod
    def fixed(op, graph, env):
        return ArgMax.run(op.attrs, ring.signed(env[op.inputs[0]]))[0]

    @staticmethod
    def lower(op, graph, bits):
        x = graph.values[next(i for i in op.inputs if not graph.values[i].is_const)]
        if op.outputs[0] not in graph.outputs:
            raise FsscError(f"argmax %{op.name} feeds other ops: the secure runtime supports a final argmax")
        return {
            "axis": op.attrs.get("axis", 0) % len(x.shape),
            "keepdims": op.attrs.get("keepdims", 1),
            "select_last": op.attrs.get("select_last_index", 0),
            "m": bits,
        }


@register(
    "trunc",
    Role.GATE,
    Scale.SHIFT_DOWN,
    GateSpec(
        rgates.Trunc.kind,
        count=_elements,
        depth=_one,
        magnitude=_shifted_magnitude("shift"),
        runtime=lambda op, graph: rgates.Trunc,
        shift=lambda op: op.attrs.get("shift", 0),
    ),
)
class Trunc:
    """Fixed-point rescale: drop ``shift`` fractional bits (identity on floats). A standalone truncation
    (no gate absorbs it): one comparison per element on x >> shift lifts the m-bit result to the ring."""

    shape = staticmethod(_same_shape)

    @staticmethod
    def run(attrs, x):
        return [x]

    @staticmethod
    def fixed(op, graph, env):
        return ring.trunc(env[op.inputs[0]], op.attrs["shift"])

    @staticmethod
    def lower(op, graph, bits):
        return {"m": bits, "shift": op.attrs["shift"]}


@register("upscale", Role.LOCAL, Scale.SHIFT_UP)
class Upscale:
    """Fixed-point rescale: add ``shift`` fractional bits (identity on floats; x * 2^shift on the ring)."""

    shape = staticmethod(_same_shape)

    @staticmethod
    def run(attrs, x):
        return [x]

    @staticmethod
    def lower(op, graph):
        return {"fn": "upscale", "shift": op.attrs["shift"]}


@register("neg", Role.LOCAL, Scale.PRESERVING, onnx="Neg")
class Neg:
    """y = -x (ONNX Neg): public and linear, the public integer multiple -1 on the ring (lib.scale)."""

    shape = staticmethod(_same_shape)

    @staticmethod
    def run(attrs, x):
        return [np.negative(x.astype(np.float64))]

    @staticmethod
    def lower(op, graph):
        return {"fn": "scale", "factor": -1}


# ------------------------------------------------------------------ secret x secret product, public scaling, softmax
def _out_elements(op: Op, graph: Graph) -> int:
    return graph.values[op.outputs[0]].size


def _product_magnitude(op: Op, graph: Graph, inputs: list[np.ndarray]) -> int:
    """Largest |x * y| (ring units at the product's scale): what the product wire holds, reported as the
    gate's width (the gate itself compares nothing)."""
    a, b = (ring.signed(v).astype(np.float64) for v in inputs[:2])
    p = np.abs(a * b)
    return int(min(p.max(), 2.0**63)) if p.size else 0


@register(
    "hmul",
    Role.GATE,
    Scale.PRODUCT,
    GateSpec(
        rgates.HMul.kind,
        count=_out_elements,
        depth=_one,
        magnitude=_product_magnitude,
        runtime=lambda op, graph: rgates.HMul,
    ),
)
class HMul:
    """x * y of two secret values (ONNX Mul with no constant operand, numpy broadcasting, e.g. a
    squeeze-excitation gate x[N,C,H,W] * s[N,C,1,1]): one round on masked wires (runtime/gates.py HMul),
    exact in the ring; the output is at scale s_x + s_y and later truncations bring it down."""

    shape = staticmethod(_bcast_shape)
    run = _binary_float(np.multiply)

    @staticmethod
    def fixed(op, graph, env):
        return env[op.inputs[0]] * env[op.inputs[1]]  # mod 2^64, broadcast: what the opened z^ - r_z is

    @staticmethod
    def lower(op, graph, bits):
        return {}


def public_factor(op: Op) -> int:
    """The public multiplier of a ``pmul`` on the ring: round(factor * 2^wscale) as a signed integer."""
    return int(np.rint(float(op.attrs["factor"]) * 2.0 ** op.attrs["wscale"]))


@register("pmul", Role.LOCAL, Scale.PUBLIC_WEIGHTED)
class PMul:
    """y = x * factor with a public real factor (LeakyRelu's alpha and 1 - alpha): the integer
    round(factor * 2^wscale) times x (lib.scale), output at scale s + wscale. Error: the factor's encoding,
    at most |x| * 2^-(wscale + 1); the truncation plan-fixed-point places later adds its own."""

    shape = staticmethod(_same_shape)

    @staticmethod
    def run(attrs, x):
        return [x.astype(np.float64) * float(attrs["factor"])]

    @staticmethod
    def lower(op, graph):
        return {"fn": "scale", "factor": public_factor(op)}


def softmax_float(attrs, x):
    """ONNX Softmax: over ``axis`` (opset >= 13), or with ``coerce`` (opset < 13) over the axes from ``axis``
    on, the input read as 2-D [prod(before), prod(after)]."""
    x = np.asarray(x, dtype=np.float64)
    ax = attrs["axis"] % max(x.ndim, 1)
    axes = tuple(range(ax, x.ndim)) if attrs.get("coerce") else (ax,)
    e = np.exp(x - x.max(axis=axes, keepdims=True))
    return [e / e.sum(axis=axes, keepdims=True)]


@register("softmax", Role.FOLDED, Scale.PRESERVING)
class Softmax:
    """ONNX Softmax. A softmax that is the graph's last op is dropped in labels mode (it does not change the
    argmax; compile.add_label_output); otherwise the pass expand-softmax (passes/expand_softmax.py) writes it
    as the row maximum (a max-gate tree), exp of the differences and 1 / their sum (spline gates) and their product
    (the secret x secret product gate). The op itself never reaches the fixed-point passes."""

    shape = staticmethod(_same_shape)
    run = staticmethod(softmax_float)

    @staticmethod
    def fixed(op, graph, env):
        raise FsscError(f"softmax %{op.name}: not expanded (the expand-softmax pass runs before fixed-point planning)")


def infer_shapes(kind: str, attrs: dict, in_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    if kind not in OPS:
        raise FsscError(f"unknown IR op kind {kind!r}")
    return [tuple(int(d) for d in s) for s in OPS[kind].shape(attrs, [tuple(s) for s in in_shapes])]


# ------------------------------------------------------------------ spline gates
def _spline_fit(op: Op, graph: Graph):
    """The op's fitted spline (compiler/ir/splines.py) at its planned input and output scales."""
    from fssc.compiler.ir import splines  # here: it imports the runtime's spec, and fits on first use

    f = graph.meta.get("frac_bits", 12)
    s_in = graph.values[op.inputs[0]].scale
    s_out = graph.values[op.outputs[0]].scale
    return splines.fit(SPLINE_KINDS[op.kind], op.attrs, f if s_in is None else s_in, f if s_out is None else s_out)


def _spline_magnitude(op: Op, graph: Graph, inputs: list[np.ndarray]) -> int:
    x = ring.signed(inputs[0])
    seen = int(max(abs(int(x.max())), abs(int(x.min())))) if x.size else 0
    if op.kind == "reciprocal":  # a softmax's row sum is at most one per class, whatever the calibration saw
        seen = max(seen, (int(op.attrs["classes"]) + 1) << _spline_fit(op, graph).s_in)
    return seen


SPLINE_GATE = GateSpec(
    "spline",
    count=_elements,
    depth=_one,
    magnitude=_spline_magnitude,
    runtime=lambda op, graph: rgates.Spline.bind(_spline_fit(op, graph).spec),
)

# IR kind -> the activation splines.fit knows (one entry each below)
SPLINE_KINDS = {
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "erf": "erf",
    "silu": "silu",
    "gelu": "gelu",
    "hardsigmoid": "hardsigmoid",
    "hardswish": "hardswish",
    "exp": "exp",
    "reciprocal": "reciprocal",
}


class _SplineOp:
    """An activation evaluated as a spline gate (runtime/gates.py ``Spline``): the input at scale min(f, 14)
    (a truncation first if it is above), one DCF key over its m bits evaluated at every knot gives masked
    selection bits (one round), each party evaluates its share of the piece's polynomial locally, one round
    opens it, an exact truncation brings it to scale f (4 rounds).
    The error against the float function at the same input is the fit's ``bound`` (docs/protocol.md,
    "Spline gates")."""

    shape = staticmethod(_same_shape)

    @staticmethod
    def fixed(op, graph, env):
        from fssc.compiler.ir import splines

        return splines.evaluate(_spline_fit(op, graph).spec, env[op.inputs[0]])

    @staticmethod
    def lower(op, graph, bits):
        from fssc.compiler.ir import splines

        return {"m": bits, **splines.spline_params(_spline_fit(op, graph).spec)}


def _spline_entry(kind: str, onnx: str | None, doc: str) -> None:
    def run(attrs, x):
        from fssc.compiler.ir import splines

        return [splines.reference(SPLINE_KINDS[kind], attrs)(x)]

    cls = type(kind.capitalize(), (_SplineOp,), {"run": staticmethod(run), "__doc__": doc})
    register(kind, Role.GATE, Scale.SPLINE, SPLINE_GATE, onnx=onnx)(cls)


_spline_entry(
    "sigmoid", "Sigmoid", "1 / (1 + e^-x) (ONNX Sigmoid): cubic pieces on [-9.5, 9.5) at f = 12, 0 and 1 beyond."
)
_spline_entry("tanh", "Tanh", "tanh x (ONNX Tanh): cubic pieces on [-5, 5) at f = 12, -1 and 1 beyond.")
_spline_entry("erf", "Erf", "erf x (ONNX Erf): cubic pieces on [-3, 3) at f = 12, -1 and 1 beyond.")
_spline_entry("silu", None, "x sigmoid(x) (the importer fuses Mul(x, Sigmoid(x))): cubic pieces, 0 and x beyond.")
_spline_entry(
    "gelu",
    None,
    "x (1 + erf(x / sqrt 2)) / 2 (ONNX Gelu, and the importer's fusion of its erf form), or its tanh "
    "approximation (approximate='tanh'): cubic pieces, 0 and x beyond.",
)
_spline_entry(
    "hardsigmoid", None, "max(0, min(1, alpha x + beta)) (ONNX HardSigmoid): its linear piece exactly, 0 and 1 beyond."
)
_spline_entry("hardswish", "HardSwish", "x HardSigmoid(x) with 1/6, 1/2 (ONNX HardSwish): x(x + 3)/6, 0 and x beyond.")
_spline_entry(
    "exp",
    None,
    "e^x for x <= 0 (a softmax's numerators, the row maximum subtracted): cubic pieces on [-9.5, 0) at f = 12, "
    "0 below, 1 from 0 on.",
)
_spline_entry(
    "reciprocal",
    None,
    "1 / x for 1 <= x <= classes (a softmax's row sums; attribute ``classes``): cubic pieces halved per octave, "
    "1 below 1, 1 / (classes + 1) above.",
)


# ------------------------------------------------------------------ layer normalization
DEFAULT_LN_MARGIN = 3  # bits over |C x - sum x| before range analysis has set the op's width (its first run)


def _centred(x: np.ndarray) -> np.ndarray:
    """C x - sum(x) over the last axis, on ring elements (what every role computes locally)."""
    x = np.asarray(x, dtype=np.uint64)
    return x * np.uint64(x.shape[-1]) - x.sum(axis=-1, keepdims=True, dtype=np.uint64)


def _ln_magnitude(op: Op, graph: Graph, inputs: list[np.ndarray]) -> int:
    """Largest |C x - sum(x)| (ring units at the input's scale): the width the plan truncates from."""
    d = ring.signed(_centred(inputs[0]))
    return int(max(abs(int(d.max())), abs(int(d.min())))) if d.size else 0


def _ln_plan(op: Op, graph: Graph, bits: int | None, magnitude: int | None = None) -> rgates.LayerNormPlan:
    """The op's public plan (compiler/ir/splines.layernorm_plan) at comparison width ``bits`` (range analysis:
    bits of |C x - sum x| + the margin); before range analysis, from the magnitude measured on the batch."""
    from fssc.compiler.ir import splines

    x = graph.values[op.inputs[0]]
    c = x.shape[-1]
    f = graph.meta.get("frac_bits", 12)
    s_x = f if x.scale is None else x.scale
    s_out = graph.values[op.outputs[0]].scale
    if bits is None:
        bits = min(64, int(magnitude or 0).bit_length() + 1 + DEFAULT_LN_MARGIN)
    s_full = s_x + c.bit_length() - 1
    return splines.layernorm_plan(c, s_full, bits, float(op.attrs["epsilon"]), f if s_out is None else s_out)


def layernorm_float(attrs, x):
    """(x - mean) / sqrt(var + epsilon) over the last axis (ONNX LayerNormalization without scale and bias)."""
    x = np.asarray(x, dtype=np.float64)
    d = x - x.mean(axis=-1, keepdims=True)
    return [d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + attrs["epsilon"])]


@register(
    "layernorm",
    Role.GATE,
    Scale.FUSED_TRUNC,
    GateSpec(
        rgates.LayerNorm.kind,
        count=_elements,
        depth=_one,
        magnitude=_ln_magnitude,
        runtime=lambda op, graph: rgates.LayerNorm.bind(
            _ln_plan(op, graph, op.bits or 64), graph.values[op.inputs[0]].shape[-1]
        ),
    ),
)
class LayerNorm:
    """(x - mean) / sqrt(var + epsilon) over the last axis (ONNX LayerNormalization's normalization; the
    importer follows it with the model owner's scale as a linear layer and bias as a constant). One composite
    gate (runtime/gates.py ``LayerNorm``): the centred sum C x - sum(x) locally, its exact truncation, the
    squares' sum through a secret x secret product, the inverse square root per row as FSS gates (an octave
    gate normalising by the leading base-4 digit, a truncation, a spline on the mantissa, a product), and the
    product with the centred values truncated to the output scale f (the input's bits above f are dropped
    inside, as a ReLU's fused truncation). docs/protocol.md, "Layer normalization", states the error bound."""

    shape = staticmethod(_same_shape)
    run = staticmethod(layernorm_float)

    @staticmethod
    def fixed(op, graph, env):
        from fssc.compiler.ir import splines

        x = env[op.inputs[0]]
        mag = None if op.bits is not None else _ln_magnitude(op, graph, [x])
        plan = _ln_plan(op, graph, op.bits, mag)
        d = ring.trunc(_centred(x), plan.d_shift - plan.extra)
        dt = ring.trunc(d, plan.extra)
        s = (dt * dt).sum(axis=-1, keepdims=True, dtype=np.uint64) + np.uint64(plan.eps)
        r = splines.rsqrt_fixed(s.reshape(-1), plan.rsqrt).reshape(s.shape)
        half = np.uint64(1 << (plan.y_shift - 1) if plan.y_shift else 0)  # round to nearest
        return ring.trunc(d * r + half, plan.y_shift)

    @staticmethod
    def lower(op, graph, bits):
        return rgates.LayerNorm.params(_ln_plan(op, graph, bits))
