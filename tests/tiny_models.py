"""Small models for runtime tests (not collected: no ``test_`` prefix).

``tiny_cnn`` is a few-layer CNN with every op kind the protocol runs (conv
with stride 2 and groups, folded batchnorm, fused ReLU truncation, a 3x3/2
MaxPool lowered to separable max trees, a residual add, global average pool,
Gemm, a final 2-class ArgMax), exported through torch's ONNX exporter and
compiled by the real pipeline.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import import_onnx
from onnx import TensorProto, helper


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.MaxPool2d(3, 2, 1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn1(self.conv1(x))))
        y = torch.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def with_argmax(proto: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """Append ArgMax(logits, axis=1) as a second output ``label``."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    out = m.graph.output[0].name
    m.graph.node.append(helper.make_node("ArgMax", [out], ["label"], axis=1, keepdims=0))
    m.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, [batch]))
    return m


def tiny_cnn(batch: int = 2, size: int = 12, seed: int = 0):
    """(compiled IR graph with logits and label outputs, ONNX proto, float input)."""
    torch.manual_seed(seed)
    model = _Tiny()
    with torch.no_grad():  # non-trivial batchnorm statistics
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            buf,
            dynamo=False,
            opset_version=17,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["input"],
            output_names=["logits"],
        )
    proto = with_argmax(onnx.load_from_string(buf.getvalue()), batch)
    graph = compile_graph(import_onnx(proto, "tiny"), echo=lambda s: None).graph
    return graph, proto, x.numpy().astype(np.float32)


def image_model(name: str, nodes, inits, batch: int, opset: int = 17, classes: int = 5) -> onnx.ModelProto:
    """A checked ONNX model over ``nodes`` from input x [batch,3,6,6] to logits [batch,classes]."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def assert_secure_run_matches(g, x: np.ndarray, ref: np.ndarray, atol: float = 0.02) -> None:
    """The generated programs, simulated, equal the fixed-point interpreter bit for bit, and their logits are
    within ``atol`` of the float oracle ``ref`` (onnxruntime's), which is not trivially small."""
    from fssc.compiler.reference.interp import run_fixed
    from fssc.compiler.reference.simulation import simulate
    from fssc.runtime import ring

    sim = simulate(g, x)
    assert sim.mismatches() == []
    want = run_fixed(g, x, raw=True)
    assert (sim.outputs[0] == want[0]).all(), "raw ring values must be equal"
    logits = ring.decode(sim.outputs[0], g.values[g.outputs[0]].fixed_scale)
    assert np.abs(ref).max() > 0.5, "the oracle's logits are not trivially small"
    np.testing.assert_allclose(logits, ref, atol=atol)


def compile_tiny(folder, run_fssc=None, batch: int = 2, size: int = 12, certs: bool = False, batches: int = 0):
    """The tiny CNN (``tiny_cnn(batch, size)``) saved as ``folder/tiny.onnx`` with its input ``folder/x.npy``
    and compiled (logits) to ``folder/prog``; with ``run_fssc`` through the real CLI, else in process. With
    ``certs``, ``folder/certs``; with ``batches``, that many key batches in ``folder/keys`` (CLI only).
    Returns (prog folder, x)."""
    import os

    from fssc.compiler.compile import compile_model
    from rich.console import Console

    _, proto, x = tiny_cnn(batch=batch, size=size)
    onnx.save(proto, str(folder / "tiny.onnx"))
    np.save(folder / "x.npy", x)
    if run_fssc is None:
        with open(os.devnull, "w") as null:
            compile_model(
                str(folder / "tiny.onnx"), str(folder / "prog"), output_mode="logits", console=Console(file=null)
            )
        if certs:
            from fssc.runtime.certs import make_certs

            make_certs(str(folder / "certs"))
        assert not batches, "key batches are dealt through the CLI"
        return folder / "prog", x
    r = run_fssc("compile", folder / "tiny.onnx", "-o", folder / "prog", "--output-mode", "logits")
    assert r.returncode == 0, r.stderr
    if certs:
        assert run_fssc("certs", "-o", folder / "certs").returncode == 0
    if batches:
        r = run_fssc("deal", folder / "prog", "--batches", batches, "-o", folder / "keys")
        assert r.returncode == 0, r.stderr
    return folder / "prog", x
