"""Range analysis: a bitwidth for every comparison, from calibration data.

Runs the planned IR in the fixed-point interpreter on calibration inputs
(``--calibrate DIR``, else batches from a fixed seed: synthetic images for an
image input [N,C,H,W], standard normal values for any other shape; one
stream per graph input) and
measures the largest magnitude each comparison sees
(:func:`fssc.compiler.backend.gates.comparison_magnitude`: x >> trunc for a ReLU, the
window spread for max gates, the row spread for ArgMax). The bitwidth is
m = bits(magnitude) + sign + ``margin_bits`` (a 2^margin safety factor),
capped at what the ring holds after the gate's shift (64 - shift). With
``ctx.full_bits`` (``fssc compile --bits full``) every comparison gets
m = 64 - shift whatever it measured: no bitwidth depends on the calibration.
A gate that compares nothing (the secret x secret product) gets the ring's width, 64: its magnitude
is the product's, and its headroom how far the product is from wrapping.
It is written on the op (``op.bits``: a value feeding several comparisons gets
no single width) and kept in ``ctx.ranges`` (:class:`fssc.passes.base.Ranges`:
magnitude and bits per comparison op, for the cost report's headroom column and
the data owner's input guard, which also reads the largest |encoded input| per
graph input).
Semantics are unchanged.
"""

from __future__ import annotations

import numpy as np
from fssc.compiler.backend.gates import bits_for, comparison_magnitude, gate_class, gate_kind, widest_bits
from fssc.compiler.ir.graph import Graph
from fssc.compiler.reference.interp import run_fixed
from fssc.passes.base import (
    COMPARISONS_MARKED,
    FIXED_POINT,
    RANGES,
    ComparisonRange,
    PassContext,
    PassResult,
    Ranges,
)
from fssc.runtime import ring
from fssc.runtime.images import synthetic_inputs

from fssc.errors import FsscError

NAME = "range-analysis"
REQUIRES = frozenset({FIXED_POINT})  # it runs the fixed-point interpreter on the planned scales
ENSURES = frozenset({RANGES})
INVALIDATES = frozenset({COMPARISONS_MARKED})  # the gates' bits are now these
DEFAULT_CALIBRATION_BATCHES = 4


def default_calibration(
    shape: tuple[int, ...], count: int = DEFAULT_CALIBRATION_BATCHES, seed: int = 1
) -> list[np.ndarray]:
    """Calibration batches from a fixed seed when the user gave none (other seeds: more of the same
    distribution, for ``--verify`` and the accuracy benchmark)."""
    if len(shape) == 4:
        return synthetic_inputs(shape, count, seed=seed)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def default_batches(graph: Graph) -> list:
    """Default calibration for every graph input: arrays for one input, dicts name -> array for several."""
    streams = {n: default_calibration(graph.values[n].shape, seed=1 + k) for k, n in enumerate(graph.inputs)}
    if len(streams) == 1:
        return next(iter(streams.values()))
    return [{n: s[b] for n, s in streams.items()} for b in range(DEFAULT_CALIBRATION_BATCHES)]


def _refuse_full_width(graph: Graph) -> None:
    """--bits full widens comparisons; a layer normalization's plan also sets its precision from its width (the
    variance's truncation keeps the sum of squares in the ring for the widest input), so at 64 bits it would
    truncate ordinary rows to nothing: refused in one line, never compiled imprecise."""
    ln = [op for op in graph.ops if op.kind == "layernorm"]
    if ln:
        raise FsscError(
            f"--bits full: {len(ln)} layer normalization(s), first {ln[0].described}: its precision is planned "
            f"for a bounded input range and has no full-width form; compile with --margin-bits K instead"
        )


def run(graph: Graph, ctx: PassContext) -> PassResult:
    if ctx.full_bits:
        _refuse_full_width(graph)
    data = ctx.calibration or default_batches(graph)
    mags: dict[int, int] = {}

    def observe(op, ins, out):
        if gate_kind(op):
            mags[op.uid] = max(mags.get(op.uid, 0), comparison_magnitude(op, graph, ins))

    in_max = dict.fromkeys(graph.inputs, 0)
    for batch in data:
        run_fixed(graph, batch, observe=observe)
        feeds = batch if isinstance(batch, dict) else {graph.inputs[0]: batch}
        for name, arr in feeds.items():
            enc = ring.signed(ring.encode(np.asarray(arr), graph.values[name].fixed_scale))
            if enc.size:
                in_max[name] = max(in_max[name], int(np.abs(enc).max()))
    ranges = {}
    modified = False
    for op in graph.ops:
        if op.uid in mags:
            widest = widest_bits(op)  # the gate reads m bits above its shift
            m = widest if ctx.full_bits else min(widest, bits_for(mags[op.uid]) + ctx.margin_bits)
            if getattr(gate_class(op, graph), "ring_wide", False):  # compares nothing: its width is the ring's
                m = widest
            ranges[op.uid] = ComparisonRange(mags[op.uid], m)
            modified |= op.bits != m
            op.bits = m
    ctx.ranges = Ranges(ranges, in_max, len(data))
    return PassResult(graph, modified)


def check(graph: Graph) -> str | None:
    """What ENSURES promises: every comparison op has its bitwidth."""
    op = next((op for op in graph.ops if gate_kind(op) and op.bits is None), None)
    return f"{op.kind} %{op.name} has no bitwidth" if op else None
