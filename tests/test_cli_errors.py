"""User errors through the real CLI.

A file that is not ONNX, a graph with an unsupported op, a graph with a
dynamic batch dimension, and ``fssc export --weights`` with a state dict that
does not fit: each gives one line on stderr that names the problem, exit code
2, and no traceback. Each case runs the installed ``fssc`` in a subprocess.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper


def assert_one_line_error(proc, *must_contain):
    assert proc.returncode == 2, f"exit code {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip("\n").split("\n")
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("fssc: error: "), line
    for s in must_contain:
        assert s in line, f"{s!r} not in {line!r}"
    assert proc.stdout == ""
    return line


@pytest.mark.parametrize(
    "content", [b"this is not an ONNX model\n", b"", b"\x08\x07\x12\x04junk\xff\xff"], ids=["text", "empty", "garbage"]
)
def test_not_onnx(tmp_path, run_fssc, content):
    path = tmp_path / "photo.onnx"
    path.write_bytes(content)
    assert_one_line_error(run_fssc("ir", path), str(path), "not an ONNX model")


def test_missing_file(tmp_path, run_fssc):
    assert_one_line_error(run_fssc("ir", tmp_path / "nope.onnx"), "nope.onnx", "no such file")


def test_unsupported_ops_are_grouped_by_type(tmp_path, run_fssc):
    """An LSTM (and a Cos): one error naming each offending op type, its node, and the supported set."""
    t, b, i, h = 4, 2, 3, 5
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Relu", ["x"], ["xr"], name="pre_relu"),
        helper.make_node("LSTM", ["xr", "W", "R"], ["y"], name="encoder_lstm", hidden_size=h),
        helper.make_node("Cos", ["xr"], ["p"], name="head_cos"),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((1, 4 * h, i)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((1, 4 * h, h)).astype(np.float32), "R"),
    ]
    graph = helper.make_graph(
        nodes,
        "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, b, i])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, 1, b, h]),
            helper.make_tensor_value_info("p", TensorProto.FLOAT, [t, b, i]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "lstm.onnx"
    onnx.save(model, path)
    line = assert_one_line_error(
        run_fssc("ir", path),
        f"{path}: 2 unsupported ONNX op types: LSTM (1 node: encoder_lstm), Cos (1 node: head_cos); fssc supports: ",
    )
    assert "pre_relu" not in line
    for op in ("Conv", "Gemm", "MaxPool", "BatchNormalization", "ArgMax"):
        assert op in line.split("supports:")[1]


class _Attention(torch.nn.Module):
    """A transformer's self-attention block (secret x secret MatMuls, a Softmax inside the graph)."""

    def __init__(self):
        super().__init__()
        self.att = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.att(x, x, x, need_weights=False)
        return self.fc(y.mean(1))


def test_attention_is_refused_in_one_grouped_line(tmp_path, run_fssc):
    """torch's own export of an attention block: one line naming each unsupported op type with its count
    and first node (the block's nodes, under /att/), and the supported set; exit code 2."""
    torch.manual_seed(0)
    path = tmp_path / "attention.onnx"
    torch.onnx.export(
        _Attention().eval(), (torch.randn(2, 5, 8),), str(path), input_names=["input"], dynamo=False, opset_version=17
    )
    line = assert_one_line_error(run_fssc("compile", path, "-o", tmp_path / "prog"), f"{path}: ", "/att/")
    assert "unsupported ONNX op type" in line and "fssc supports: " in line, line
    assert not (tmp_path / "prog").exists(), "a refused model left an output folder"


def test_many_unsupported_nodes_give_counts_and_first_nodes(tmp_path, run_fssc):
    """Several nodes of two unsupported types: one line with each type's count and first node, in graph order."""
    chain = ["Sin", "Relu", "Cos", "Sin", "Cos", "Sin", "Sin"]
    names = [f"{op.lower()}_{k}" for k, op in enumerate(chain)]
    values = ["x"] + [f"v{k}" for k in range(len(chain) - 1)] + ["y"]
    nodes = [helper.make_node(op, [values[k]], [values[k + 1]], name=names[k]) for k, op in enumerate(chain)]
    graph = helper.make_graph(
        nodes,
        "act",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    path = tmp_path / "act.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    line = assert_one_line_error(
        run_fssc("ir", path),
        f"{path}: 2 unsupported ONNX op types: Sin (4 nodes, first: sin_0), "
        "Cos (2 nodes, first: cos_2); --verbose names every node; fssc supports: Add, ArgMax, ",
    )
    assert "relu_1" not in line and "sin_3" not in line and "cos_4" not in line
    # --verbose: every node of each type, still one line (fssc compile takes it too)
    assert_one_line_error(
        run_fssc("ir", path, "--verbose"),
        f"{path}: 2 unsupported ONNX op types: Sin (4: sin_0 sin_3 sin_5 sin_6), Cos (2: cos_2 cos_4); "
        "fssc supports: Add, ",
    )
    assert_one_line_error(
        run_fssc("compile", path, "-o", tmp_path / "prog", "--verbose"), "Sin (4: sin_0 sin_3 sin_5 sin_6)"
    )
    assert not (tmp_path / "prog").exists()


def test_dynamic_batch_dimension(tmp_path, run_fssc, resnet18_onnx):
    model = onnx.load(str(resnet18_onnx))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = "batch_size"  # as torch.onnx.export(..., dynamic_axes={"input": {0: "batch_size"}}) writes
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, path)
    assert_one_line_error(
        run_fssc("ir", path),
        "dynamic.onnx",
        "'input'",
        "dynamic dimension 'batch_size' (axis 0)",
        "pin it with --batch N",
    )


def test_dynamic_dimension_elsewhere(tmp_path, run_fssc):
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [2, 3, "height", 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, "height", 8])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["pixels"], ["out"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    path = tmp_path / "h.onnx"
    onnx.save(model, path)
    assert_one_line_error(
        run_fssc("ir", path), "'pixels'", "dynamic dimension 'height' (axis 2)", "--input-shape pixels:2,3,D2,8"
    )


@pytest.fixture(scope="module")
def resnet18_2class_state_dict():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=2).state_dict()


@pytest.mark.slow  # an export through the CLI (a torch import and a model build)
def test_weights_with_wrong_keys(tmp_path, run_fssc, resnet18_2class_state_dict):
    sd = dict(resnet18_2class_state_dict)
    sd["head.weight"] = sd.pop("fc.weight")  # renamed: one missing, one unexpected
    del sd["layer1.0.bn1.running_var"]
    sd["extra.scale"] = torch.ones(1)
    torch.save(sd, tmp_path / "sd.pt")
    out = tmp_path / "out.onnx"
    line = assert_one_line_error(
        run_fssc(
            "export", "resnet18", "-o", out, "--num-classes", 2, "--image-size", 32, "--weights", tmp_path / "sd.pt"
        ),
        "sd.pt",
        "missing keys: fc.weight, layer1.0.bn1.running_var",
        "unexpected keys: extra.scale, head.weight",
    )
    assert "wrong shapes" not in line
    assert not out.exists() and not (tmp_path / "out.onnx.part").exists()


@pytest.mark.slow  # an export through the CLI (a torch import and a model build)
def test_weights_with_wrong_shapes(tmp_path, run_fssc, resnet18_2class_state_dict):
    """A 2-class state dict for a 1000-class model (no --num-classes): the shapes are named."""
    torch.save(resnet18_2class_state_dict, tmp_path / "sd2.pt")
    out = tmp_path / "out.onnx"
    line = assert_one_line_error(
        run_fssc("export", "resnet18", "-o", out, "--image-size", 32, "--weights", tmp_path / "sd2.pt"),
        "sd2.pt",
        "wrong shapes:",
        "fc.weight (2, 512) (model has (1000, 512))",
        "fc.bias (2,) (model has (1000,))",
    )
    assert "missing keys" not in line and "unexpected keys" not in line
    assert not out.exists()


def test_usage_errors_are_one_line(tmp_path, run_fssc):
    assert_one_line_error(run_fssc("ir", tmp_path), "is a directory", "fssc ir --help")
    assert_one_line_error(
        run_fssc("export", "resnet18", "-o", tmp_path / "x.onnx", "--batch", "two"), "'--batch'", "not a valid integer"
    )


def test_unwritable_output_directory(tmp_path, run_fssc, resnet18_onnx):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_fssc("compile", resnet18_onnx, "-o", blocker / "prog")
    assert_one_line_error(proc, str(blocker))


def test_listen_port_in_use_is_one_line(tmp_path, run_fssc):
    import socket
    import subprocess
    import sys

    from tiny_models import compile_tiny

    prog, _ = compile_tiny(tmp_path, run_fssc, certs=True, batches=1)
    keys, certs = tmp_path / "keys", tmp_path / "certs"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                str(prog / "party1" / "program.py"),
                "--keys",
                str(keys / "p1"),
                "--listen",
                f"127.0.0.1:{port}",
                "--certs",
                str(certs),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "in use" in proc.stderr.lower()


@pytest.mark.slow
def test_model_torch_cannot_export_is_one_line(tmp_path, run_fssc):
    """VGG's adaptive pool to 7x7 cannot be exported from 64x64 inputs by the TorchScript exporter (fssc export
    falls back to dynamo unless told otherwise): torch's own multi-page dump stays hidden."""
    proc = run_fssc(
        "export", "vgg11", "-o", tmp_path / "v.onnx", "--image-size", 64, "--batch", 1, "--exporter", "torchscript"
    )
    assert_one_line_error(proc, "vgg11", "64x64")
    assert not (tmp_path / "v.onnx").exists()


def test_two_input_model_compiles_and_the_data_owner_cli_says_it_feeds_one(tmp_path, run_fssc):
    """A model with two data inputs compiles (P0's program takes both); its command line, which reads one
    tensor, refuses it in one line naming the inputs (exit 2, before any key or network is touched)."""
    import subprocess
    import sys

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "two.onnx"))
    proc = run_fssc("compile", tmp_path / "two.onnx", "-o", tmp_path / "prog", "--output-mode", "logits")
    assert proc.returncode == 0, proc.stderr
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    args = ["--keys", tmp_path / "keys", "--peer", "127.0.0.1:9", "--input", tmp_path / "x.npy"]
    p0 = subprocess.run(
        [sys.executable, str(tmp_path / "prog" / "party0" / "program.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p0.returncode == 2 and "Traceback" not in p0.stderr
    assert p0.stderr.strip() == (
        "fssc party0: error: this program has 2 inputs (a, b); the data owner's command line feeds one "
        "(--images or --input): run programs with several inputs through their online(P, X, Z0) function"
    )


def test_weight_beyond_the_public_bound(tmp_path, run_fssc):
    """A weight at or beyond 2^--weight-bound-bits (after BN folding) is one line and no program; a larger
    public bound compiles it (P1's arithmetic comes from the bound, not the weights)."""
    w = np.full((4, 2), 0.5, dtype=np.float32)
    w[2, 1] = 40.0
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], name="head")],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [numpy_helper.from_array(w, "W")],
    )
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    proc = run_fssc("compile", path, "-o", tmp_path / "prog", "--output-mode", "logits", cwd=tmp_path)
    assert_one_line_error(proc, "gemm %", "magnitude 40", "public bound 2^4", "--weight-bound-bits 6 or more")
    assert not (tmp_path / "prog" / "party1" / "program.py").exists()
    ok = run_fssc("compile", path, "-o", tmp_path / "prog", "--output-mode", "logits", "--weight-bound-bits", 6)
    assert ok.returncode == 0, ok.stderr
    assert "w_bits=24" in (tmp_path / "prog" / "party1" / "program.py").read_text()  # 17 + 6 + 1
