"""What every pass shares: the context it runs in.

A pass is a module in this package with a docstring stating its rewrite rule,
a ``NAME`` and a function ``run(graph, ctx) -> Graph``. A pass may rewrite the
graph it is given in place and return it; the pass manager hands each pass a
clone, verifies the result and records whether the text form changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_MARGIN_BITS = 3  # fssc compile --margin-bits; chosen from the measurements in docs/accuracy.md


@dataclass
class PassContext:
    frac_bits: int = 12  # f: fixed-point fractional bits
    max_scale_factor: int = 2  # a value may reach scale k*f before a truncation is forced
    calibration: list[np.ndarray] | None = None  # input batches for range analysis
    margin_bits: int = DEFAULT_MARGIN_BITS  # safety margin added to measured ranges (--margin-bits)
    full_bits: bool = False  # --bits full: every comparison at 64 - shift bits, whatever the calibration
    weight_extra_bits: int = 5  # weights get f + this many fractional bits (public, value-independent)
    weight_bound_bits: int = 4  # public bound |W| < 2^this on every weight: fixes P1's limb counts (ring.plan_limbs)
    notes: dict[str, Any] = field(default_factory=dict)  # passes leave findings here

    @property
    def max_scale(self) -> int:
        return self.max_scale_factor * self.frac_bits
