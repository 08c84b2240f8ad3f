"""``fssc export`` writes the ResNet-18 the project is about.

``fssc export resnet18 -o r.onnx --num-classes 2 --image-size 224 --batch 2``
(the real CLI, in a subprocess) writes a valid ONNX graph with static shapes
and its 20 BatchNormalization nodes; onnxruntime on it matches torch within
1e-4; a state dict passed with ``--weights`` goes through exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.models.export import export_model, prepare_model, synthetic_images
from onnx import numpy_helper


def torch_reference(name: str, num_classes: int | None, weights: str | None, image_size: int, x) -> torch.Tensor:
    """The model ``export_model`` exports (same arguments, default seed), run in torch."""
    model = prepare_model(name, num_classes, weights, image_size)
    with torch.no_grad():
        return model(x)


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.slow
def test_cli_export_writes_valid_resnet18_with_batchnorms(resnet18_224_cli):
    proc, path = resnet18_224_cli
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert path.exists() and not path.with_name("r.onnx.part").exists()
    assert "20 BatchNormalization" in proc.stdout

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)  # includes strict shape inference
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("BatchNormalization") == 20
    assert kinds.count("Conv") == 20  # BN not folded into the convs at export
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert [i.name for i in model.graph.input] == ["input"]
    assert _dims(model.graph.input[0]) == [2, 3, 224, 224]  # static batch
    assert _dims(model.graph.output[0]) == [2, 2]
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    # every BN is in inference form: one output, no training mode
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            assert len([o for o in n.output if o]) == 1
            assert all(a.name != "training_mode" or a.i == 0 for a in n.attribute)


@pytest.mark.slow
def test_onnxruntime_matches_torch(resnet18_224_onnx, ort_session):
    x = synthetic_images(2, 224, seed=11)
    ref = torch_reference("resnet18", 2, None, 224, x).numpy()
    got = ort_session(resnet18_224_onnx).run(None, {"input": x.numpy()})[0]
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    # the calibrated random model is not degenerate: logits are finite and not all equal
    assert np.isfinite(got).all() and np.ptp(got) > 1e-3


def test_export_is_deterministic(resnet18_onnx, tmp_path):
    """Same arguments, same seed: the same weights (the IR text hashes every constant)."""
    again = tmp_path / "resnet18.onnx"
    export_model("resnet18", str(again), 2, None, 64, 2)
    assert import_onnx(str(again)).text() == import_onnx(str(resnet18_onnx)).text()


def test_weights_round_trip(resnet18_onnx, export_resnet18, ort_session, tmp_path):
    """The default model's state dict, saved and passed back with --weights, gives the same model.

    Its initializers equal the state dict's tensors exactly, and onnxruntime's
    outputs on it are bit-identical to those of the default export.
    """
    model = prepare_model("resnet18", 2, None, 64)  # what `fssc export` built for resnet18_onnx
    sd_path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd_path)
    with_weights = export_resnet18(64, 2, 2, weights=sd_path)

    sd = model.state_dict()
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(with_weights)).graph.initializer}
    params = [k for k in sd if not k.endswith("num_batches_tracked")]
    missing = [k for k in params if k not in inits]
    assert not missing, f"state dict entries not in the ONNX initializers: {missing}"
    for k in params:
        np.testing.assert_array_equal(inits[k], sd[k].numpy(), err_msg=k)

    x = synthetic_images(2, 64, seed=5).numpy()
    a = ort_session(resnet18_onnx).run(None, {"input": x})[0]
    b = ort_session(with_weights).run(None, {"input": x})[0]
    np.testing.assert_array_equal(a, b)


def test_user_weights_match_torch(export_resnet18, ort_session, tmp_path):
    """Weights that are not the default random ones: onnxruntime on the export matches torch with them."""
    torch.manual_seed(3)
    model = prepare_model("resnet18", 2, None, 64, seed=3)
    with torch.no_grad():
        model.fc.weight.mul_(-2.0)  # clearly different from the default model
    sd_path = tmp_path / "other.pt"
    torch.save(model.state_dict(), sd_path)
    path = export_resnet18(64, 2, 2, weights=sd_path)
    x = synthetic_images(2, 64, seed=6)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(ort_session(path).run(None, {"input": x.numpy()})[0], ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(torch_reference("resnet18", 2, str(sd_path), 64, x).numpy(), ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"num_classes": 0}, "--num-classes must be >= 1"),
        ({"opset": 5}, "--opset 5 is not supported"),
        ({"batch": 0}, "--batch must be >= 1"),
    ],
)
def test_export_refuses_bad_arguments(tmp_path, bad, message):
    from fssc.errors import FsscError

    args = {"name": "resnet18", "out": str(tmp_path / "x.onnx"), "num_classes": 2, "image_size": 32, "batch": 2}
    args.update(bad)
    with pytest.raises(FsscError, match=message):
        export_model(**args)
    assert not list(tmp_path.iterdir())
