"""Neg (y = -x), an op defined by its registry entry alone: imported, planned, lowered and run securely.

The graph puts Neg on the data owner's input, between a linear layer and a ReLU (its values reach a
comparison) and on a ReLU's output; the secure simulation must equal the fixed-point interpreter bit for
bit, and both must agree with onnxruntime up to fixed-point rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fssc.compiler.backend.lower import lower
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import SUPPORTED, import_onnx
from fssc.compiler.ir.ops import OPS, Role, Scale
from fssc.compiler.reference.interp import run_float
from fssc.runtime import ring
from onnx import helper, numpy_helper
from tiny_models import assert_secure_run_matches, image_model


def neg_model(batch: int = 2) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)
    g = rng.normal(0, 0.4, (5, 4 * 6 * 6)).astype(np.float32)
    nodes = [
        helper.make_node("Neg", ["x"], ["nx"]),
        helper.make_node("Conv", ["nx", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Neg", ["c"], ["nc"]),
        helper.make_node("Relu", ["nc"], ["r"]),
        helper.make_node("Neg", ["r"], ["nr"]),
        helper.make_node("Add", ["nr", "nc"], ["s"]),
        helper.make_node("Flatten", ["s"], ["f"]),
        helper.make_node("Gemm", ["f", "G"], ["logits"], transB=1),
    ]
    return image_model("neg", nodes, [numpy_helper.from_array(w, "W"), numpy_helper.from_array(g, "G")], batch)


def test_neg_is_a_local_op_the_importer_takes_from_the_registry():
    d = OPS["neg"]
    assert d.role is Role.LOCAL and d.scale is Scale.PRESERVING and d.gate is None
    assert "Neg" in SUPPORTED
    g = import_onnx(neg_model(), "neg")
    assert [op.kind for op in g.ops].count("neg") == 3


def test_neg_ring_semantics_wrap():
    x = ring.encode(np.array([1.5, -2.25, 0.0, 1e6]), 12)
    got = ring.decode(run_fixed_neg(x), 12)
    assert got.tolist() == [-1.5, 2.25, 0.0, -1e6]


def run_fixed_neg(x: np.ndarray) -> np.ndarray:
    from fssc.runtime import lib

    p = OPS["neg"].lower(None, None)
    return getattr(lib, p.pop("fn"))(x, **p)


@pytest.fixture(scope="module")
def compiled():
    model = neg_model()
    x = np.random.default_rng(4).normal(size=(2, 3, 6, 6)).astype(np.float32)
    res = compile_graph(import_onnx(model, "neg"), echo=lambda s: None, output_mode="logits")
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    return res.graph, x, ref


def test_neg_graph_compiles_to_local_statements(compiled):
    g, _, _ = compiled
    prog = lower(g)
    negs = [st for st in prog.stmts if st.kind == "local" and st.comment.startswith("neg ")]
    assert len(negs) == 3 and all(st.params == {"fn": "scale", "factor": -1} for st in negs)


def test_neg_float_semantics_match_onnxruntime(compiled):
    g, x, ref = compiled
    (y,) = run_float(g, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_neg_secure_run_matches_interpreter_and_onnxruntime(compiled):
    g, x, ref = compiled
    assert_secure_run_matches(g, x, ref)
