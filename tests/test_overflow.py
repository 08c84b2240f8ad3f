"""The final IR in the fixed-point interpreter against onnxruntime, and overflow reports.

Model: the demo's ResNet-18 at 224x224, batch 2, two classes (random weights,
BN calibrated; exported once per session through conftest's cache),
compiled with the default pipeline (f = 12; range analysis on its default
calibration, ``runtime.images.synthetic_inputs`` with seed 1) in logits mode.
Test inputs: 32 images = 16 batches of 2 from ``models.export.synthetic_images``
with seeds 1000..1015, a different generator and seeds from the calibration
data. The 224 model costs about 1 s per batch in the fixed-point interpreter
(run_fixed and find_overflows each run it), so the file takes under a minute.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.reference.interp import find_overflows, run_fixed
from fssc.models.export import synthetic_images
from fssc.passes.base import DEFAULT_MARGIN_BITS

SEEDS = range(1000, 1016)  # 16 batches of 2 = 32 inputs
LOGIT_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def final_ir(r18):
    return compile_graph(import_onnx(str(r18)), echo=lambda s: None).graph


@pytest.fixture(scope="module")
def session(r18):
    return ort.InferenceSession(str(r18), providers=["CPUExecutionProvider"])


def batch(seed: int) -> np.ndarray:
    return synthetic_images(2, 224, seed=seed).numpy()


@pytest.mark.slow
def test_fixed_point_keeps_every_argmax_and_the_logits_no_overflow(final_ir, session):
    worst = 0.0
    labels = []
    for seed in SEEDS:
        x = batch(seed)
        ref = session.run(None, {"input": x})[0]
        got = run_fixed(final_ir, x)[0]
        assert got.shape == ref.shape == (2, 2)
        np.testing.assert_array_equal(got.argmax(axis=1), ref.argmax(axis=1), err_msg=f"seed {seed}")
        worst = max(worst, float(np.abs(got - ref).max()))
        labels += ref.argmax(axis=1).tolist()
        overflows = find_overflows(final_ir, x)
        assert overflows == [], f"seed {seed}: " + "; ".join(map(str, overflows))
    assert worst <= LOGIT_TOLERANCE, worst
    assert len(labels) == 32


@pytest.mark.slow
def test_inputs_within_the_safety_margin_do_not_overflow(final_ir):
    # the default margin covers a 2x larger input than anything calibrated (docs/accuracy.md)
    assert find_overflows(final_ir, batch(SEEDS[0]) * 2) == []


@pytest.mark.slow
def test_input_far_outside_the_calibrated_range_reports_overflow_naming_the_op(final_ir):
    found = find_overflows(final_ir, batch(SEEDS[0]) * 1000)
    assert found
    ops = {op.name: op for op in final_ir.ops}
    for o in found:
        op = ops[o.op]
        assert op.gate and o.kind == op.kind and o.gate == op.gate["kind"]
        assert o.planned_bits == op.gate["bits"] and o.needed_bits > o.planned_bits
        assert str(o) == (
            f"overflow at {o.kind} %{o.op}: its {o.gate} comparison needs {o.needed_bits} bits, "
            f"planned {o.planned_bits} (by {o.needed_bits - o.planned_bits} bits)"
        )
    # the first comparison after the stem conv, the lowered stem MaxPool, is named first
    first = next(op for op in final_ir.ops if op.gate)
    assert found[0].op == first.name and first.kind == "maxpool" and "/maxpool/MaxPool" in first.origin
    # x1000 is ~10 bits more than calibrated, of which the margin covers DEFAULT_MARGIN_BITS
    assert found[0].needed_bits - found[0].planned_bits >= 9 - DEFAULT_MARGIN_BITS
