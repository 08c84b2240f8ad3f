"""torchvision classifier -> ONNX, with BatchNormalization nodes kept.

``export_model`` builds a torchvision classifier (ResNet-18 first), replaces
its final layer for ``num_classes`` (as the seed's bees/ants model does), loads
a user's state dict or makes deterministic random weights, and exports it with
a static batch in eval mode without constant folding, so the BatchNorm nodes
stay in the graph for the compiler's own folding pass.

Random weights get *calibrated* BatchNorm statistics: running mean and
variance are set to the batch statistics that each BN layer sees on synthetic
inputs (cumulative average over a few batches), and the BN affine parameters
are drawn around (1, 0). Only the BN layers run in train mode for that; the
rest of the model stays in eval mode, so calibration runs the graph that is
exported (no Inception auxiliary head, no dropout, no stochastic depth).
Without this, a random-init network with default statistics (mean 0, var 1)
blows activations up layer by layer and its logits are degenerate. (Deep
networks at small sizes get more batches and a variance floor: see
:func:`randomize_and_calibrate`.) A network without BatchNorm (alexnet, vgg,
squeezenet) instead has each conv and linear layer scaled to unit output scale
on the same inputs (:func:`_unit_scale`). Then the final linear layer's bias is shifted
so that the mean logits over the same inputs are zero: without that, the
random head predicts one class for (nearly) every input, and "the argmax is
kept" would say little.

Two exporters: torch's TorchScript exporter first (the graph fssc was built
on), then, if it refuses the model (adaptive pooling to a size that does not
divide the feature map, as vgg and alexnet at 64x64 need) or its graph does
not reproduce torch's output in onnxruntime, torch's dynamo exporter (opset 18
at least, needs ``onnxscript``). The dynamo graph gets constant folding only
(its shape-arithmetic chains become initializers), not onnxscript's rewrites,
which would fold BatchNorm into the convolutions. Every written file has been
run in onnxruntime and matches torch's eval output on the export batch.
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
    exporter: str = "torchscript"  # or "dynamo" (see EXPORTERS)


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
        with warnings.catch_warnings():  # googlenet/inception_v3 warn that their default init will change
            warnings.simplefilter("ignore", FutureWarning)
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


MAX_LOGIT = 100.0  # calibrated random classifiers give centred logits of 0.1..10; blown-up ones 1e3..1e6


@torch.no_grad()
def randomize_and_calibrate(
    model: torch.nn.Module, image_size: int, seed: int = DEFAULT_SEED, batches: int = 4, batch_size: int = 8
) -> None:
    """Deterministic random weights with BN statistics measured on synthetic inputs.

    ``batches`` batches first. The statistics must generalise: on held-out synthetic images (4
    batches) the centred logits must stay within :data:`MAX_LOGIT` (BN keeps features near unit scale
    and the head's init keeps logits O(1)). Deep networks at small sizes can miss that by orders of
    magnitude (last maps 1x1: few samples per channel, and a channel nearly constant on the calibration
    images gets a gain near 1/sqrt(eps) on others), and then float32 rounding alone makes onnxruntime
    and torch disagree. They are calibrated again with 4x as many batches, up to 64, and with every
    channel's variance raised to at least its layer's median.
    """
    torch.manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        _unit_scale(model, image_size, seed, batch_size)
    for m in bns:
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.momentum = None  # cumulative average
    for mod in model.modules():  # ConvNeXt: LayerNorm's affine around (1, 0), and a layer scale that lets the
        # residual blocks count (torchvision's 1e-6 would make every block a no-op in the exported function)
        if isinstance(mod, torch.nn.LayerNorm) and mod.weight is not None:
            mod.weight.uniform_(0.5, 1.5)
            mod.bias.uniform_(-0.2, 0.2)
        scale = getattr(mod, "layer_scale", None)
        if isinstance(scale, torch.nn.Parameter):
            scale.uniform_(0.1, 0.5)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = linear[-1].bias.clone() if linear and linear[-1].bias is not None else None
    held_out = [synthetic_images(batch_size, image_size, seed - 1 - i) for i in range(4)]
    floor = False
    while True:
        _calibrate(model, bns, image_size, seed, batches, batch_size)
        if floor:
            for m in bns:
                if m.running_var is not None:
                    m.running_var.clamp_(min=float(m.running_var.median()))
        if head is not None:
            linear[-1].bias.copy_(head)
        seen = torch.cat(
            [model(synthetic_images(batch_size, image_size, seed + 1 + i)) for i in range(min(batches, 2))]
        )
        mean = seen.mean(0)
        # Centre the logits: a random head otherwise gives one class for every input.
        if head is not None and mean.shape == head.shape:
            linear[-1].bias.copy_(head - mean)
        if batches >= 64 or not bns or max(float((model(x) - mean).abs().max()) for x in held_out) <= MAX_LOGIT:
            return
        batches, floor = batches * 4, True


def _unit_scale(model: torch.nn.Module, image_size: int, seed: int, batch_size: int) -> None:
    """A network without BatchNorm (alexnet, vgg, squeezenet): each conv and linear layer, in forward order,
    has its weights and bias divided by the standard deviation of its output on synthetic images, so
    every layer's output has unit scale (layer-sequential unit variance, data-dependent init).

    torchvision's init for these shrinks activations layer by layer (alexnet's logits at 63x63 are
    ~1e-3; vgg's linear layers are N(0, 0.01)): logits that small make "within 0.02 of onnxruntime" and
    "the same label" say nothing. BN-calibrated networks need none of this.
    """
    model.eval()
    x = synthetic_images(batch_size, image_size, seed + 1)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    order: list[torch.nn.Conv2d | torch.nn.Linear] = []
    hooks = [m.register_forward_hook(lambda _m, _i, _o, m=m: order.append(m)) for m in layers]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    seen: dict[str, torch.Tensor] = {}
    for layer in dict.fromkeys(order):  # forward order, each once
        hook = layer.register_forward_hook(lambda _m, _i, out: seen.__setitem__("y", out))
        try:
            model(x)
        finally:
            hook.remove()
        std = float(seen["y"].std())
        if std > 0:
            layer.weight.div_(std)
            if layer.bias is not None:
                layer.bias.div_(std)


def _calibrate(model: torch.nn.Module, bns: list, image_size: int, seed: int, batches: int, batch_size: int) -> None:
    """BN running statistics := the cumulative average of the batch statistics over ``batches`` batches."""
    for m in bns:
        m.reset_running_stats()
    # The BN layers measure their batch statistics (train mode); every other module stays in eval mode, so
    # the forward is the exported graph (Inception's auxiliary head, which needs larger inputs, does not run).
    model.eval()
    for m in bns:
        m.train()
    try:
        for i in range(batches):
            model(synthetic_images(batch_size, image_size, seed + 1 + i))
    finally:
        model.eval()


MIN_IMAGE_SIZE = 8  # fssc export's floor, whatever the architecture could take
MAX_PROBE_SIZE = 1024


@torch.no_grad()
def _runs_at(model: torch.nn.Module, image_size: int) -> bool:
    """Does the eval-mode model take a [1, 3, s, s] input? (Shapes only: zeros, batch 1.)"""
    try:
        model(torch.zeros(1, 3, image_size, image_size))
    except RuntimeError:  # torch reports an input too small for a kernel or pool as a RuntimeError
        return False
    return True


def smallest_image_size(model: torch.nn.Module, start: int = MIN_IMAGE_SIZE) -> int | None:
    """The smallest square size >= ``start`` the eval-mode model runs at (None if none up to 1024).

    Assumes that a model that runs at size s runs at every larger size (true of the torchvision
    classifiers: only kernels and pools larger than the map refuse); bisects between powers of two.
    """
    training = model.training
    model.eval()
    try:
        if _runs_at(model, start):
            return start
        lo, hi = start, start * 2
        while not _runs_at(model, hi):
            if hi >= MAX_PROBE_SIZE:
                return None
            lo, hi = hi, min(hi * 2, MAX_PROBE_SIZE)
        while hi - lo > 1:  # lo fails, hi runs
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _runs_at(model, mid) else (mid, hi)
        return hi
    finally:
        model.train(training)


def check_image_size(model: torch.nn.Module, name: str, image_size: int) -> None:
    """One-line refusal of a size the architecture cannot take (too small for its kernels and pools)."""
    training = model.training
    model.eval()
    try:
        if _runs_at(model, image_size):
            return
    finally:
        model.train(training)
    least = smallest_image_size(model, image_size + 1)
    if least is None:
        raise FsscError(f"{name} does not run at --image-size {image_size} (nor at any size up to {MAX_PROBE_SIZE})")
    raise FsscError(
        f"--image-size {image_size} is too small for {name} (its kernels and pools need larger feature maps); "
        f"the smallest size it takes is {least}"
    )


def prepare_model(
    name: str,
    num_classes: int | None = None,
    weights: str | None = None,
    image_size: int = 224,
    seed: int = DEFAULT_SEED,
) -> torch.nn.Module:
    """The eval-mode torch model :func:`export_model` exports: the user's weights, or random calibrated ones.

    A size the architecture cannot take is one FsscError naming the smallest size it takes.
    """
    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    if weights:
        load_weights(model, weights)
    check_image_size(model, name, image_size)
    if not weights:
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


EXPORTERS = ("torchscript", "dynamo")
DYNAMO_MIN_OPSET = 18  # the lowest opset torch's dynamo exporter writes without a version conversion


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first.split(" Please feel free")[0].split(" [Caused by")[0]


def _export_torchscript(model: torch.nn.Module, x: torch.Tensor, path: str, opset: int) -> None:
    torch.onnx.export(
        model,
        (x,),
        path,
        dynamo=False,
        opset_version=opset,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.EVAL,
        input_names=["input"],
        output_names=["logits"],
    )


def _export_dynamo(model: torch.nn.Module, x: torch.Tensor, path: str, opset: int) -> None:
    """torch's dynamo exporter, constant folding only (onnxscript's rewrites would fold BN into the convs)."""
    import onnx

    try:
        from onnxscript import optimizer
    except ImportError:
        raise FsscError("the dynamo exporter needs onnxscript: pip install 'fssc[compiler]'") from None
    raw = path + ".raw.onnx"
    torch.onnx.export(
        model,
        (x,),
        raw,
        dynamo=True,
        opset_version=opset,
        optimize=False,
        external_data=False,
        input_names=["input"],
        output_names=["logits"],
    )
    proto = onnx.load(raw)
    optimizer.fold_constants(proto)  # in place: Shape/Expand/CastLike chains of constants -> initializers
    optimizer.remove_unused_nodes(proto)
    onnx.save(proto, path)


def _ort_outputs(proto, x: torch.Tensor):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _matches(got, ref: torch.Tensor) -> str | None:
    """None if onnxruntime's logits equal torch's (float32 rounding: 1e-3 of their scale), else why not."""
    import numpy as np

    want = ref.numpy()
    if got.shape != want.shape:
        return f"onnxruntime gives shape {got.shape}, torch {want.shape}"
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    tol = 1e-3 * max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    return None if err <= tol else f"onnxruntime differs from torch by {err:.3g} (tolerance {tol:.3g})"


def export_model(
    name: str,
    out: str,
    num_classes: int | None = None,
    weights: str | None = None,
    image_size: int = 224,
    batch: int = 2,
    opset: int = 17,
    seed: int = DEFAULT_SEED,
    exporters: tuple[str, ...] = EXPORTERS,
    model: torch.nn.Module | None = None,
) -> ExportInfo:
    """Export ``name`` to ``out`` with the first of ``exporters`` whose graph runs in onnxruntime equal to torch.

    The dynamo exporter writes opset ``max(opset, 18)``; :attr:`ExportInfo.opset` is the opset written.
    ``model``: the model :func:`prepare_model` built with the same arguments (callers that also run it
    in torch save a second calibration); by default it is built here.
    """
    import onnx

    if batch < 1 or image_size < MIN_IMAGE_SIZE:
        raise FsscError(f"--batch must be >= 1 and --image-size >= {MIN_IMAGE_SIZE} (got {batch}, {image_size})")
    if num_classes is not None and num_classes < 1:
        raise FsscError(f"--num-classes must be >= 1 (got {num_classes})")
    unknown = [e for e in exporters if e not in EXPORTERS]
    if not exporters or unknown:
        raise FsscError(f"exporters {list(exporters)}: choose from {', '.join(EXPORTERS)}")
    lo, hi = supported_opsets()
    if not lo <= opset <= hi:
        raise FsscError(f"--opset {opset} is not supported: torch's ONNX exporter writes opsets {lo}..{hi}")
    if model is None:
        model = prepare_model(name, num_classes, weights, image_size, seed)
    wdesc = os.path.basename(weights) if weights else f"random (seed {seed}), BN calibrated"
    x = synthetic_images(batch, image_size, seed)
    with torch.no_grad():
        ref = model(x)
    failures = []
    proto, exporter = None, ""
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="fssc-export-") as scratch:
        warnings.simplefilter("ignore")
        for kind in exporters:
            exported = os.path.join(scratch, f"{kind}.onnx")
            used = opset if kind == "torchscript" else max(opset, DYNAMO_MIN_OPSET)
            try:
                with _quiet_output():  # torch's exporters log whole graphs (some from C++) on failure
                    if kind == "torchscript":
                        _export_torchscript(model, x, exported, used)
                    else:
                        _export_dynamo(model, x, exported, used)
                candidate = onnx.load(exported)
                why = _matches(_ort_outputs(candidate, x), ref)
            except FsscError:
                raise
            except Exception as e:  # the exporters report unsupported shapes with pages of graph dump
                why = _first_line(e)
            if why is None:
                proto, opset, exporter = candidate, used, kind
                break
            failures.append(f"{kind}: {why}")
    if proto is None:
        raise FsscError(
            f"torch cannot export {name} at {image_size}x{image_size}, batch {batch}: "
            + "; ".join(failures)
            + " (try another --image-size)"
        )
    proto.producer_name = "fssc export"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        # the model owner's plaintext model: private (0600), and no partial file that looks complete
        write_atomic(out, proto.SerializeToString(), private=True)
    except OSError as e:
        raise FsscError(f"{out}: cannot write ({e.strerror or type(e).__name__})") from None
    kinds = [n.op_type for n in proto.graph.node]
    nc = num_classes if num_classes is not None else int(proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value)
    return ExportInfo(
        out, name, nc, image_size, batch, opset, len(kinds), kinds.count("BatchNormalization"), wdesc, exporter
    )
