"""The compiler's commands: export, ir, compile, view, demo, bench.

The ``fssc`` group (fssc/cli/__init__.py) imports this module only when one of
these commands is asked for. Each command imports what it runs (torch, onnx,
the passes) inside its body, so listing them costs no more than click.
"""

from __future__ import annotations

import sys

import click

from fssc.errors import FsscError
from fssc.passes.base import DEFAULT_MARGIN_BITS


@click.command()
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--num-classes", type=int, default=None, help="Replace the final layer with this many classes.")
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="A state dict (torch.save) for the model; default: random weights, BN calibrated.",
)
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--batch", type=int, default=2, show_default=True, help="Static batch dimension.")
@click.option("--opset", type=int, default=17, show_default=True, help="The dynamo exporter writes 18 at least.")
@click.option(
    "--exporter",
    type=click.Choice(["auto", "torchscript", "dynamo"]),
    default="auto",
    show_default=True,
    help="auto: torch's TorchScript exporter, else its dynamo exporter if the first fails or its graph "
    "does not reproduce torch's output in onnxruntime.",
)
def export(model, out, num_classes, weights, image_size, batch, opset, exporter):
    """Export a torchvision classifier MODEL (e.g. resnet18) to ONNX, keeping BatchNorm nodes."""
    from fssc.models.export import EXPORTERS, export_model

    exporters = EXPORTERS if exporter == "auto" else (exporter,)
    info = export_model(model, out, num_classes, weights, image_size, batch, opset, exporters=exporters)
    click.echo(
        f"wrote {info.path}: {info.model}, {info.num_classes} classes, input [{info.batch},3,"
        f"{info.image_size},{info.image_size}], opset {info.opset} ({info.exporter} exporter), {info.nodes} nodes "
        f"({info.batchnorms} BatchNormalization), weights: {info.weights}"
    )


BATCH_HELP = (
    "Pin a dynamic batch: dimension 0 of every graph input becomes N (as exported with "
    "torch.onnx.export(..., dynamic_axes={'input': {0: 'N'}})). A static dimension must already be N."
)
INPUT_SHAPE_HELP = (
    "Pin the whole shape of input NAME, e.g. input:2,3,224,224 (repeatable; for dynamic dimensions other than "
    "the batch). A static dimension must already have the value given."
)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--batch", type=int, default=None, metavar="N", help=BATCH_HELP)
@click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:D0,D1,...", help=INPUT_SHAPE_HELP)
@click.option("--verbose", is_flag=True, help="Name every node of an unsupported op type, not only the first.")
def ir(model, batch, input_shape, verbose):
    """Import an ONNX MODEL and print fssc's IR (deterministic text form)."""
    from fssc.compiler.frontend.onnx_import import import_onnx, parse_input_shapes

    g = import_onnx(model, batch=batch, input_shapes=parse_input_shapes(input_shape), verbose=verbose)
    click.echo(g.text(), nl=False)


@click.command("compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Program directory.")
@click.option("--frac-bits", type=int, default=12, show_default=True, help="Fixed-point fractional bits f.")
@click.option("--batch", type=int, default=None, metavar="N", help=BATCH_HELP)
@click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:D0,D1,...", help=INPUT_SHAPE_HELP)
@click.option(
    "--calibrate",
    type=click.Path(exists=True),
    default=None,
    help="Images (folder) or .npy for range analysis; default: inputs from a fixed seed.",
)
@click.option("--dump-ir", is_flag=True, help="Write prog/ir/NN-pass.txt after every pass.")
@click.option("--print-ir-after-all", is_flag=True, help="Print the IR after every pass.")
@click.option("--print-ir-after", multiple=True, metavar="PASS", help="Print the IR after this pass (repeatable).")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the cost report as JSON here.",
)
@click.option(
    "--output-mode",
    "output_mode",
    type=click.Choice(["labels", "logits"]),
    default="labels",
    show_default=True,
    help="What the data owner learns: labels only (argmax inside), or the logits.",
)
@click.option(
    "--margin-bits",
    type=click.IntRange(0, 32),
    default=None,
    help=f"Headroom bits every comparison gets over its calibrated range (default {DEFAULT_MARGIN_BITS}; "
    "each bit adds about 16 bytes per comparison key; see docs/accuracy.md).",
)
@click.option(
    "--bits",
    type=click.Choice(["range", "full"]),
    default="range",
    show_default=True,
    help="range: comparison bitwidths from range analysis plus the margin; full: every comparison as wide "
    "as the ring allows (m = 64 - shift), no input is too large, keys about 1.85x larger.",
)
@click.option(
    "--verify",
    type=click.IntRange(0),
    default=0,
    metavar="N",
    help="After compiling, run N inputs (the --calibrate set, else a fixed seed) through onnxruntime, the "
    "fixed-point interpreter and the in-process two-party run; exit 2 and write nothing if the secure run "
    "and the interpreter disagree.",
)
@click.option(
    "--weight-bound-bits",
    type=int,
    default=4,
    show_default=True,
    help="Public bound |W| < 2^B on every weight (after BatchNorm folding). It fixes the model owner's "
    "arithmetic (and so its timing) independently of the weights; a larger weight is a compile error.",
)
@click.option("--verbose", is_flag=True, help="Name every node of an unsupported op type, not only the first.")
def compile_cmd(
    model,
    out,
    frac_bits,
    batch,
    input_shape,
    calibrate,
    dump_ir,
    print_ir_after_all,
    print_ir_after,
    json_path,
    output_mode,
    margin_bits,
    bits,
    verify,
    weight_bound_bits,
    verbose,
):
    """Compile an ONNX MODEL into prog/: the passes, the cost report, and one program per party."""
    from fssc.compiler.compile import compile_model
    from fssc.compiler.frontend.onnx_import import parse_input_shapes

    shapes = parse_input_shapes(input_shape)
    compile_model(
        model,
        out,
        frac_bits,
        calibrate,
        dump_ir,
        print_ir_after,
        print_ir_after_all,
        json_path,
        output_mode=output_mode,
        margin_bits=margin_bits,
        bits=bits,
        verify=verify,
        weight_bound_bits=weight_bound_bits,
        batch=batch,
        input_shapes=shapes,
        verbose=verbose,
    )


@click.command()
@click.argument("prog", type=click.Path(exists=True))
@click.option("--port", type=int, default=0, show_default=True, help="Port on 127.0.0.1 (0: any free port).")
@click.option("--open", "open_browser", is_flag=True, help="Also open the page in a browser, if there is one.")
def view(prog, port, open_browser):
    """Serve PROG's IR dump viewer (prog/ir/index.html, from --dump-ir) on localhost until Ctrl-C."""
    from fssc.compiler.viewer.serve import serve_viewer

    def echo(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    serve_viewer(prog, port, open_browser, echo=echo)


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="demo-out", show_default=True)
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--num-classes", type=int, default=2, show_default=True)
@click.option("--weights", type=click.Path(dir_okay=False), default=None)
@click.option("--frac-bits", type=int, default=12, show_default=True)
@click.option("--keep-keys", is_flag=True, help="Keep WORKDIR/keys (removed at the end by default).")
def demo(workdir, image_size, batch, num_classes, weights, frac_bits, keep_keys):
    """The whole job on loopback: export ResNet-18, compile, certificates, deal, run both parties as two
    processes over mutual TLS, and compare the labels with onnxruntime (exit 0 only if they agree)."""
    from fssc.compiler.demo import run_demo

    ok = run_demo(
        workdir,
        image_size=image_size,
        batch=batch,
        num_classes=num_classes,
        weights=weights,
        frac_bits=frac_bits,
        keep_keys=keep_keys,
    )
    sys.exit(0 if ok else 1)


@click.group()
def bench():
    """Benchmarks that print figures."""


@bench.command("dcf")
@click.option("--keys", "n_keys", type=int, default=1 << 17, show_default=True, help="Keys per measurement.")
def bench_dcf(n_keys):
    """DCF keygen/eval throughput beside sycret, in one run."""
    from fssc.benchmarks import bench_dcf as mod

    mod.run(n_keys=n_keys)


@bench.command("accuracy")
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--batches", type=int, default=1, show_default=True, help="Batches per input scale.")
@click.option("--margins", default="2,3,4,6", show_default=True, help="--margin-bits settings to compare.")
@click.option("--full/--no-full", default=True, show_default=True, help="Also measure --bits full.")
@click.option("--two-process/--no-two-process", default=True, show_default=True, help="Time one real run each.")
@click.option("--workdir", type=click.Path(file_okay=False), default="bench-accuracy", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def bench_accuracy(image_size, batch, batches, margins, full, two_process, workdir, json_path):
    """ResNet-18 on inputs scaled x1, x2, x4, x8 for each comparison setting: accuracy against onnxruntime
    with the input guard on and off, overflowing comparisons, key bytes per image, online time."""
    import json

    from fssc.benchmarks import bench_accuracy as mod

    try:
        ks = [int(k) for k in margins.split(",")]
    except ValueError:
        raise FsscError(f"--margins {margins!r}: a comma-separated list of integers, e.g. 2,4,6") from None
    fig = mod.run(image_size, batch, batches, ks, workdir, two_process, full=full)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(fig, fh, indent=1)


@bench.command("resnet")
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default="bench-out", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write every figure here.")
@click.option(
    "--profile",
    is_flag=True,
    help="Also time every statement of the dealer and both parties (FSSC_PROFILE): tables per gate kind and "
    "per layer with wall time, share, time blocked on the peer, rounds and bytes.",
)
@click.option(
    "--rtt-ms",
    type=click.FloatRange(min=0),
    default=20.0,
    show_default=True,
    help="Run one more session through a delaying TCP proxy with this round trip (half each way) and print "
    "its online time beside the network model's estimate; 0: skip it.",
)
def bench_resnet(image_size, batch, workdir, json_path, profile, rtt_ms):
    """ResNet-18 end to end over TCP loopback: online/offline/dealer time, keys, traffic, rounds, memory,
    the online time a network model estimates at 1/10/50 ms round trip, and one proxied run."""
    import json

    from fssc.benchmarks import bench_resnet as mod

    fig = mod.run(image_size, batch, workdir, profile, rtt_ms)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(fig, fh, indent=1)


@bench.command("throughput")
@click.option("--images", type=click.IntRange(min=20), default=20, show_default=True, help="Images to label.")
@click.option("--image-size", type=int, default=64, show_default=True)
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Dealer processes.")
@click.option("--workdir", type=click.Path(file_okay=False), default="bench-throughput", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write every figure here.")
def bench_throughput(images, image_size, batch, workers, workdir, json_path):
    """Images per hour with the dealer and both parties on this machine: keys for every image dealt ahead
    (timed separately), then one two-party session labels them all over TCP loopback."""
    import json

    from fssc.benchmarks import bench_throughput as mod

    fig = mod.run(images, image_size, batch, workers, workdir)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(fig, fh, indent=1)


@bench.command("scaling")
@click.option("--sizes", default="64,128,224", show_default=True, help="Image sizes.")
@click.option("--batches", default="1,2,8", show_default=True, help="Batch sizes.")
@click.option("--workdir", type=click.Path(file_okay=False), default="bench-scaling", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write every figure here.")
def bench_scaling(sizes, batches, workdir, json_path):
    """ResNet-18's online, offline and dealer time and key bytes for each image size and batch, per batch
    and per image (a setting whose keys do not fit the disk is skipped with a line)."""
    import json

    from fssc.benchmarks import bench_scaling as mod

    fig = mod.run(mod._ints(sizes, "--sizes"), mod._ints(batches, "--batches"), workdir)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(fig, fh, indent=1)


@bench.command("session")
@click.option("--batches", type=int, default=20, show_default=True, help="Key batches used back to back.")
@click.option("--image-size", type=int, default=64, show_default=True)
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Dealer processes (`fssc deal --workers`).")
@click.option("--workdir", type=click.Path(file_okay=False), default="bench-session", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def bench_session(batches, image_size, batch, workers, workdir, json_path):
    """ResNet-18: BATCHES key batches back to back in one session over TCP loopback; each party's peak RSS
    after the first batch and after the last, seconds per batch, images per second, dealer time. The keys it
    deals are deleted."""
    import json

    from fssc.benchmarks import bench_session as mod

    if batches < 1:
        raise FsscError("--batches must be at least 1")
    fig = mod.run(batches, image_size, batch, workers, workdir)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(fig, fh, indent=1)


# name -> command, for the group's lazy loading (fssc/cli/__init__.py lists the same names)
COMMANDS: dict[str, click.Command] = {c.name: c for c in (export, ir, compile_cmd, view, demo, bench) if c.name}
