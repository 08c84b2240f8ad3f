"""ReduceMean and ReduceSum from torch: x.mean(dim=(2, 3)) and x.sum(dim=1) in tiny CNNs.

torch.onnx.export (dynamo=False) emits ReduceMean / ReduceSum nodes. Each model is compiled and run
through the generated programs: the secure simulation must equal the fixed-point interpreter bit for bit
and onnxruntime within 0.02. The mean that ends a network stays a ``reducemean`` (the public 1/n at wscale
bits); the one that feeds a Linear is folded into it by fold-public-scaling (a ``reducesum``).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.ir.ops import OPS, Role, Scale
from fssc.compiler.reference.interp import run_fixed, run_float
from fssc.compiler.reference.simulation import simulate
from fssc.runtime import lib, ring
from onnx import TensorProto, helper, numpy_helper

from fssc.errors import FsscError


class _MeanOut(torch.nn.Module):
    """Conv, ReLU, conv, ReLU, then the spatial mean is the output."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.c2(torch.relu(self.c1(x)))).mean(dim=(2, 3))


class _MeanLinear(torch.nn.Module):
    """Conv, ReLU, spatial mean, Linear (the mean's 1/n folds into the Linear)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c1(x)).mean(dim=(2, 3)))


class _ChannelSum(torch.nn.Module):
    """Conv, ReLU, sum over the channels (keepdim), conv, ReLU, flatten, Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.fc = torch.nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        s = torch.relu(self.c1(x)).sum(dim=1, keepdim=True)
        return self.fc(torch.relu(self.c2(s)).flatten(1))


def export(module: torch.nn.Module, opset: int, batch: int = 2) -> tuple[onnx.ModelProto, np.ndarray]:
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, 0.0, 0.4)
    module.eval()
    x = torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buf.getvalue()), x.numpy().astype(np.float32)


CASES = {
    "mean-out-17": (_MeanOut, 17, "ReduceMean", "reducemean"),  # axes an attribute
    "mean-out-18": (_MeanOut, 18, "ReduceMean", "reducemean"),  # axes a constant input
    "mean-linear": (_MeanLinear, 17, "ReduceMean", "reducesum"),  # folded into the Linear
    "channel-sum": (_ChannelSum, 17, "ReduceSum", "reducesum"),  # axes a constant input (opset >= 13)
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_reduce_secure_run_matches_interpreter_and_onnxruntime(name):
    cls, opset, onnx_op, kind = CASES[name]
    model, x = export(cls(), opset)
    assert onnx_op in [n.op_type for n in model.graph.node]
    g = compile_graph(import_onnx(model, name), echo=lambda s: None, output_mode="logits").graph
    kinds = [op.kind for op in g.ops]
    assert kind in kinds and ({"reducemean", "reducesum"} - {kind}).isdisjoint(kinds)
    if name == "mean-linear":  # the 1/36 moved into the Linear's weights, with ceil(log2 36) extra bits
        assert next(op for op in g.ops if op.kind == "gemm").attrs["wscale_extra"] == 6
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_float(g, x)[0], ref, rtol=1e-5, atol=1e-5)
    sim = simulate(g, x)
    assert sim.mismatches() == []
    assert (sim.outputs[0] == run_fixed(g, x, raw=True)[0]).all(), "raw ring values must be equal"
    y = ring.decode(sim.outputs[0], g.values[g.outputs[0]].fixed_scale)
    assert np.abs(ref).max() > 0.5, "the oracle's outputs are not trivially small"
    np.testing.assert_allclose(y, ref, atol=0.02)


def test_reduce_entries():
    assert OPS["reducesum"].role is Role.LOCAL and OPS["reducesum"].scale is Scale.PRESERVING
    assert OPS["reducemean"].role is Role.LOCAL and OPS["reducemean"].scale is Scale.PUBLIC_WEIGHTED


def test_reducemean_ring_error_within_the_stated_bound():
    """lib.reducemean against the exact mean: |error| <= |sum| * 2^-(wscale + 1) (the rounding of 1/n)."""
    rng = np.random.default_rng(5)
    ws = 12
    for axes, n in (([1], 7), ([0, 2], 3 * 5), ([0, 1, 2], 3 * 7 * 5)):
        xi = rng.integers(-(1 << 20), 1 << 20, (3, 7, 5))  # ring values (scale 0)
        got = ring.signed(lib.reducemean(xi.astype(np.int64).view(np.uint64), axes, 0, ws)).astype(np.float64)
        s = xi.sum(axis=tuple(axes)).astype(np.float64)
        err = np.abs(got / 2.0**ws - s / n)  # got is at scale ws
        assert np.all(err <= np.abs(s) * 2.0 ** -(ws + 1))
        assert err.max() > 0  # n is not a power of two: 1/n is rounded


def _reduce_model(op: str, opset: int, axes, attrs: dict, shape=(2, 3, 4), out_shape=None):
    ins, inits = ["x"], []
    if opset >= (13 if op == "ReduceSum" else 18):
        if axes is not None:
            ins.append("axes")
            inits.append(numpy_helper.from_array(np.asarray(axes, np.int64), "axes"))
    elif axes is not None:
        attrs = {**attrs, "axes": axes}
    node = helper.make_node(op, ins, ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "r",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model if out_shape else onnx.shape_inference.infer_shapes(model)  # fills in y's shape


@pytest.mark.parametrize(
    "op,opset,axes,attrs",
    [
        ("ReduceSum", 11, [-1, 0], {"keepdims": 0}),
        ("ReduceSum", 11, None, {}),
        ("ReduceMean", 17, [1], {}),
        ("ReduceMean", 18, [-2, 2], {"keepdims": 0}),
        ("ReduceMean", 18, [], {"noop_with_empty_axes": 1}),
        ("ReduceSum", 13, None, {"noop_with_empty_axes": 1}),
    ],
)
def test_reduce_forms_match_onnxruntime_and_run_securely(op, opset, axes, attrs):
    model = _reduce_model(op, opset, axes, attrs)
    x = np.random.default_rng(2).normal(size=(2, 3, 4)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    g = compile_graph(import_onnx(model, "r"), echo=lambda s: None, output_mode="logits").graph
    np.testing.assert_allclose(run_float(g, x)[0], ref, rtol=1e-5, atol=1e-5)
    sim = simulate(g, x)
    assert sim.mismatches() == [] and sim.outputs[0].shape == ref.shape
    np.testing.assert_allclose(ring.decode(sim.outputs[0], g.values[g.outputs[0]].fixed_scale), ref, atol=0.01)


@pytest.mark.parametrize("axes", [[3], [1, -2]])
def test_reduce_bad_axes_refused_in_one_line(axes):
    with pytest.raises(FsscError, match="ax") as e:  # onnx (axis) or fssc (axes) names it
        import_onnx(_reduce_model("ReduceSum", 13, axes, {}, out_shape=[2, 1, 4]), "r")
    assert "\n" not in str(e.value)


def test_mean_over_one_element_becomes_a_sum_and_a_mean_before_a_relu_stays():
    one = _reduce_model("ReduceMean", 18, [0], {}, shape=(1, 3, 4))  # n = 1: the sum is the same map
    g = compile_graph(import_onnx(one, "one"), echo=lambda s: None, output_mode="logits").graph
    assert "reducesum" in [op.kind for op in g.ops] and "reducemean" not in [op.kind for op in g.ops]
    x = np.random.default_rng(6).normal(size=(1, 3, 4)).astype(np.float32)
    sim = simulate(g, x)
    assert sim.mismatches() == []
    np.testing.assert_allclose(ring.decode(sim.outputs[0], g.values[g.outputs[0]].fixed_scale), x, atol=1e-3)
    before_relu = _reduce_model("ReduceMean", 18, [2], {}, out_shape=[2, 3, 1])
    before_relu.graph.node[0].output[0] = "m"
    before_relu.graph.node.append(helper.make_node("Relu", ["m"], ["y"]))
    g = compile_graph(import_onnx(before_relu, "relu"), echo=lambda s: None, output_mode="logits").graph
    assert "reducemean" in [op.kind for op in g.ops]  # no linear layer to take the 1/4
