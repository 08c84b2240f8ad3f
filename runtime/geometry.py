"""Window geometry shared by the compiler and the runtime: output sizes, sliding windows, padding.

Pools and convolutions use the same rules (ONNX's pads, strides, dilations and
ceil_mode). The runtime owns them because every party evaluates pooled windows;
the compiler reads them from here for shape inference and its interpreters.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fssc.errors import FsscError

POOL_PARAMS = ("kernel_shape", "strides", "pads", "dilations", "ceil_mode")  # a pool's window, in statement order


def pool_attrs(kernel_shape, strides, pads, dilations, ceil_mode) -> dict:
    """A pool's window attributes from its statement parameters (``POOL_PARAMS``)."""
    return {
        "kernel_shape": list(kernel_shape),
        "strides": list(strides),
        "pads": list(pads),
        "dilations": list(dilations),
        "ceil_mode": int(ceil_mode),
    }


def pool_params(attrs: dict) -> dict:
    """A pool op's statement parameters (``POOL_PARAMS``) from its IR attributes."""
    return {k: attrs.get(k, 0) if k == "ceil_mode" else attrs[k] for k in POOL_PARAMS}


def pool_out_size(n: int, k: int, s: int, pb: int, pe: int, d: int, ceil: bool) -> int:
    """Output length along one axis (ONNX's and torch's rule).

    ``span`` = padded length - window extent; floor mode needs span >= 0. In ceil mode the count is
    ceil(span / s) + 1, minus one if the last window would start past the input and the left padding;
    a window may then reach past the padded input (span < 0 included: a 3-wide window on a 2-long
    input gives one output, the max or average over the taps that exist), as long as one output is left.
    """
    eff = d * (k - 1) + 1
    span = n + pb + pe - eff
    if span < 0 and not ceil:
        raise FsscError(f"window {k} (dilation {d}) larger than padded input {n + pb + pe}")
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + pb:
        out -= 1  # the last window must start inside the input or the left padding
    if out < 1:
        raise FsscError(f"window {k} (dilation {d}, stride {s}) larger than padded input {n + pb + pe}, ceil_mode")
    return out


def window_geometry(attrs: dict, spatial: tuple[int, ...]):
    nd = len(spatial)
    k = attrs["kernel_shape"]
    s = attrs.get("strides") or [1] * nd
    d = attrs.get("dilations") or [1] * nd
    p = attrs.get("pads") or [0] * (2 * nd)
    ceil = bool(attrs.get("ceil_mode", 0))
    out = [pool_out_size(spatial[i], k[i], s[i], p[i], p[i + nd], d[i], ceil) for i in range(nd)]
    return k, s, d, p, out


def windows(x: np.ndarray, attrs: dict, fill: float):
    """Sliding windows of x[N,C,*spatial] padded with ``fill``.

    Returns (windows [N,C,*out,*k], valid [*out,*k]: the tap reads a real
    element, inpad [*out,*k]: the tap is inside the declared pads, nd).
    """
    nd = x.ndim - 2
    n = x.shape[2:]
    k, s, d, p, out = window_geometry(attrs, n)
    span = [d[i] * (k[i] - 1) + 1 for i in range(nd)]
    # pad the end far enough for ceil-mode windows (which may pass the declared pads)
    end = [max(0, (out[i] - 1) * s[i] + span[i] - (n[i] + p[i])) for i in range(nd)]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(p[i], end[i]) for i in range(nd)], constant_values=fill)
    valid = np.ones((), dtype=bool)
    inpad = np.ones((), dtype=bool)
    for i in range(nd):
        j = np.arange(xp.shape[2 + i])
        shape = [1] * nd
        shape[i] = -1
        valid = valid & ((j >= p[i]) & (j < p[i] + n[i])).reshape(shape)
        inpad = inpad & (j < n[i] + p[i] + p[i + nd]).reshape(shape)

    def view(a, lead):
        a = np.broadcast_to(a, a.shape[:lead] + xp.shape[2:])
        w = sliding_window_view(a, span, axis=tuple(range(lead, lead + nd)))
        sl = [slice(None)] * lead
        sl += [slice(0, (out[i] - 1) * s[i] + 1, s[i]) for i in range(nd)]
        sl += [slice(None, None, d[i]) for i in range(nd)]
        return w[tuple(sl)]

    return view(xp, 2), view(valid, 0), view(inpad, 0), nd


def pad_or_crop(x: np.ndarray, pads) -> np.ndarray:
    """Zero padding by ``pads`` = [begin_0, ..., end_0, ...] over every axis; a negative entry crops."""
    r = x.ndim
    y = np.pad(x, [(max(pads[i], 0), max(pads[i + r], 0)) for i in range(r)])
    return y[tuple(slice(-min(pads[i], 0), y.shape[i] + min(pads[i + r], 0)) for i in range(r))]
