"""The in-process two-party simulator on the whole compiled ResNet-18.

ResNet-18 (2 classes, random BN-calibrated weights) exported at 32x32, batch 2,
with a final ArgMax appended (outputs: logits and label), imported and
compiled by the real pipeline. The dealer and P0 get the weightless graph;
P1 the full one. The run must

* equal the fixed-point interpreter (floor truncation) bit for bit: raw ring
  values, since every truncation is exact;
* give bit-identical logits when the same input runs again on a fresh deal;
* agree with onnxruntime's argmax (label output and argmax of the logits);
* cost what the compiler's cost report says (rounds, bytes sent, key bytes).
"""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fssc.compiler.backend.lower import is_weighted
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.reference.interp import run_fixed
from fssc.compiler.reference.simulation import simulate, strip_weights
from fssc.models.export import synthetic_images
from fssc.runtime import ring
from fssc.runtime.keys import KeyReader
from tiny_models import tiny_cnn, with_argmax

BATCH, SIZE = 2, 32


@pytest.fixture(scope="module")
def resnet(export_resnet18):
    path = str(export_resnet18(SIZE, BATCH, num_classes=2))  # the session's export (test_accuracy reads it too)
    proto = with_argmax(onnx.load(path), BATCH)
    res = compile_graph(import_onnx(proto, "resnet18"), echo=lambda s: None)
    x = synthetic_images(BATCH, SIZE, seed=5).numpy()
    ref = ort.InferenceSession(path).run(None, {"input": x})[0]
    sim = simulate(res.graph, x)
    k0, k1 = sim.keys
    c0, c1 = sim.channels
    print(
        f"\nresnet18 {SIZE}x{SIZE} batch {BATCH}: deal {sim.deal_seconds:.2f} s, online {sim.online_seconds:.2f} s, "
        f"keys {len(k0) / 1e6:.1f} + {len(k1) / 1e6:.1f} MB, "
        f"sent {c0.bytes_sent / 1e6:.2f} + {c1.bytes_sent / 1e6:.2f} MB, {c0.rounds} exchanges"
    )
    return {
        "res": res,
        "graph": res.graph,
        "x": x,
        "ref": ref,
        "sim": sim,
        "out": sim.outputs,
        "k0": k0,
        "k1": k1,
        "c0": c0,
        "c1": c1,
    }


def test_resnet_compiled_graph_is_the_real_thing(resnet):
    kinds = [op.kind for op in resnet["graph"].ops]
    assert kinds.count("conv") == 20 and kinds.count("relu") == 17 and kinds.count("maxpool") == 2
    assert kinds[-1] == "argmax" and resnet["graph"].outputs == ["logits", "label"]
    assert all(op.attrs.get("trunc") for op in resnet["graph"].ops if op.kind == "relu"), "truncation is fused"


def test_resnet_matches_fixed_point_interpreter_exactly(resnet):
    g, sim = resnet["graph"], resnet["sim"]
    want = run_fixed(g, resnet["x"], raw=True)
    assert all((a == b).all() for a, b in zip(sim.reference, want, strict=True))
    assert sim.mismatches() == []
    logits, label = resnet["out"]
    assert logits.dtype == np.uint64 and (logits == want[0]).all(), "raw ring values must be equal"
    assert (label == want[1]).all()


def test_resnet_matches_onnxruntime_argmax(resnet):
    logits, label = resnet["out"]
    ref = resnet["ref"]
    y = ring.decode(logits, resnet["graph"].values["logits"].scale)
    assert (label == ref.argmax(1)).all()
    assert (y.argmax(1) == ref.argmax(1)).all()
    assert np.abs(y - ref).max() < 0.05, "fixed point at 12 fractional bits tracks float"
    assert len(set(ref.argmax(1).tolist())) == 2, "the batch exercises both labels"


def test_resnet_costs_match_the_cost_report(resnet):
    rep, c0, c1 = resnet["res"].report, resnet["c0"], resnet["c1"]
    # steps: P0's masked input (one way), the gate / linear exchanges, P1's label share (one way)
    assert c0.rounds == c1.rounds == rep.rounds
    # each one-way step (the input, the label share) has one sender, every other round both
    assert c0.messages_sent == c1.messages_sent == c0.rounds - 1
    # payload bytes as reported; the channel adds a few framing bytes (dtype, rank, shape) per message
    for sent, model in ((c0.bytes_sent, rep.total("sent_p0") + rep.input_bytes), (c1.bytes_sent, rep.total("sent_p1"))):
        assert 0 <= sent - int(model) <= 32 * c0.messages_sent
    for party, kb, model in ((0, resnet["k0"], rep.total("key_p0")), (1, resnet["k1"], rep.total("key_p1"))):
        r = KeyReader(kb, party=party)
        nrec = 0
        while not r.skip_to_end():
            r._next()
            nrec += 1
        assert 0 <= len(kb) - int(model) <= 48 * nrec + 1024, f"P{party} key bytes"


def test_p0_graph_holds_no_weight_bytes(resnet):
    g = resnet["graph"]
    g0 = strip_weights(g)
    consts = [n for n, v in g.values.items() if v.is_const]
    assert consts and all(g0.values[n].data is None and g0.values[n].stripped for n in consts)
    assert all(g.values[n].data is not None for n in consts), "stripping works on a copy"
    blob = pickle.dumps(g0)
    total = sum(g.values[n].data.nbytes for n in consts)
    assert len(blob) < 200_000 < total
    for n in consts:  # not even a fragment of any weight tensor
        raw = np.ascontiguousarray(g.values[n].data).tobytes()
        for off in range(0, len(raw) - 32, max(32, len(raw) // 8)):
            assert raw[off : off + 32] not in blob, f"bytes of {n} in P0's graph"
    # nor do P0's keys (seeds, masks, DCF keys) hold P1's encoded weights (what its weights file holds)
    encoded = {t: w for t, w in resnet["sim"].program.weights.items() if t.endswith(".w")}
    assert len(encoded) == sum(is_weighted(op, g) for op in g.ops)
    for tag, w_enc in encoded.items():
        if w_enc.size >= 4:
            assert w_enc[:4].tobytes() not in resnet["k0"], f"weights {tag} in P0's keys"


def test_tiny_cnn_labels_and_logits():
    """A small CNN with grouped/dilated conv, folded BN and a residual add, several inputs."""
    graph, proto, _ = tiny_cnn(batch=4, size=12, seed=3)
    sess = ort.InferenceSession(proto.SerializeToString())
    gen = np.random.default_rng(0)
    for _ in range(2):
        x = gen.standard_normal((4, 3, 12, 12)).astype(np.float32)
        sim = simulate(graph, x)
        assert sim.mismatches() == []
        ref_logits, ref_label = sess.run(None, {"input": x})
        y, label = sim.decoded()
        margin = np.abs(ref_logits[:, 1] - ref_logits[:, 0]) > 0.02
        assert (label[margin] == ref_label[margin]).all()
        assert np.abs(y - ref_logits).max() < 0.02


class _Bottleneck(torch.nn.Module):
    """MobileNet-v2's pieces: depthwise conv, ReLU6 (Clip), a linear bottleneck (conv -> BN -> conv, no
    activation between: a standalone truncation gate) and a residual add with no ReLU after it."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.expand = torch.nn.Conv2d(8, 16, 1)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = torch.nn.BatchNorm2d(16)
        self.project = torch.nn.Conv2d(16, 8, 1)
        self.head = torch.nn.Conv2d(8, 4, 1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        s = torch.clamp(self.stem(x), 0, 6)
        y = torch.clamp(self.bn(self.dw(torch.clamp(self.expand(s), 0, 6))), 0, 6)
        y = self.project(y) + s  # no activation: the sum goes straight into another conv
        y = self.head(y)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_mobilenet_style_block_with_standalone_truncations():
    import io
    import warnings

    torch.manual_seed(0)
    model = _Bottleneck().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.running_mean.uniform_(-0.2, 0.2)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(2, 3, 8, 8),),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
        )
    proto = onnx.load_from_string(buf.getvalue())
    graph = compile_graph(import_onnx(proto, "bottleneck"), echo=lambda s: None, output_mode="logits").graph
    kinds = [op.kind for op in graph.ops]
    assert "trunc" in kinds and "clip" in kinds, kinds
    assert all(op.gate for op in graph.ops if op.kind == "trunc"), "standalone truncations are gates"
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    sim = simulate(graph, x)
    assert sim.mismatches() == [], "secure == fixed-point semantics (floor truncation)"
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"input": x})[0]
    (y,) = sim.decoded()
    assert np.abs(y - ref).max() < 0.02


@pytest.mark.parametrize("classes,select_last", [(5, 0), (8, 0), (5, 1)])
def test_argmax_over_many_classes(classes, select_last):
    """labels mode on a C-class model: a tournament of selections; P0 learns only the index."""
    gen = np.random.default_rng(classes + 10 * select_last)
    w = gen.standard_normal((6, classes)).astype(np.float32)
    nodes = [
        onnx.helper.make_node("MatMul", ["input", "W"], ["logits"]),
        onnx.helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0, select_last_index=select_last),
    ]
    g = onnx.helper.make_graph(
        nodes,
        "argmax",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [16, 6])],
        [onnx.helper.make_tensor_value_info("label", onnx.TensorProto.INT64, [16])],
        [onnx.numpy_helper.from_array(w, "W")],
    )
    proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    x = gen.standard_normal((16, 6)).astype(np.float32)
    x[0] = 0.0  # all logits tie: the first (or last) index must win
    res = compile_graph(import_onnx(proto, "argmax"), echo=lambda s: None)
    graph = res.graph
    sim = simulate(graph, x)
    label = ring.signed(sim.outputs[0])
    want = run_fixed(graph, x)[0]
    assert (label == want).all()
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"input": x})[0]
    assert (label == ref).all()
    assert label[0] == (classes - 1 if select_last else 0)
    rep = res.report
    assert rep.rounds == sim.channels[0].rounds == sim.channels[1].rounds
    assert rep.total("key_p0") <= len(sim.keys[0]) <= rep.total("key_p0") + 4096
    assert rep.total("key_p1") <= len(sim.keys[1]) <= rep.total("key_p1") + 4096


def test_same_input_twice_gives_bit_identical_logits(resnet):
    """Exact truncation: a second deal and run on the same input opens the same logits, bit for bit
    (a probabilistic carry would make them differ and reveal the dropped bits on repetition)."""
    again = simulate(resnet["graph"], resnet["x"], reference=False)
    assert (again.outputs[0] == resnet["out"][0]).all(), "logits differ between two runs of one input"
    assert (again.outputs[1] == resnet["out"][1]).all()
