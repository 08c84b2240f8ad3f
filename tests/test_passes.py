"""Unit and semantics tests for every pass in ``passes/``.

Each pass gets positive cases (the rewrite happens, with the right result) and
negative cases (it is refused where it would be wrong or useless), on tiny
ONNX graphs built with ``onnx.helper`` and imported with ``import_onnx``.
The semantics tests run the IR before and after each pass in the plaintext
float interpreter (``run_float``) and compare with onnxruntime, and check
that the fixed-point interpreter (``run_fixed``) stays close.
"""

from __future__ import annotations

import math
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fssc.compiler.backend import cost, gates
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.ir.graph import Graph
from fssc.compiler.reference.interp import run_fixed, run_float
from fssc.passes import (
    canonicalize,
    expand_softmax,
    fold_batchnorm,
    fold_public_scaling,
    lower_maxpool,
    mark_comparisons,
    plan_fixed_point,
    range_analysis,
    reorder_maxpool_relu,
)
from fssc.passes.base import DEFAULT_MARGIN_BITS, ComparisonRange, PassContext
from fssc.passes.manager import PIPELINE, run_pipeline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from fssc.errors import FsscError

F = 12  # default fractional bits


# --------------------------------------------------------------------------- helpers
def make_model(nodes, x_shape, inits=None, outputs=("y",), opset=17) -> onnx.ModelProto:
    """A one-input ONNX model; output types and shapes come from ONNX shape inference."""
    tensors = []
    for name, v in (inits or {}).items():
        a = np.asarray(v)
        a = a.astype(np.int64) if a.dtype.kind in "iu" else a.astype(np.float32)
        tensors.append(nh.from_array(a, name))
    graph = oh.make_graph(
        nodes,
        "t",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [oh.make_empty_tensor_value_info(o) for o in outputs],
        tensors,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    del model.graph.output[:]
    model.graph.output.extend(known[o] for o in outputs)
    return model


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def rand(shape, seed=0, scale=1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def run_passes(graph: Graph, passes, ctx: PassContext | None = None):
    """Run passes through the pass manager (so the verifier checks each one)."""
    return run_pipeline(graph, ctx or PassContext(), passes=list(passes), echo=lambda s: None)


def apply(graph: Graph, mod, ctx: PassContext | None = None) -> tuple[Graph, bool]:
    g, recs = run_passes(graph, [mod], ctx)
    return g, recs[-1].modified


def prefix(mod) -> list:
    return PIPELINE[: PIPELINE.index(mod)]


def kinds(graph: Graph) -> list[str]:
    return [op.kind for op in graph.ops]


def op_of(graph: Graph, kind: str):
    found = [op for op in graph.ops if op.kind == kind]
    assert len(found) == 1, f"expected one {kind}, got {kinds(graph)}"
    return found[0]


def assert_float_close(y, ref):
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def assert_fixed_close(y, ref, tol=1e-2):
    if np.asarray(ref).dtype.kind in "iu":
        np.testing.assert_array_equal(y, ref)
        return
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol * max(1.0, float(np.abs(ref).max())))


def check_semantics(model, x, mod, ctx: PassContext | None = None, expect_change=True):
    """The IR just before ``mod`` (after the passes that precede it in PIPELINE) and
    just after it agree with onnxruntime in run_float and stay close in run_fixed."""
    ref = ort_run(model, x)
    ctx = ctx or PassContext(calibration=[x])
    before, _ = run_passes(import_onnx(model), prefix(mod), ctx)
    after, recs = run_passes(before, [mod], ctx)
    assert recs[-1].modified == expect_change
    for stage in (before, after):
        assert_float_close(run_float(stage, x)[0], ref)
        assert_fixed_close(run_fixed(stage, x)[0], ref)
    return before, after


def bn_node(inp, out, eps=None):
    kw = {} if eps is None else {"epsilon": eps}
    return oh.make_node("BatchNormalization", [inp, out + ".s", out + ".b", out + ".m", out + ".v"], [out], **kw)


def bn_inits(out, c, seed):
    rng = np.random.default_rng(seed)
    return {
        out + ".s": rng.uniform(0.5, 1.5, c),
        out + ".b": rng.standard_normal(c),
        out + ".m": rng.standard_normal(c),
        out + ".v": rng.uniform(0.05, 2.0, c),
    }


def tiny_resnet(batch=2, size=8, c=4, classes=3, seed=0):
    """conv-BN-ReLU-MaxPool stem, one residual block, GAP-Flatten-Gemm head."""
    rng = np.random.default_rng(seed)
    nodes = [
        oh.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        bn_node("c0", "n0"),
        oh.make_node("Relu", ["n0"], ["r0"]),
        oh.make_node("MaxPool", ["r0"], ["p0"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        oh.make_node("Conv", ["p0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        bn_node("c1", "n1"),
        oh.make_node("Relu", ["n1"], ["r1"]),
        oh.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        bn_node("c2", "n2"),
        oh.make_node("Add", ["n2", "p0"], ["a"]),
        oh.make_node("Relu", ["a"], ["r2"]),
        oh.make_node("GlobalAveragePool", ["r2"], ["g"]),
        oh.make_node("Flatten", ["g"], ["f"]),
        oh.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    inits = {
        "w0": rng.standard_normal((c, 3, 3, 3)) * 0.3,
        "w1": rng.standard_normal((c, c, 3, 3)) * 0.2,
        "w2": rng.standard_normal((c, c, 3, 3)) * 0.2,
        "wf": rng.standard_normal((classes, c)),
        "bf": rng.standard_normal(classes),
    }
    for i in range(3):
        inits.update(bn_inits(f"n{i}", c, seed + 1 + i))
    return make_model(nodes, (batch, 3, size, size), inits)


# --------------------------------------------------------------------------- every pass
@pytest.mark.parametrize("mod", PIPELINE, ids=[p.NAME for p in PIPELINE])
def test_every_pass_preserves_semantics_on_a_tiny_resnet(mod):
    model = tiny_resnet()
    x = rand((2, 3, 8, 8), seed=1)
    check_semantics(model, x, mod, expect_change=mod is not expand_softmax)  # it has no softmax: see below


def test_expand_softmax_keeps_the_float_semantics_and_the_fixed_point_close():
    """A softmax over the classes after the tiny ResNet's head: expanded into the row max, exp, sum,
    reciprocal and product; float semantics unchanged, the planned fixed point within 0.002 (5 classes)."""
    model = tiny_resnet(classes=5)
    model.graph.node[-1].output[0] = "z"
    model.graph.node.append(oh.make_node("Softmax", ["z"], ["y"], axis=1))
    x = rand((2, 3, 8, 8), seed=1)
    ref = ort_run(model, x)
    before = import_onnx(model)
    after, recs = run_passes(before.clone(), [expand_softmax])
    assert recs[-1].modified and "softmax" not in kinds(after)
    assert kinds(after)[-8:] == [
        "reshape",
        "maxpool",
        "sub",
        "exp",
        "reducesum",
        "reciprocal",
        "hmul",
        "reshape",
    ]
    for stage in (before, after):
        assert_float_close(run_float(stage, x)[0], ref)
    planned, _ = run_passes(after, PIPELINE[1:], PassContext(calibration=[x]))
    assert_fixed_close(run_fixed(planned, x)[0], ref, tol=0.002)


def test_every_pass_is_a_module_with_name_run_and_docstring():
    for mod in PIPELINE:
        assert isinstance(mod.NAME, str) and callable(mod.run)
        assert mod.__doc__ and len(mod.__doc__) > 200, mod.NAME
    assert len({p.NAME for p in PIPELINE}) == len(PIPELINE)


# --------------------------------------------------------------------------- canonicalize
def test_canonicalize_flatten_becomes_reshape():
    model = make_model(
        [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Flatten", ["r"], ["y"], axis=2)], (2, 3, 4, 5)
    )
    g, changed = apply(import_onnx(model), canonicalize)
    assert changed and kinds(g) == ["relu", "reshape"]
    assert op_of(g, "reshape").attrs == {"shape": [6, 20]}


def test_canonicalize_drops_a_reshape_to_its_own_shape_but_not_an_output():
    nodes = [
        oh.make_node("Reshape", ["x", "s"], ["h"]),
        oh.make_node("Relu", ["h"], ["r"]),
        oh.make_node("Reshape", ["r", "s"], ["y"]),
    ]
    g, _ = apply(import_onnx(make_model(nodes, (2, 6), {"s": np.array([2, 6])})), canonicalize)
    # the first reshape is a no-op and goes; the second is the graph output and stays
    assert kinds(g) == ["relu", "reshape"]
    assert op_of(g, "relu").inputs == ["x"]


def test_canonicalize_gemm_transb_alpha_beta():
    rng = np.random.default_rng(0)
    b, c = rng.standard_normal((5, 6)), rng.standard_normal((1, 5))
    model = make_model(
        [oh.make_node("Gemm", ["x", "B", "C"], ["y"], transB=1, alpha=0.5, beta=2.0)], (3, 6), {"B": b, "C": c}
    )
    g, changed = apply(import_onnx(model), canonicalize)
    op = op_of(g, "gemm")
    assert changed and op.attrs == {}
    w, bias = g.values[op.inputs[1]].data, g.values[op.inputs[2]].data
    assert w.shape == (6, 5) and bias.shape == (5,)
    np.testing.assert_allclose(w, 0.5 * b.T, rtol=1e-6)
    np.testing.assert_allclose(bias, 2.0 * c.reshape(5), rtol=1e-6)
    x = rand((3, 6), seed=2)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))


def test_canonicalize_gemm_scalar_c_becomes_a_vector():
    model = make_model(
        [oh.make_node("Gemm", ["x", "B", "C"], ["y"], beta=3.0)], (2, 4), {"B": rand((4, 3)), "C": np.array(0.25)}
    )
    g, _ = apply(import_onnx(model), canonicalize)
    np.testing.assert_allclose(g.values[op_of(g, "gemm").inputs[2]].data, [0.75] * 3)


def test_canonicalize_gemm_transa_keeps_only_transa_and_runs_securely():
    """transA=1 reads the data operand transposed: alpha and transB fold into W, transA stays; the
    generated programs compute x^T W (lib.matmul_transposed) exactly as the fixed-point interpreter."""
    from fssc.compiler.compile import compile_graph
    from fssc.compiler.reference.simulation import simulate

    model = make_model(
        [oh.make_node("Gemm", ["x", "B"], ["y"], transA=1, transB=1, alpha=0.5)], (4, 2), {"B": rand((3, 4))}
    )
    g, changed = apply(import_onnx(model), canonicalize)
    assert changed and op_of(g, "gemm").attrs == {"transA": 1}
    x = rand((4, 2), seed=1)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))
    sim = simulate(compile_graph(import_onnx(model), echo=lambda s: None).graph, x)
    assert sim.mismatches() == [] and sim.outputs[0].shape == (2, 3)
    assert_float_close(sim.decoded()[0], ort_run(model, x))


def test_canonicalize_matmul_becomes_gemm_and_bias_folds():
    nodes = [oh.make_node("MatMul", ["x", "W"], ["h"]), oh.make_node("Add", ["h", "c"], ["y"])]
    model = make_model(nodes, (2, 4), {"W": rand((4, 3)), "c": rand((3,), seed=1)})
    g, changed = apply(import_onnx(model), canonicalize)
    assert changed and kinds(g) == ["gemm"]
    op = g.ops[0]
    assert op.outputs == ["y"] and len(op.inputs) == 3
    assert set(op.origin) == {"MatMul_0", "Add_1"}
    x = rand((2, 4), seed=3)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))


def test_canonicalize_matmul_forms_it_does_not_touch():
    # 3-D activation, and the constant on the left: both stay matmul
    m3 = make_model([oh.make_node("MatMul", ["x", "W"], ["y"])], (2, 3, 4), {"W": rand((4, 5))})
    ml = make_model([oh.make_node("MatMul", ["W", "x"], ["y"])], (4, 2), {"W": rand((3, 4))})
    for model in (m3, ml):
        g, changed = apply(import_onnx(model), canonicalize)
        assert not changed and kinds(g) == ["matmul"]


def test_canonicalize_conv_bias_folding():
    nodes = [oh.make_node("Conv", ["x", "W"], ["h"]), oh.make_node("Add", ["b", "h"], ["y"])]
    model = make_model(nodes, (1, 2, 4, 4), {"W": rand((3, 2, 3, 3)), "b": rand((1, 3, 1, 1), seed=1)})
    g, changed = apply(import_onnx(model), canonicalize)
    assert changed and kinds(g) == ["conv"] and g.values[g.ops[0].inputs[2]].shape == (3,)
    x = rand((1, 2, 4, 4), seed=4)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))


def test_canonicalize_bias_not_folded_when_the_linear_output_has_another_user():
    nodes = [
        oh.make_node("Conv", ["x", "W"], ["h"]),
        oh.make_node("Add", ["h", "b"], ["a"]),
        oh.make_node("Add", ["a", "h"], ["y"]),
    ]
    model = make_model(nodes, (1, 2, 4, 4), {"W": rand((3, 2, 3, 3)), "b": rand((3, 1, 1), seed=1)})
    g, changed = apply(import_onnx(model), canonicalize)
    assert not changed and kinds(g) == ["conv", "add", "add"]


def test_canonicalize_bias_not_folded_when_it_is_not_per_channel():
    nodes = [oh.make_node("Conv", ["x", "W"], ["h"]), oh.make_node("Add", ["h", "b"], ["y"])]
    model = make_model(nodes, (1, 2, 4, 4), {"W": rand((3, 2, 3, 3)), "b": rand((1, 3, 2, 2), seed=1)})
    g, changed = apply(import_onnx(model), canonicalize)
    assert not changed and kinds(g) == ["conv", "add"]


def test_canonicalize_sub_constant_becomes_add():
    model = make_model(
        [oh.make_node("Sub", ["x", "c"], ["h"]), oh.make_node("Relu", ["h"], ["y"])],
        (2, 3),
        {"c": np.array([0.5, -1.0, 2.0])},
    )
    g, changed = apply(import_onnx(model), canonicalize)
    assert changed and kinds(g) == ["add", "relu"]
    np.testing.assert_allclose(g.values[g.ops[0].inputs[1]].data, [-0.5, 1.0, -2.0])
    # c - x keeps its form (it is not x + const)
    model2 = make_model([oh.make_node("Sub", ["c", "x"], ["y"])], (2, 3), {"c": np.array([0.5, -1.0, 2.0])})
    g2, changed2 = apply(import_onnx(model2), canonicalize)
    assert not changed2 and kinds(g2) == ["sub"]


def test_canonicalize_semantics():
    nodes = [
        oh.make_node("Flatten", ["x"], ["f"]),
        oh.make_node("Gemm", ["f", "B", "C"], ["h"], transB=1, alpha=0.5, beta=2.0),
        oh.make_node("Sub", ["h", "d"], ["h2"]),
        oh.make_node("MatMul", ["h2", "W2"], ["h3"]),
        oh.make_node("Add", ["h3", "b2"], ["h4"]),
        oh.make_node("Relu", ["h4"], ["y"]),
    ]
    inits = {"B": rand((5, 12)), "C": rand((5,), 1), "d": rand((1, 5), 2), "W2": rand((5, 4), 3), "b2": rand((4,), 4)}
    model = make_model(nodes, (2, 3, 2, 2), inits)
    _, after = check_semantics(model, rand((2, 3, 2, 2), seed=5), canonicalize)
    assert kinds(after) == ["reshape", "gemm", "gemm", "relu"]  # the sub folds into the first bias


# --------------------------------------------------------------------------- fold-batchnorm
def conv_bn_model(x_shape, cout, k=3, group=1, bias=True, eps=None, pads=1, stride=1, seed=0):
    cin = x_shape[1]
    rng = np.random.default_rng(seed)
    ins = ["x", "W"] + (["B"] if bias else [])
    nodes = [
        oh.make_node("Conv", ins, ["c"], group=group, pads=[pads] * 4, strides=[stride] * 2),
        bn_node("c", "y", eps),
    ]
    inits = {"W": rng.standard_normal((cout, cin // group, k, k)) * 0.5}
    if bias:
        inits["B"] = rng.standard_normal(cout)
    inits.update(bn_inits("y", cout, seed + 1))
    return make_model(nodes, x_shape, inits)


def expected_fold(model, eps):
    init = {t.name: nh.to_array(t).astype(np.float64) for t in model.graph.initializer}
    a = init["y.s"] / np.sqrt(init["y.v"] + eps)
    w = init["W"] * a.reshape(-1, 1, 1, 1)
    b = (init.get("B", 0.0) - init["y.m"]) * a + init["y.b"]
    return w, b


@pytest.mark.parametrize("bias", [True, False], ids=["with-bias", "without-bias"])
def test_fold_batchnorm_into_conv(bias):
    model = conv_bn_model((1, 2, 5, 5), 3, bias=bias)
    g, changed = apply(import_onnx(model), fold_batchnorm)
    assert changed and kinds(g) == ["conv"]
    conv = g.ops[0]
    assert len(conv.inputs) == 3 and "BatchNormalization_1" in conv.origin
    w, b = expected_fold(model, 1e-5)
    np.testing.assert_allclose(g.values[conv.inputs[1]].data, w, rtol=1e-5)
    np.testing.assert_allclose(g.values[conv.inputs[2]].data, b, rtol=1e-5, atol=1e-6)
    x = rand((1, 2, 5, 5), seed=1)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))


@pytest.mark.parametrize("group,cin,cout", [(2, 4, 6), (4, 4, 4)], ids=["grouped", "depthwise"])
def test_fold_batchnorm_grouped_conv(group, cin, cout):
    model = conv_bn_model((2, cin, 5, 5), cout, group=group)
    g, changed = apply(import_onnx(model), fold_batchnorm)
    assert changed and kinds(g) == ["conv"] and g.ops[0].attrs["group"] == group
    w, _ = expected_fold(model, 1e-5)
    np.testing.assert_allclose(g.values[g.ops[0].inputs[1]].data, w, rtol=1e-5)
    x = rand((2, cin, 5, 5), seed=2)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))


def test_fold_batchnorm_takes_epsilon_from_the_attribute():
    model = conv_bn_model((1, 2, 4, 4), 3, eps=0.5)
    g, _ = apply(import_onnx(model), fold_batchnorm)
    w_right, _ = expected_fold(model, 0.5)
    w_default, _ = expected_fold(model, 1e-5)
    got = g.values[g.ops[0].inputs[1]].data
    np.testing.assert_allclose(got, w_right, rtol=1e-5)
    assert not np.allclose(got, w_default, rtol=1e-2)
    x = rand((1, 2, 4, 4), seed=3)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))


def test_fold_batchnorm_refused_when_the_conv_output_has_two_users():
    rng = np.random.default_rng(0)
    nodes = [
        oh.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        bn_node("c", "n"),
        oh.make_node("Add", ["n", "c"], ["y"]),
    ]
    model = make_model(nodes, (1, 2, 4, 4), {"W": rng.standard_normal((3, 2, 3, 3)), **bn_inits("n", 3, 1)})
    g, changed = apply(import_onnx(model), fold_batchnorm)
    assert changed and kinds(g) == ["conv", "affine", "add"]
    conv = g.ops[0]
    assert conv.inputs == ["x", "W"]  # the conv is untouched
    assert g.ops[1].created_by == fold_batchnorm.NAME
    x = rand((1, 2, 4, 4), seed=4)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))


def test_fold_batchnorm_refused_when_the_conv_output_is_a_graph_output():
    rng = np.random.default_rng(0)
    nodes = [oh.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]
    model = make_model(
        nodes, (1, 2, 4, 4), {"W": rng.standard_normal((3, 2, 3, 3)), **bn_inits("y", 3, 1)}, outputs=("y", "c")
    )
    g, _ = apply(import_onnx(model), fold_batchnorm)
    assert kinds(g) == ["conv", "affine"]


@pytest.mark.parametrize("where", ["input", "after-relu"])
def test_batchnorm_not_after_a_conv_becomes_affine(where):
    pre = [] if where == "input" else [oh.make_node("Relu", ["x"], ["r"])]
    nodes = pre + [bn_node("x" if where == "input" else "r", "y", eps=0.01)]
    model = make_model(nodes, (2, 3, 4, 4), bn_inits("y", 3, 0))
    g, changed = apply(import_onnx(model), fold_batchnorm)
    assert changed and "batchnorm" not in kinds(g) and kinds(g)[-1] == "affine"
    aff = g.ops[-1]
    init = {t.name: nh.to_array(t).astype(np.float64) for t in model.graph.initializer}
    a = init["y.s"] / np.sqrt(init["y.v"] + 0.01)
    np.testing.assert_allclose(g.values[aff.inputs[1]].data, a, rtol=1e-6)
    np.testing.assert_allclose(g.values[aff.inputs[2]].data, init["y.b"] - init["y.m"] * a, rtol=1e-5, atol=1e-6)
    x = rand((2, 3, 4, 4), seed=5)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))
    assert_fixed_close(run_fixed(g, x)[0], ort_run(model, x))


def test_fold_batchnorm_semantics():
    model = conv_bn_model((2, 4, 5, 5), 4, group=2)
    check_semantics(model, rand((2, 4, 5, 5), seed=6), fold_batchnorm)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    group=st.integers(1, 3),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 2),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    bias=st.booleans(),
    eps=st.sampled_from([None, 1e-3, 0.1, 1.0]),
    size=st.integers(3, 6),
    seed=st.integers(0, 2**16),
)
def test_fold_batchnorm_random_conv_bn_matches_onnxruntime(group, cin_g, cout_g, k, stride, bias, eps, size, seed):
    x_shape = (1, group * cin_g, size, size)
    model = conv_bn_model(
        x_shape, group * cout_g, k=k, group=group, bias=bias, eps=eps, pads=k // 2, stride=stride, seed=seed
    )
    g, changed = apply(import_onnx(model), fold_batchnorm)
    assert changed and kinds(g) == ["conv"]
    x = rand(x_shape, seed=seed + 1)
    ref = ort_run(model, x)
    assert_float_close(run_float(g, x)[0], ref)
    assert_fixed_close(run_fixed(g, x)[0], ref)


# --------------------------------------------------------------------------- reorder-maxpool-relu
def relu_pool_nodes(inp="x", out="y", **pool):
    pool = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], **pool}
    return [oh.make_node("Relu", [inp], ["r"]), oh.make_node("MaxPool", ["r"], [out], **pool)]


def test_reorder_maxpool_relu():
    model = make_model(relu_pool_nodes(), (1, 2, 8, 8))
    g, changed = apply(import_onnx(model), reorder_maxpool_relu)
    assert changed and kinds(g) == ["maxpool", "relu"]
    pool, relu = g.ops
    assert pool.inputs == ["x"] and relu.inputs == pool.outputs and relu.outputs == ["y"]
    assert gates.gate_count(relu, g) == 2 * 4 * 4  # the pooled size, not 2 * 8 * 8
    # all-negative inputs: -inf padding, never zero padding, makes the swap exact
    for x in (rand((1, 2, 8, 8), seed=1), -np.abs(rand((1, 2, 8, 8), seed=2)) - 0.1):
        assert_float_close(run_float(g, x)[0], ort_run(model, x))


def test_reorder_moves_a_relu_past_a_chain_of_maxpools():
    nodes = relu_pool_nodes(out="p") + [oh.make_node("MaxPool", ["p"], ["y"], kernel_shape=[2, 2])]
    model = make_model(nodes, (1, 2, 8, 8))
    g, changed = apply(import_onnx(model), reorder_maxpool_relu)
    assert changed and kinds(g) == ["maxpool", "maxpool", "relu"]
    x = rand((1, 2, 8, 8), seed=3)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))


@pytest.mark.parametrize("other", ["add", "graph-output", "second-pool"])
def test_reorder_refused_when_the_relu_output_has_another_user(other):
    nodes = relu_pool_nodes(out="p")
    outputs = ("y",)
    if other == "add":
        nodes.append(oh.make_node("Add", ["r", "r"], ["y"]))
        outputs = ("y", "p")
    elif other == "graph-output":
        outputs = ("p", "r")
    else:
        nodes.append(oh.make_node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2]))
        outputs = ("y", "p")
    model = make_model(nodes, (1, 2, 8, 8), outputs=outputs)
    g, changed = apply(import_onnx(model), reorder_maxpool_relu)
    assert not changed and kinds(g)[0] == "relu"


def test_reorder_leaves_a_maxpool_without_relu_alone():
    model = make_model([oh.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])], (1, 1, 4, 4))
    _, changed = apply(import_onnx(model), reorder_maxpool_relu)
    assert not changed


def test_reorder_semantics():
    rng = np.random.default_rng(0)
    nodes = [oh.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1])] + relu_pool_nodes("c")
    model = make_model(nodes, (2, 3, 8, 8), {"W": rng.standard_normal((4, 3, 3, 3)) * 0.3})
    check_semantics(model, rand((2, 3, 8, 8), seed=7), reorder_maxpool_relu)


# --------------------------------------------------------------------------- lower-maxpool
def test_lower_maxpool_3x3_stride2_pad1():
    model = make_model(
        [oh.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])], (1, 1, 8, 8)
    )
    g0 = import_onnx(model)
    g, changed = apply(g0, lower_maxpool)
    assert changed and kinds(g) == ["maxpool", "maxpool"]
    first, second = g.ops
    assert {tuple(first.attrs["kernel_shape"]), tuple(second.attrs["kernel_shape"])} == {(1, 3), (3, 1)}
    assert first.created_by == second.created_by == lower_maxpool.NAME
    x = rand((1, 1, 8, 8), seed=1)
    np.testing.assert_array_equal(run_float(g, x)[0], run_float(g0, x)[0])
    np.testing.assert_array_equal(run_float(g, x)[0], ort_run(model, x))
    # n x n outputs from a 2n x 2n input: 6 max gates per output, one fewer per
    # window on the padded first row and first column: 6 n^2 - 3 n (here n = 4)
    lowered = sum(gates.gate_count(op, g) for op in g.ops)
    assert lowered == 6 * 16 - 3 * 4
    assert gates.gate_count(g0.ops[0], g0) == 105  # 8 per interior output, unlowered


def test_lower_maxpool_six_gates_per_interior_output():
    # a 3x3/2 pool with no padding effects: 2 gates per 1-D window, 2 rows per output
    model = make_model(
        [oh.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])], (1, 1, 64, 64)
    )
    g, _ = apply(import_onnx(model), lower_maxpool)
    n = 32
    assert sum(gates.gate_count(op, g) for op in g.ops) == 6 * n * n - 3 * n
    assert sum(gates.gate_count(op, g) for op in g.ops) / (n * n) < 6


@pytest.mark.parametrize(
    "shape,kw",
    [
        ((1, 2, 8, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
        ((1, 2, 7, 9), {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1}),
        ((1, 1, 9, 6), {"kernel_shape": [2, 3], "strides": [3, 1], "dilations": [2, 1]}),
    ],
    ids=["ceil", "ceil-asym-pads", "dilated"],
)
def test_lower_maxpool_keeps_geometry(shape, kw):
    model = make_model([oh.make_node("MaxPool", ["x"], ["y"], **kw)], shape)
    g0 = import_onnx(model)
    g, changed = apply(g0, lower_maxpool)
    assert changed and kinds(g) == ["maxpool", "maxpool"]
    for op in g.ops:
        assert op.attrs["ceil_mode"] == kw.get("ceil_mode", 0)
    x = rand(shape, seed=2)
    np.testing.assert_array_equal(run_float(g, x)[0], ort_run(model, x))
    assert sum(gates.gate_count(op, g) for op in g.ops) <= gates.gate_count(g0.ops[0], g0)


@pytest.mark.parametrize(
    "shape,kernel", [((1, 2, 6, 6), [1, 3]), ((1, 2, 6, 6), [3, 1]), ((1, 2, 9), [3])], ids=["1x3", "3x1", "1-D"]
)
def test_lower_maxpool_leaves_1xk_and_1d_pools(shape, kernel):
    model = make_model([oh.make_node("MaxPool", ["x"], ["y"], kernel_shape=kernel)], shape)
    g, changed = apply(import_onnx(model), lower_maxpool)
    assert not changed and kinds(g) == ["maxpool"]


def test_lower_maxpool_semantics():
    model = make_model(relu_pool_nodes(), (2, 2, 8, 8))
    check_semantics(model, rand((2, 2, 8, 8), seed=8), lower_maxpool)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_reorder_and_lower_random_pools_match_onnxruntime(data):
    k = [data.draw(st.integers(1, 3)) for _ in range(2)]
    s = [data.draw(st.integers(1, 3)) for _ in range(2)]
    p = [data.draw(st.integers(0, k[i % 2] - 1)) for i in range(4)]
    d = [data.draw(st.integers(1, 2)) for _ in range(2)]
    ceil = data.draw(st.integers(0, 1))
    hw = [data.draw(st.integers(d[i] * (k[i] - 1) + 1, 9)) for i in range(2)]
    seed = data.draw(st.integers(0, 2**16))
    nodes = relu_pool_nodes(kernel_shape=k, strides=s, pads=p, ceil_mode=ceil, dilations=d)
    model = make_model(nodes, (1, 2, *hw))
    g, recs = run_passes(import_onnx(model), [reorder_maxpool_relu, lower_maxpool])
    assert recs[1].modified  # the relu always moves
    x = rand((1, 2, *hw), seed=seed)
    ref = ort_run(model, x)
    np.testing.assert_array_equal(run_float(g, x)[0], ref.astype(np.float64))
    assert_fixed_close(run_fixed(g, x)[0], ref, tol=1e-3)


# --------------------------------------------------------------------------- fold-public-scaling
def gap_head_model(extra_user=False, c=4, classes=3):
    nodes = [
        oh.make_node("Relu", ["x"], ["r"]),
        oh.make_node("GlobalAveragePool", ["r"], ["g"]),
        oh.make_node("Flatten", ["g"], ["f"]),
        oh.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1),
    ]
    outputs = ("y",)
    if extra_user:
        nodes.append(oh.make_node("Relu", ["g"], ["z"]))
        outputs = ("y", "z")
    return make_model(nodes, (2, c, 5, 5), {"W": rand((classes, c)), "b": rand((classes,), 1)}, outputs=outputs)


def test_fold_public_scaling_gap_flatten_gemm():
    model = gap_head_model()
    before, _ = run_passes(import_onnx(model), prefix(fold_public_scaling))
    g, changed = apply(before, fold_public_scaling)
    assert changed and kinds(g) == ["relu", "globalsumpool", "reshape", "gemm"]
    gemm_before, gemm = op_of(before, "gemm"), op_of(g, "gemm")
    np.testing.assert_allclose(g.values[gemm.inputs[1]].data, before.values[gemm_before.inputs[1]].data / 25, rtol=1e-6)
    assert gemm.inputs[2] == gemm_before.inputs[2]  # the bias is unchanged
    assert gemm.attrs["wscale_extra"] == math.ceil(math.log2(25))
    x = rand((2, 4, 5, 5), seed=1)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))


def test_fold_public_scaling_refused_when_the_pool_has_another_user():
    before, _ = run_passes(import_onnx(gap_head_model(extra_user=True)), prefix(fold_public_scaling))
    g, changed = apply(before, fold_public_scaling)
    assert not changed and "globalavgpool" in kinds(g)


def avgpool_conv_model(count_include_pad, pads, ceil_mode=0, size=7):
    nodes = [
        oh.make_node(
            "AveragePool",
            ["x"],
            ["a"],
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=pads,
            count_include_pad=count_include_pad,
            ceil_mode=ceil_mode,
        ),
        oh.make_node("Conv", ["a", "W"], ["y"]),
    ]
    return make_model(nodes, (1, 2, size, size), {"W": rand((3, 2, 2, 2))})


@pytest.mark.parametrize("cip,pads", [(0, [0, 0, 0, 0]), (1, [1, 1, 1, 1])], ids=["no-pads", "count-include-pad"])
def test_fold_public_scaling_uniform_avgpool_into_conv(cip, pads):
    model = avgpool_conv_model(cip, pads)
    g, changed = apply(import_onnx(model), fold_public_scaling)
    assert changed and kinds(g) == ["sumpool", "conv"]
    assert "count_include_pad" not in g.ops[0].attrs and g.ops[1].attrs["wscale_extra"] == 4
    x = rand((1, 2, 7, 7), seed=2)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))


@pytest.mark.parametrize(
    "cip,pads,ceil", [(0, [1, 1, 1, 1], 0), (1, [0, 0, 0, 0], 1)], ids=["border-counts", "ceil-mode"]
)
def test_fold_public_scaling_refused_with_non_uniform_counts(cip, pads, ceil):
    model = avgpool_conv_model(cip, pads, ceil, size=8)  # ceil mode: the last window is cut short
    g, changed = apply(import_onnx(model), fold_public_scaling)
    assert not changed and kinds(g) == ["avgpool", "conv"]
    x = rand((1, 2, 8, 8), seed=3)
    assert_float_close(run_float(g, x)[0], ort_run(model, x))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fold_public_scaling_random_avgpools_match_onnxruntime(data):
    k = [data.draw(st.integers(1, 3)) for _ in range(2)]
    s = [data.draw(st.integers(1, 3)) for _ in range(2)]
    p = [data.draw(st.integers(0, k[i % 2] - 1)) for i in range(4)]
    cip, ceil = data.draw(st.integers(0, 1)), data.draw(st.integers(0, 1))
    hw = [data.draw(st.integers(k[i], 8)) for i in range(2)]
    seed = data.draw(st.integers(0, 2**16))
    nodes = [
        oh.make_node(
            "AveragePool", ["x"], ["a"], kernel_shape=k, strides=s, pads=p, count_include_pad=cip, ceil_mode=ceil
        ),
        oh.make_node("Conv", ["a", "W"], ["y"], pads=[1, 1, 1, 1]),
    ]
    model = make_model(nodes, (1, 2, *hw), {"W": rand((3, 2, 3, 3), seed)})
    ctx = PassContext()
    before, _ = run_passes(import_onnx(model), prefix(fold_public_scaling), ctx)
    g, changed = apply(before, fold_public_scaling, ctx)
    assert changed == (fold_public_scaling._uniform_count(before, before.ops[0]) is not None)
    x = rand((1, 2, *hw), seed=seed + 1)
    ref = ort_run(model, x)
    assert_float_close(run_float(g, x)[0], ref)
    assert_fixed_close(run_fixed(g, x)[0], ref, tol=5e-3)


def test_fold_public_scaling_needs_a_linear_consumer():
    nodes = [oh.make_node("GlobalAveragePool", ["x"], ["g"]), oh.make_node("Relu", ["g"], ["y"])]
    _g, changed = apply(import_onnx(make_model(nodes, (1, 2, 3, 3))), fold_public_scaling)
    assert not changed


def test_fold_public_scaling_semantics():
    check_semantics(gap_head_model(), rand((2, 4, 5, 5), seed=9), fold_public_scaling)


# --------------------------------------------------------------------------- plan-fixed-point
def planned(model, frac_bits=F):
    ctx = PassContext(frac_bits=frac_bits)
    g, _ = run_passes(import_onnx(model), PIPELINE[: PIPELINE.index(plan_fixed_point) + 1], ctx)
    return g


def residual_model():
    rng = np.random.default_rng(0)
    nodes = [
        oh.make_node("Relu", ["x"], ["r0"]),
        oh.make_node("Conv", ["r0", "W1"], ["c1"], pads=[1, 1, 1, 1]),
        oh.make_node("Conv", ["c1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
        oh.make_node("Add", ["c2", "r0"], ["a"]),
        oh.make_node("Relu", ["a"], ["y"]),
    ]
    return make_model(
        nodes,
        (1, 2, 5, 5),
        {"W1": rng.standard_normal((2, 2, 3, 3)) * 0.3, "W2": rng.standard_normal((2, 2, 3, 3)) * 0.3},
    )


@pytest.mark.parametrize("f", [8, 12, 16])
def test_plan_fixed_point_scales(f):
    g = planned(residual_model(), f)
    v = g.values
    assert g.meta["frac_bits"] == f
    assert v["x"].scale == f and v["r0"].scale == f
    conv1, conv2 = [op for op in g.ops if op.kind == "conv"]
    # weights get f + weight_extra_bits fractional bits, whatever their values (the scale is public)
    for conv in (conv1, conv2):
        assert conv.attrs["wscale"] == f + PassContext().weight_extra_bits
    assert v["c1"].scale == f + conv1.attrs["wscale"]
    # conv -> conv: the second conv's input is truncated back to f first
    tr = next(op for op in g.ops if op.outputs == conv2.inputs[:1])
    assert tr.kind == "trunc" and tr.attrs["shift"] == conv1.attrs["wscale"]
    assert tr.created_by == plan_fixed_point.NAME
    s2 = f + conv2.attrs["wscale"]
    assert v["c2"].scale == s2
    # residual add: the lower-scale operand is upscaled (exact), not the other truncated
    add = op_of(g, "add")
    up = next(op for op in g.ops if op.outputs[0] in add.inputs and op.kind == "upscale")
    assert up.inputs == ["r0"] and up.attrs["shift"] == s2 - f and v["a"].scale == s2
    # the final relu absorbs the truncation
    relu = g.ops[-1]
    assert relu.attrs["trunc"] == s2 - f and v["y"].scale == f
    # the first relu sees scale f: nothing to absorb
    assert "trunc" not in g.ops[0].attrs


def test_plan_fixed_point_every_value_has_a_scale_and_fixed_point_is_close():
    model = residual_model()
    g = planned(model)
    assert all(g.values[n].scale is not None for op in g.ops for n in op.outputs)
    x = rand((1, 2, 5, 5), seed=1)
    ref = ort_run(model, x)
    assert_fixed_close(run_fixed(g, x)[0], ref, tol=2e-3)
    # fewer fractional bits, larger error, still the same values
    assert_fixed_close(run_fixed(planned(model, 8), x)[0], ref, tol=5e-2)


def test_plan_fixed_point_pool_argmax_and_public_scaling():
    g = planned(tiny_resnet())
    pools = [op for op in g.ops if op.kind == "maxpool"]
    # after the reorder, the pool sees the conv's output (scale f + wscale) and compares the full
    # differences: a comparison truncated back to scale f would choose at random between close values
    stem = g.producer()[pools[0].inputs[0]]
    assert stem.kind == "conv"
    assert pools
    assert all(g.values[op.outputs[0]].scale == F + stem.attrs["wscale"] for op in pools)
    gemm = op_of(g, "gemm")
    assert gemm.attrs["wscale"] == F + gemm.attrs["wscale_extra"] + PassContext().weight_extra_bits
    am = make_model([oh.make_node("Relu", ["x"], ["r"]), oh.make_node("ArgMax", ["r"], ["y"], axis=1)], (2, 5))
    ga = planned(am)
    assert ga.values[ga.outputs[0]].scale == 0


def test_plan_fixed_point_semantics():
    check_semantics(residual_model(), rand((1, 2, 5, 5), seed=10), plan_fixed_point)


def test_plan_fixed_point_refuses_an_unknown_kind():
    g = import_onnx(make_model([oh.make_node("Relu", ["x"], ["y"])], (1, 3)))
    g.ops[0].kind = "no_such_kind"
    with pytest.raises(FsscError, match="no_such_kind"):
        plan_fixed_point.run(g, PassContext())


# --------------------------------------------------------------------------- range analysis, marks
def marked(model, calibration=None, **ctx_kw):
    ctx = PassContext(calibration=calibration, **ctx_kw)
    g, _ = run_passes(import_onnx(model), PIPELINE, ctx)
    return g, ctx


def test_range_analysis_bits_from_calibration():
    x = np.array([[-3.0, 5.0, 0.5, 1.0], [0.25, -1.0, 2.0, 0.0]], dtype=np.float32)
    model = make_model([oh.make_node("Relu", ["x"], ["y"])], (2, 4))
    g, ctx = marked(model, [x], margin_bits=2)
    relu = g.ops[0]
    # |5 * 2^12| = 20480 needs 15 bits + sign = 16, plus the 2-bit margin
    assert ctx.ranges is not None and ctx.ranges.comparisons[relu.uid] == ComparisonRange(magnitude=20480, bits=18)
    assert relu.gate["bits"] == 18 and relu.bits == 18
    g3, _ = marked(model, [x], margin_bits=3)
    assert g3.ops[0].gate["bits"] == 19
    g8, _ = marked(model, [x], frac_bits=8, margin_bits=2)
    assert g8.ops[0].gate["bits"] == 14
    gd, _ = marked(model, [x])  # the default margin (docs/accuracy.md)
    assert gd.ops[0].gate["bits"] == 16 + DEFAULT_MARGIN_BITS
    assert ctx.ranges.calibration_batches == 1


def test_range_analysis_relu_with_fused_truncation_measures_after_the_shift():
    model = make_model(
        [oh.make_node("MatMul", ["x", "W"], ["h"]), oh.make_node("Relu", ["h"], ["y"])], (1, 2), {"W": np.eye(2) * 4.0}
    )
    g, _ = marked(model, [np.array([[1.0, -0.5]], dtype=np.float32)])
    relu = op_of(g, "relu")
    mm = op_of(g, "gemm")  # canonicalize turned the MatMul into a Gemm
    assert relu.gate["trunc"] == mm.attrs["wscale"]  # the product is at scale f + wscale; the gate drops wscale
    assert relu.gate["bits"] == gates.bits_for(4 << F) + DEFAULT_MARGIN_BITS  # 4.0 at scale f after the shift


def test_range_analysis_default_calibration_for_image_and_flat_inputs():
    for shape in ((2, 3, 8, 8), (2, 6)):
        nodes = [oh.make_node("Relu", ["x"], ["y"])]
        g, ctx = marked(make_model(nodes, shape))
        assert ctx.ranges is not None
        assert ctx.ranges.calibration_batches == range_analysis.DEFAULT_CALIBRATION_BATCHES
        assert 4 <= g.ops[0].gate["bits"] <= 64


def test_range_analysis_bits_cover_the_calibration_and_the_secure_path_relies_on_them():
    """The bitwidths are what the secure gates compute with: the calibration inputs fit them (no
    comparison overflows, the programs equal the interpreter); inputs 64 times larger do not, and then
    the programs' result leaves the interpreter's."""
    from fssc.compiler.reference.interp import find_overflows
    from fssc.compiler.reference.simulation import simulate

    x = rand((2, 3, 8, 8), seed=11)
    g, _ = marked(tiny_resnet(), [x])
    assert find_overflows(g, x) == []
    assert simulate(g, x).mismatches() == []
    big = x * 64
    over = find_overflows(g, big)
    by_name = {op.name: op for op in g.ops}
    assert over and all(o.needed_bits > o.planned_bits == by_name[o.op].gate["bits"] for o in over)
    assert simulate(g, big).mismatches() != []


def test_range_analysis_bitwidth_belongs_to_each_comparison_not_to_a_shared_value():
    """h feeds a ReLU (which drops h's weight scale: fused truncation) and a Clip (which compares at h's
    full scale): two widths, one value. Each op carries its own, the text form prints it on the op's line,
    and the viewer's estimate for the unmarked op (after range-analysis) uses it."""
    from fssc.compiler.viewer.document import _planned_gate

    nodes = [
        oh.make_node("MatMul", ["x", "W"], ["h"]),
        oh.make_node("Relu", ["h"], ["r"]),
        oh.make_node("Clip", ["h", "lo", "hi"], ["c"]),
        oh.make_node("Add", ["r", "c"], ["y"]),
    ]
    model = make_model(nodes, (2, 4), {"W": rand((4, 4)), "lo": np.array(-1.0), "hi": np.array(1.0)})
    x = rand((2, 4), seed=3)
    ctx = PassContext(calibration=[x])
    ranged, _ = run_passes(import_onnx(model), PIPELINE[: PIPELINE.index(range_analysis) + 1], ctx)
    marked_g, _ = run_passes(ranged, [mark_comparisons], ctx)
    relu, clip = op_of(marked_g, "relu"), op_of(marked_g, "clip")
    assert relu.inputs[0] == clip.inputs[0]  # one value, two comparisons
    h = ranged.values[relu.inputs[0]]
    assert relu.gate["bits"] < clip.gate["bits"] - 10  # the clip sees h at scale f + wscale, the ReLU at f
    for op in (relu, clip):
        planned = _planned_gate(next(o for o in ranged.ops if o.uid == op.uid), ranged)
        assert planned["bits"] == op.gate["bits"] and planned["ranged"]
        line = next(ln for ln in ranged.text().splitlines() if f"= {op.kind}(" in ln)
        assert f" m={op.gate['bits']}" in line
    assert f"%{h.name}: float32[2,4]{{s={h.scale}}}" in ranged.text()  # the value has no width of its own


def test_mark_comparisons_kinds_counts_and_depths():
    nodes = [
        oh.make_node("Relu", ["x"], ["r"]),
        oh.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Clip", ["p", "lo", "hi"], ["c"]),
        oh.make_node("Flatten", ["c"], ["f"]),
        oh.make_node("Gemm", ["f", "W"], ["l"]),
        oh.make_node("ArgMax", ["l"], ["y"], axis=1),
    ]
    model = make_model(nodes, (2, 3, 4, 4), {"lo": np.array(-0.5), "hi": np.array(0.5), "W": rand((12, 5))})
    g, ctx = marked(model, [rand((2, 3, 4, 4), seed=1)])
    marks: dict[str, list[dict]] = {}
    for op in g.ops:
        if op.gate:
            marks.setdefault(op.kind, []).append(op.gate)
    total = {k: sum(gt["count"] for gt in v) for k, v in marks.items()}
    # the relu moved after the pool (reorder), so it counts pooled elements
    assert [gt["kind"] for gt in marks["relu"]] == ["relu"] and total["relu"] == 2 * 3 * 2 * 2
    # 2x2/2 pool lowered to 1x2 then 2x1: 2 gates per output row pair + 1
    assert {gt["kind"] for gt in marks["maxpool"]} == {"max"} and total["maxpool"] == 2 * 3 * (4 * 2 + 2 * 2)
    assert [gt["kind"] for gt in marks["clip"]] == ["clip"] and total["clip"] == 2 * 12 * 2
    assert [gt["kind"] for gt in marks["argmax"]] == ["argmax"] and total["argmax"] == 2 * 4
    assert marks["argmax"][0]["depth"] == 3 and marks["relu"][0]["depth"] == 1
    for gate in [gt for kind_gates in marks.values() for gt in kind_gates]:
        assert gate["per_image"] * 2 == gate["count"]
        assert 2 <= gate["bits"] <= 64
    assert {op.kind for op in g.ops if not op.gate} == {"reshape", "gemm"}
    for op in g.ops:
        if op.gate:
            assert op.gate["bits"] == ctx.ranges.comparisons[op.uid].bits
            assert op.gate["count"] == gates.gate_count(op, g)


def test_range_analysis_and_marks_leave_a_graph_without_comparisons_alone():
    model = make_model(
        [oh.make_node("Conv", ["x", "W"], ["c"]), oh.make_node("Flatten", ["c"], ["y"])],
        (1, 2, 3, 3),
        {"W": rand((2, 2, 2, 2))},
    )
    ctx = PassContext()
    g, recs = run_passes(import_onnx(model), PIPELINE, ctx)
    changed = {r.name: r.modified for r in recs}
    assert not changed["range-analysis"] and not changed["mark-comparisons"]
    assert ctx.ranges is not None and ctx.ranges.comparisons == {} and all(op.gate is None for op in g.ops)


def test_mark_comparisons_needs_range_analysis():
    g, _ = run_passes(import_onnx(make_model([oh.make_node("Relu", ["x"], ["y"])], (1, 3))), [plan_fixed_point])
    with pytest.raises(FsscError, match=r"^pass 'mark-comparisons' requires ranges, which no earlier pass ensures"):
        run_passes(g, [mark_comparisons])  # the manager refuses the order before anything runs
    with pytest.raises(FsscError, match=r"mark-comparisons.*range-analysis"):
        mark_comparisons.run(g.clone(), PassContext())  # and the pass itself finds no bitwidth


# --------------------------------------------------------------------------- cost model
def cost_model_graph():
    """One op of every cost family: mul, standalone truncation (between two muls), relu (fused
    trunc), conv, max tree, add of a constant, a secret x secret product (a square: one wire twice), clip,
    sum pool folded into a gemm (whose input the product's scale makes truncate), and (labels mode)
    a 2-class argmax."""
    rng = np.random.default_rng(0)
    nodes = [
        oh.make_node("Mul", ["x", "k"], ["a0"]),
        oh.make_node("Mul", ["a0", "k2"], ["a"]),
        oh.make_node("Relu", ["a"], ["r0"]),
        oh.make_node("Conv", ["r0", "W"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("MaxPool", ["c"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["p"], ["r1"]),
        oh.make_node("Add", ["r1", "B"], ["s"]),
        oh.make_node("Mul", ["s", "s"], ["sq"]),
        oh.make_node("Clip", ["sq", "lo", "hi"], ["cl"]),
        oh.make_node("GlobalAveragePool", ["cl"], ["g"]),
        oh.make_node("Flatten", ["g"], ["f"]),
        oh.make_node("Gemm", ["f", "V", "vb"], ["y"], transB=1),
    ]
    inits = {
        "k": np.array(0.7),
        "k2": np.array(-1.3),
        "W": rng.standard_normal((4, 3, 3, 3)) * 0.3,
        "B": rng.standard_normal((1, 4, 4, 4)) * 0.1,
        "lo": np.array(0.0),
        "hi": np.array(1.5),
        "V": rng.standard_normal((2, 4)),
        "vb": rng.standard_normal(2),
    }
    return make_model(nodes, (2, 3, 8, 8), inits)


def test_cost_model_follows_the_documented_formulas():
    """docs/cost-model.md: the formulas a benchmark checks, op by op."""
    from fssc.compiler.compile import compile_graph

    res = compile_graph(import_onnx(cost_model_graph()), echo=lambda s: None, output_mode="labels")
    g, rep = res.graph, res.report
    costs = {o.op: o for o in rep.ops}
    seen = set()
    for op in g.ops:
        c = costs[op.name]
        out = g.values[op.outputs[0]]
        if op.gate:
            n, m, depth = op.gate["count"], op.gate["bits"], op.gate["depth"]
            kb = cost.dcf.nbytes_per_key(m - 1, 0)
            s = op.gate.get("trunc" if op.kind == "relu" else "shift", 0)
            cb = cost.dcf.nbytes_per_key(s, 0) if s else 0  # exact truncation: the carry's DCF over s bits
            if op.kind in ("relu", "clip"):
                assert (op.kind == "relu") == (s > 0), "the ReLUs truncate, the clip does not"
                words, bits = (48 + 16, 2) if s else (48, 1)  # + r_c, r_d r_c and the bit c^
                assert (c.key_p0, c.key_p1) == (n * (kb + cb) + 16, pytest.approx(n * (kb + cb + words + bits / 8)))
                assert c.rounds == 2 and c.sent_p0 == c.sent_p1 == pytest.approx(n * (bits / 8 + 8))
            elif op.kind == "trunc":
                assert s > 0 and cb > 0
                assert (c.key_p0, c.key_p1) == (n * (kb + cb) + 16, pytest.approx(n * (kb + cb + 40 + 8 + 2 / 8)))
                assert c.rounds == 2 and c.sent_p0 == c.sent_p1 == pytest.approx(n * (2 / 8 + 8))
            elif op.kind == "maxpool":
                assert (c.key_p0, c.key_p1) == (n * kb + 16 * depth, n * (kb + 32 + 1 / 8))
                assert c.rounds == 2 * depth == 4 and c.sent_p0 == c.sent_p1 == n * (1 / 8 + 8)
            elif op.kind == "hmul":  # shares of r_x, r_y, r_x r_y, r_z (x and y: one wire of n elements)
                assert (c.key_p0, c.key_p1) == (16, 8 * 4 * n) and n == 2 * 4 * 4 * 4
                assert c.rounds == 1 and c.sent_p0 == c.sent_p1 == 8 * n
            else:  # two classes: one DReLU per row, its bit opened to P0 only
                assert op.kind == "argmax" and n == 2
                assert (c.key_p0, c.key_p1) == (n * kb + 16, n * (kb + 1 / 8))
                assert (c.rounds, c.sent_p0, c.sent_p1) == (1, 0, n / 8)
            if op.kind == "clip":
                assert n == 2 * g.values[op.inputs[0]].size
        elif op.kind in ("conv", "gemm", "mul"):  # the model owner's weights: linear protocol
            x = g.values[op.inputs[0]]
            assert (c.key_p0, c.key_p1) == (32, 8 * (x.size + out.size))
            assert c.rounds == 1 and c.sent_p0 == c.sent_p1 == 8 * out.size
        elif op.kind == "add":  # a local op with the model owner's constant B: P1 sends B masked
            assert (c.key_p0, c.key_p1, c.rounds, c.sent_p0, c.sent_p1) == (0, 16, 1, 0, 8 * 4 * 4 * 4)
        else:
            assert op.kind in ("globalsumpool", "reshape")
            assert c.key_p0 == c.key_p1 == c.rounds == c.sent_p0 == c.sent_p1 == 0
        seen.add(op.kind)
    assert seen == {
        "mul",
        "trunc",
        "relu",
        "conv",
        "maxpool",
        "add",
        "hmul",
        "clip",
        "globalsumpool",
        "reshape",
        "gemm",
        "argmax",
    }
    n_in = 2 * 3 * 8 * 8
    assert rep.input_bytes == 8 * n_in and rep.masks_p0 == 8 * n_in  # label output: no output mask
    assert rep.setup_bytes == 8 * (2 + 4 * 3 * 3 * 3 + 4 * 2)  # two muls, conv, gemm weights
    # rounds by the docs' table: the input 1, mul 1, mul 1, trunc 2, relu 2, conv 1, the 3x3 pool lowered to two
    # 1-D pools of depth 2 (2 x 2 x 2), relu 2, the constant B sent 1, hmul 1, clip 2, trunc 2, gemm 1, the
    # 2-class argmax 1
    assert rep.rounds == 1 + 1 + 1 + 2 + 2 + 1 + 8 + 2 + 1 + 1 + 2 + 2 + 1 + 1


@pytest.mark.parametrize("mode", ["logits", "labels"])
def test_cost_estimates_match_an_in_memory_deal_and_run(mode):
    """The estimates equal what the runtime's dealer writes and its parties send, up to
    framing: key records (< 64 bytes each) and message headers (< 32 bytes each)."""
    from fssc.compiler.backend.lower import is_weighted
    from fssc.compiler.compile import compile_graph
    from fssc.compiler.reference.simulation import simulate

    res = compile_graph(import_onnx(cost_model_graph()), echo=lambda s: None, output_mode=mode)
    g, rep = res.graph, res.report
    sim = simulate(g, rand((2, 3, 8, 8), seed=1), reference=False)
    (k0, k1), (c0, c1) = sim.keys, sim.channels
    calls = sum(op.gate["depth"] if op.kind == "maxpool" else 1 for op in g.ops if op.gate)
    linear = sum(is_weighted(op, g) for op in g.ops)
    records = 4 * calls + 2 * linear + 3  # dcf, carry dcf, seed (P0) / corrections and bits (P1) per call
    for actual, est in ((len(k0), rep.total("key_p0")), (len(k1), rep.total("key_p1"))):
        assert est <= actual <= est + 64 * records + 512, (actual, est)
    assert sim.setup_bytes == rep.setup_bytes
    for chan, est in ((c0, rep.total("sent_p0") + rep.input_bytes), (c1, rep.total("sent_p1"))):
        assert est <= chan.bytes_sent <= est + 32 * chan.messages_sent, (chan.bytes_sent, est)
    # rounds: every exchange, P0's input message and P1's label bits (labels mode), as the channel counts them
    assert rep.rounds == c0.rounds == c1.rounds


@pytest.mark.usefixtures("walk")  # the numpy walk counts mmo calls, the compiled one aes_fixed calls
@pytest.mark.parametrize("mode", ["logits", "labels"])
def test_aes_estimates_match_the_parties_online_aes_blocks(mode, monkeypatch):
    """Per party, the AES blocks its online evaluation spends: the MMO blocks inside ``dcf.evaluate`` and, for
    P0, the CTR blocks expanding its shares (``Party.shares``), counted in an in-memory run; the estimate
    (``aes_blocks_p0/p1``) equals them up to rounding of one block per share expansion."""
    import threading

    from fssc.compiler.compile import compile_graph
    from fssc.compiler.reference.simulation import simulate
    from fssc.runtime import dcf, protocol

    local = threading.local()
    counts = {0: 0.0, 1: 0.0}
    real_mmo, real_aes = dcf.mmo, dcf.aes_fixed
    real_eval, real_expand, real_shares = dcf.evaluate, protocol.expand, protocol.Party.shares

    def mmo(blocks, scratch=None):
        if getattr(local, "party", None) is not None:
            counts[local.party] += blocks.size // 2
        return real_mmo(blocks, scratch)

    def aes_fixed(blocks, scratch=None):
        if getattr(local, "party", None) is not None:
            counts[local.party] += blocks.size // 2
        return real_aes(blocks, scratch)

    def evaluate(party, keys, x, threads=1):
        local.party = party
        try:
            return real_eval(party, keys, x, threads)
        finally:
            local.party = None

    def expand(seed, shape, nbits=64, nonce=0):
        out = real_expand(seed, shape, nbits, nonce)
        if getattr(local, "shares", False):
            counts[0] += out.nbytes / 16
        return out

    def shares(self, *args):
        local.shares = self.b == 0
        try:
            return real_shares(self, *args)
        finally:
            local.shares = False

    monkeypatch.setattr(dcf, "mmo", mmo)
    monkeypatch.setattr(dcf, "aes_fixed", aes_fixed)  # the compiled walk's AES calls (MMO without its xor)
    monkeypatch.setattr(dcf, "evaluate", evaluate)
    monkeypatch.setattr(protocol, "expand", expand)
    monkeypatch.setattr(protocol.Party, "shares", shares)
    res = compile_graph(import_onnx(cost_model_graph()), echo=lambda s: None, output_mode=mode)
    simulate(res.graph, rand((2, 3, 8, 8), seed=1), reference=False)
    tot = res.report.to_dict()["totals"]
    calls = sum(op.gate["depth"] if op.kind == "maxpool" else 1 for op in res.graph.ops if op.gate)
    assert counts[1] == tot["aes_blocks_p1"] > 0
    assert abs(counts[0] - tot["aes_blocks_p0"]) <= calls, (counts[0], tot["aes_blocks_p0"])


def test_cost_model_argmax_over_more_than_two_classes():
    from fssc.compiler.compile import compile_graph

    model = make_model([oh.make_node("Gemm", ["x", "W"], ["y"])], (2, 4), {"W": rand((4, 3))})
    res = compile_graph(import_onnx(model), echo=lambda s: None, output_mode="labels")
    am = next(o for o in res.report.ops if o.gate == "argmax")
    assert am.gates == 2 * 2 and am.rounds == 2 * 2  # 2 rows x (3 - 1) selections, ceil(log2 3) levels
    assert am.sent_p0 == am.sent_p1 == am.gates * (1 / 8 + 16)  # value and index opened per selection
    res = compile_graph(import_onnx(model), echo=lambda s: None, output_mode="logits")
    assert res.report.gates_by_kind() == {}


def test_broken_pass_module_shape_is_rejected_by_name():
    bad = types.SimpleNamespace(NAME="explodes", run=lambda g, ctx: 1 / 0)
    g = import_onnx(make_model([oh.make_node("Relu", ["x"], ["y"])], (1, 3)))
    with pytest.raises(FsscError, match="pass 'explodes' failed: ZeroDivisionError"):
        run_passes(g, [bad])


def test_compile_graph_leaves_the_callers_graph_alone():
    """compile_graph works on copies: labels mode appends its ArgMax to a copy, never to the graph given."""
    from fssc.compiler.compile import compile_graph

    g = import_onnx(make_model([oh.make_node("Gemm", ["x", "W"], ["y"])], (2, 4), {"W": rand((4, 3))}))
    before, uid, outputs = g.text(), g._next_uid, list(g.outputs)
    for mode in ("labels", "logits", "labels"):
        res = compile_graph(g, echo=lambda s: None, output_mode=mode)
        assert (res.graph.ops[-1].kind == "argmax") == (mode == "labels")
        assert res.report.gates_by_kind() == ({"argmax": 2 * 2} if mode == "labels" else {})
    assert g.text() == before and g._next_uid == uid and g.outputs == outputs
