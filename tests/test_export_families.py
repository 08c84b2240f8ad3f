"""``fssc export`` beyond ResNet: every torchvision CNN family, two exporters.

* inception_v3 exports at its smallest size (75): BN calibration runs the
  eval graph, so the auxiliary head (which needs larger inputs) never runs;
  onnxruntime on the file equals torch's eval output.
* alexnet and vgg11 at 64x64 need adaptive pooling to 6x6 / 7x7 from a smaller
  map, which the TorchScript exporter refuses: the export falls back to the
  dynamo exporter, and onnxruntime equals torch; its GatherND imports.
* A ResNet-18 written by the dynamo exporter (fssc's own, and torch's with its
  default settings: BN folded, external data, ReduceMean axes as an input,
  or unoptimised with Shape/Expand/CastLike chains) imports; compiled, its
  secure simulation tracks onnxruntime within 0.02 with equal labels.
* Unknown model, a size too small for the architecture, an exporter that
  fails: one line, exit 2, no traceback.
* (slow) every family exports at its smallest size with batch 2, and
  onnxruntime equals torch (the sizes are in docs/models.md, "Export").
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.reference.interp import run_float
from fssc.compiler.reference.simulation import simulate
from fssc.models.export import build_model, export_model, prepare_model, smallest_image_size, synthetic_images
from fssc.runtime import ring
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh
from tiny_models import with_argmax

from fssc.errors import FsscError

# family -> the smallest --image-size its architecture takes in eval mode (fssc export's floor is 8);
# docs/models.md ("Export") has the same table
SMALLEST = {
    "alexnet": 63,
    "convnext_tiny": 32,
    "densenet121": 29,
    "efficientnet_b0": 8,
    "efficientnet_v2_s": 8,
    "googlenet": 15,
    "inception_v3": 75,
    "mnasnet0_5": 8,
    "mobilenet_v2": 8,
    "mobilenet_v3_small": 8,
    "regnet_x_400mf": 8,
    "regnet_y_400mf": 8,
    "resnet18": 8,
    "resnext50_32x4d": 8,
    "shufflenet_v2_x0_5": 8,
    "squeezenet1_0": 21,
    "vgg11": 32,
    "wide_resnet50_2": 8,
}


def _ort(path: str, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _check_against_torch(name: str, path: str, num_classes: int | None, size: int, batch: int = 2) -> None:
    """onnxruntime on the file == the torch eval model export_model built, on inputs it did not see."""
    x = synthetic_images(batch, size, seed=11)
    with torch.no_grad():
        ref = prepare_model(name, num_classes, None, size)(x).numpy()
    got = _ort(path, x)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3 * max(1.0, float(np.abs(ref).max())))
    assert np.isfinite(got).all() and np.ptp(got) > 1e-4, "the calibrated random model is not degenerate"


@pytest.mark.slow  # 8-13 s: an export and its onnxruntime check; the zoo matrix runs inception_v3 too
def test_inception_v3_exports_at_its_smallest_size(tmp_path):
    path = str(tmp_path / "inception.onnx")
    info = export_model("inception_v3", path, 10, None, 75, 2)
    assert info.exporter == "torchscript" and info.batchnorms == 94
    model = onnx.load(path)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 75, 75]
    assert [o.name for o in model.graph.output] == ["logits"], "no auxiliary output"
    _check_against_torch("inception_v3", path, 10, 75)


def test_calibration_keeps_modules_other_than_batchnorm_in_eval_mode():
    """Dropout stays off while the BN statistics are measured: they are those the eval graph sees."""
    seen = []
    model = build_model("mobilenet_v2", 4)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_pre_hook(lambda mod, _args: seen.append(mod.training))
    from fssc.models.export import randomize_and_calibrate

    randomize_and_calibrate(model, 16)
    assert seen and not any(seen)
    assert not any(m.training for m in model.modules())


@pytest.mark.slow  # two calibrations of efficientnet_v2_s (8 s)
def test_recalibration_is_deterministic_and_tames_a_deep_net_at_8px():
    """mnasnet0_5 at 8x8 blows its held-out logits up after the first calibration (4 batches); the
    second (16 batches, variance floor) keeps them O(1) on inputs from other seeds, the same weights
    every time."""
    a, b = prepare_model("mnasnet0_5", 10, None, 8), prepare_model("mnasnet0_5", 10, None, 8)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        worst = max(float(a(synthetic_images(4, 8, seed)).abs().max()) for seed in (3, 5, 7, 11))
    assert worst < 20


def test_a_network_without_batchnorm_gets_unit_scale_layers():
    """squeezenet has no BN: each conv is scaled to unit output scale on synthetic images at export, so its
    logits on other images are O(1) (torchvision's init leaves BN-free nets' logits near 1e-3 or 1e3)."""
    model = prepare_model("squeezenet1_0", 10, None, 21)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(float(out.std()))) for m in convs]
    with torch.no_grad():
        y = model(synthetic_images(8, 21, seed=17))
    for h in hooks:
        h.remove()
    assert len(seen) == len(convs) and all(0.3 < s < 3 for s in seen), seen
    assert 0.5 < float(y.abs().max()) < 20


@pytest.mark.parametrize(
    "name",
    [pytest.param("alexnet", marks=pytest.mark.slow), pytest.param("vgg11", marks=pytest.mark.slow)],  # 13 s, tens
)
def test_adaptive_pool_from_a_smaller_map_falls_back_to_dynamo(name, tmp_path):
    path = str(tmp_path / f"{name}.onnx")
    with pytest.raises(FsscError, match=r"torchscript: .*adaptive_avg_pool2d"):
        export_model(name, path, 10, None, 64, 2, exporters=("torchscript",))
    assert not os.path.exists(path), "no file from a failed export"
    info = export_model(name, path, 10, None, 64, 2)
    assert info.exporter == "dynamo" and info.opset == 18
    _check_against_torch(name, path, 10, 64)
    # the pooling is written as GatherND with constant indices: a reshape and a Gather in fssc
    assert "GatherND" in {n.op_type for n in onnx.load(path).graph.node}
    x = synthetic_images(2, 64, seed=13)
    np.testing.assert_allclose(run_float(import_onnx(path, name), x.numpy())[0], _ort(path, x), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def dynamo_resnet(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dynamo") / "resnet18.onnx")
    info = export_model("resnet18", path, 2, None, 32, 2, exporters=("dynamo",))
    return path, info


def test_dynamo_resnet18_keeps_batchnorm_and_folds_shape_arithmetic(dynamo_resnet):
    path, info = dynamo_resnet
    assert info.exporter == "dynamo" and info.opset == 18
    kinds = [n.op_type for n in onnx.load(path).graph.node]
    assert kinds.count("BatchNormalization") == 20 and kinds.count("Conv") == 20
    assert not {"Shape", "Expand", "CastLike"} & set(kinds)


def test_dynamo_resnet18_compiles_and_its_secure_run_tracks_onnxruntime(dynamo_resnet):
    path, _ = dynamo_resnet
    res = compile_graph(import_onnx(with_argmax(onnx.load(path), 2), "resnet18"), echo=lambda s: None)
    x = synthetic_images(2, 32, seed=5).numpy()
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    sim = simulate(res.graph, x)
    assert sim.mismatches() == [], "secure run == fixed-point interpreter"
    logits, label = sim.outputs
    y = ring.decode(logits, res.graph.values["logits"].scale)
    assert np.abs(y - ref).max() < 0.02
    assert (label == ref.argmax(1)).all() and (y.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize(
    "optimize",
    [pytest.param(True, marks=pytest.mark.slow), pytest.param(False, marks=pytest.mark.slow)],
    ids=["torch-default", "unoptimised"],
)  # slow: the zoo matrix's torch legs (tests/test_zoo.py) export every family with torch's default exporter
def test_torch_dynamo_exports_of_resnet18_import(optimize, tmp_path):
    """torch's own dynamo output: BN folded into the convs, weights in an external data file, ReduceMean's
    axes as an input, opset 18 (optimize=True); or Shape/Expand/CastLike chains for the convs' zero biases
    (optimize=False). The float interpreter on the imported graph equals onnxruntime."""
    model = prepare_model("resnet18", 2, None, 32)
    x = synthetic_images(2, 32, seed=7)
    path = str(tmp_path / "r.onnx")
    torch.onnx.export(model, (x,), path, dynamo=True, optimize=optimize, verbose=False)
    assert os.path.exists(path + ".data"), "weights in an external data file"
    kinds = {n.op_type for n in onnx.load(path).graph.node}
    assert ("BatchNormalization" in kinds) != optimize
    assert optimize or {"Shape", "Expand", "CastLike"} <= kinds
    g = import_onnx(path)
    got = run_float(g, x.numpy())[0]
    np.testing.assert_allclose(got, _ort(path, x), rtol=0, atol=1e-4)


def _shape_chain_model() -> onnx.ModelProto:
    """A flatten written as shape arithmetic: Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])),
    then a Gemm whose bias is CastLike(0) expanded to the weight's row count, and a Cast to float."""
    w = np.arange(48 * 3, dtype=np.float32).reshape(3, 48) / 100
    nodes = [
        oh.make_node("Shape", ["x"], ["s"]),
        oh.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        oh.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        oh.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        oh.make_node("Reshape", ["x", "target"], ["flat"]),
        oh.make_node("Shape", ["w"], ["ws"], start=0, end=1),
        oh.make_node("CastLike", ["zf", "x"], ["zc"]),
        oh.make_node("Expand", ["zc", "ws"], ["bias"]),
        oh.make_node("ConstantOfShape", ["ws"], ["ones"], value=nh.from_array(np.ones(1, np.float32))),
        oh.make_node("Add", ["bias", "ones"], ["bias1"]),
        oh.make_node("Gemm", ["flat", "w", "bias1"], ["y0"], transB=1),
        oh.make_node("Cast", ["y0"], ["y"], to=TensorProto.FLOAT),
    ]
    inits = [
        nh.from_array(w, "w"),
        nh.from_array(np.array(0, np.int64), "zero"),
        nh.from_array(np.array([0], np.int64), "zero1"),
        nh.from_array(np.array([-1], np.int64), "minus1"),
        nh.from_array(np.array(0.0, np.float64), "zf"),
    ]
    graph = oh.make_graph(
        nodes,
        "shapes",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        inits,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])


def test_shape_arithmetic_folds_at_import():
    proto = _shape_chain_model()
    g = import_onnx(proto, "shapes")
    assert [op.kind for op in g.ops] == ["reshape", "gemm"]
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_float(g, x)[0], want, rtol=0, atol=1e-5)


def test_integer_shape_division_truncates_at_import():
    """torch's traced chunk: Slice bounds from Shape, Gather, Div, Mul. On 5 channels, int64 5 / 2 is 2
    (so the slice keeps 4 channels); a float division would keep 5."""
    nodes = [
        oh.make_node("Shape", ["x"], ["s"]),
        oh.make_node("Gather", ["s", "one"], ["c"], axis=0),
        oh.make_node("Div", ["c", "two"], ["half"]),
        oh.make_node("Mul", ["half", "two"], ["even"]),
        oh.make_node("Unsqueeze", ["even", "zero1"], ["end"]),
        oh.make_node("Slice", ["x", "zero1", "end", "one1"], ["y0"]),
        oh.make_node("Relu", ["y0"], ["y"]),
    ]
    inits = [
        nh.from_array(np.array(1, np.int64), "one"),
        nh.from_array(np.array(2, np.int64), "two"),
        nh.from_array(np.array([0], np.int64), "zero1"),
        nh.from_array(np.array([1], np.int64), "one1"),
    ]
    graph = oh.make_graph(
        nodes,
        "chunk",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 3])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3])],
        inits,
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    g = import_onnx(proto, "chunk")
    x = np.random.default_rng(1).standard_normal((2, 5, 3)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert want.shape == (2, 4, 3)
    np.testing.assert_array_equal(run_float(g, x)[0], want)


def test_division_by_a_computed_value_is_refused_in_one_line():
    """A constant divisor is a product by its reciprocal; a computed one (a secret) is refused."""
    graph = oh.make_graph(
        [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Div", ["x", "r"], ["y"])],
        "div",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    with pytest.raises(FsscError, match=r"node Div_1 \(Div\): the divisor \(input 1\) must be a constant") as e:
        import_onnx(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))
    assert "\n" not in str(e.value)


def test_expand_of_a_computed_value_is_refused_in_one_line():
    graph = oh.make_graph(
        [oh.make_node("Expand", ["x", "shape"], ["y"])],
        "expand",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [nh.from_array(np.array([2, 3], np.int64), "shape")],
    )
    with pytest.raises(FsscError, match=r"^<model>: node Expand_0 \(Expand\): broadcasting a computed") as e:
        import_onnx(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["nosuchnet"], "unknown model 'nosuchnet'", marks=pytest.mark.slow),
        pytest.param(  # the message itself: test_too_small_names_the_smallest_size, in process
            ["inception_v3", "--image-size", "74"],
            "--image-size 74 is too small for inception_v3",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["alexnet", "--image-size", "64", "--exporter", "torchscript"],
            "torch cannot export alexnet at 64x64",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["unknown", "too-small", "export-fails"],
)
def test_export_errors_are_one_line(args, message, run_fssc, tmp_path):
    proc = run_fssc("export", *args, "--num-classes", 10, "-o", "m.onnx", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_too_small_names_the_smallest_size():
    with pytest.raises(FsscError, match=r"the smallest size it takes is 15$"):
        prepare_model("googlenet", 10, None, 12)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_every_family_exports_at_its_smallest_size(name, tmp_path):
    size = SMALLEST[name]
    assert smallest_image_size(build_model(name, 10)) == size
    path = str(tmp_path / f"{name}.onnx")
    info = export_model(name, path, 10, None, size, 2)
    onnx.checker.check_model(onnx.load(path))
    assert info.image_size == size and info.batch == 2
    _check_against_torch(name, path, 10, size)
