"""The secret x secret product gate (``hmul``, runtime/gates.py ``HMul``): ONNX Mul with two secret operands.

* Exhaustive at small widths: every pair of signed 6-bit values, on uniform 64-bit masks, and the ring's
  wrap-around edges: the opened value minus the dealer's output mask is x * y mod 2^64 exactly.
* Broadcasting (squeeze-excitation's x[N,C,H,W] * s[N,C,1,1], both sides broadcast, x * x on one wire).
* Key records, key bytes, rounds and bytes sent against the gate's ``cost`` (what the cost model prints).
* Scale planning: the product is at s_x + s_y; operands above f are truncated first when the sum would
  pass the maximum scale.
* End to end: a small torch CNN with a squeeze-excitation block x * relu(fc(mean(x))) exported to ONNX: the
  secure simulation equals the fixed-point interpreter bit for bit and onnxruntime within 0.02, and the
  cost model's rounds equal the measured ones.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fssc.compiler.backend.cost import cost_report
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.ir.graph import Graph, Value
from fssc.compiler.ir.ops import OPS, Role, Scale
from fssc.compiler.reference.simulation import simulate
from fssc.passes import plan_fixed_point
from fssc.passes.base import ComparisonRange, PassContext, Ranges
from fssc.runtime import gates
from fssc.runtime.channel import decode_array
from fssc.runtime.keys import KeyReader
from fssc.runtime.prg import Rng
from fssc.runtime.protocol import CORR
from fssc.runtime.simulate import deal_in_memory, run_parties
from test_security import bit_matrix, check_indistinguishable, records
from tiny_models import assert_secure_run_matches

U64 = np.uint64
N_SEC = 4096  # samples per input pair in the statistical check


def run_gate(x: np.ndarray, y: np.ndarray, record: bool = False):
    """(opened z^ as both parties hold it, r_z, P0's key bytes, P1's key bytes, channels) for x * y."""
    rx, ry = Rng().u64(x.shape), Rng().u64(y.shape)
    xh, yh = x.astype(U64) + rx, y.astype(U64) + ry
    rz, k0, k1 = deal_in_memory(lambda D: D.gate(gates.HMul, "g", rx, ry))

    def party(P):
        out = P.gate(gates.HMul, "g", xh, yh)
        assert P.keys.skip_to_end(), f"party {P.b} left key records unread"
        return out

    z0, z1, c0, c1 = run_parties(party, party, k0, k1, record=record)
    assert (z0 == z1).all()
    return z0, rz, k0, k1, (c0, c1)


def test_every_pair_of_small_values_multiplies_exactly():
    v = np.arange(-32, 32, dtype=np.int64)  # every signed 6-bit value
    x, y = (a.reshape(-1) for a in np.meshgrid(v, v, indexing="ij"))
    z, rz, _, _, _ = run_gate(x.view(U64), y.view(U64))
    assert ((z - rz).view(np.int64) == x * y).all()


def test_products_wrap_like_the_ring():
    """Values at the ring's edges: the gate is exact mod 2^64 (what the fixed-point interpreter computes)."""
    big = np.array([2**62, -(2**63), 2**63 - 1, 3, -1, 2**32 + 1], dtype=np.int64)
    x, y = (a.reshape(-1) for a in np.meshgrid(big, big, indexing="ij"))
    z, rz, _, _, _ = run_gate(x.view(U64), y.view(U64))
    assert ((z - rz) == x.view(U64) * y.view(U64)).all()


@pytest.mark.parametrize(
    "xs, ys",
    [((2, 3, 4, 4), (2, 3, 1, 1)), ((3, 1), (1, 4)), ((1,), (5,)), ((2, 5), (2, 5))],
)
def test_broadcasting_products(xs, ys):
    gen = np.random.default_rng(7)
    x = gen.integers(-(2**20), 2**20, size=xs)
    y = gen.integers(-(2**20), 2**20, size=ys)
    z, rz, k0, k1, (c0, c1) = run_gate(x.view(U64), y.view(U64), record=True)
    assert z.shape == np.broadcast_shapes(xs, ys)
    assert ((z - rz).view(np.int64) == x * y).all()
    # the keys and messages are what the cost model says
    n = z.size
    c = gates.HMul.cost(n, 64, 0, 1, sizes=(x.size, y.size))
    recs = [list(KeyReader(k, party=p).records()) for p, k in ((0, k0), (1, k1))]
    for party in (0, 1):
        assert [t for t, _ in recs[party]] == gates.HMul.records("g", party)
    assert sum(a.nbytes for _, a in recs[0]) == c.key_p0 == 16
    assert sum(a.nbytes for _, a in recs[1]) == c.key_p1 == 8 * (x.size + y.size + 2 * n)
    assert c0.rounds == c1.rounds == c.rounds == 1
    for chan, sent in ((c0, c.sent_p0), (c1, c.sent_p1)):  # payload plus one message header (2 + 8 ndim)
        assert chan.messages_sent == 1 and chan.bytes_sent == sent + 2 + 8 * z.ndim


def test_a_wire_times_itself():
    x = np.arange(-40, 40, dtype=np.int64)
    r = Rng().u64(x.shape)
    xh = x.view(U64) + r
    rz, k0, k1 = deal_in_memory(lambda D: D.gate(gates.HMul, "g", r, r))
    z0, _, _, _ = run_parties(
        lambda P: P.gate(gates.HMul, "g", xh, xh), lambda P: P.gate(gates.HMul, "g", xh, xh), k0, k1
    )
    assert ((z0 - rz).view(np.int64) == x * x).all()


def test_opened_values_are_masked_by_fresh_masks():
    """The only value opened is z + r_z with the dealer's fresh r_z: the same product on two deals opens
    two unrelated values (a party cannot tell z from what it sees without r_z)."""
    x = np.full(64, 3, dtype=np.int64).view(U64)
    y = np.full(64, 5, dtype=np.int64).view(U64)
    za, rza, *_ = run_gate(x, y)
    zb, rzb, *_ = run_gate(x, y)
    assert (za - rza == zb - rzb).all() and (za != zb).all()
    assert len(np.unique(za)) == 64  # equal products, different masked values


def test_each_partys_view_is_independent_of_the_inputs():
    """Statistically, as tests/test_security.py checks the other gates: for inputs (0, 0) and for
    (large, -3) alike, P1's key words, the share each party receives and the opened z^ look uniform and
    the same, bit position by bit position."""
    n = N_SEC
    views = []
    for xv, yv in ((0, 0), (1 << 40, -3)):
        x = np.full(n, xv, dtype=np.int64).view(U64)
        y = np.full(n, yv, dtype=np.int64).view(U64)
        z, _, _, k1, (c0, c1) = run_gate(x, y, record=True)
        corr = records(k1, 1)["g" + CORR].reshape(4, n)  # [r_x], [r_y], [r_x r_y], [r_z]: n words each
        views.append((corr, decode_array(c0.received[0]), decode_array(c1.received[0]), z))
    for i, what in ((0, "P1's key words"), (1, "P0 receives P1's share"), (2, "P1 receives P0's share"), (3, "z^")):
        a, b = views[0][i], views[1][i]
        check_indistinguishable(bit_matrix(a.reshape(-1, n)), bit_matrix(b.reshape(-1, n)), what)


# ----------------------------------------------------------------- the registry entry and scale planning
def test_registry_entry():
    d = OPS["hmul"]
    assert d.role is Role.GATE and d.scale is Scale.PRODUCT and d.gate is not None
    assert d.gate.runtime(None, None) is gates.HMul
    assert gates.STATEMENTS["hmul"] is gates.HMul


def _product_graph(sx_relu: bool) -> Graph:
    """x, y inputs -> (conv'd or not) -> hmul: the operands' scales decide the plan."""
    g = Graph("p")
    for n in ("x", "y"):
        g.add_value(Value(n, (1, 2), "float32"))
        g.inputs.append(n)
    g.add_const("w", np.ones((1, 2), np.float32))
    g.add_value(Value("a", (1, 2), "float32"))
    g.ops.append(g.make_op("mul", ["x", "w"], ["a"]))  # at 2f + 5
    g.add_value(Value("z", (1, 2), "float32"))
    g.ops.append(g.make_op("hmul", ["a" if sx_relu else "x", "y"], ["z"]))
    g.outputs = ["z"]
    return g


def test_product_scale_is_the_sum_of_the_operands():
    g = plan_fixed_point.run(_product_graph(False), PassContext(frac_bits=12)).graph
    assert g.values["z"].scale == 24 and [op.kind for op in g.ops] == ["mul", "hmul"]


def test_operands_above_f_are_truncated_first():
    g = plan_fixed_point.run(_product_graph(True), PassContext(frac_bits=12)).graph
    assert [op.kind for op in g.ops] == ["mul", "trunc", "hmul"]
    assert g.values["z"].scale == 24


# ----------------------------------------------------------------- end to end: squeeze-excitation
class _SE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = torch.nn.Conv2d(8, 4, 1)
        self.fc2 = torch.nn.Conv2d(4, 8, 1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        s = torch.nn.functional.adaptive_avg_pool2d(y, 1)
        s = torch.clamp(self.fc2(torch.relu(self.fc1(s))), 0.0, 1.0)  # a sigmoid-free gate
        y = y * s  # squeeze-excitation: secret x secret, broadcast over H, W
        y = torch.relu(self.conv2(y))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def se_model(batch: int = 2) -> tuple[onnx.ModelProto, np.ndarray]:
    torch.manual_seed(5)
    model = _SE().eval()
    with torch.no_grad():
        model.fc2.bias.add_(0.5)  # gates mostly inside (0, 1)
        model.conv2.weight.mul_(2.0)
        model.fc.weight.mul_(6.0)  # logits of a few units
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, input_names=["x"], output_names=["logits"], opset_version=17, dynamo=False)
    return onnx.load_from_string(buf.getvalue()), x.numpy()


@pytest.fixture(scope="module")
def se():
    model, x = se_model()
    res = compile_graph(import_onnx(model, "se"), echo=lambda s: None, output_mode="logits")
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    return res.graph, x, ref


def test_se_block_imports_as_one_product_gate(se):
    g, _, _ = se
    (op,) = [op for op in g.ops if op.kind == "hmul"]
    a, b = (g.values[i].shape for i in op.inputs)
    assert a == (2, 8, 8, 8) and b == (2, 8, 1, 1)
    assert op.gate["kind"] == "hmul" and op.gate["count"] == 2 * 8 * 8 * 8
    assert op.gate["bits"] == 64  # compares nothing: the ring's width, so its headroom is the ring's


def test_se_block_verify_reports_no_overflow(se):
    """The product's width only matters against the ring: a calibrated product gives no overflow report."""
    from fssc.compiler.reference.interp import find_overflows

    g, x, _ = se
    assert all(o.kind != "hmul" for o in find_overflows(g, x * 4))


def test_se_block_secure_run_matches_interpreter_and_onnxruntime(se):
    g, x, ref = se
    assert_secure_run_matches(g, x, ref)


def test_se_block_rounds_and_bytes_match_the_cost_model(se):
    g, x, _ = se
    sim = simulate(g, x, reference=False)
    rep = cost_report(g)
    assert rep.rounds == sim.channels[0].rounds == sim.channels[1].rounds
    (c,) = [c for c in rep.ops if c.kind == "hmul"]
    n = 2 * 8 * 8 * 8
    assert c.rounds == 1 and c.key_p0 == 16 and c.key_p1 == 8 * (n + 2 * 8 + 2 * n)
    assert c.sent_p0 == c.sent_p1 == 8 * n


def test_se_block_report_reads_the_product_at_its_scale(se):
    g, _, _ = se
    (op,) = [op for op in g.ops if op.kind == "hmul"]
    assert g.values[op.outputs[0]].scale == 24
    rep = cost_report(g, Ranges({op.uid: ComparisonRange(1 << 30, 34)}, {}, 1))
    (c,) = [c for c in rep.ops if c.kind == "hmul"]
    assert c.calibrated == 1 << 30 and c.calibrated_scale == 24  # the product, read at the product's scale


def test_viewer_counts_products_as_gates_not_comparisons(se):
    from fssc.compiler.viewer.document import estimated_cost, pass_totals

    g, _, _ = se
    t = pass_totals(g, [estimated_cost(op, g)[0] for op in g.ops])
    assert t["gates_by_kind"]["hmul"] == 1024 and t["comparisons"] == t["gates"] - 1024
