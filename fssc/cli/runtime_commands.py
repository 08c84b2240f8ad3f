"""The runtime's commands: ``fssc deal`` (the dealer), ``fssc certs`` (the parties' TLS certificates) and
``fssc keys status`` (what a key folder holds).

They run on the dealer's and the parties' machines, where only the runtime is
installed (``pip install fssc``, no ``[compiler]`` extra): this module imports
nothing of the compiler, the passes, torch or onnx (tests/test_layering.py
checks). The party programs themselves start from fssc/runtime/party_main.py.
"""

from __future__ import annotations

import click

from fssc.errors import FsscError


@click.command()
@click.argument("prog", type=click.Path(file_okay=False, exists=True))
@click.option("--batches", type=int, default=1, show_default=True, help="Key batches to make (one per inference).")
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Processes dealing batches in parallel, one batch each at a time (each needs the memory of one).",
)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Key directory: writes OUT/p0 (for the data owner) and OUT/p1 (for the model owner).",
)
def deal(prog, batches, workers, out):
    """The dealer: make one-time FSS key batches for a compiled program.

    Each run is a new deal (a random deal id and a fresh setup seed for the weight masks). PROG needs only
    manifest.json and dealer/: the dealer never opens the model owner's weights (party1/)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fssc.runtime.session import deal_batches

    if batches < 1:
        raise FsscError("--batches must be at least 1")
    if workers < 1:
        raise FsscError("--workers must be at least 1")
    with Progress(
        TextColumn("dealing"), BarColumn(), TextColumn("{task.completed}/{task.total} batches"), TimeElapsedColumn()
    ) as bar:
        task = bar.add_task("deal", total=batches)
        done = deal_batches(prog, out, batches, lambda i, n, dt: bar.update(task, completed=i), workers)
    for b, n0, n1, dt in done:
        click.echo(f"batch {b}: {n0 / 1e6:,.1f} MB for party 0, {n1 / 1e6:,.1f} MB for party 1 ({dt:.1f} s)")
    click.echo(f"wrote {out}/p0 and {out}/p1 (give each party its own folder, nothing else; the dealer keeps no state)")


@click.command()
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False))
@click.option("--days", type=int, default=365, show_default=True)
def certs(out, days):
    """Make a CA and TLS certificates for party 0 and party 1 (mutual TLS)."""
    from fssc.runtime.certs import make_certs

    for p in make_certs(out, days):
        click.echo(f"wrote {p}")
    click.echo("give party 0: ca.pem, party0.pem, party0.key; party 1: ca.pem, party1.pem, party1.key")


@click.group()
def keys():
    """Key folders as a resource: what `fssc deal` made and what sessions used."""


@keys.command("status")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout, for scripts.")
def keys_status_command(directory, as_json):
    """Per party folder of DIRECTORY (as `fssc deal -o` writes it): programs, and per deal the unused and
    used batches, bytes on disk and setup files. Reads file names and key headers only."""
    import json

    from fssc.runtime.session import keys_status

    folders = keys_status(directory)
    if as_json:
        click.echo(json.dumps({"folders": folders}, indent=2))
        return
    for f in folders:
        party = ", ".join(str(p) for p in f["party"]) or "?"
        click.echo(f"{f['path']}: party {party}, {f['bytes'] / 1e6:,.1f} MB, program {', '.join(f['programs']) or '?'}")
        for d in f["deals"]:
            left = [b for b in d["used"] if b in d["used_with_key_file"]]
            click.echo(f"  deal {d['deal']}: {d['bytes'] / 1e6:,.1f} MB")
            click.echo(f"    unused batches: {_ids(d['unused'])}")
            used = _ids(d["used"])
            if left:
                used += f" (key file still on disk, a session died mid-batch: {_ids(left)})"
            click.echo(f"    used batches:   {used}")
            click.echo(f"    setup files:    {', '.join(d['setup']) or 'none'}")


def _ids(ids: list[int]) -> str:
    return ", ".join(str(b) for b in ids) or "none"
