"""The ``fssc`` command line.

Every user error is an :class:`FsscError`: one line on stderr naming the
problem, exit code 2, no traceback, and no partial output that looks
complete (files are written to a temporary name and renamed when done).
"""

from __future__ import annotations

import sys

import click

from fssc import __version__
from fssc.errors import FsscError, os_error_message
from fssc.passes.base import DEFAULT_MARGIN_BITS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fssc")
def cli():
    """fssc: compile ONNX graphs into secure two-party inference programs (FSS)."""


@cli.command()
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
@click.option("--opset", type=int, default=17, show_default=True)
def export(model, out, num_classes, weights, image_size, batch, opset):
    """Export a torchvision classifier MODEL (e.g. resnet18) to ONNX, keeping BatchNorm nodes."""
    from fssc.models.export import export_model

    info = export_model(model, out, num_classes, weights, image_size, batch, opset)
    click.echo(
        f"wrote {info.path}: {info.model}, {info.num_classes} classes, input [{info.batch},3,"
        f"{info.image_size},{info.image_size}], opset {info.opset}, {info.nodes} nodes "
        f"({info.batchnorms} BatchNormalization), weights: {info.weights}"
    )


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
def ir(model):
    """Import an ONNX MODEL and print fssc's IR (deterministic text form)."""
    from fssc.compiler.frontend.onnx_import import import_onnx

    click.echo(import_onnx(model).text(), nl=False)


@cli.command("compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Program directory.")
@click.option("--frac-bits", type=int, default=12, show_default=True, help="Fixed-point fractional bits f.")
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
def compile_cmd(
    model,
    out,
    frac_bits,
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
):
    """Compile an ONNX MODEL into prog/: the passes, the cost report, and one program per party."""
    from fssc.compiler.compile import compile_model

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
    )


@cli.command()
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


@cli.command()
@click.argument("prog", type=click.Path(file_okay=False, exists=True))
@click.option("--batches", type=int, default=1, show_default=True, help="Key batches to make (one per inference).")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Key directory: writes OUT/p0 (for the data owner) and OUT/p1 (for the model owner).",
)
def deal(prog, batches, out):
    """The dealer: make one-time FSS key batches for a compiled program.

    Each run is a new deal (a random deal id and a fresh setup seed for the weight masks). PROG needs only
    manifest.json and dealer/: the dealer never opens the model owner's weights (party1/)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fssc.runtime.session import deal_batches

    if batches < 1:
        raise FsscError("--batches must be at least 1")
    with Progress(
        TextColumn("dealing"), BarColumn(), TextColumn("{task.completed}/{task.total} batches"), TimeElapsedColumn()
    ) as bar:
        task = bar.add_task("deal", total=batches)
        done = deal_batches(prog, out, batches, lambda i, n, dt: bar.update(task, completed=i))
    for b, n0, n1, dt in done:
        click.echo(f"batch {b}: {n0 / 1e6:,.1f} MB for party 0, {n1 / 1e6:,.1f} MB for party 1 ({dt:.1f} s)")
    click.echo(f"wrote {out}/p0 and {out}/p1 (give each party its own folder, nothing else; the dealer keeps no state)")


@cli.command()
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False))
@click.option("--days", type=int, default=365, show_default=True)
def certs(out, days):
    """Make a CA and TLS certificates for party 0 and party 1 (mutual TLS)."""
    from fssc.runtime.certs import make_certs

    for p in make_certs(out, days):
        click.echo(f"wrote {p}")
    click.echo("give party 0: ca.pem, party0.pem, party0.key; party 1: ca.pem, party1.pem, party1.key")


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="demo-out", show_default=True)
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--num-classes", type=int, default=2, show_default=True)
@click.option("--weights", type=click.Path(dir_okay=False), default=None)
@click.option("--frac-bits", type=int, default=12, show_default=True)
def demo(workdir, image_size, batch, num_classes, weights, frac_bits):
    """The whole job on loopback: export ResNet-18, compile, certificates, deal, run both parties as two
    processes over mutual TLS, and compare the labels with onnxruntime (exit 0 only if they agree)."""
    from fssc.compiler.demo import run_demo

    ok = run_demo(
        workdir, image_size=image_size, batch=batch, num_classes=num_classes, weights=weights, frac_bits=frac_bits
    )
    sys.exit(0 if ok else 1)


@cli.group()
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
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def bench_resnet(image_size, batch, workdir, json_path):
    """ResNet-18 end to end over TCP loopback: online/offline/dealer time, keys, traffic, rounds, memory."""
    import json

    from fssc.benchmarks import bench_resnet as mod

    fig = mod.run(image_size, batch, workdir)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(fig, fh, indent=1)


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="fssc", standalone_mode=False)
    except FsscError as e:
        click.echo(f"fssc: error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # a path that cannot be written, a port in use, ...
        click.echo(f"fssc: error: {os_error_message(e)}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("fssc: aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as e:  # bare `fssc`: the help text
        click.echo(e.format_message(), err=True)
        sys.exit(2)
    except click.UsageError as e:  # bad arguments: one line too, with where to look
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"fssc: error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"fssc: error: {e.format_message()}", err=True)
        sys.exit(2)
    except SystemExit:
        raise
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
