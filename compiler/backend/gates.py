"""Which comparisons each op needs, how many, and on what values.

One registry entry per op kind (:class:`fssc.compiler.ir.ops.GateSpec`)
serves range analysis (what magnitude reaches each comparison),
mark-comparisons (gate kind and count), the cost model and the fixed-point
interpreter's overflow check, so they cannot disagree; this module reads it.

Gate kinds (docs/protocol.md, section 6; the runtime's classes in
:mod:`fssc.runtime.gates`): ``relu`` (one comparison per element, optionally
with fused exact truncation), ``max`` (MaxPool trees), ``argmax`` (a
tournament, or one DReLU for two classes), ``clip`` (two comparisons per
element), ``trunc`` (a standalone truncation) and ``spline`` (a public piecewise polynomial: sigmoid,
tanh, SiLU, GELU...; DCFs over its input select the piece).
"""

from __future__ import annotations

import numpy as np
from fssc.compiler.ir.graph import Graph, Op
from fssc.compiler.ir.ops import OPS, GateSpec
from fssc.runtime.gates import Gate


def gate_tag(op: Op, suffix: str = "") -> str:
    """Name of an op's key records and gate calls (shared by dealer, parties and the interpreter)."""
    return f"op{op.uid}{suffix}"


def gate_spec(op: Op) -> GateSpec | None:
    d = OPS.get(op.kind)
    return d.gate if d is not None else None


def gate_kind(op: Op) -> str | None:
    spec = gate_spec(op)
    return spec.kind if spec else None


def gate_class(op: Op, graph: Graph) -> type[Gate]:
    """The runtime gate class of the op's statement."""
    spec = gate_spec(op)
    if spec is None:
        raise ValueError(f"{op.kind} %{op.name} needs no gate")
    return spec.runtime(op, graph)


def gate_count(op: Op, graph: Graph) -> int:
    """Gate evaluations for the whole batch."""
    spec = gate_spec(op)
    return spec.count(op, graph) if spec else 0


def gate_depth(op: Op, graph: Graph) -> int:
    """Sequential gate layers (each a protocol round trip or two)."""
    spec = gate_spec(op)
    return spec.depth(op, graph) if spec else 0


def comparison_magnitude(op: Op, graph: Graph, inputs: list[np.ndarray]) -> int:
    """Largest |value| any comparison of ``op`` sees, in ring units (at the gate's scale)."""
    spec = gate_spec(op)
    return spec.magnitude(op, graph, inputs) if spec else 0


def compare_shift(op: Op) -> int:
    """Bits a comparison drops before it compares (fused truncation, standalone shift)."""
    spec = gate_spec(op)
    return spec.shift(op) if spec else 0


def widest_bits(op: Op) -> int:
    """The widest comparison the ring allows after the op's shift: m = 64 - shift (``--bits full``)."""
    return 64 - compare_shift(op)


def headroom_bits(magnitude: int, bits: int) -> int:
    """Headroom of an m-bit comparison over a calibrated magnitude: inputs 2^h times larger still fit."""
    return bits - bits_for(magnitude)


def bits_for(magnitude: int) -> int:
    """Signed bitwidth m with |v| < 2^(m-1) for every |v| <= magnitude."""
    return int(magnitude).bit_length() + 1
