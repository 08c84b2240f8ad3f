"""The data owner's input guard: inputs outside the range the program was compiled for are refused.

Comparison bitwidths come from range analysis on calibration data; an input
far larger than anything calibrated overflows the comparisons and the secure
result is silently wrong. ``fssc compile`` records in ``manifest.json``
(``input_guard``) the largest |encoded input| of the calibration data and the
largest it allows (the rule is in :func:`fssc.compiler.compile.input_guard`
and docs/accuracy.md). The data owner sees its own inputs in the clear, so
checking them costs nothing and tells the model owner nothing: the check runs
before anything is sent.
"""

from __future__ import annotations

import numpy as np
from fssc.runtime import ring


def out_of_range(manifest: dict, name: str, x_enc: np.ndarray, items: list[str]) -> str | None:
    """None if every item of the encoded input ``x_enc`` [N, ...] is within the allowed range;
    else one sentence naming the input, the first offending item, the observed and the allowed range."""
    guard = manifest.get("input_guard") or {}
    spec = next((s for s in guard.get("inputs", []) if s["name"] == name), None)
    if spec is None or spec.get("allowed_max_abs") is None:
        return None
    allowed = int(spec["allowed_max_abs"])
    v = ring.signed(np.asarray(x_enc)).reshape(len(items), -1) if len(items) else np.zeros((0, 1), np.int64)
    # in float64: |int64 min| (what an unencodable input becomes) must count as out of range, not wrap negative
    per_item = np.abs(v.astype(np.float64)).max(axis=1) if v.size else np.zeros(len(items))
    bad = np.flatnonzero(per_item > allowed)
    if not bad.size:
        return None
    s = spec["scale"]
    lo, hi = (int(v.min()) / 2.0**s, int(v.max()) / 2.0**s)
    a, cal = allowed / 2.0**s, int(spec["calibrated_max_abs"]) / 2.0**s
    more = f" (and {bad.size - 1} more of {len(items)})" if bad.size > 1 else ""
    h = guard.get("headroom_bits")
    why = f"calibrated max |x| {cal:.4g}, x{a / cal:.4g} for the comparisons' {h}-bit headroom" if cal else "calibrated"
    return (
        f"input %{name}: {items[bad[0]]}{more} has values in [{lo:.4g}, {hi:.4g}], outside the range this program "
        f"was compiled for, [{-a:.4g}, {a:.4g}] ({why}); such inputs overflow comparisons and give wrong results"
    )


def unencodable(x: np.ndarray, scale: int, items: list[str]) -> str | None:
    """None if every value of the real input ``x`` [N, ...] is finite and fits the ring at ``scale``;
    else one sentence naming the first offending item. No flag runs such an input: it has no encoding."""
    flat = np.asarray(x, dtype=np.float64).reshape(len(items), -1) if len(items) else np.zeros((0, 1))
    with np.errstate(invalid="ignore", over="ignore"):
        bad_rows = ~(np.isfinite(flat) & (np.abs(flat) * 2.0**scale < 2.0**62)).all(axis=1)
    bad = np.flatnonzero(bad_rows)
    if not bad.size:
        return None
    more = f" (and {bad.size - 1} more of {len(items)})" if bad.size > 1 else ""
    return (
        f"{items[bad[0]]}{more} holds values that are not finite or too large for the fixed-point ring "
        f"(|x| < 2^{62 - scale} at scale {scale})"
    )


FIXES = (
    "recompile with `fssc compile --calibrate DIR` on data like yours, or with more headroom "
    "(`--margin-bits K`, or `--bits full`), or run anyway with --allow-out-of-range"
)
