"""Transpose, Squeeze, Unsqueeze, Slice, Split and Gather: local ops (public index maps) on secret values.

One small model chains them after a convolution and a ReLU and before a linear layer; its secure simulation
must equal the fixed-point interpreter bit for bit and onnxruntime up to fixed-point rounding. The same model
is built at opset 11 (Squeeze/Unsqueeze axes, Split sizes as attributes) and opset 18 (as constant inputs,
Split's num_outputs), and a Slice at opset 9 takes its indices as attributes.
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
from fssc.runtime import lib
from onnx import TensorProto, helper, numpy_helper
from tiny_models import assert_secure_run_matches, image_model

from fssc.errors import FsscError

OPS_HERE = ("Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather")


def _i64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def structural_model(opset: int, batch: int = 2) -> onnx.ModelProto:
    """x [N,3,6,6] -> Conv [N,4,6,6] -> Relu -> Transpose [N,6,6,4] -> Slice (reversed rows, every 2nd col)
    [N,6,3,4] -> Split on the last axis (1 + 3) -> Unsqueeze/Squeeze round trips -> Gather rows [4,0,-1]
    [N,3,3,3] -> Add the 1-channel part -> Flatten -> Gemm [N,5]."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)
    g = rng.normal(0, 0.4, (5, 27)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(g, "G"), _i64("rows", [4, 0, -1])]
    inits += [_i64("starts", [-1, 0]), _i64("ends", [-7, 100]), _i64("axes", [1, -2]), _i64("steps", [-1, 2])]
    if opset >= 13:
        inits += [_i64("ax0", [0]), _i64("ax1", [-1])]
        inits.append(_i64("sizes", [1, 3]))  # (Split's num_outputs, an equal split, runs in the backend cases)
        split = helper.make_node("Split", ["t", "sizes"], ["a", "b"], axis=-1)
        unsq = helper.make_node("Unsqueeze", ["b", "ax0"], ["u"])
        sq = helper.make_node("Squeeze", ["u", "ax0"], ["q"])
        sq_a = helper.make_node("Squeeze", ["ua"], ["qa1"])  # every 1-dim: [1,N,6,3,1] -> [N,6,3]
        unsq_a = helper.make_node("Unsqueeze", ["a", "ax0"], ["ua"])
        back = helper.make_node("Unsqueeze", ["qa1", "ax1"], ["qa"])  # [N,6,3,1]
    else:
        split = helper.make_node("Split", ["t"], ["a", "b"], axis=-1, split=[1, 3])
        unsq = helper.make_node("Unsqueeze", ["b"], ["u"], axes=[0])
        sq = helper.make_node("Squeeze", ["u"], ["q"], axes=[0])
        unsq_a = helper.make_node("Unsqueeze", ["a"], ["ua"], axes=[0])
        sq_a = helper.make_node("Squeeze", ["ua"], ["qa1"])
        back = helper.make_node("Unsqueeze", ["qa1"], ["qa"], axes=[-1])
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["tr"], perm=[0, 2, 3, 1]),
        helper.make_node("Slice", ["tr", "starts", "ends", "axes", "steps"], ["t"]),
        split,
        unsq,
        sq,
        unsq_a,
        sq_a,
        back,
        helper.make_node("Gather", ["q", "rows"], ["gq"], axis=1),
        helper.make_node("Gather", ["qa", "rows"], ["ga"], axis=-3),
        helper.make_node("Add", ["gq", "ga"], ["s"]),
        helper.make_node("Flatten", ["s"], ["f"]),
        helper.make_node("Gemm", ["f", "G"], ["logits"], transB=1),
    ]
    return image_model("structural", nodes, inits, batch, opset)


@pytest.fixture(scope="module", params=[11, 13, 18])
def compiled(request):
    model = structural_model(request.param)
    x = np.random.default_rng(4).normal(size=(2, 3, 6, 6)).astype(np.float32)
    res = compile_graph(import_onnx(model, "structural"), echo=lambda s: None, output_mode="logits")
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    return res.graph, x, ref


def test_entries_are_local_and_scale_preserving():
    assert set(OPS_HERE) <= set(SUPPORTED)
    for kind in ("transpose", "slice", "gather"):
        d = OPS[kind]
        assert d.role is Role.LOCAL and d.scale is Scale.PRESERVING and d.gate is None


def test_import_lowers_onto_index_maps():
    g = import_onnx(structural_model(13), "structural")
    kinds = [op.kind for op in g.ops]
    # Split: one slice per part; Squeeze/Unsqueeze: reshapes
    assert kinds.count("transpose") == 1 and kinds.count("slice") == 3 and kinds.count("gather") == 2
    assert kinds.count("reshape") == 5  # 3 Unsqueeze + 2 Squeeze
    sl = next(op for op in g.ops if op.kind == "slice")
    # [N,6,6,4]: axis 1 from -1 (row 5) down to -7 (past the front), axis 2 from 0 by 2 clamped to 6
    assert sl.attrs == {"starts": [0, 5, 0, 0], "ends": [2, -1, 6, 4], "steps": [1, -1, 2, 1]}
    ga = [op for op in g.ops if op.kind == "gather"]
    assert all(op.attrs == {"indices": [4, 0, 5], "axis": 1} for op in ga)


def test_lib_functions_are_the_numpy_index_maps():
    x = np.arange(2 * 3 * 4, dtype=np.uint64).reshape(2, 3, 4)
    assert (lib.transpose(x, [2, 0, 1]) == x.transpose(2, 0, 1)).all()
    assert (lib.slice(x, [1, 2, 3], [-1, -1, 0], [-1, -1, -2]) == x[1::-1, 2::-1, 3:0:-2]).all()
    assert (lib.take(x, [[0, 2]], 1) == x[:, [[0, 2]]]).all()
    assert lib.take(x, 3, 2).shape == (2, 3)


def test_slice_attributes_before_opset_10_and_clamping():
    nodes = [helper.make_node("Slice", ["x"], ["y"], starts=[-100, 1], ends=[100, -1], axes=[0, 2])]
    graph = helper.make_graph(
        nodes,
        "s9",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    (y,) = run_float(import_onnx(model, "s9"), x)
    np.testing.assert_array_equal(y, x[:, :, 1:-1])


def test_gather_index_outside_the_axis_is_refused_in_one_line():
    graph = helper.make_graph(
        [helper.make_node("Gather", ["x", "i"], ["y"], axis=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1])],
        [_i64("i", [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(FsscError) as e:
        import_onnx(model, "bad")
    assert "node Gather_0 (Gather): indices outside axis 1 of (3, 4)" in str(e.value) and "\n" not in str(e.value)


def test_float_semantics_match_onnxruntime(compiled):
    g, x, ref = compiled
    (y,) = run_float(g, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_graph_lowers_to_local_statements(compiled):
    fns = {st.params.get("fn") for st in lower(compiled[0]).stmts if st.kind == "local"}
    assert {"transpose", "slice", "take", "reshape"} <= fns


def test_secure_run_matches_interpreter_and_onnxruntime(compiled):
    g, x, ref = compiled
    assert_secure_run_matches(g, x, ref)


def where_model(batch: int = 2) -> onnx.ModelProto:
    """x [N,3,6,6] -> Conv [N,4,6,6] -> Relu -> Where(mask [1,1,6,6], relu, 0.75) (a masked_fill as torch's
    exporter writes adaptive pooling's variable windows) -> Where(channel mask [1,4,1,1], conv, the previous)
    (both operands secret) -> Where(mask, a constant of the model owner's [4,1,1], the previous) -> Flatten
    -> Gemm [N,5]."""
    rng = np.random.default_rng(11)
    w = rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)
    g = rng.normal(0, 0.4, (5, 144)).astype(np.float32)
    mask = rng.random((1, 1, 6, 6)) < 0.4
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(g, "G"),
        numpy_helper.from_array(mask, "m"),
        numpy_helper.from_array(np.asarray([True, False, False, True]).reshape(1, 4, 1, 1), "cm"),
        numpy_helper.from_array(np.asarray(0.75, dtype=np.float32), "fill"),
        numpy_helper.from_array(rng.normal(0, 1, (4, 1, 1)).astype(np.float32), "c"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["r"]),
        helper.make_node("Where", ["m", "fill", "r"], ["w1"]),
        helper.make_node("Where", ["cm", "conv", "w1"], ["w2"]),
        helper.make_node("Where", ["m", "c", "w2"], ["w3"]),
        helper.make_node("Flatten", ["w3"], ["f"]),
        helper.make_node("Gemm", ["f", "G"], ["logits"], transB=1),
    ]
    return image_model("where", nodes, inits, batch, 13)


def test_where_with_a_constant_condition_is_a_local_selection():
    model = where_model()
    g = import_onnx(model, "where")
    assert [op.kind for op in g.ops].count("where") == 3
    assert OPS["where"].role is Role.LOCAL and OPS["where"].gate is None
    x = np.random.default_rng(5).normal(size=(2, 3, 6, 6)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    (y,) = run_float(g, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    res = compile_graph(g, echo=lambda s: None, output_mode="logits")
    assert "where" in {st.params.get("fn") for st in lower(res.graph).stmts if st.kind == "local"}
    assert_secure_run_matches(res.graph, x, ref)


def test_where_with_a_non_finite_constant_is_refused_in_one_line():
    """masked_fill(-inf), as attention masks and adaptive max pools write it: no fixed-point encoding."""
    graph = helper.make_graph(
        [helper.make_node("Where", ["m", "inf", "x"], ["y"])],
        "w",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [
            numpy_helper.from_array(np.eye(3, 4, dtype=bool), "m"),
            numpy_helper.from_array(np.asarray(-np.inf, dtype=np.float32), "inf"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(FsscError) as e:
        import_onnx(model, "bad")
    assert "node Where_0 (Where): a non-finite constant (inf)" in str(e.value) and "\n" not in str(e.value)


def test_where_whose_condition_is_computed_by_an_unsupported_comparison_is_refused_in_one_line():
    graph = helper.make_graph(
        [helper.make_node("Greater", ["x", "z"], ["c"]), helper.make_node("Where", ["c", "x", "z"], ["y"])],
        "w",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(np.zeros((3, 4), np.float32), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(FsscError) as e:
        import_onnx(model, "bad")
    assert "Greater" in str(e.value) and "\n" not in str(e.value)
