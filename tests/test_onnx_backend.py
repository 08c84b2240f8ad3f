"""ONNX's backend node test cases for the ops fssc supports.

The cases come from the installed onnx package
(``onnx.backend.test.case.node.collect_testcases``: models and reference data
generated locally; nothing is downloaded). A case belongs to an op when its
node is of that op type; its function-expanded variants (``*_expanded``)
belong to the same op. Every case of a supported op either runs through
fssc's importer and the float interpreter (``run_float``) and must match the
case's expected outputs with the case's own tolerances (rtol=1e-3,
atol=1e-7), or is listed in ``LEFT_OUT`` with its reason -- and for those the
importer must refuse the model with a clear ``FsscError`` (not crash, not
compute something else).

Weights as constants: the backend cases feed every operand as a graph input.
fssc treats weights and structural operands as constants owned by the model
owner (its importer requires Conv/Gemm weights, MatMul's and Mul's second
operand, BatchNormalization's parameters, Reshape's shape, Pad's pads,
Clip's bounds, Squeeze's/Unsqueeze's axes, Slice's indices, Split's sizes,
Gather's and GatherND's indices, ReduceSum's and ReduceMean's axes and Where's condition to be initializers), so
before import the operands listed in ``CONSTANT_OPERANDS`` are turned into
initializers holding the case's own input data. The remaining inputs (the data
owner's tensors) stay graph inputs.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from fssc.compiler.backend.lower import lower
from fssc.compiler.frontend.onnx_import import SUPPORTED, import_onnx
from fssc.compiler.reference.interp import run_float
from fssc.compiler.reference.simulation import simulate
from fssc.passes.base import PassContext
from fssc.passes.manager import run_pipeline
from onnx import numpy_helper

from fssc.errors import FsscError

# every op the importer's converter table takes; Constant has no backend case of its own that fssc can run
# (its output is a constant, and a graph output must depend on the input), so it is covered in test_import
SUPPORTED_OPS = tuple(op for op in SUPPORTED if op != "Constant")

# op type -> input positions that become initializers (the model owner's constants)
CONSTANT_OPERANDS = {
    "Conv": {1, 2},
    "Gemm": {1, 2},
    "MatMul": {1},
    "Mul": {1},
    "BatchNormalization": {1, 2, 3, 4},
    "Clip": {1, 2},
    "Reshape": {1},
    "Pad": {1, 2, 3},
    "Dropout": {1, 2},
    "Squeeze": {1},
    "Unsqueeze": {1},
    "Slice": {1, 2, 3, 4},
    "Split": {1},
    "Gather": {1},
    "GatherND": {1},
    "ReduceSum": {1},
    "ReduceMean": {1},
    "PRelu": {1},
    "Div": {1},
    "LayerNormalization": {1, 2},
    "Where": {0},
}

# ONNX's LayerNormalization cases (each reads the Mean and InvStdDev outputs too; their Y-only variants run)
LAYERNORM_CASES = [
    f"test_layer_normalization_{v}"
    for v in (
        *(f"4d_axis{a}" for a in ("0", "1", "2", "3", "_negative_1", "_negative_2", "_negative_3", "_negative_4")),
        "default_axis",
        *(f"2d_axis{a}" for a in ("0", "1", "_negative_1", "_negative_2")),
        *(f"3d_axis{a}_epsilon" for a in ("0", "1", "2", "_negative_1", "_negative_2", "_negative_3")),
    )
]

_INT = "integer tensors ({}); fssc's inputs are float32 reals (encoded in fixed point)"
_EXPANDED = "function-expanded form uses {}, outside fssc's op set (the {} node itself is tested)"
LEFT_OUT = {
    # Add / Sub / Mul on integer dtypes
    **{
        f"test_{op}_{t}": _INT.format(t)
        for op in ("add", "sub", "mul")
        for t in ("int8", "int16", "uint8", "uint16", "uint32", "uint64")
    },
    # Div on integer dtypes
    **{f"test_div_{t}": _INT.format(t) for t in ("int8", "int16", "uint8", "uint16", "uint32", "uint64")},
    "test_div_int32_trunc": _INT.format("int32"),
    # LeakyRelu / PRelu
    **{
        f"test_leakyrelu{s}_expanded": _EXPANDED.format("Less (a computed condition)", "LeakyRelu")
        for s in ("", "_default", "_example")
    },
    **{
        f"test_prelu_{s}_expanded": _EXPANDED.format("Less (a computed condition)", "PRelu")
        for s in ("example", "broadcast")
    },
    # Softmax
    **{
        f"test_softmax_{s}_expanded{v}": _EXPANDED.format("Exp/ReduceMax", "Softmax")
        for s in ("example", "large_number", "axis_0", "axis_1", "axis_2", "negative_axis", "default_axis")
        for v in ("", "_ver18")
    },
    # BatchNormalization
    "test_batchnorm_example_training_mode": "training_mode=1 (batch statistics, running-stat outputs); "
    "fssc compiles inference graphs",
    "test_batchnorm_epsilon_training_mode": "training_mode=1 (batch statistics, running-stat outputs); "
    "fssc compiles inference graphs",
    # Clip
    "test_clip_default_int8_min": _INT.format("int8"),
    "test_clip_default_int8_max": _INT.format("int8"),
    "test_clip_default_int8_inbounds": _INT.format("int8"),
    "test_clip_default_int8_min_expanded": _INT.format("int8"),
    "test_clip_default_int8_max_expanded": _INT.format("int8"),
    "test_clip_default_int8_inbounds_expanded": _INT.format("int8"),
    **{
        f"test_clip{s}_expanded": _EXPANDED.format("Less (a computed condition)", "Clip")
        for s in (
            "",
            "_example",
            "_inbounds",
            "_outbounds",
            "_splitbounds",
            "_min_greater_than_max",
            "_default_min",
            "_default_max",
        )
    },
    # Where
    "test_where_long_example": _INT.format("int64"),
    # Dropout
    "test_dropout_default_mask": "uses the mask output; fssc drops Dropout at inference and has no mask",
    "test_dropout_default_mask_ratio": "uses the mask output; fssc drops Dropout at inference and has no mask",
    "test_training_dropout": "training_mode=true (random dropout); fssc compiles inference graphs",
    "test_training_dropout_default": "training_mode=true (random dropout); fssc compiles inference graphs",
    "test_training_dropout_zero_ratio": "training_mode=true; fssc compiles inference graphs",
    "test_training_dropout_mask": "training_mode=true and the mask output; fssc compiles inference graphs",
    "test_training_dropout_default_mask": "training_mode=true and the mask output; fssc compiles inference graphs",
    "test_training_dropout_zero_ratio_mask": "training_mode=true and the mask output; fssc compiles inference graphs",
    # GatherND
    "test_gathernd_example_int32": _INT.format("int32"),
    "test_gathernd_example_int32_batch_dim1": _INT.format("int32") + "; and batch_dims=1",
    # Identity
    "test_identity_sequence": "a sequence of tensors, not a tensor",
    "test_identity_opt": "an optional type, not a tensor",
    # MaxPool
    "test_maxpool_2d_uint8": _INT.format("uint8"),
    "test_maxpool_with_argmax_2d_precomputed_pads": "uses MaxPool's Indices output (second output)",
    "test_maxpool_with_argmax_2d_precomputed_strides": "uses MaxPool's Indices output (second output)",
    # Pad
    "test_constant_pad": "pads with the constant 1.2; fssc's Pad is constant 0 only",
    "test_constant_pad_axes": "pads with the constant 1.2; fssc's Pad is constant 0 only",
    "test_constant_pad_negative_axes": "pads with the constant 1.2; fssc's Pad is constant 0 only",
    "test_edge_pad": "mode 'edge' (and int32 data); fssc's Pad is constant 0 only",
    "test_reflect_pad": "mode 'reflect' (and int32 data); fssc's Pad is constant 0 only",
    "test_wrap_pad": "mode 'wrap' (and int32 data); fssc's Pad is constant 0 only",
    # Relu
    "test_relu_expanded_ver18": _EXPANDED.format("CastLike/Max", "Relu"),
    # Reshape
    "test_reshape_allowzero_reordered": "a zero-size input tensor (shape [0,3,4]); fssc needs non-empty tensors",
    # Split
    "test_split_zero_size_splits_opset13": "a zero-size input tensor (shape [0]); fssc needs non-empty tensors",
    "test_split_zero_size_splits_opset18": "a zero-size input tensor (shape [0]); fssc needs non-empty tensors",
    # spline activations: the nodes themselves run (Gelu, HardSigmoid, HardSwish); their expansions do not
    **{
        f"test_gelu_{v}_expanded": _EXPANDED.format("CastLike/Sqrt/Div/Sum", "Gelu")
        for v in ("default_1", "default_2", "tanh_1", "tanh_2")
    },
    **{
        f"test_hardsigmoid{v}_expanded_ver18": _EXPANDED.format("CastLike/Min/Max", "HardSigmoid")
        for v in ("", "_default", "_example")
    },
    # LayerNormalization: every case reads the Mean and InvStdDev outputs (its Y-only variants run, below)
    **dict.fromkeys(
        LAYERNORM_CASES,
        "reads the Mean and InvStdDev outputs (training statistics); fssc computes Y (its Y-only variant runs)",
    ),
    **{
        f"{n}_expanded{v}": _EXPANDED.format(
            "Reciprocal/Shape/ConstantOfShape of computed values", "LayerNormalization"
        )
        for n in LAYERNORM_CASES
        for v in ("", "_ver18")
    },
    # ReduceSum
    "test_reduce_sum_empty_set": "a zero-size input tensor (shape [2,0,4]); fssc needs non-empty tensors",
    "test_reduce_sum_empty_set_non_reduced_axis_zero": "a zero-size input tensor (shape [2,0,4]); "
    "fssc needs non-empty tensors",
}


def _collect() -> dict[str, tuple[str, object]]:
    """name -> (op type, TestCase) for every node test case of a supported op."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = collect_testcases()  # all ops (the op_type filter only applies to the first call in a process)
    op_of = {
        c.name: c.model.graph.node[0].op_type
        for c in cases
        if "_expanded" not in c.name and len(c.model.graph.node) == 1
    }
    out = {}
    for c in cases:
        op = op_of.get(c.name.split("_expanded")[0])
        if op in SUPPORTED_OPS:
            out[c.name] = (op, c)
    return out


CASES = _collect()

# Every Pad case pads with a non-zero constant or another mode. So that Pad runs too, its constant-mode
# cases are also run with the pad value set to 0, the expected output computed by onnx's own reference
# implementation (onnx.reference, which also generates the cases' data).
ZERO_VALUE_VARIANTS = ("test_constant_pad", "test_constant_pad_axes", "test_constant_pad_negative_axes")


def y_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A LayerNormalization case's model with its Y output alone (Mean and InvStdDev dropped)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = m.graph.node[0]
    del node.output[1:]
    del m.graph.output[1:]
    return m


def freeze_constant_operands(case, op: str):
    """The case's model with CONSTANT_OPERANDS[op] turned into initializers; returns (model, feeds, outputs)."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    inputs, outputs = case.data_sets[0]
    node = model.graph.node[0]
    const = {
        name
        for pos, name in enumerate(node.input)
        if name and pos in CONSTANT_OPERANDS.get(op, ()) and len(model.graph.node) == 1
    }
    feeds, keep = {}, []
    for vi, value in zip(list(model.graph.input), inputs, strict=True):
        if vi.name in const:
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), vi.name))
        else:
            keep.append(vi)
            feeds[vi.name] = value
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model, feeds, outputs


def test_every_supported_op_has_cases_and_the_list_is_current():
    assert set(SECURE_LEFT_OUT) <= set(CASES) - set(LEFT_OUT)
    ops_seen = {op for op, _ in CASES.values()}
    assert ops_seen == set(SUPPORTED_OPS), f"no backend cases collected for {set(SUPPORTED_OPS) - ops_seen}"
    stale = sorted(set(LEFT_OUT) - set(CASES))
    assert not stale, f"LEFT_OUT names cases the installed onnx does not have: {stale}"
    assert set(ZERO_VALUE_VARIANTS) <= set(CASES)
    run = {op for op, _ in (CASES[n] for n in CASES if n not in LEFT_OUT)} | {"Pad", "LayerNormalization"}
    assert set(LAYERNORM_CASES) <= set(CASES)
    assert run == set(SUPPORTED_OPS), f"every case left out for {set(SUPPORTED_OPS) - run}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_node_case(name):
    op, case = CASES[name]
    model, feeds, expected = freeze_constant_operands(case, op)
    if name in LEFT_OUT:
        # left out: fssc must refuse it with a clear error, not compute something else
        with pytest.raises(FsscError) as e:
            import_onnx(model, name)
        assert "\n" not in str(e.value)
        return
    g = import_onnx(model, name)
    got = run_float(g, feeds)
    assert len(got) == len(expected)
    for y, want in zip(got, expected, strict=True):
        want = np.asarray(want)
        assert y.shape == want.shape, f"shape {y.shape} != {want.shape}"
        if want.dtype.kind in "iub":
            np.testing.assert_array_equal(y, want)
        else:
            np.testing.assert_allclose(y, want, rtol=case.rtol, atol=case.atol)


@pytest.mark.parametrize("name", ZERO_VALUE_VARIANTS)
def test_backend_pad_case_with_zero_value(name):
    from onnx.reference import ReferenceEvaluator

    op, case = CASES[name]
    model, feeds, _ = freeze_constant_operands(case, op)
    value = model.graph.node[0].input[2]
    init = next(t for t in model.graph.initializer if t.name == value)
    init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), value))
    want = ReferenceEvaluator(model).run(None, feeds)
    got = run_float(import_onnx(model, name + "_zero_value"), feeds)
    assert len(got) == len(want) == 1
    assert got[0].shape == want[0].shape
    np.testing.assert_allclose(got[0], want[0], rtol=case.rtol, atol=case.atol)
    # and through the generated programs, bit for bit with the fixed-point interpreter
    sim = simulate(compile_case(model, name + "_zero_value", feeds), feeds)
    assert sim.mismatches() == [] and sim.outputs[0].shape == want[0].shape


@pytest.mark.parametrize("name", LAYERNORM_CASES)
def test_backend_layernorm_case_y_only(name):
    """Every LayerNormalization case with its Y output alone: the float interpreter equals the case's Y, and
    the generated programs equal the fixed-point interpreter bit for bit, within 2^-8 of Y."""
    op, case = CASES[name]
    model, feeds, expected = freeze_constant_operands(case, op)
    model = y_only(model)
    g = import_onnx(model, name)
    (got,) = run_float(g, feeds)
    np.testing.assert_allclose(got, expected[0], rtol=case.rtol, atol=case.atol)
    sim = simulate(compile_case(model, name, feeds), feeds)
    assert sim.mismatches() == []
    np.testing.assert_allclose(sim.decoded()[0], expected[0], atol=2**-8)


# ----------------------------------------------------------------- the secure path
def compile_case(model, name: str, feeds: dict[str, np.ndarray]):
    """The case through the whole pipeline, calibrated on its own inputs (so no comparison leaves its width)."""
    g = import_onnx(model, name)
    cal = feeds[g.inputs[0]] if len(g.inputs) == 1 else {k: feeds[k] for k in g.inputs}
    g, _ = run_pipeline(g, PassContext(calibration=[cal]), echo=lambda s: None)
    return g


# cases the float interpreter passes that the secure runtime refuses, with the reason (docs/conformance.md)
SECURE_LEFT_OUT: dict[str, str] = {}


@pytest.mark.parametrize("name", sorted(n for n in CASES if n not in LEFT_OUT))
def test_backend_node_case_secure(name):
    """Every case the float interpreter passes runs through the generated programs (dealer, P0 holding
    every data input, P1 holding the case's constant operands) and equals the fixed-point interpreter bit
    for bit (exact truncation in both); or it is in SECURE_LEFT_OUT and the compile refuses it in one line."""
    op, case = CASES[name]
    model, feeds, expected = freeze_constant_operands(case, op)
    if name in SECURE_LEFT_OUT:
        with pytest.raises(FsscError) as e:
            lower(compile_case(model, name, feeds))
        assert "\n" not in str(e.value)
        return
    g = compile_case(model, name, feeds)
    sim = simulate(g, {k: feeds[k] for k in g.inputs})
    assert sim.mismatches() == []
    assert [y.shape for y in sim.outputs] == [np.asarray(w).shape for w in expected]


# Mul's cases again with both operands secret: the secret x secret product gate (hmul)
TWO_SECRET_MUL = ("test_mul", "test_mul_bcast", "test_mul_example")


@pytest.mark.parametrize("name", TWO_SECRET_MUL)
def test_backend_mul_case_with_two_secret_operands(name):
    _, case = CASES[name]
    inputs, expected = case.data_sets[0]
    feeds = {vi.name: v for vi, v in zip(case.model.graph.input, inputs, strict=True)}
    g = import_onnx(case.model, name)
    assert [op.kind for op in g.ops] == ["hmul"]
    (got,) = run_float(g, feeds)
    np.testing.assert_allclose(got, expected[0], rtol=case.rtol, atol=case.atol)
    sim = simulate(compile_case(case.model, name, feeds), feeds)
    assert sim.mismatches() == [] and sim.outputs[0].shape == np.asarray(expected[0]).shape
    np.testing.assert_allclose(sim.decoded()[0], expected[0], atol=2e-3)


# ----------------------------------------------------------------- docs/conformance.md
def conformance_table() -> str:
    """The table docs/conformance.md holds: per op, the attributes its cases use, how many cases run
    through the float interpreter and through the generated programs, and every case left out, with why."""
    rows = [
        "| op | attributes in its cases | cases | float interpreter | secure programs | left out (why) |",
        "|---|---|---|---|---|---|",
    ]
    for op in SUPPORTED_OPS:
        names = sorted(n for n, (o, _) in CASES.items() if o == op)
        nodes = [node for n in names for node in CASES[n][1].model.graph.node if node.op_type == op]
        attrs = sorted({a.name for node in nodes for a in node.attribute})
        out = [n for n in names if n in LEFT_OUT]
        secure_out = [n for n in names if n in SECURE_LEFT_OUT]
        variants = {"Pad": len(ZERO_VALUE_VARIANTS), "LayerNormalization": len(LAYERNORM_CASES)}  # run below
        n_float = len(names) - len(out) + variants.get(op, 0)
        n_secure = n_float - len(secure_out)
        why: dict[str, list[str]] = {}
        for n in out:  # the integer dtypes share one reason
            reason = LEFT_OUT[n]
            integer = "integer tensors; fssc's inputs are float32 reals (encoded in fixed point)"
            why.setdefault(integer if reason.startswith("integer tensors") else reason, []).append(n)
        for n in secure_out:
            why.setdefault(f"secure path only: {SECURE_LEFT_OUT[n]}", []).append(n)
        left = "; ".join(f"{', '.join(f'`{n[5:]}`' for n in ns)}: {reason}" for reason, ns in why.items())
        rows.append(f"| {op} | {', '.join(attrs) or '-'} | {len(names)} | {n_float} | {n_secure} | {left or '-'} |")
    return "\n".join(rows) + "\n"


def test_docs_conformance_table_is_current():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "conformance.md").read_text()
    assert conformance_table() in doc, "regenerate the table: python tests/test_onnx_backend.py"


if __name__ == "__main__":
    print(conformance_table(), end="")
