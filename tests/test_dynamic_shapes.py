"""Models exported with dynamic dimensions: ``--batch N`` and ``--input-shape NAME:D0,D1,...`` pin them.

A tiny CNN exported by torch with ``dynamic_axes`` compiles at batch 2 and 3; the secure simulation equals
the fixed-point interpreter bit for bit and is close to onnxruntime on the original (dynamic) model. The
refusals (a static dimension that differs, a dynamic one left unpinned, an input that does not exist) are
one line each with exit code 2 through the real CLI.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import import_onnx, parse_input_shapes
from fssc.compiler.reference.interp import run_fixed, run_float
from fssc.compiler.reference.simulation import simulate
from test_cli_errors import assert_one_line_error

from fssc.errors import FsscError


class SmallCnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def export_small_cnn(path, dynamic_axes: dict | None, batch: int = 2, size: int = 8) -> None:
    torch.manual_seed(0)
    model = SmallCnn()
    with torch.no_grad():  # non-trivial batchnorm statistics
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(batch, 3, size, size),),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=dynamic_axes,
        )
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def dynamic_cnn(tmp_path_factory):
    path = tmp_path_factory.mktemp("dyn") / "cnn.onnx"
    export_small_cnn(path, {"input": {0: "N"}, "logits": {0: "N"}})
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N" and not dim0.HasField("dim_value"), "the export should have a symbolic batch"
    return path


@pytest.fixture(scope="module")
def static_cnn(tmp_path_factory):
    path = tmp_path_factory.mktemp("static") / "cnn.onnx"
    export_small_cnn(path, None, batch=2)
    return path


@pytest.mark.parametrize("batch", [2, 3])
def test_pinned_batch_simulates_like_the_interpreter_and_onnxruntime(dynamic_cnn, batch):
    graph = compile_graph(import_onnx(str(dynamic_cnn), batch=batch), echo=lambda s: None).graph
    assert graph.values[graph.inputs[0]].shape == (batch, 3, 8, 8)
    x = np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)
    sim = simulate(graph, x)
    assert sim.mismatches() == []
    (y,) = sim.decoded()
    np.testing.assert_array_equal(y, run_fixed(graph, x)[0])
    ref = ort.InferenceSession(str(dynamic_cnn)).run(None, {"input": x})[0]
    assert y.shape == ref.shape == (batch, 3)
    assert np.abs(y - ref).max() < 0.02


def test_compile_batch_through_the_cli(tmp_path, run_fssc, dynamic_cnn):
    proc = run_fssc("compile", dynamic_cnn, "-o", tmp_path / "prog", "--batch", "3")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "prog" / "report.json").read_text())["batch"] == 3


def test_unpinned_dynamic_batch_names_the_flag(tmp_path, run_fssc, dynamic_cnn):
    line = assert_one_line_error(
        run_fssc("compile", dynamic_cnn, "-o", tmp_path / "prog"),
        "cnn.onnx",
        "input 'input' has a dynamic dimension 'N' (axis 0)",
        "pin it with --batch N (or --input-shape input:D0,3,8,8)",
    )
    print(line)
    assert not (tmp_path / "prog").exists()


def test_static_dimension_that_differs_is_refused(tmp_path, run_fssc, static_cnn):
    line = assert_one_line_error(
        run_fssc("compile", static_cnn, "-o", tmp_path / "prog", "--batch", "3"),
        "cnn.onnx: input 'input' dimension 0 is fixed at 2 in the model; --batch 3 asks for 3",
    )
    print(line)
    line = assert_one_line_error(
        run_fssc("ir", static_cnn, "--input-shape", "input:2,3,8,9"),
        "cnn.onnx: input 'input' dimension 3 is fixed at 8 in the model; --input-shape input:2,3,8,9 asks for 9",
    )
    print(line)


def test_static_batch_equal_to_the_request_is_accepted(run_fssc, static_cnn):
    proc = run_fssc("ir", static_cnn, "--batch", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == import_onnx(str(static_cnn)).text()


def test_input_shape_naming_no_input_lists_the_inputs(tmp_path, run_fssc, dynamic_cnn):
    line = assert_one_line_error(
        run_fssc("compile", dynamic_cnn, "-o", tmp_path / "prog", "--input-shape", "image:2,3,8,8"),
        "cnn.onnx: --input-shape names 'image', not an input of the model; its inputs: 'input'",
    )
    print(line)


def test_input_shape_pins_spatial_dimensions(tmp_path, run_fssc):
    path = tmp_path / "hw.onnx"
    export_small_cnn(path, {"input": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N"}})
    line = assert_one_line_error(
        run_fssc("ir", path, "--batch", "2"),
        "input 'input' has a dynamic dimension 'H' (axis 2)",
        "pin it with --input-shape input:2,3,D2,D3",
    )
    print(line)
    g = import_onnx(str(path), input_shapes=parse_input_shapes(["input:2,3,10,12"]))
    assert g.values["input"].shape == (2, 3, 10, 12)
    x = np.random.default_rng(7).standard_normal((2, 3, 10, 12)).astype(np.float32)
    graph = compile_graph(g, echo=lambda s: None).graph
    ref = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    assert np.abs(run_fixed(graph, x)[0] - ref).max() < 0.02
    with pytest.raises(FsscError, match=r"--batch 3 and --input-shape input:2,3,10,12 disagree on dimension 0"):
        import_onnx(str(path), batch=3, input_shapes={"input": (2, 3, 10, 12)})
    with pytest.raises(FsscError, match=r"input 'input' has 4 dimensions; --input-shape input:2,3,10 gives 3"):
        import_onnx(str(path), input_shapes={"input": (2, 3, 10)})


@pytest.mark.parametrize("spec", ["input", "input:", "input:2,x", "input:2,0", ":2,3"])
def test_malformed_input_shape_is_refused(spec):
    with pytest.raises(FsscError, match=r"^--input-shape .*: give NAME:D0,D1,\.\.\. with positive dimensions"):
        parse_input_shapes([spec])
    with pytest.raises(FsscError, match=r"input 'a' is given twice"):
        parse_input_shapes(["a:1,2", "a:1,2"])


def test_batch_below_one_is_refused(dynamic_cnn):
    with pytest.raises(FsscError, match=r"^--batch 0: must be at least 1$"):
        import_onnx(str(dynamic_cnn), batch=0)


def test_unknown_batch_dimension_is_pinned_too(tmp_path, run_fssc, static_cnn):
    """A dimension with neither a value nor a name (unknown) is dynamic too: refused unpinned, pinned by --batch."""
    model = onnx.load(str(static_cnn))
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.output[0].type.tensor_type.shape.dim[0].Clear()
    path = tmp_path / "unknown.onnx"
    onnx.save(model, path)
    line = assert_one_line_error(
        run_fssc("ir", path),
        "unknown.onnx: input 'input' has a dynamic (unknown) dimension (axis 0); fssc needs static shapes: "
        "pin it with --batch N (or --input-shape input:D0,3,8,8)",
    )
    print(line)
    g = import_onnx(str(path), batch=4)
    assert g.values["input"].shape == (4, 3, 8, 8)
    x = np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    np.testing.assert_allclose(run_float(g, x)[0], ref, rtol=1e-4, atol=1e-5)
