"""Layer normalization over channels (ConvNeXt): runtime/gates.py ``Octave``, ``RSqrt``, ``LayerNorm``;
compiler/ir/splines.py ``fit_rsqrt``, ``layernorm_plan``; the registry's ``layernorm``; the importer's
LayerNormalization converter and its fusion of the pre-opset-17 form.

* The octave gate, exhaustively at small widths: every input of the range under every mask mod 2^nb; the
  opened (u, q) equal ``splines.octave_fixed`` and normalise the input into [4^top, 4^(top+1)); what P1
  holds and sees is uniform whichever octave the input is in (statistical check).
* The inverse square root: every input of a 10-bit range under fresh masks equals ``splines.rsqrt_fixed``
  bit for bit, whose relative error against 1 / sqrt(x) is within the stated bound; the mantissa spline's
  error is within 1 unit of 2^-16 at every mantissa (exhaustive).
* The layer normalization gate: the secure run equals the fixed-point semantics (``OPS['layernorm'].fixed``)
  bit for bit; its key records and key bytes, rounds and bytes sent are what ``cost`` says.
* Accuracy against float (docs/protocol.md, "Layer normalization"): rows whose standard deviations span
  2^-3 .. 2^6 around offsets up to 2^5, max error in units of 2^-f within the stated bound.
* The importer: the LayerNormalization node (any axis; with and without bias; constants folded; the model
  owner's scale refused if computed), and torch's exports at opsets 13, 16 (decomposed) and 17, and by the
  dynamo exporter, of a model with LayerNorm2d and nn.LayerNorm: secure == fixed point bit for bit, logits
  within 0.02 of onnxruntime.
* convnext_tiny end to end (both exporters, 32x32, batch 2): tests/test_zoo.py (slow).
"""

from __future__ import annotations

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
from fssc.compiler.ir.graph import Graph, Value
from fssc.compiler.ir.ops import OPS
from fssc.compiler.reference.interp import run_fixed, run_float
from fssc.compiler.reference.simulation import simulate
from fssc.runtime import gates, ring
from fssc.runtime.keys import KeyReader
from fssc.runtime.prg import Rng
from fssc.runtime.simulate import deal_in_memory, run_parties
from onnx import TensorProto, helper, numpy_helper

from fssc.errors import FsscError

U64 = np.uint64
# docs/protocol.md, "Layer normalization": the bound on |y - float| in units of 2^-f over the tested range
STATED_BOUND = 1.0
# the inverse square root's relative error (mantissa truncation 2^-(L+1) + the spline's 1 unit on >= sqrt(C)/2)
RSQRT_RELATIVE = 2.0**-16


def _secure(deal, evaluate):
    """(party 0's result, party 1's result, P0's channel, P1's channel, dealer's result, key bytes)."""
    res, k0, k1 = deal_in_memory(deal)

    def party(P):
        out = evaluate(P)
        assert P.keys.skip_to_end(), f"party {P.b} left key records unread"
        return out

    o0, o1, c0, c1 = run_parties(party, party, k0, k1)
    return o0, o1, c0, c1, res, (k0, k1)


@pytest.mark.parametrize("nb, lo, top", [(6, 0, 3), (7, 1, 5), (5, 2, 4)])
def test_octave_gate_every_input_and_every_mask(nb, lo, top):
    xs = np.arange(4**lo, 1 << nb, dtype=U64)
    X, RHO = (a.ravel() for a in np.meshgrid(xs, np.arange(1 << nb, dtype=U64)))
    r = RHO + (Rng().u64(X.size) & ~U64((1 << nb) - 1))  # every mask mod 2^nb, random above
    xhat = X + r
    (u0, q0), (u1, q1), c0, _, (ru, rq), _ = _secure(
        lambda D: D.gate(gates.Octave, "o", r, nb, lo, top), lambda P: P.gate(gates.Octave, "o", xhat, nb, lo, top)
    )
    assert (u0 == u1).all() and (q0 == q1).all() and c0.rounds == 1
    u, q = u0 - ru, q0 - rq
    want_u, want_q = splines.octave_fixed(X, nb, lo, top)
    assert (u == want_u).all() and (q == want_q).all()
    if len(gates.Octave.knots(nb, lo)) + lo == top:  # the top piece reaches the top: u in [4^top, 4^(top+1))
        assert (u >= U64(4**top)).all() and (u < U64(4 ** (top + 1))).all()
    assert (u == X * q * q).all(), "u = x q^2"


def test_octave_gate_view_does_not_depend_on_the_octave():
    """P1's key words, the share it receives and the opened u^, q^ are uniform whatever octave x is in: x = 5
    (q = 2^(top - 1)) and x = 2^40 + 3 (q = 2^(top - 20)), 2048 fresh masks each."""
    from fssc.runtime.channel import decode_array
    from fssc.runtime.protocol import CORR
    from test_security import bit_matrix, check_indistinguishable, records

    nb, lo, top, n = 42, 0, 21, 2048
    views = []
    for v in (5, (1 << 40) + 3):
        x = np.full(n, v, dtype=U64)
        r = Rng().u64(n)
        (_, rq), k0, k1 = deal_in_memory(lambda D, r=r: D.gate(gates.Octave, "o", r, nb, lo, top))

        def party(P, x=x, r=r):
            return P.gate(gates.Octave, "o", x + r, nb, lo, top)

        (u, q), _, _, c1 = run_parties(party, party, k0, k1, record=True)
        assert (q - rq == U64(1 << (top - (1 if v == 5 else 20)))).all()
        views.append((records(k1, 1)["o" + CORR], decode_array(c1.received[0]), np.stack([u, q])))
    for i, what in ((0, "P1's key words"), (1, "P1 receives P0's shares"), (2, "u^ and q^")):
        a, b = views[0][i], views[1][i]
        check_indistinguishable(bit_matrix(a.reshape(-1, n)), bit_matrix(b.reshape(-1, n)), what)


@pytest.mark.parametrize("c", [4, 96, 768])
def test_mantissa_spline_within_one_unit_everywhere(c):
    fit = splines.fit_rsqrt(c)
    v = np.arange(1 << fit.s_in, 4 << fit.s_in, dtype=np.int64)
    got = ring.signed(splines.evaluate(fit.spec, ring.unsigned(v))).astype(np.float64)
    err = np.abs(got / 2.0**fit.s_out - np.sqrt(c / (v / 2.0**fit.s_in))) * 2.0**fit.s_out
    assert err.max() <= 1.0 and fit.bound <= 1.0


def _rsqrt_plan(nb: int, c: int, lo: int = 0) -> gates.RSqrtPlan:
    top = max(lo + len(gates.Octave.knots(nb, lo)), (splines.RSQRT_MANTISSA_BITS + 1) // 2)
    return gates.RSqrtPlan(nb, lo, top, splines.RSQRT_MANTISSA_BITS, splines.fit_rsqrt(c).spec)


def test_rsqrt_every_input_of_a_10_bit_range():
    c, nb = 96, 10
    plan = _rsqrt_plan(nb, c)
    x = np.arange(1, 1 << nb, dtype=U64)
    r = Rng().u64(x.size)
    y0, y1, c0, _, r_out, (k0, _) = _secure(
        lambda D: gates.RSqrt.run(D, "s", r, plan), lambda P: gates.RSqrt.run(P, "s", x + r, plan)
    )
    assert (y0 == y1).all()
    got = y0 - r_out
    assert (got == splines.rsqrt_fixed(x, plan)).all(), "secure == the fixed-point semantics, bit for bit"
    want = 2.0 ** (plan.top + splines.RSQRT_OUT_SCALE) * np.sqrt(c / x.astype(np.float64))
    assert np.abs(got.astype(np.float64) / want - 1).max() <= RSQRT_RELATIVE
    costs = gates.RSqrt.cost(x.size, plan)
    assert c0.rounds == sum(k.rounds for k in costs) == 8
    assert len(k0) - 16 * 25 < sum(k.key_p0 for k in costs) <= len(k0)  # the payload, plus record framing


def _ln_graph(shape: tuple[int, ...], eps: float = 1e-5, s_in: int = 12) -> Graph:
    g = Graph("ln")
    g.add_value(Value("x", shape, "float32"))
    g.add_value(Value("y", shape, "float32"))
    g.inputs, g.outputs = ["x"], ["y"]
    g.ops.append(g.make_op("layernorm", ["x"], ["y"], {"epsilon": eps}))
    g.values["x"].scale, g.values["y"].scale = s_in, 12
    g.meta["frac_bits"] = 12
    return g


def _rows(n: int, c: int, seed: int = 3) -> np.ndarray:
    """Rows whose standard deviations span 2^-3 .. 2^6 around offsets up to 2^5."""
    rng = np.random.default_rng(seed)
    sd = 2.0 ** rng.uniform(-3, 6, size=(n, 1))
    return rng.uniform(-32, 32, size=(n, 1)) + sd * rng.standard_normal((n, c))


@pytest.mark.parametrize("c, s_in", [(8, 12), (96, 29)])
def test_layernorm_gate_equals_its_fixed_point_semantics_and_its_cost(c, s_in):
    g = _ln_graph((40, c), s_in=s_in)
    op = g.ops[0]
    x = ring.encode(_rows(40, c), s_in)
    d = OPS["layernorm"]
    op.bits = int(d.gate.magnitude(op, g, [x])).bit_length() + 1 + 3
    want = d.fixed(op, g, {"x": x})
    params = d.lower(op, g, op.bits)
    r = Rng().u64(x.shape)
    y0, y1, c0, c1, r_out, (k0, k1) = _secure(
        lambda D: gates.LayerNorm.run(D, "l", r, **params), lambda P: gates.LayerNorm.run(P, "l", x + r, **params)
    )
    assert (y0 == y1).all() and (y0 - r_out == want).all(), "secure == fixed point, bit for bit"
    cls = d.gate.runtime(op, g)
    cost = cls.cost(x.size, op.bits)
    assert c0.rounds == cost.rounds == 12 + 2 * (params["d_shift"] > params["extra"]) + 2 * (params["extra"] > 0)
    assert c0.bytes_sent == pytest.approx(cost.sent_p0, rel=0.02)
    assert c1.bytes_sent == pytest.approx(cost.sent_p1, rel=0.02)
    for k, want_bytes in ((k0, cost.key_p0), (k1, cost.key_p1)):
        got = sum(a.nbytes for _, a in KeyReader(k, party=0 if k is k0 else 1).records())
        assert got == pytest.approx(want_bytes, abs=1)


@pytest.mark.parametrize("c, s_in, eps", [(8, 12, 1e-5), (96, 29, 1e-6), (384, 29, 1e-6), (768, 17, 1e-5)])
def test_accuracy_against_float(c, s_in, eps):
    """Max |fixed - float| in units of 2^-12 over rows whose deviations span 2^-3 .. 2^6 (the fixed-point
    semantics is what the secure run gives, bit for bit: the test above)."""
    rows = _rows(64, c)
    g = _ln_graph(rows.shape, eps, s_in)
    op = g.ops[0]
    x = ring.encode(rows, s_in)
    op.bits = int(OPS["layernorm"].gate.magnitude(op, g, [x])).bit_length() + 1 + 3
    got = ring.decode(OPS["layernorm"].fixed(op, g, {"x": x}), 12)
    want = OPS["layernorm"].run({"epsilon": eps}, ring.decode(x, s_in))[0]
    err = np.abs(got - want).max() * 2**12
    assert err <= STATED_BOUND, f"C={c}: {err:.2f} units"
    assert np.abs(want).max() > 1


def _ln_model(nodes, inits, shape, opset=17):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    graph = helper.make_graph(nodes, "ln", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("axis, bias", [(-1, True), (2, False), (1, True)])
def test_layernormalization_node_imports_and_runs(axis, bias):
    shape = (2, 3, 4, 6)
    rng = np.random.default_rng(axis + 5)
    pshape = shape[axis % 4 :]
    inits = {"g": rng.uniform(0.5, 1.5, pshape).astype(np.float32)}
    ins = ["x", "g"]
    if bias:
        inits["b"] = rng.uniform(-0.5, 0.5, pshape).astype(np.float32)
        ins.append("b")
    node = helper.make_node("LayerNormalization", ins, ["y"], axis=axis, epsilon=1e-5)
    proto = _ln_model([node], inits, shape)
    g = import_onnx(proto)
    kinds = [o.kind for o in g.ops]
    assert kinds.count("layernorm") == 1 and "mul" in kinds and ("add" in kinds) == bias
    assert "LayerNormalization" in SUPPORTED
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_float(g, x)[0], ref, atol=1e-4)
    cg = compile_graph(g).graph
    sim = simulate(cg, x)
    assert sim.mismatches() == []
    np.testing.assert_allclose(sim.decoded()[0], ref, atol=0.01)


def test_layernormalization_refusals_and_folding():
    shape = (1, 2, 5)
    g_init = {"g": np.ones(5, np.float32)}
    computed = helper.make_node("Relu", ["x"], ["r"])
    node = helper.make_node("LayerNormalization", ["x", "r"], ["y"])
    with pytest.raises(FsscError, match=r"LayerNormalization\): scale \(input 1"):
        import_onnx(_ln_model([computed, node], {}, shape[:2] + (5,)))
    stats = helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"])
    use = helper.make_node("Relu", ["mean"], ["z"])
    with pytest.raises(FsscError, match=r"output\(s\) \['mean'\] are not supported"):
        m = _ln_model([stats, use], g_init, shape)
        m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 1]))
        import_onnx(m)
    c = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.arange(5, dtype=np.float32)))
    folded = helper.make_node("LayerNormalization", ["k", "g"], ["kn"])
    add = helper.make_node("Add", ["x", "kn"], ["y"])
    g = import_onnx(_ln_model([c, folded, add], g_init, shape))
    assert [o.kind for o in g.ops] == ["add"]
    kn = next(v for v in g.values.values() if v.is_const and v.shape == (5,) and v.name != "g")
    want = (np.arange(5) - 2) / math.sqrt(2 + 1e-5)
    np.testing.assert_allclose(kn.data, want, atol=1e-5)


class _LnNet(torch.nn.Module):
    """LayerNorm2d (permute, layer_norm over channels, permute back) as ConvNeXt has it, a Linear on the
    channel-last 4-D tensor, nn.LayerNorm, a head."""

    def __init__(self):
        super().__init__()
        from torchvision.models.convnext import LayerNorm2d

        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.ln = LayerNorm2d(16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.ln2 = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32 * 8 * 8, 5)

    def forward(self, x):
        y = self.ln(self.conv(x)).permute(0, 2, 3, 1)
        return self.head(self.ln2(self.fc1(y)).flatten(1))


@pytest.mark.parametrize("opset", [13, 16, 17, "dynamo"])
def test_torch_layernorm_exports_run_securely(opset, tmp_path):
    """The TorchScript exporter at opsets 13 and 16 (the written-out form) and 17 (LayerNormalization), and
    the dynamo exporter (LayerNormalization at its opset)."""
    torch.manual_seed(0)
    m = _LnNet().eval()
    with torch.no_grad():
        m.ln.weight.uniform_(0.5, 1.5)
        m.ln.bias.uniform_(-0.3, 0.3)
    x = torch.randn(2, 3, 8, 8)
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = {"input_names": ["input"], "output_names": ["logits"]}
        if opset == "dynamo":
            torch.onnx.export(m, (x,), path, dynamo=True, **names)
        else:
            torch.onnx.export(m, x, path, opset_version=opset, dynamo=False, **names)
    ref = ort.InferenceSession(path).run(None, {"input": x.numpy()})[0]
    g = import_onnx(path)
    assert [o.kind for o in g.ops].count("layernorm") == 2
    res = compile_graph(g)
    sim = simulate(res.graph, x.numpy())
    assert sim.mismatches() == [], "secure == fixed point, bit for bit"
    logits = sim.decoded()[0]
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(logits, ref, atol=0.02)
    rep = res.report
    assert sim.channels[0].rounds == sim.channels[1].rounds == rep.rounds
    got = run_fixed(res.graph, x.numpy(), raw=True)[0]
    assert (got == sim.outputs[0]).all()
    # the compile report's key bytes are what the run used, up to the records' framing (a layernorm writes 20)
    records = 20 * len([op for op in res.graph.ops if op.gate]) + 8
    for actual, est in ((len(sim.keys[0]), rep.total("key_p0")), (len(sim.keys[1]), rep.total("key_p1"))):
        assert est <= actual <= est + 64 * records + 512


def test_bits_full_refuses_layer_normalization_in_one_line(tmp_path, run_fssc):
    """--bits full would plan the variance's truncation for 64-bit rows and lose every ordinary row's
    precision (2.3 off on unit-scale rows): the compiler refuses it, exit 2, and writes no program."""
    shape = (2, 3, 4, 6)
    node = helper.make_node("LayerNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-5)
    path = tmp_path / "ln.onnx"
    onnx.save(_ln_model([node], {"g": np.ones(6, np.float32)}, shape), str(path))
    with pytest.raises(FsscError, match=r"--bits full: 1 layer normalization\(s\), first %.*LayerNormalization_0"):
        compile_graph(import_onnx(str(path)), echo=lambda s: None, bits="full")
    proc = run_fssc("compile", path, "-o", tmp_path / "prog", "--bits", "full", "--output-mode", "logits")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "has no full-width form" in proc.stderr
    assert not (tmp_path / "prog").exists()
