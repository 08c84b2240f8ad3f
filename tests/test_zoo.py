"""The torchvision CNN zoo through the secure path: every classifier family, two exporters, batch 2.

For each family, its smallest member at the smallest input size its architecture takes in eval mode
(``SMALLEST`` in test_export_families.py, also in docs/models.md), with 10 classes and random calibrated
weights (:func:`fssc.models.export.prepare_model`):

* exported by ``fssc export`` (:func:`export_model`: TorchScript, or dynamo where that refuses) and by
  ``torch.onnx.export(model, (x,), path)`` as a user writes it (torch's default exporter: dynamo,
  BatchNorm folded into the convolutions, weights in an external data file);
* imported, compiled in logits mode, and run through the in-process two-party simulation (dealer, P0
  and P1 running their generated programs; key streams in memory, nothing on disk) on two synthetic
  images of the distribution the weights were calibrated on (other seeds than the calibration's);
* the secure run equals the fixed-point interpreter bit for bit, its logits are within 0.02 x the logit
  scale (onnxruntime's largest |logit| in the batch, at least 1) of onnxruntime's, and its labels equal
  onnxruntime's on every row whose top-two margin is at least that tolerance.

A family that fails for a reason not yet fixed stays in the matrix as a strict xfail with the reason
(docs/models.md says the same), so a fix shows. The ceil-mode pool windows past a small input
(googlenet, squeezenet) and GatherND with constant indices (alexnet, vgg below 224 through the dynamo
exporter) have their own small tests against onnxruntime here.

mobilenet_v3_small, efficientnet_b0 and convnext_tiny run fssc's export in the fast suite (``FAST``); every
other case is slow (times in docs/models.md), and the fast suite keeps the pool and GatherND tests.
To fit the slow matrix in its budget, three families run fssc's export only
(``Family.no_torch_leg`` says why): alexnet and vgg11, which fssc exports with torch's dynamo exporter
anyway, and efficientnet_v2_s, the costliest. inception_v3 and efficientnet_v2_s compile with 16
fractional bits (``--frac-bits 16``): at the default 12 their fixed-point logits miss the tolerance.
"""

from __future__ import annotations

import functools
import shutil
import time
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.reference.interp import run_float
from fssc.compiler.reference.simulation import simulate
from fssc.models.export import export_model, prepare_model, synthetic_images
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh
from test_export_families import SMALLEST

from fssc.errors import FsscError

BATCH = 2
CLASSES = 10
REL_TOL = 0.02  # of the logit scale
INPUT_SEED = 11  # the export's image distribution (its calibration and checks use seeds near DEFAULT_SEED)


@dataclass(frozen=True)
class Family:
    model: str  # the family's smallest torchvision member
    weight_bound_bits: int = 4  # fssc compile's default; BN-folded depthwise weights can need more
    frac_bits: int = 12  # fssc compile's default; the deepest nets need more to stay within the tolerance
    xfail: str = ""  # why the family does not pass yet ("" if it does)
    no_torch_leg: str = ""  # why torch.onnx.export's file is not run too ("" if it is)


SAME_GRAPH = "fssc export writes it with torch's dynamo exporter too (same op list); the leg costs minutes"


ZOO = {
    f.model: f
    for f in (
        Family("alexnet", no_torch_leg=SAME_GRAPH),
        Family("convnext_tiny"),
        Family("densenet121"),
        Family("efficientnet_b0"),
        Family(
            "efficientnet_v2_s",
            frac_bits=16,  # at 12: max logit error 0.029 > 0.02 (logits ~0.3); at 16: 0.005
            no_torch_leg="the leg costs 3 minutes (at 12 fractional bits it missed the tolerance like fssc's, 0.028)",
        ),
        Family("googlenet"),
        Family("inception_v3", frac_bits=16),  # at 12: max logit error 0.46 > 0.14 (scale 6.8); at 16: 0.039
        Family("mnasnet0_5"),
        Family("mobilenet_v2", weight_bound_bits=6),
        Family("mobilenet_v3_small"),
        Family("regnet_x_400mf"),
        Family("regnet_y_400mf"),
        Family("resnet18"),
        Family("resnext50_32x4d"),
        Family("shufflenet_v2_x0_5", weight_bound_bits=8),
        Family("squeezenet1_0"),
        Family("vgg11", no_torch_leg=SAME_GRAPH),
        Family("wide_resnet50_2"),
    )
}
# in the fast suite: the three families the fast suite must show, fssc's export (4, 17 and 44 s here, convnext's
# mostly its 32 x 32 simulation); their torch.onnx.export legs and every other family are slow
FAST: set[tuple[str, str]] = {("mobilenet_v3_small", "fssc"), ("efficientnet_b0", "fssc"), ("convnext_tiny", "fssc")}


def _cases():
    for name in sorted(ZOO):
        for exporter in ("fssc", "torch"):
            if exporter == "torch" and ZOO[name].no_torch_leg:
                continue
            marks = [] if (name, exporter) in FAST else [pytest.mark.slow]
            if ZOO[name].xfail:
                marks.append(pytest.mark.xfail(reason=ZOO[name].xfail, strict=True))
            yield pytest.param(name, exporter, marks=marks, id=f"{name}-{exporter}")


def _ort(path: str, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """torch's two OpenMP threads spin against the parties' threads (and anything else on 2 cores): a
    forward of efficientnet_b0 at 8x8 took 6 s with two threads under load, 0.4 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)  # the fssc and torch legs of a family run one after the other
def _model(name: str, size: int) -> torch.nn.Module:
    return prepare_model(name, CLASSES, None, size)


def _export(name: str, exporter: str, path: str, size: int) -> None:
    model = _model(name, size)
    if exporter == "fssc":
        export_model(name, path, CLASSES, None, size, BATCH, model=model)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (synthetic_images(BATCH, size),), path)  # torch's defaults, as a user calls it


def check_against_onnxruntime(logits: np.ndarray, ref: np.ndarray) -> str:
    """Logits within REL_TOL x scale; labels equal where onnxruntime's top-two margin is at least that.
    Returns a summary line."""
    scale = max(1.0, float(np.abs(ref).max()))
    tol = REL_TOL * scale
    err = float(np.abs(logits - ref).max())
    assert err <= tol, f"max logit error {err:.4g} > {tol:.4g} (logit scale {scale:.3g})"
    top2 = np.sort(ref, axis=1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] >= tol
    want, got = ref.argmax(1), logits.argmax(1)
    assert (got[sure] == want[sure]).all(), f"labels {got} != onnxruntime's {want} (rows compared: {sure})"
    return f"max logit error {err:.3g} (scale {scale:.3g}), labels {int(sure.sum())}/{len(sure)} compared"


@pytest.mark.parametrize(("name", "exporter"), list(_cases()))
def test_zoo_secure_run_tracks_onnxruntime(name, exporter, tmp_path):
    try:
        _run_family(name, exporter, tmp_path)
    finally:  # the exported models are up to 0.5 GB (vgg11); the key streams were only ever in memory
        shutil.rmtree(tmp_path, ignore_errors=True)


def _run_family(name: str, exporter: str, tmp_path) -> None:
    size = SMALLEST[name]
    path = str(tmp_path / f"{name}.onnx")
    t0, c0 = time.perf_counter(), time.process_time()
    _export(name, exporter, path, size)
    t1 = time.perf_counter()
    res = compile_graph(
        import_onnx(path, name),
        frac_bits=ZOO[name].frac_bits,
        echo=lambda s: None,
        output_mode="logits",
        weight_bound_bits=ZOO[name].weight_bound_bits,
    )
    t2 = time.perf_counter()
    x = synthetic_images(BATCH, size, seed=INPUT_SEED).numpy()
    ref = _ort(path, x)
    sim = simulate(res.graph, x)
    assert sim.mismatches() == [], "the secure run equals the fixed-point interpreter"
    summary = check_against_onnxruntime(sim.decoded()[0], ref)
    print(
        f"\n{name} ({exporter}) {size}x{size}: export {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, "
        f"deal {sim.deal_seconds:.1f} s, online {sim.online_seconds:.1f} s (wall; CPU {time.process_time() - c0:.0f} s "
        f"in all), keys {len(sim.keys[0]) / 1e6:.0f} MB (P0); {summary}; ops "
        + " ".join(sorted({n.op_type for n in onnx.load(path, load_external_data=False).graph.node}))
    )


# ------------------------------------------------------------- ceil-mode windows past a small input
def _pool_model(op: str, n: int, **attrs) -> onnx.ModelProto:
    k, s = 3, 2
    pads = attrs.get("pads", [0, 0, 0, 0])
    out = -(-(n + pads[0] + pads[2] - k) // s) + 1
    if (out - 1) * s >= n + pads[0]:
        out -= 1
    graph = oh.make_graph(
        [oh.make_node(op, ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], ceil_mode=1, **attrs)],
        "pool",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, n, n])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, out, out])],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("op", "n", "attrs"),
    [
        ("MaxPool", 2, {}),  # googlenet at 15, squeezenet at 21: a 3x3/2 window on a 2x2 map
        ("MaxPool", 3, {}),
        ("MaxPool", 4, {"pads": [1, 1, 1, 1]}),  # the last window passes the declared pads
        ("AveragePool", 2, {"count_include_pad": 0}),
        ("AveragePool", 2, {"count_include_pad": 1}),
        ("AveragePool", 4, {"count_include_pad": 1, "pads": [1, 1, 1, 1]}),  # divisor: taps inside the pads
    ],
)
def test_ceil_mode_window_past_the_input_matches_onnxruntime(op, n, attrs):
    """ONNX and torch: in ceil mode a window may start inside the input and end past the padded input;
    it covers the taps that exist (a max of those, an average over those or, with count_include_pad,
    over those inside the declared pads)."""
    model = _pool_model(op, n, **attrs)
    x = np.random.default_rng(n).normal(size=(2, 3, n, n)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    g = import_onnx(model, "pool")
    np.testing.assert_allclose(run_float(g, x)[0], ref, rtol=0, atol=1e-6)
    sim = simulate(compile_graph(g, echo=lambda s: None, output_mode="logits").graph, x)
    assert sim.mismatches() == []
    np.testing.assert_allclose(sim.decoded()[0], ref, rtol=0, atol=2e-3)


def test_a_window_with_no_output_is_refused_in_one_line():
    """Ceil mode or not, a window that leaves no output (3 wide, stride 1, on 2) is one error line."""
    graph = oh.make_graph(
        [oh.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[1, 1], ceil_mode=1)],
        "pool",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 0, 0])],
    )
    with pytest.raises(FsscError, match=r"MaxPool.*window 3 .*larger than padded input 2") as e:
        import_onnx(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), "pool")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------- GatherND with constant indices
def _gathernd_model(idx: np.ndarray, shape=(4, 3, 2, 5), batch_dims: int = 0) -> onnx.ModelProto:
    out = list(shape[:batch_dims]) + list(idx.shape[batch_dims:-1]) + list(shape[batch_dims + idx.shape[-1] :])
    graph = oh.make_graph(
        [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("GatherND", ["r", "i"], ["y"], batch_dims=batch_dims)],
        "gnd",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        [nh.from_array(idx, "i")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gathernd_with_constant_indices_matches_onnxruntime(k):
    """Indices [..., k] (negative ones too) pick along the first k axes: a reshape and a Gather, no gate."""
    shape = (4, 3, 2, 5)
    rng = np.random.default_rng(k)
    idx = np.stack([rng.integers(-d, d, size=(2, 3)) for d in shape[:k]], axis=-1).astype(np.int64)
    model = _gathernd_model(idx, shape)
    x = rng.normal(size=shape).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    g = import_onnx(model, "gnd")
    assert [op.kind for op in g.ops] == ["relu", "reshape", "gather"]
    np.testing.assert_array_equal(run_float(g, x)[0], ref)
    sim = simulate(compile_graph(g, echo=lambda s: None, output_mode="logits").graph, x)
    assert sim.mismatches() == []
    np.testing.assert_allclose(sim.decoded()[0], ref, rtol=0, atol=2e-3)


def test_gathernd_with_batch_dims_is_refused_in_one_line():
    with pytest.raises(FsscError, match=r"node .* \(GatherND\): batch_dims 1 is not supported") as e:
        import_onnx(_gathernd_model(np.zeros((4, 1, 1), np.int64), batch_dims=1), "gnd")
    assert "\n" not in str(e.value)
