"""torchvision classifier -> ONNX, with BatchNormalization nodes kept.

``export_model`` builds a torchvision classifier (ResNet-18 first), replaces
its final layer for ``num_classes`` (as the seed's bees/ants model does), loads
a user's state dict or makes deterministic random weights, and exports it with
a static batch in eval mode without constant folding, so the BatchNorm nodes
stay in the graph for the compiler's own folding pass.

Random weights get *calibrated* BatchNorm statistics: running mean and
variance are set to the batch statistics that each BN layer sees on synthetic
inputs (cumulative average over a few batches in train mode), and the BN
affine parameters are drawn around (1, 0). Without this, a random-init network
with default statistics (mean 0, var 1) blows activations up layer by layer
and its logits are degenerate. Then the final linear layer's bias is shifted
so that the mean logits over the same inputs are zero: without that, the
random head predicts one class for (nearly) every input, and "the argmax is
kept" would say little.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass

import torch

from fssc.errors import FsscError
from fssc.files import write_atomic

DEFAULT_SEED = 20261127


@dataclass
class ExportInfo:
    path: str
    model: str
    num_classes: int
    image_size: int
    batch: int
    opset: int
    nodes: int
    batchnorms: int
    weights: str


def available_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def supported_opsets() -> tuple[int, int]:
    """The opset range torch's TorchScript ONNX exporter writes."""
    try:
        from torch.onnx import _constants as c

        return int(c.ONNX_MIN_OPSET), int(c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):  # pragma: no cover - private module moved
        return 7, 20


def build_model(name: str, num_classes: int | None = None) -> torch.nn.Module:
    import torchvision

    if name not in available_models():
        raise FsscError(f"unknown model {name!r}; torchvision classifiers: {', '.join(available_models())}")
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception as e:  # some constructors reject arguments
        raise FsscError(f"cannot build {name}: {e}") from None


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load a state dict; missing/unexpected keys or wrong shapes are one error listing them."""
    if not os.path.exists(path):
        raise FsscError(f"--weights {path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FsscError(f"--weights {path}: not a torch state dict ({type(e).__name__})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FsscError(f"--weights {path}: expected a dict of tensors (a state dict)")
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if wrong:
        problems.append(
            "wrong shapes: " + ", ".join(f"{k} {tuple(sd[k].shape)} (model has {tuple(own[k].shape)})" for k in wrong)
        )
    if problems:
        raise FsscError(f"--weights {path} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


def synthetic_images(n: int, image_size: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Smooth-ish normalised images from a fixed seed (test data, not key material)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, max(image_size // 8, 1), max(image_size // 8, 1), generator=g)
    img = torch.nn.functional.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return img + 0.3 * torch.randn(n, 3, image_size, image_size, generator=g)


@torch.no_grad()
def randomize_and_calibrate(
    model: torch.nn.Module, image_size: int, seed: int = DEFAULT_SEED, batches: int = 4, batch_size: int = 8
) -> None:
    """Deterministic random weights with BN statistics measured on synthetic inputs."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    for i in range(batches):
        model(synthetic_images(batch_size, image_size, seed + 1 + i))
    model.eval()
    # Centre the logits: a random head otherwise gives one class for every input.
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if linear and linear[-1].bias is not None:
        mean = torch.cat(
            [model(synthetic_images(batch_size, image_size, seed + 1 + i)) for i in range(min(batches, 2))]
        ).mean(0)
        if mean.shape == linear[-1].bias.shape:
            linear[-1].bias.sub_(mean)


def prepare_model(
    name: str,
    num_classes: int | None = None,
    weights: str | None = None,
    image_size: int = 224,
    seed: int = DEFAULT_SEED,
) -> torch.nn.Module:
    """The eval-mode torch model :func:`export_model` exports: the user's weights, or random calibrated ones."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    if weights:
        load_weights(model, weights)
    else:
        randomize_and_calibrate(model, image_size, seed)
    return model.eval()


@contextlib.contextmanager
def _quiet_output():
    """Silence file descriptors 1 and 2 (C++ writers included) for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def export_model(
    name: str,
    out: str,
    num_classes: int | None = None,
    weights: str | None = None,
    image_size: int = 224,
    batch: int = 2,
    opset: int = 17,
    seed: int = DEFAULT_SEED,
) -> ExportInfo:
    import onnx

    if batch < 1 or image_size < 8:
        raise FsscError(f"--batch must be >= 1 and --image-size >= 8 (got {batch}, {image_size})")
    if num_classes is not None and num_classes < 1:
        raise FsscError(f"--num-classes must be >= 1 (got {num_classes})")
    lo, hi = supported_opsets()
    if not lo <= opset <= hi:
        raise FsscError(f"--opset {opset} is not supported: torch's ONNX exporter writes opsets {lo}..{hi}")
    model = prepare_model(name, num_classes, weights, image_size, seed)
    wdesc = os.path.basename(weights) if weights else f"random (seed {seed}), BN calibrated"
    x = synthetic_images(batch, image_size, seed)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="fssc-export-") as scratch:
        exported = os.path.join(scratch, "model.onnx")
        warnings.simplefilter("ignore")
        try:
            with _quiet_output():  # torch's exporter logs its whole graph (from C++) on failure
                torch.onnx.export(
                    model,
                    (x,),
                    exported,
                    dynamo=False,
                    opset_version=opset,
                    do_constant_folding=False,
                    training=torch.onnx.TrainingMode.EVAL,
                    input_names=["input"],
                    output_names=["logits"],
                )
        except Exception as e:  # torch's exporter reports unsupported shapes with pages of graph dump
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            first = first.split(" Please feel free")[0].split(" [Caused by")[0]
            raise FsscError(
                f"torch cannot export {name} at {image_size}x{image_size}, batch {batch}: {first} "
                f"(try another --image-size)"
            ) from None
        proto = onnx.load(exported)
    proto.producer_name = "fssc export"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        # the model owner's plaintext model: private (0600), and no partial file that looks complete
        write_atomic(out, proto.SerializeToString(), private=True)
    except OSError as e:
        raise FsscError(f"{out}: cannot write ({e.strerror or type(e).__name__})") from None
    kinds = [n.op_type for n in proto.graph.node]
    nc = num_classes if num_classes is not None else int(proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value)
    return ExportInfo(out, name, nc, image_size, batch, opset, len(kinds), kinds.count("BatchNormalization"), wdesc)
