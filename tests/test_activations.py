"""LeakyRelu, PRelu, Div by a constant, and a final Softmax: imported onto existing gates and local ops.

* LeakyRelu(x) = alpha x + (1 - alpha) relu(x): one ReLU gate, the public scalings are local (``pmul``).
* PRelu(x) = slope x + (1 - slope) relu(x): one ReLU gate and two products with the model owner's slopes
  through the linear-layer protocol (the slopes are P1's weights, never in the data owner's program).
* Div by a constant c: a ``mul`` by 1/c; a secret or zero divisor is refused.
* Softmax: as the graph's last op dropped in labels mode (argmax unchanged); in logits mode, and anywhere
  else in the graph, evaluated: row maximum, exp and 1 / sum as spline gates, their product.

Each model runs through the generated programs: the secure simulation equals the fixed-point interpreter
bit for bit and onnxruntime within 0.02.
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
from fssc.compiler.reference.simulation import simulate
from onnx import TensorProto, helper, numpy_helper
from tiny_models import assert_secure_run_matches, image_model

from fssc.errors import FsscError


def act_model(softmax: bool = False, batch: int = 2) -> onnx.ModelProto:
    """conv -> LeakyRelu -> conv -> PRelu (per-channel slopes) -> Div by a constant -> gemm [-> Softmax]."""
    rng = np.random.default_rng(11)
    w1 = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.4, (4, 4, 3, 3)).astype(np.float32)
    slope = np.array([0.25, -0.5, 1.5, 0.05], np.float32).reshape(4, 1, 1)
    div = np.array([2.0, 0.5, 3.0, 7.0], np.float32).reshape(1, 4, 1, 1)
    g = rng.normal(0, 0.5, (5, 4 * 6 * 6)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["c1"], ["l"], alpha=0.1),
        helper.make_node("Conv", ["l", "W2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["c2", "S"], ["p"]),
        helper.make_node("Div", ["p", "D"], ["q"]),
        helper.make_node("Flatten", ["q"], ["f"]),
        helper.make_node("Gemm", ["f", "G"], ["z" if softmax else "logits"], transB=1),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["logits"], axis=-1))
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (w2, "W2"), (slope, "S"), (div, "D"), (g, "G"))]
    return image_model("act", nodes, inits, batch)


def _input(batch: int = 2, seed: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 3, 6, 6)).astype(np.float32)


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


def test_registry_and_importer():
    assert {"LeakyRelu", "PRelu", "Div", "Softmax"} <= set(SUPPORTED)
    assert OPS["pmul"].role is Role.LOCAL and OPS["pmul"].scale is Scale.PUBLIC_WEIGHTED
    assert OPS["softmax"].role is Role.FOLDED
    kinds = [op.kind for op in import_onnx(act_model(), "act").ops]
    # LeakyRelu: pmul, relu, pmul, add; PRelu: mul, relu, mul, add; Div: mul
    assert kinds == [
        "conv",
        "pmul",
        "relu",
        "pmul",
        "add",
        "conv",
        "mul",
        "relu",
        "mul",
        "add",
        "mul",
        "flatten",
        "gemm",
    ]


def test_float_semantics_match_onnxruntime():
    model, x = act_model(softmax=True), _input()
    (y,) = run_float(import_onnx(model, "act"), x)
    np.testing.assert_allclose(y, _ort(model, x), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def logits_run():
    model, x = act_model(), _input()
    res = compile_graph(import_onnx(model, "act"), echo=lambda s: None, output_mode="logits")
    return res, x, _ort(model, x)


def test_secure_run_matches_interpreter_and_onnxruntime(logits_run):
    res, x, ref = logits_run
    assert_secure_run_matches(res.graph, x, ref)


def test_prelu_slopes_stay_with_the_model_owner(logits_run):
    """The slopes (and 1 - slope) are weights of linear statements: in P1's weights file only, sent as
    W + A; the data owner's program holds no value of theirs."""
    res, _, _ = logits_run
    prog = lower(res.graph)
    prelu = [st for st in prog.stmts if st.comment.startswith("mul ") and "PRelu" in st.comment]
    assert len(prelu) == 2 and all(st.kind == "linear" for st in prelu)
    assert all(st.tag + ".w" in prog.weights for st in prelu)
    assert all("w" not in st.params or st.params["w_shape"] == [4, 1, 1] for st in prelu)


def test_leakyrelu_is_one_relu_gate_and_local_scalings(logits_run):
    res, _, _ = logits_run
    g = res.graph
    gates = [op.gate["kind"] for op in g.ops if op.gate]
    assert gates.count("relu") == 2  # one each for LeakyRelu and PRelu
    pm = [op for op in g.ops if op.kind == "pmul"]
    assert sorted(op.attrs["factor"] for op in pm) == pytest.approx([0.1, 0.9])
    assert not any(op.gate for op in pm)


def test_div_error_is_within_the_stated_bound():
    """y = x * enc(1/c): off the exact quotient by at most |x| 2^-(wscale + 1) before any truncation."""
    nodes = [helper.make_node("Div", ["x", "D"], ["y"])]
    c = np.array([3.0, -7.0, 0.3], np.float32)
    graph = helper.make_graph(
        nodes,
        "d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
        [numpy_helper.from_array(c, "D")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(1).normal(0, 4, (4, 3)).astype(np.float32)
    res = compile_graph(import_onnx(model, "d"), echo=lambda s: None, output_mode="logits")
    sim = simulate(res.graph, x)
    assert sim.mismatches() == []
    (op,) = res.graph.ops
    x_err = 2.0**-13  # the input's own encoding at f = 12
    recip = np.abs(x / c) * 2.0**-24  # 1/c is stored as a float32 constant
    bound = np.abs(x) * 2.0 ** -(op.attrs["wscale"] + 1) + x_err / np.abs(c) + recip
    err = np.abs(sim.decoded()[0] - x.astype(np.float64) / c)
    assert (err <= bound).all() and err.max() > 0


@pytest.mark.parametrize(
    "divisor, why",
    [(None, "must be a constant initializer"), (np.zeros(3, np.float32), "finite and non-zero")],
)
def test_div_refuses_a_secret_or_zero_divisor(divisor, why):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])]
    inits = []
    if divisor is None:
        inputs.append(helper.make_tensor_value_info("D", TensorProto.FLOAT, [2, 3]))
    else:
        inits.append(numpy_helper.from_array(divisor, "D"))
    graph = helper.make_graph(
        [helper.make_node("Div", ["x", "D"], ["y"])],
        "d",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(FsscError, match=why) as e:
        import_onnx(model, "d")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------- softmax
def test_final_softmax_is_dropped_in_labels_mode():
    model, x = act_model(softmax=True, batch=4), _input(batch=4, seed=3)
    res = compile_graph(import_onnx(model, "act"), echo=lambda s: None, output_mode="labels")
    assert "softmax" not in [op.kind for op in res.graph.ops]
    sim = simulate(res.graph, x)
    assert sim.mismatches() == []
    assert (sim.outputs[0] == _ort(model, x).argmax(axis=1)).all()


def test_softmax_is_evaluated_in_logits_mode():
    """logits mode: the softmax runs as the row maximum (max gates), exp and 1 / sum (spline gates) and their
    product; the generated programs equal the interpreter bit for bit and onnxruntime's probabilities within
    the bound docs/protocol.md states (here with 5 classes: well inside 0.002)."""
    model, x = act_model(softmax=True, batch=4), _input(batch=4, seed=3)
    res = compile_graph(import_onnx(model, "act"), echo=lambda s: None, output_mode="logits")
    kinds = [op.kind for op in res.graph.ops]
    assert "softmax" not in kinds and {"maxpool", "exp", "reducesum", "reciprocal", "hmul"} <= set(kinds)
    ref = _ort(model, x)
    assert ref.max() > 0.5 and ref.min() < 0.05, "the probabilities are not all alike"
    assert_secure_run_matches(res.graph, x, ref, atol=0.002)


def test_reciprocal_width_covers_every_row_sum_without_margin():
    """The row sum is at most C (+ the exps' rounding): the reciprocal's comparison width covers C + 1
    whatever the calibration saw, even with no margin bits."""
    from fssc.compiler.backend.gates import bits_for

    model = act_model(softmax=True)
    res = compile_graph(import_onnx(model, "act"), echo=lambda s: None, output_mode="logits", margin_bits=0)
    recip = next(op for op in res.graph.ops if op.kind == "reciprocal")
    s_in = res.graph.values[recip.inputs[0]].fixed_scale
    assert recip.bits == bits_for(6 << s_in)


def test_softmax_inside_the_graph_and_over_a_middle_axis():
    """A softmax that is not the last op, over the middle axis of [N, 3, 4] (moved last and back) and with
    opset 11's flattening (axes 1 and 2 as rows of 12): evaluated, not dropped or refused."""

    def model(nodes, opset):
        graph = helper.make_graph(
            nodes,
            "s",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
            [numpy_helper.from_array(np.random.default_rng(2).normal(0, 1, (12, 4)).astype(np.float32), "W")],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    x = np.random.default_rng(9).normal(0, 2, (2, 3, 4)).astype(np.float32)
    for opset, axis in ((17, 1), (11, 1)):
        nodes = [
            helper.make_node("Softmax", ["x"], ["s"], axis=axis),
            helper.make_node("Flatten", ["s"], ["f"]),
            helper.make_node("Gemm", ["f", "W"], ["y"]),
        ]
        m = model(nodes, opset)
        ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
        res = compile_graph(import_onnx(m, "s"), echo=lambda s: None, output_mode="logits")
        assert "transpose" in [op.kind for op in res.graph.ops] or opset == 11
        assert_secure_run_matches(res.graph, x, ref, atol=0.01)


def test_softmax_over_the_batch_axis_is_refused_in_labels_mode():
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["g"]), helper.make_node("Softmax", ["g"], ["y"], axis=0)],
        "s",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.eye(3, dtype=np.float32), "W")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(FsscError, match="batch axis") as e:
        compile_graph(import_onnx(m, "s"), echo=lambda s: None, output_mode="labels")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("mode", "tol"), [("labels", 0.02), ("logits", 0.002)])
def test_verify_compares_what_the_program_outputs(mode, tol):
    """``fssc compile --verify`` on a model ending in Softmax. labels mode drops it: onnxruntime's logits are
    the softmax's input, so the differences are fixed-point error, not probabilities against logits. logits
    mode evaluates it: its probabilities are compared with onnxruntime's output (not with the softmax's
    input, which would differ by whole units)."""
    from fssc.compiler.reference.crosscheck import cross_check, pair_stats

    model, x = act_model(softmax=True), _input()
    res = compile_graph(import_onnx(model, "act"), echo=lambda s: None, output_mode=mode)
    result = cross_check(res.graph, model.SerializeToString(), [x])
    assert result.exact
    ort_fixed = pair_stats(result.records)[0]
    assert ort_fixed.max_logit_diff is not None and ort_fixed.max_logit_diff < tol
    assert ort_fixed.agree == ort_fixed.total == 2
