"""What every pass shares: its contract, its result and the context it runs in.

A pass is a module in this package with a docstring stating its rewrite rule and

* ``NAME``: the name ``--print-ir-after`` and the dumps use;
* ``REQUIRES``: the properties (below) the graph must have before the pass runs;
* ``ENSURES``: the properties the graph has after it;
* ``INVALIDATES``: the properties it may destroy (a rewrite leaves new values
  without a fixed-point scale, so it invalidates the plan and what rests on it);
* ``run(graph, ctx) -> PassResult``: the graph (rewritten in place and returned)
  and whether the pass modified it;
* ``check(graph) -> str | None``: the predicate behind ``ENSURES`` (what is wrong,
  or None), which the manager checks after the pass. Every pass has one but
  fold-public-scaling, whose rewrite depends on the next layer (its property is
  recorded on the pass's word).

The pass manager (:mod:`fssc.passes.manager`) refuses a pipeline whose order
breaks a ``REQUIRES``, hands each pass a clone, verifies the result, checks
its ``ENSURES`` and records the properties it ensured on the graph (:attr:`Graph.properties`).

Analyses leave typed results on the context (:class:`Ranges`), never loose
dictionaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from fssc.compiler.ir.graph import Graph

DEFAULT_MARGIN_BITS = 3  # fssc compile --margin-bits; chosen from the measurements in docs/accuracy.md

# ---------------------------------------------------------------- graph properties
CANONICAL = "canonical"  # canonicalize's forms: no flatten, gemm(a, W[K,N], b), biases inside the linear op
NO_BATCHNORM = "no-batchnorm"  # every batchnorm folded into its conv or an affine
RELU_AFTER_MAXPOOL = "relu-after-maxpool"  # no maxpool reads a ReLU it could move past
SEPARABLE_MAXPOOL = "separable-maxpool"  # every 2-D maxpool window is 1 x k or k x 1
PUBLIC_SCALING_FOLDED = "public-scaling-folded"  # uniform average pools are sum pools, 1/k in the next layer
FIXED_POINT = "fixed-point"  # every value has a scale, truncations and upscales placed
RANGES = "ranges"  # every comparison op has its bitwidth (op.bits); ctx.ranges holds the measurements
COMPARISONS_MARKED = "comparisons-marked"  # every comparison op carries op.gate
NO_SOFTMAX = "no-softmax"  # every softmax expanded into max, spline and product gates

PROPERTIES = frozenset(
    {
        CANONICAL,
        NO_BATCHNORM,
        RELU_AFTER_MAXPOOL,
        SEPARABLE_MAXPOOL,
        PUBLIC_SCALING_FOLDED,
        FIXED_POINT,
        RANGES,
        COMPARISONS_MARKED,
        NO_SOFTMAX,
    }
)
# what a pass that adds or rewrites ops destroys: the plan (new values have no scale) and what rests on it
REWRITE_INVALIDATES = frozenset({FIXED_POINT, RANGES, COMPARISONS_MARKED})


@dataclass
class PassResult:
    graph: Graph
    modified: bool  # the pass changed the graph (the manager checks: unmodified means the same IR text)


@dataclass(frozen=True)
class ComparisonRange:
    magnitude: int  # largest |value| the comparison saw on the calibration inputs (ring units after its shift)
    bits: int  # the bitwidth m chosen for it


@dataclass
class Ranges:
    """Range analysis's findings: per comparison op (by uid), per graph input, and how much data."""

    comparisons: dict[int, ComparisonRange]
    inputs: dict[str, int]  # largest |encoded input| per graph input (ring units at the input's scale)
    calibration_batches: int


@dataclass
class PassContext:
    frac_bits: int = 12  # f: fixed-point fractional bits
    max_scale_factor: int = 2  # a value may reach scale k*f before a truncation is forced
    calibration: list[np.ndarray] | None = None  # input batches for range analysis
    margin_bits: int = DEFAULT_MARGIN_BITS  # safety margin added to measured ranges (--margin-bits)
    full_bits: bool = False  # --bits full: every comparison at 64 - shift bits, whatever the calibration
    weight_extra_bits: int = 5  # weights get f + this many fractional bits (public, value-independent)
    weight_bound_bits: int = 4  # public bound |W| < 2^this on every weight: fixes P1's limb counts (ring.plan_limbs)
    ranges: Ranges | None = None  # set by range-analysis

    @property
    def max_scale(self) -> int:
        return self.max_scale_factor * self.frac_bits
