"""Lowering: the generated programs agree with the IR.

Each model goes through the real pipeline and the generated programs (dealer,
P0, P1 in process, :func:`fssc.compiler.reference.simulation.simulate`); the oracles
are the fixed-point interpreter (bit for bit: truncation is exact in both) and
onnxruntime (within fixed-point tolerance).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from fssc.compiler.backend.lower import lower
from fssc.compiler.backend.program import check_program
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.reference.simulation import simulate
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from fssc.errors import FsscError


def model(nodes, inputs: dict[str, tuple], consts: dict[str, np.ndarray], outputs: dict[str, tuple]):
    g = oh.make_graph(
        nodes,
        "m",
        [oh.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [oh.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), n) for n, v in consts.items()],
    )
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])


def secure_vs_oracles(proto, feeds: dict[str, np.ndarray]):
    """Compile, run the generated programs; check them against the interpreter (exact) and onnxruntime."""
    res = compile_graph(import_onnx(proto, "m"), echo=lambda s: None)
    x = feeds if len(feeds) > 1 else next(iter(feeds.values()))
    sim = simulate(res.graph, x)
    assert sim.mismatches() == []
    want = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)
    for y, w in zip(sim.decoded(), want, strict=True):
        assert y.shape == w.shape
        np.testing.assert_allclose(y, w, atol=2e-3)
    return res, sim


def test_concat_with_a_constant_keeps_the_constant():
    """The miscompile: the program dropped the constant (output (1, 2), not (1, 4)) while the cost
    report counted 4 ReLU gates."""
    c = np.array([[0.75, -1.5]])
    proto = model(
        [oh.make_node("Concat", ["x", "c"], ["h"], axis=1), oh.make_node("Relu", ["h"], ["y"])],
        {"x": (1, 2)},
        {"c": c},
        {"y": (1, 4)},
    )
    x = np.array([[-0.5, 2.25]], dtype=np.float32)
    res, sim = secure_vs_oracles(proto, {"x": x})
    np.testing.assert_allclose(sim.decoded()[0], [[0.0, 2.25, 0.75, 0.0]], atol=1e-3)
    assert res.report.total("gates") == 4


def test_concat_of_two_inputs_around_a_constant():
    c = np.arange(6, dtype=np.float32).reshape(1, 3, 2) / 4 - 0.5
    proto = model(
        [oh.make_node("Concat", ["a", "c", "b"], ["h"], axis=1), oh.make_node("Relu", ["h"], ["y"])],
        {"a": (1, 2, 2), "b": (1, 1, 2)},
        {"c": c},
        {"y": (1, 6, 2)},
    )
    gen = np.random.default_rng(0)
    feeds = {
        "a": gen.standard_normal((1, 2, 2)).astype(np.float32),
        "b": gen.standard_normal((1, 1, 2)).astype(np.float32),
    }
    secure_vs_oracles(proto, feeds)


@pytest.mark.parametrize("op,order", [("Add", "xc"), ("Add", "cx"), ("Sub", "xc"), ("Sub", "cx")])
def test_add_sub_of_a_constant_that_broadcasts_x(op, order):
    """The miscompile: x [2] + c [3, 2] compiled and then crashed at run time (cannot reshape array)."""
    c = np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]])
    ins = ["x", "c"] if order == "xc" else ["c", "x"]
    proto = model(
        [oh.make_node(op, ins, ["h"]), oh.make_node("Relu", ["h"], ["y"])], {"x": (2,)}, {"c": c}, {"y": (3, 2)}
    )
    secure_vs_oracles(proto, {"x": np.array([0.25, -0.5], dtype=np.float32)})


def test_mul_by_a_constant_that_broadcasts_x():
    c = np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]])
    proto = model(
        [oh.make_node("Mul", ["x", "c"], ["h"]), oh.make_node("Relu", ["h"], ["y"])],
        {"x": (2,)},
        {"c": c},
        {"y": (3, 2)},
    )
    secure_vs_oracles(proto, {"x": np.array([0.25, -0.5], dtype=np.float32)})


# ----------------------------------------------------------------- the lowering verifier
def concat_program():
    proto = model(
        [oh.make_node("Concat", ["x", "c"], ["h"], axis=1), oh.make_node("Relu", ["h"], ["y"])],
        {"x": (1, 2)},
        {"c": np.array([[0.75, -1.5]])},
        {"y": (1, 4)},
    )
    return lower(compile_graph(import_onnx(proto, "m"), echo=lambda s: None).graph)


def refused(prog) -> str:
    with pytest.raises(FsscError) as e:
        check_program(prog)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_verifier_refuses_a_concat_that_drops_its_constant():
    """Today's miscompile, as a statement: concat of x alone gives (1, 2) where the IR has (1, 4)."""
    prog = concat_program()
    check_program(prog)  # the real lowering passes
    cat = next(st for st in prog.stmts if st.params.get("fn") == "concat")
    cat.args = cat.args[:1]
    msg = refused(prog)
    assert msg.startswith("lowering: concat %h") and "(1, 2)" in msg and "(1, 4)" in msg


def test_verifier_refuses_a_constant_into_a_gate():
    prog = concat_program()
    c = next(st for st in prog.stmts if st.kind == "const")
    relu = next(st for st in prog.stmts if st.kind == "relu")
    relu.args = [c.out]
    assert "relu %y (relu) cannot take the model owner's constant" in refused(prog)


def test_verifier_refuses_an_undefined_operand_and_an_impossible_linear_map():
    prog = concat_program()
    relu = next(st for st in prog.stmts if st.kind == "relu")
    relu.args = ["v99"]
    assert "reads v99 before any statement defines it" in refused(prog)
    proto = model([oh.make_node("Mul", ["x", "c"], ["y"])], {"x": (2,)}, {"c": np.ones((3, 2))}, {"y": (3, 2)})
    prog = lower(compile_graph(import_onnx(proto, "m"), echo=lambda s: None).graph)
    mul = next(st for st in prog.stmts if st.kind == "linear")
    mul.params["x_shape"] = [3]  # a statement that cannot take its operand
    assert "mul %y (linear)" in refused(prog)
    mul.params["x_shape"], mul.params["y_shape"] = [2], [6]  # a map that cannot give what it claims
    assert "lib.elementwise gives (3, 2), the statement claims (6,)" in refused(prog)
