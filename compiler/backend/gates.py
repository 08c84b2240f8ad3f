"""Which comparisons each op needs, how many, and on what values.

One table serves range analysis (what magnitude reaches each comparison),
mark-comparisons (gate kind and count), the cost model and the fixed-point
interpreter's overflow check, so they cannot disagree.

Gate kinds (docs/protocol.md, section 6):

* ``relu``: one DCF comparison per element, optionally dropping ``trunc`` bits
  (fused exact truncation, with a second DCF over the dropped bits for the
  carry); its input is x >> trunc.
* ``max``: max(a, b) = b + ReLU(a - b); a MaxPool is a tree of these over each
  window, padding skipped, so a window with v real taps costs v - 1 gates.
  Every comparison input a - b lies within [min, max] - [min, max] of its window;
  with ``cmp_trunc`` = s the gate would compare (a - b) >> s, a choice that depends
  on the masks (plan-fixed-point no longer sets it: max gates compare the full difference).
* ``argmax``: C - 1 max gates per row (a tournament that also selects the
  index); for C = 2 a single DReLU of l1 - l0 gives the label.
* ``clip``: two comparisons per element (against min and against max).
* ``trunc``: a standalone truncation by ``shift`` bits (no gate absorbs it):
  one comparison per element on x >> shift, to lift the m-bit result back
  to the ring (sign extension).
"""

from __future__ import annotations

import numpy as np
from fssc.compiler.ir.graph import Graph, Op
from fssc.compiler.ir.ops import OPS
from fssc.runtime import ring
from fssc.runtime.geometry import windows


def gate_tag(op: Op, suffix: str = "") -> str:
    """Name of an op's key records and gate calls (shared by dealer, parties and the interpreter)."""
    return f"op{op.uid}{suffix}"


def gate_kind(op: Op) -> str | None:
    return OPS[op.kind].comparison if op.kind in OPS else None


def _window_valid_counts(op: Op, in_shape) -> np.ndarray:
    """Real (non-padding) taps per output window, shape [*out]."""
    dummy = np.zeros((1, 1) + tuple(in_shape[2:]), dtype=np.int8)
    _, valid, _, nd = windows(dummy, op.attrs, 0)
    return valid.reshape(valid.shape[:nd] + (-1,)).sum(axis=-1)


def gate_count(op: Op, graph: Graph) -> int:
    """Gate evaluations for the whole batch."""
    kind = gate_kind(op)
    x = graph.values[op.inputs[0]]
    if kind in ("relu", "trunc"):
        return x.size
    if kind == "clip":
        return x.size * sum(1 for b in ("min", "max") if b in op.attrs)
    if kind == "max":
        n, c = x.shape[0], x.shape[1]
        return int(n * c * (_window_valid_counts(op, x.shape) - 1).sum())
    if kind == "argmax":
        ax = op.attrs.get("axis", 0) % len(x.shape)
        classes = x.shape[ax]
        return (x.size // classes) * (classes - 1)
    return 0


def gate_depth(op: Op, graph: Graph) -> int:
    """Sequential gate layers (each a protocol round trip or two)."""
    kind = gate_kind(op)
    if kind in ("relu", "clip", "trunc"):
        return 1
    if kind == "max":
        k = int(np.prod(op.attrs["kernel_shape"]))
        return max(1, int(np.ceil(np.log2(k))))
    if kind == "argmax":
        x = graph.values[op.inputs[0]]
        classes = x.shape[op.attrs.get("axis", 0) % len(x.shape)]
        return max(1, int(np.ceil(np.log2(classes))))
    return 0


def comparison_magnitude(op: Op, graph: Graph, inputs: list[np.ndarray]) -> int:
    """Largest |value| any comparison of ``op`` sees, in ring units (at the gate's scale)."""
    kind = gate_kind(op)
    x = ring.signed(inputs[0])
    if x.size == 0:
        return 0
    if kind in ("relu", "trunc"):
        s = op.attrs.get("trunc" if kind == "relu" else "shift", 0)
        xs = x >> np.int64(s) if s else x
        return int(max(abs(int(xs.max())), abs(int(xs.min()))))
    if kind == "clip":
        s = graph.values[op.inputs[0]].scale or 0
        mags = []
        for b in ("min", "max"):
            if b in op.attrs:
                bound = np.clip(op.attrs[b] * 2.0**s, -(2.0**62), 2.0**62)
                d = x.astype(np.float64) - bound
                mags.append(float(np.abs(d).max()))
        return int(max(mags)) if mags else 0
    if kind == "max":
        lo = np.iinfo(np.int64)
        wmax, _, _, nd = windows(x, op.attrs, lo.min)
        wmin, _, _, _ = windows(x, op.attrs, lo.max)
        axes = tuple(range(-nd, 0))
        spread = wmax.max(axis=axes).astype(np.float64) - wmin.min(axis=axes).astype(np.float64)
        return int(spread.max()) >> op.attrs.get("cmp_trunc", 0)
    if kind == "argmax":
        ax = op.attrs.get("axis", 0)
        spread = x.max(axis=ax).astype(np.float64) - x.min(axis=ax).astype(np.float64)
        return int(spread.max())
    return 0


def compare_shift(op: Op) -> int:
    """Bits a comparison drops before it compares (fused truncation, standalone shift, max gates' cmp_trunc)."""
    return op.attrs.get("trunc") or op.attrs.get("shift") or op.attrs.get("cmp_trunc") or 0


def widest_bits(op: Op) -> int:
    """The widest comparison the ring allows after the op's shift: m = 64 - shift (``--bits full``)."""
    return 64 - compare_shift(op)


def headroom_bits(magnitude: int, bits: int) -> int:
    """Headroom of an m-bit comparison over a calibrated magnitude: inputs 2^h times larger still fit."""
    return bits - bits_for(magnitude)


def bits_for(magnitude: int) -> int:
    """Signed bitwidth m with |v| < 2^(m-1) for every |v| <= magnitude."""
    return int(magnitude).bit_length() + 1
