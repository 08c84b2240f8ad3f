"""Range analysis: a bitwidth for every comparison, from calibration data.

Runs the planned IR in the fixed-point interpreter on calibration inputs
(``--calibrate DIR``, else batches from a fixed seed: synthetic images for an
image input [N,C,H,W], standard normal values for any other shape; one
stream per graph input) and
measures the largest magnitude each comparison sees
(:func:`fssc.compiler.gates.comparison_magnitude`: x >> trunc for a ReLU, the
window spread for max gates, the row spread for ArgMax). The bitwidth is
m = bits(magnitude) + sign + ``margin_bits`` (a 2^margin safety factor),
capped at the ring's 64 bits. It is written on the
op (``op.bits``: a value feeding several comparisons gets no single width)
for mark-comparisons, and kept with the magnitude in ``ctx.notes['ranges']``.
Semantics are unchanged.
"""

from __future__ import annotations

import numpy as np
from fssc.compiler.gates import bits_for, comparison_magnitude, gate_kind
from fssc.compiler.interp import run_fixed
from fssc.compiler.ir import Graph
from fssc.runtime.images import synthetic_inputs

from .base import PassContext

NAME = "range-analysis"
DEFAULT_CALIBRATION_BATCHES = 4


def default_calibration(shape: tuple[int, ...], seed: int = 1) -> list[np.ndarray]:
    """Calibration batches from a fixed seed when the user gave none."""
    if len(shape) == 4:
        return synthetic_inputs(shape, DEFAULT_CALIBRATION_BATCHES, seed=seed)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(DEFAULT_CALIBRATION_BATCHES)]


def default_batches(graph: Graph) -> list:
    """Default calibration for every graph input: arrays for one input, dicts name -> array for several."""
    streams = {n: default_calibration(graph.values[n].shape, seed=1 + k) for k, n in enumerate(graph.inputs)}
    if len(streams) == 1:
        return next(iter(streams.values()))
    return [{n: s[b] for n, s in streams.items()} for b in range(DEFAULT_CALIBRATION_BATCHES)]


def run(graph: Graph, ctx: PassContext) -> Graph:
    data = ctx.calibration or default_batches(graph)
    mags: dict[int, int] = {}

    def observe(op, ins, out):
        if gate_kind(op):
            mags[op.uid] = max(mags.get(op.uid, 0), comparison_magnitude(op, graph, ins))

    for batch in data:
        run_fixed(graph, batch, observe=observe)
    ranges = {}
    for op in graph.ops:
        if op.uid in mags:
            shift = op.attrs.get("trunc") or op.attrs.get("shift") or op.attrs.get("cmp_trunc") or 0
            m = min(64 - shift, bits_for(mags[op.uid]) + ctx.margin_bits)  # the gate reads m bits above the shift
            ranges[op.uid] = {"magnitude": mags[op.uid], "bits": m}
            op.bits = m
    ctx.notes["ranges"] = ranges
    ctx.notes["calibration_batches"] = len(data)
    return graph
