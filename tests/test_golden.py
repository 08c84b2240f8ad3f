"""Golden outputs: a fixed ResNet-18 through the whole compiler and the generated programs.

ResNet-18 with 10 classes at 32x32, batch 2, exported by ``fssc.models.export``
with an ArgMax appended, is compiled by the real pipeline and its three generated
programs run in memory (:func:`fssc.compiler.reference.simulation.simulate`).
Only the graph comes from the export: every weight, BatchNorm statistic and input
value is then replaced by a small dyadic number drawn from SHAKE-256 (exact in
float32), so the model and its input are the same bits on every machine and
every library version. (Weights calibrated by torch in float32 differ in their
last bits between CPUs, and those bits move a fixed-point logit by a few units.)
P0's outputs -- the logits' raw ring values and the labels -- must equal the
ones recorded in ``tests/golden/resnet18_32px_10cls.json``: a refactoring
of the passes, the lowering, the code generator or the runtime that changes
what a party computes shows up here, bit for bit.

Exact truncation makes the outputs independent of the dealer's randomness, so
the golden values hold for every fresh deal. Only outputs are recorded, not the
program's hash: restyling a generated statement may change the hash but not
what it computes.

The file records a SHA-256 of each output (dtype, shape, little-endian bytes),
the labels in clear and the logits to 4 decimals, so a failure shows a readable
difference. After a change that is *meant* to alter the outputs (a new
fixed-point scale, say), rewrite the file with ``python tests/test_golden.py``
and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.reference.simulation import simulate
from fssc.models.export import export_model
from onnx import numpy_helper
from tiny_models import with_argmax

CLASSES, SIZE, BATCH = 10, 32, 2
GOLDEN = Path(__file__).with_name("golden") / "resnet18_32px_10cls.json"
DESCRIPTION = (
    f"resnet18, {CLASSES} classes, {SIZE}x{SIZE}, batch {BATCH}: the graph of fssc.models.export + ArgMax; "
    "weights, BN statistics and input from tests/test_golden.py's dyadic(): SHAKE-256 of each tensor's name"
)


def dyadic(name: str, shape: tuple[int, ...], lo: int, hi: int, scale: float) -> np.ndarray:
    """Integers in [lo, hi] from SHAKE-256 of ``name``, times ``scale`` (a power of two): the same float32
    bits on every machine."""
    n = math.prod(shape)
    raw = np.frombuffer(hashlib.shake_256(name.encode()).digest(2 * n), dtype="<u2").astype(np.int64)
    return ((raw % (hi - lo + 1) + lo) * scale).astype(np.float32).reshape(shape)


def pow2(x: float) -> float:
    return 2.0 ** round(math.log2(x))


def golden_model(onnx_path: Path) -> onnx.ModelProto:
    """The exported graph with every initializer replaced by :func:`dyadic` values: He-scaled weights
    (integers in [-8, 8] times a power of two), BatchNorm statistics near the identity."""
    proto = onnx.load(str(onnx_path))
    for init in proto.graph.initializer:
        shape, name = tuple(init.dims), init.name
        if len(shape) >= 2:  # conv and fc weights: std near sqrt(2 / fan_in) (uniform on [-8, 8]: std 4.9)
            value = dyadic(name, shape, -8, 8, pow2(math.sqrt(2 / math.prod(shape[1:])) / 4.9))
        elif name.endswith("running_var"):
            value = dyadic(name, shape, 8, 16, 1 / 8)  # 1 .. 2
        elif name.endswith("running_mean"):
            value = dyadic(name, shape, -8, 8, 1 / 64)
        elif name.endswith("weight"):  # BN scale
            value = dyadic(name, shape, 12, 20, 1 / 16)  # 0.75 .. 1.25
        else:  # BN and fc biases
            value = dyadic(name, shape, -8, 8, 1 / 64)
        init.CopyFrom(numpy_helper.from_array(value, name))
    return proto


def golden_input() -> np.ndarray:
    return dyadic("input", (BATCH, 3, SIZE, SIZE), -64, 64, 1 / 32)  # -2 .. 2


def digest(a: np.ndarray) -> str:
    a = np.asarray(a)
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    h = hashlib.sha256(f"{a.dtype.str} {a.shape}\n".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def run_model(onnx_path: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """(the golden record of one secure run, the float input, onnxruntime's logits), for the graph exported
    to ``onnx_path`` with :func:`golden_model`'s weights."""
    model = golden_model(onnx_path)
    proto = with_argmax(model, BATCH)
    graph = compile_graph(import_onnx(proto, "resnet18"), echo=lambda s: None).graph
    x = golden_input()
    sim = simulate(graph, x, reference=False)
    record: dict = {"model": DESCRIPTION, "outputs": {}}
    for y, o, dec in zip(sim.outputs, sim.program.outputs, sim.decoded(), strict=True):
        entry = {"kind": o["kind"], "dtype": str(np.asarray(y).dtype), "shape": list(np.shape(y)), "sha256": digest(y)}
        if o["kind"] == "labels":
            entry["values"] = np.asarray(y).tolist()
        else:
            entry["scale"] = o["scale"]
            entry["decoded"] = np.round(np.asarray(dec, dtype=np.float64), 4).tolist()
        record["outputs"][o["name"]] = entry
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    return record, x, ref


def test_resnet18_outputs_equal_the_golden_file(export_resnet18):
    assert GOLDEN.exists(), f"{GOLDEN} is missing; write it with `python tests/test_golden.py`"
    want = json.loads(GOLDEN.read_text())
    got, _, ref = run_model(export_resnet18(image_size=SIZE, batch=BATCH, num_classes=CLASSES))
    assert got["model"] == want["model"], "the golden file describes another model or input"
    assert sorted(got["outputs"]) == sorted(want["outputs"]) == ["label", "logits"]
    # readable differences first, then the bit-for-bit check
    assert got["outputs"]["label"]["values"] == want["outputs"]["label"]["values"]
    g, w = np.array(got["outputs"]["logits"]["decoded"]), np.array(want["outputs"]["logits"]["decoded"])
    assert g.shape == w.shape == (BATCH, CLASSES)
    assert np.abs(g - w).max() <= 2e-4, f"logits moved:\n got {g.tolist()}\nwant {w.tolist()}"
    for name in ("label", "logits"):
        assert got["outputs"][name] == want["outputs"][name], f"output {name} differs from the golden file"
    # the golden values themselves are right: they track the float model (onnxruntime)
    assert got["outputs"]["label"]["values"] == ref.argmax(1).tolist()
    assert np.abs(g - ref).max() < 0.05


if __name__ == "__main__":  # rewrite the golden file (after an intended change of the outputs)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "resnet18.onnx"
        export_model("resnet18", str(path), CLASSES, None, SIZE, BATCH)
        record, _, ref = run_model(path)
    assert record["outputs"]["label"]["values"] == ref.argmax(1).tolist(), "secure labels differ from onnxruntime"
    GOLDEN.parent.mkdir(exist_ok=True)
    text = json.dumps(record, indent=1)  # one line per innermost list (a row of logits, the labels)
    GOLDEN.write_text(re.sub(r"\[[^\[\]{}]*\]", lambda m: json.dumps(json.loads(m.group(0))), text) + "\n")
    print(f"wrote {GOLDEN}; onnxruntime logits {np.round(ref, 3).tolist()}", file=sys.stderr)
