"""Spline gates: activations as public piecewise polynomials on masked wires (runtime/gates.py ``Spline``,
compiler/ir/splines.py, the registry's spline entries, the importer's SiLU and GELU fusions).

* The gate against the plaintext spline (``splines.evaluate``, the fixed-point interpreter's semantics):
  every masked value and every mask mod 2^m at small m for a spec with knots everywhere (at the range's
  edges, outside it, adjacent), and every input of the m-bit range under many masks for every fitted
  activation at small scales.
* The stated error bounds (docs/protocol.md, "Spline gates"): every representable input of [-16, 16) and
  samples of the tails, at f = 12 and f = 8.
* Key records and key bytes of a deal against the gate class's cost.
* The importer: SiLU and GELU patterns (erf and tanh forms) fused into one op, ONNX Gelu (opset 20, both
  forms), HardSigmoid's attributes, Erf alone.
* End to end: a torch model with nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Tanh and nn.GELU, exported at
  opsets 17 and 18: the generated programs equal the fixed-point interpreter bit for bit, the logits are
  within 0.02 of onnxruntime, and the compile report's rounds and key bytes are what the run used.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import SUPPORTED, import_onnx
from fssc.compiler.ir import splines
from fssc.compiler.ir.ops import OPS, Role, Scale
from fssc.compiler.reference.interp import run_fixed, run_float
from fssc.compiler.reference.simulation import simulate
from fssc.runtime import dcf, gates, ring
from fssc.runtime.keys import KeyReader
from fssc.runtime.simulate import deal_in_memory, run_parties
from onnx import TensorProto, helper, numpy_helper

U64 = np.uint64
# the bound docs/protocol.md states per activation, in units of 2^-f (f = 12 and f = 8)
STATED = {
    ("sigmoid", ()): 1.0,
    ("tanh", ()): 1.0,
    ("erf", ()): 1.0,
    ("silu", ()): 1.0,
    ("gelu", (("approximate", "none"),)): 1.0,
    ("gelu", (("approximate", "tanh"),)): 1.0,
    ("hardsigmoid", (("alpha", 0.2), ("beta", 0.5))): 0.51,
    ("hardsigmoid", (("alpha", 1 / 6), ("beta", 0.5))): 0.51,
    ("hardswish", ()): 0.51,
}


def run_gate(spec: gates.SplineSpec, x: np.ndarray, r: np.ndarray, m: int):
    """(y = output^ - output mask as int64, P0's channel, P0's and P1's key bytes) of one gate call."""
    xhat = ring.unsigned(x) + r
    r_out, k0, k1 = deal_in_memory(lambda D: gates.Spline.deal(D, "g", r, m, spec))

    def party(P):
        y = gates.Spline.evaluate(P, "g", xhat, m, spec)
        assert P.keys.skip_to_end(), f"party {P.b} left key records unread"
        return y

    y0, y1, c0, _ = run_parties(party, party, k0, k1)
    assert (y0 == y1).all(), "both parties open the same masked output"
    return ring.signed(y0 - r_out), c0, k0, k1


def _mixed_spec() -> gates.SplineSpec:
    """Knots below, at and above a 6-bit range, two adjacent, a linear piece, a cubic, a constant."""
    knots = (-40, -32, -7, -6, 0, 5, 31, 32, 50)
    centers = (0, 3, -20, -6, -3, 2, 9, 0, 0, 0)
    coeffs = tuple(((i * 37) % 11 - 5, (i * 5) % 7 - 3, (i * 3) % 5 - 2, i % 3 - 1) for i in range(10))
    lin = (0, 0, 1, 0, 0, 2, 0, 0, 1, 0)
    return gates.SplineSpec(knots, centers, coeffs, lin, 2, 40)


@pytest.mark.parametrize("m", [2, 3, 6])
def test_gate_exhaustive_every_masked_value_and_mask(m):
    """Every (x^, r) mod 2^m (uniform bits above): the selection's wrap-around cases all occur."""
    spec = _mixed_spec()
    n = 1 << m
    u, rho = (a.reshape(-1) for a in np.meshgrid(np.arange(n, dtype=U64), np.arange(n, dtype=U64)))
    gen = np.random.default_rng(m)
    high = gen.integers(0, 1 << 64, size=(2, u.size), dtype=np.uint64) & ~U64(n - 1)
    r = rho | high[0]
    x = ring.signed(((u - rho) & U64(n - 1)) << U64(64 - m)) >> np.int64(64 - m)  # (x^ - r) mod 2^m, signed
    y, _, _, _ = run_gate(spec, x, r, m)
    assert (y == ring.signed(splines.evaluate(spec, ring.unsigned(x)))).all()


FITTED = [("sigmoid", {}), ("tanh", {}), ("erf", {}), ("silu", {}), ("gelu", {}), ("gelu", {"approximate": "tanh"})]
HARD = [
    ("hardsigmoid", {"alpha": 1 / 6, "beta": 0.5}),
    ("hardsigmoid", {"alpha": -0.3, "beta": 0.2}),
    ("hardswish", {}),
]


@pytest.mark.parametrize("name,attrs", FITTED + HARD)
def test_gate_every_input_at_small_scale(name, attrs):
    """Every input of the 10-bit range at scale 5 (the fitted range, the tails and the range's edges), under
    8 masks each: the gate equals the fixed-point semantics; the result is within the fit's bound."""
    fit = splines.fit(name, attrs, 5, 5)
    m = 10
    x = np.repeat(np.arange(-(1 << (m - 1)), 1 << (m - 1), dtype=np.int64), 8)
    r = np.random.default_rng(len(name)).integers(0, 1 << 64, size=x.size, dtype=np.uint64)
    y, chan, _, _ = run_gate(fit.spec, x, r, m)
    assert (y == ring.signed(splines.evaluate(fit.spec, ring.unsigned(x)))).all()
    assert chan.rounds == 3 == gates.Spline.bind(fit.spec).cost(x.size, m).rounds
    err = np.abs(y / 32.0 - splines.reference(name, attrs)(x / 32.0)) * 32
    assert err.max() <= fit.bound + 1e-9


def test_gate_with_wide_comparisons():
    """m = 64 (``--bits full``) and m = 40: the selection's wrap test on the whole ring."""
    fit = splines.fit("silu", {}, 12, 12)
    gen = np.random.default_rng(5)
    x = gen.integers(-(20 << 12), 20 << 12, size=300)
    x[:4] = [-(1 << 31), (1 << 31) - 1, 0, -1]
    r = gen.integers(0, 1 << 64, size=x.size, dtype=np.uint64)
    r[5:9] = ring.unsigned(-x[5:9])  # x^ = 0
    for m in (40, 64):
        y, _, _, _ = run_gate(fit.spec, x, r, m)
        assert (y == ring.signed(splines.evaluate(fit.spec, ring.unsigned(x)))).all()


@pytest.mark.parametrize("f", [12, 8, 16])
@pytest.mark.parametrize("key", sorted(STATED))
def test_stated_error_bound_holds(key, f):
    """Every representable input of [-16, 16) and samples up to 256 out: |spline - float| <= the bound
    docs/protocol.md states (units of 2^-f; above f = 13 the fits stop at 2^-13: 2^(f - 13) times the
    bound, the input read at scale min(f, 14)), and the fit's own measure says the same."""
    name, items = key
    s_in = splines.input_scale(f)
    fit = splines.fit(name, dict(items), s_in, f)
    stated = STATED[key] * max(1.0, 2.0 ** (f - 13))
    assert fit.bound <= stated
    xs = np.arange(-16 << s_in, 16 << s_in)
    xs = np.concatenate([xs, np.linspace(-256, 256, 20001).round().astype(np.int64) << s_in])
    got = ring.signed(splines.evaluate(fit.spec, ring.unsigned(xs))) / 2.0**f
    err = np.abs(got - splines.reference(name, dict(items))(xs / 2.0**s_in)).max() * 2**f
    assert err <= stated, f"{name} at f={f}: {err:.3f} units"


def test_fits_are_deterministic_and_fit_the_ring():
    for name, attrs in FITTED + HARD:
        a = splines._fit.__wrapped__(name, tuple(sorted(attrs.items())), 12, 12).spec
        assert a == splines.fit(name, attrs, 12, 12).spec
        assert a.shift + a.out_bits <= 64 and a.words <= dcf.MAX_K
        assert list(a.knots) == sorted(set(a.knots))


@pytest.mark.parametrize("m", [9, 18])
def test_records_and_cost_match_a_deal(m):
    spec = splines.fit("gelu", {}, 8, 8).spec  # at m = 9 the range cuts pieces off
    cls = gates.Spline.bind(spec)
    x = np.arange(40) - 20
    _, chan, k0, k1 = run_gate(spec, x, np.random.default_rng(1).integers(0, 1 << 64, 40, dtype=np.uint64), m)
    c = cls.cost(x.size, m)
    for party, k, want in ((0, k0, c.key_p0), (1, k1, c.key_p1)):
        recs = list(KeyReader(k, party=party).records())
        assert [t for t, _ in recs] == cls.records("g", party, 0, m)
        assert sum(a.nbytes for _, a in recs) == pytest.approx(want, abs=1)
    first, last = spec.active(m)
    assert (m == 9) == (last - first < len(spec.knots))
    assert chan.bytes_sent == pytest.approx(c.sent_p0, abs=32 * chan.messages_sent)


# ----------------------------------------------------------------- registry and importer
def _model(nodes, inits=(), opset=17, shape=(2, 8)):
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 20 else 9
    return model


def _c(name, v):
    return numpy_helper.from_array(np.array(v, dtype=np.float32), name)


def test_registry_entries():
    for kind in ("sigmoid", "tanh", "erf", "silu", "gelu", "hardsigmoid", "hardswish"):
        d = OPS[kind]
        assert d.role is Role.GATE and d.scale is Scale.SPLINE and d.gate is not None and d.gate.kind == "spline"
    assert {"Sigmoid", "Tanh", "Erf", "HardSigmoid", "HardSwish", "Gelu"} <= set(SUPPORTED)


def _check_float(model, kinds, x=None):
    g = import_onnx(model, "m")
    assert [op.kind for op in g.ops] == kinds
    x = np.random.default_rng(0).normal(0, 3, (2, 8)).astype(np.float32) if x is None else x
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_float(g, x)[0], want, atol=2e-6)
    return g, x


@pytest.mark.parametrize("swap", [False, True])
def test_silu_pattern_fused(swap):
    ins = ["s", "x"] if swap else ["x", "s"]
    _check_float(_model([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ins, ["y"])]), ["silu"])


def test_silu_keeps_a_sigmoid_read_elsewhere():
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"]),
        helper.make_node("Mul", ["x", "s"], ["p"]),
        helper.make_node("Add", ["p", "s"], ["y"]),
    ]
    _check_float(_model(nodes), ["sigmoid", "silu", "add"])


@pytest.mark.parametrize("form", ["torch", "half_first", "mul_inv_sqrt2"])
def test_gelu_erf_pattern_fused(form):
    inits = [_c("r2", math.sqrt(2)), _c("ir2", 1 / math.sqrt(2)), _c("one", 1.0), _c("half", 0.5)]
    scaled = (
        helper.make_node("Mul", ["ir2", "x"], ["d"])
        if form == "mul_inv_sqrt2"
        else helper.make_node("Div", ["x", "r2"], ["d"])
    )
    nodes = [scaled, helper.make_node("Erf", ["d"], ["e"]), helper.make_node("Add", ["one", "e"], ["a"])]
    if form == "half_first":
        nodes += [helper.make_node("Mul", ["x", "half"], ["h"]), helper.make_node("Mul", ["a", "h"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["x", "a"], ["p"]), helper.make_node("Mul", ["p", "half"], ["y"])]
    _check_float(_model(nodes, inits), ["gelu"])


def test_gelu_tanh_pattern_with_pow_fused():
    inits = [_c("three", 3.0), _c("k", 0.044715), _c("r", math.sqrt(2 / math.pi)), _c("one", 1.0), _c("half", 0.5)]
    nodes = [
        helper.make_node("Pow", ["x", "three"], ["p3"]),
        helper.make_node("Mul", ["p3", "k"], ["q"]),
        helper.make_node("Add", ["q", "x"], ["a"]),
        helper.make_node("Mul", ["a", "r"], ["b"]),
        helper.make_node("Tanh", ["b"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["a1"]),
        helper.make_node("Mul", ["x", "half"], ["h"]),
        helper.make_node("Mul", ["h", "a1"], ["y"]),
    ]
    g, _ = _check_float(_model(nodes, inits), ["gelu"])
    assert g.ops[0].attrs == {"approximate": "tanh"}


def test_torch_gelu_tanh_end_to_end():
    """nn.GELU(approximate='tanh') as torch exports it at opset 17 (Mul/Add/Tanh): one gelu op, run securely."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(approximate="tanh")).eval()
    x = torch.randn(2, 8) * 2
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    proto = onnx.load_from_string(buf.getvalue())
    g = import_onnx(proto, "g")
    assert [op.kind for op in g.ops] == ["gemm", "gelu"] and g.ops[1].attrs == {"approximate": "tanh"}
    res = compile_graph(g, echo=lambda s: None, output_mode="logits")
    sim = simulate(res.graph, x.numpy())
    assert sim.mismatches() == []
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(sim.decoded()[0], ref, atol=0.005)


def test_erf_alone_and_a_pattern_that_is_not_gelu():
    _check_float(_model([helper.make_node("Erf", ["x"], ["y"])]), ["erf"])
    inits = [_c("r2", math.sqrt(2)), _c("one", 1.0), _c("half", 0.25)]  # 0.25: not GELU
    nodes = [
        helper.make_node("Mul", ["x", "r2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["a", "half"], ["y"]),
    ]
    _check_float(_model(nodes, inits), ["mul", "erf", "add", "mul"])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_onnx_gelu_op(approximate):
    """ONNX Gelu (opset 20), both forms: float against onnxruntime, secure run bit for bit."""
    model = _model([helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)], opset=20)
    g, x = _check_float(model, ["gelu"])
    assert g.ops[0].attrs == {"approximate": approximate}
    res = compile_graph(g, echo=lambda s: None, output_mode="logits")
    sim = simulate(res.graph, x)
    assert sim.mismatches() == []
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(sim.decoded()[0], ref, atol=2.5 * 2.0**-12)


def test_hardsigmoid_attributes():
    model = _model([helper.make_node("HardSigmoid", ["x"], ["y"], alpha=0.3, beta=0.4)])
    g, _ = _check_float(model, ["hardsigmoid"])
    assert g.ops[0].attrs == pytest.approx({"alpha": 0.3, "beta": 0.4})


def test_gelu_bad_approximation_refused():
    from fssc.errors import FsscError

    model = _model([helper.make_node("Gelu", ["x"], ["y"], approximate="none")], opset=20)
    model.graph.node[0].attribute[0].s = b"cubic"
    with pytest.raises(FsscError, match="approximate='cubic'"):
        import_onnx(model, "m")


@pytest.mark.parametrize("f", [12, 16])
def test_a_value_read_by_two_splines_is_truncated_once(f):
    """A product above scale f reaches both splines through one truncation (to f; to 14 when f = 16)."""
    w = np.random.default_rng(2).normal(0, 0.5, (8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Sigmoid", ["h"], ["s"]),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("Add", ["s", "t"], ["y"]),
    ]
    model = _model(nodes, [numpy_helper.from_array(w, "W")])
    g = compile_graph(import_onnx(model, "m"), frac_bits=f, echo=lambda s: None, output_mode="logits").graph
    assert [op.kind for op in g.ops][1:] == ["trunc", "sigmoid", "tanh", "add"]
    assert [g.values[op.inputs[0]].scale for op in g.ops[2:4]] == [min(f, 14)] * 2
    x = np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32)
    sim = simulate(g, x)
    assert sim.mismatches() == []
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(sim.decoded()[0], ref, atol=0.01)


# ----------------------------------------------------------------- end to end
class _Acts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.silu, self.sig, self.hsw, self.tanh, self.gelu = (
            torch.nn.SiLU(),
            torch.nn.Sigmoid(),
            torch.nn.Hardswish(),
            torch.nn.Tanh(),
            torch.nn.GELU(),
        )
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        y = self.conv(x)
        y = self.silu(y) + self.tanh(y)
        y = self.hsw(y) + self.gelu(y) - self.sig(y)
        return self.fc(torch.flatten(y, 1))


@pytest.fixture(scope="module")
def acts_model():
    torch.manual_seed(0)
    model = _Acts().eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    return model, x


@pytest.mark.parametrize("opset", [17, 18])
def test_torch_activations_end_to_end(acts_model, opset):
    model, x = acts_model
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=["x"])
    proto = onnx.load_from_string(buf.getvalue())
    g = import_onnx(proto, "acts")
    assert sorted(op.kind for op in g.ops if OPS[op.kind].scale is Scale.SPLINE) == [
        "gelu",
        "hardswish",
        "sigmoid",
        "silu",
        "tanh",
    ]
    res = compile_graph(g, echo=lambda s: None, output_mode="logits")
    xn = x.numpy()
    sim = simulate(res.graph, xn)
    assert sim.mismatches() == []
    assert (sim.outputs[0] == run_fixed(res.graph, xn, raw=True)[0]).all()
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {proto.graph.input[0].name: xn})[0]
    assert np.abs(ref).max() > 0.3
    np.testing.assert_allclose(sim.decoded()[0], ref, atol=0.02)
    rep = res.report
    assert rep.rounds == sim.channels[0].rounds == sim.channels[1].rounds
    records = 8 * len([op for op in res.graph.ops if op.gate]) + 8
    for actual, est in ((len(sim.keys[0]), rep.total("key_p0")), (len(sim.keys[1]), rep.total("key_p1"))):
        assert est <= actual <= est + 64 * records + 512
    for chan, est in (
        (sim.channels[0], rep.total("sent_p0") + rep.input_bytes),
        (sim.channels[1], rep.total("sent_p1")),
    ):
        assert est <= chan.bytes_sent <= est + 32 * chan.messages_sent
    splines_ops = [o for o in rep.ops if o.gate == "spline"]
    assert len(splines_ops) == 5 and all(o.rounds == 3 for o in splines_ops)


def test_cost_report_follows_the_documented_formula():
    """docs/cost-model.md's spline row, op by op: (K + 1) DCFs over m bits with w payload words, the
    truncation's two DCFs, P1's (w + 1 + 6) words and two bits, two seeds for P0; 3 rounds."""
    from fssc.runtime.gates import carry_bytes, dcf_bytes

    nodes = [helper.make_node(op, ["x"], [f"y{k}"]) for k, op in enumerate(("Sigmoid", "HardSwish", "Erf"))]
    nodes += [helper.make_node("Add", ["y0", "y1"], ["s"]), helper.make_node("Add", ["s", "y2"], ["y"])]
    res = compile_graph(import_onnx(_model(nodes), "m"), echo=lambda s: None, output_mode="logits")
    for op in res.graph.ops:
        if not op.gate:
            continue
        c = next(o for o in res.report.ops if o.op == op.name)
        spec = splines.fit(op.kind, op.attrs, 12, 12).spec
        n, m, w = op.gate["count"], op.gate["bits"], spec.words
        first, last = spec.active(m)
        k = last - first
        keys = (k + 1) * dcf.nbytes_per_key(m, w) if k else 0
        trunc = dcf_bytes(spec.out_bits) + carry_bytes(spec.shift)
        assert c.key_p0 == n * (keys + trunc) + 2 * 16
        assert c.key_p1 == pytest.approx(n * (keys + trunc + (w + 1 + 6) * 8 + 2 / 8))
        assert (c.rounds, c.sent_p0, c.sent_p1) == (3, n * (8 + 2 / 8 + 8), n * (8 + 2 / 8 + 8))
    assert res.report.rounds == 1 + 3 * 3  # the input, then the three splines (ops run in sequence)
