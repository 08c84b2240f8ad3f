"""The table of IR op kinds: shape rules and float (numpy/torch) semantics.

Each kind maps to an :class:`OpDef` with

* ``shape(attrs, in_shapes) -> [out_shape, ...]`` used by the importer and the
  verifier, and
* ``run(attrs, *inputs) -> [outputs]``: the float reference semantics (ONNX's),
  computed in float64.

Structural constants (reshape targets, pads, clip bounds) are attributes, so
every tensor value in the IR is data. Kinds created by passes (``trunc``,
``affine``, ``upscale``...) are registered here too so one table serves the
verifier and every interpreter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from fssc.runtime.geometry import pad_or_crop, window_geometry, windows

from fssc.errors import FsscError


@dataclass(frozen=True)
class OpDef:
    shape: Callable
    run: Callable
    # which gate family the op needs in the secure protocol (None: local/linear)
    comparison: str | None = None


OPS: dict[str, OpDef] = {}


def register(kind: str, comparison: str | None = None):
    def deco(cls):
        OPS[kind] = OpDef(cls.shape, cls.run, comparison)
        return cls

    return deco


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


@register("conv")
class Conv:
    shape = staticmethod(_conv_shape)
    run = staticmethod(conv_float)


def _gemm_dims(attrs, a, b):
    m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
    k2, n = (b[1], b[0]) if attrs.get("transB", 0) else (b[0], b[1])
    return m, k, k2, n


@register("gemm")
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


@register("matmul")
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


for _k, _f in {"add": np.add, "sub": np.subtract, "mul": np.multiply}.items():
    OPS[_k] = OpDef(_bcast_shape, (lambda f: lambda attrs, a, b: [f(a.astype(np.float64), b)])(_f))


def _same_shape(attrs, shapes):
    return [tuple(shapes[0])]


@register("relu", comparison="relu")
class Relu:
    shape = staticmethod(_same_shape)

    @staticmethod
    def run(attrs, x):
        return [np.maximum(x, 0)]


@register("clip", comparison="clip")
class Clip:
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


def _pool_shape(attrs, shapes):
    x = shapes[0]
    if len(x) < 3:
        raise FsscError(f"pooling needs [N,C,spatial...] input, got {x}")
    if len(attrs["kernel_shape"]) != len(x) - 2:
        raise FsscError(f"kernel_shape {attrs['kernel_shape']} does not match input {x}")
    _, _, _, _, out = window_geometry(attrs, x[2:])
    return [(x[0], x[1], *out)]


@register("maxpool", comparison="max")
class MaxPool:
    shape = staticmethod(_pool_shape)

    @staticmethod
    def run(attrs, x):
        w, _, _, nd = windows(x.astype(np.float64), attrs, -np.inf)
        return [w.max(axis=tuple(range(-nd, 0)))]


@register("avgpool")
class AvgPool:
    shape = staticmethod(_pool_shape)

    @staticmethod
    def run(attrs, x):
        w, valid, inpad, nd = windows(x.astype(np.float64), attrs, 0.0)
        axes = tuple(range(-nd, 0))
        cnt = (inpad if attrs.get("count_include_pad", 0) else valid).sum(axis=axes)
        return [w.sum(axis=axes) / cnt]


@register("globalavgpool")
class GlobalAvgPool:
    @staticmethod
    def shape(attrs, shapes):
        x = shapes[0]
        return [(x[0], x[1]) + (1,) * (len(x) - 2)]

    @staticmethod
    def run(attrs, x):
        return [x.astype(np.float64).mean(axis=tuple(range(2, x.ndim)), keepdims=True)]


@register("sumpool")
class SumPool:
    """Window sums (zero padding): an average pool whose 1/k was folded away."""

    shape = staticmethod(_pool_shape)

    @staticmethod
    def run(attrs, x):
        w, _, _, nd = windows(x.astype(np.float64), attrs, 0.0)
        return [w.sum(axis=tuple(range(-nd, 0)))]


@register("globalsumpool")
class GlobalSumPool:
    shape = GlobalAvgPool.shape

    @staticmethod
    def run(attrs, x):
        return [x.astype(np.float64).sum(axis=tuple(range(2, x.ndim)), keepdims=True)]


def batchnorm_affine(attrs, scale, bias, mean, var) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization as y = x * a + b per channel: a = scale / sqrt(var + eps), b = bias - mean * a
    (eps from the node's attribute)."""
    a = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + attrs.get("epsilon", 1e-5))
    return a, np.asarray(bias, np.float64) - np.asarray(mean, np.float64) * a


@register("batchnorm")
class BatchNorm:
    @staticmethod
    def shape(attrs, shapes):
        x = shapes[0]
        for s in shapes[1:]:
            if tuple(s) != (x[1],):
                raise FsscError(f"batchnorm parameter shape {tuple(s)} != ({x[1]},)")
        return [tuple(x)]

    @staticmethod
    def run(attrs, x, scale, bias, mean, var):
        sh = (1, -1) + (1,) * (x.ndim - 2)
        a, b = batchnorm_affine(attrs, scale, bias, mean, var)
        return [x * a.reshape(sh) + b.reshape(sh)]


@register("affine")
class Affine:
    """y = x * a[c] + b[c], per channel (axis 1): a BatchNorm with no conv to fold into."""

    @staticmethod
    def shape(attrs, shapes):
        x = shapes[0]
        for s in shapes[1:]:
            if tuple(s) != (x[1],):
                raise FsscError(f"affine parameter shape {tuple(s)} != ({x[1]},)")
        return [tuple(x)]

    @staticmethod
    def run(attrs, x, a, b):
        sh = (1, -1) + (1,) * (x.ndim - 2)
        return [x.astype(np.float64) * a.reshape(sh) + b.reshape(sh)]


@register("flatten")
class Flatten:
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


@register("reshape")
class Reshape:
    @staticmethod
    def shape(attrs, shapes):
        out = tuple(attrs["shape"])
        if int(np.prod(out, dtype=np.int64)) != int(np.prod(shapes[0], dtype=np.int64)):
            raise FsscError(f"reshape {tuple(shapes[0])} -> {out}: sizes differ")
        return [out]

    @staticmethod
    def run(attrs, x):
        return [x.reshape(attrs["shape"])]


@register("concat")
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


@register("pad")
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


@register("argmax", comparison="argmax")
class ArgMax:
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


@register("trunc", comparison="trunc")
class Trunc:
    """Fixed-point rescale: drop ``shift`` fractional bits (identity on floats)."""

    shape = staticmethod(_same_shape)

    @staticmethod
    def run(attrs, x):
        return [x]


@register("upscale")
class Upscale:
    """Fixed-point rescale: add ``shift`` fractional bits (identity on floats)."""

    shape = staticmethod(_same_shape)

    @staticmethod
    def run(attrs, x):
        return [x]


def infer_shapes(kind: str, attrs: dict, in_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    if kind not in OPS:
        raise FsscError(f"unknown IR op kind {kind!r}")
    return [tuple(int(d) for d in s) for s in OPS[kind].shape(attrs, [tuple(s) for s in in_shapes])]
