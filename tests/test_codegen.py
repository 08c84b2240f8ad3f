"""Code generation treats every name from the model as data: hostile ONNX names cannot inject code."""

from __future__ import annotations

import numpy as np
import onnx
from fssc.compiler.compile import compile_graph, compile_model
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.reference.simulation import simulate
from onnx import TensorProto, numpy_helper
from onnx import helper as oh


def hostile_model(path: str) -> None:
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "W")
    nodes = [
        oh.make_node("MatMul", ['in"put', "W"], ["mm"], name='mm\nimport os\nos.system("exit 1")'),
        oh.make_node("Relu", ["mm"], ['out"\n'], name='r\\"""'),
    ]
    g = oh.make_graph(
        nodes,
        'g"""',
        [oh.make_tensor_value_info('in"put', TensorProto.FLOAT, [2, 4])],
        [oh.make_tensor_value_info('out"\n', TensorProto.FLOAT, [2, 2])],
        [w],
    )
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), path)


def test_hostile_names_stay_data(tmp_path):
    from rich.console import Console

    path = str(tmp_path / 'model"""x.onnx')
    hostile_model(path)
    compile_model(path, str(tmp_path / "prog"), output_mode="logits", console=Console(quiet=True))
    for role in ("party0", "party1", "dealer"):
        src = (tmp_path / "prog" / role / "program.py").read_text()
        compile(src, role, "exec")  # parses
        code = [line for line in src.splitlines() if not line.lstrip().startswith("#")]
        assert not any("os.system" in line or line.strip() == "import os" for line in code), role
    # and the program still runs securely with those names
    g = compile_graph(import_onnx(path), echo=lambda s: None, output_mode="logits").graph
    x = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
    (y,) = simulate(g, x).decoded()
    assert np.allclose(y, np.maximum(x @ np.ones((4, 2)), 0))
