"""The commands of the data owner, the model owner and the dealer: ``fssc run`` (a party's program),
``fssc serve`` (the model owner's service),
``fssc check`` (is a received program the one the manifest describes?), ``fssc deal`` (the dealer),
``fssc certs`` (the parties' TLS certificates) and ``fssc keys status`` (what a key folder holds).

They run where only the runtime is installed (``pip install fssc``, no ``[compiler]`` extra): this module
imports nothing of the IR, the passes, torch or onnx; ``run``, ``check`` and ``deal`` use the code generator
(:mod:`fssc.compiler.backend.trust`, which needs jinja2 and the runtime only) to regenerate the data owner's
and the dealer's programs from the manifest, so neither ever runs code the model owner wrote
(tests/test_layering.py checks the imports).
"""

from __future__ import annotations

import json

import click

from fssc.errors import FsscError, printable

PROG = click.argument("prog", type=click.Path(file_okay=False, exists=True))
SKIP_CHECK = click.option(
    "--skip-check",
    is_flag=True,
    help="Development only: run the received program file as it is, unchecked (it may do anything).",
)


def _program(prog: str, role: str, skip_check: bool):
    """The program to run for ``role``: the data owner's and the dealer's regenerated from the manifest and
    compared with the received file (which is never imported), unless --skip-check."""
    from fssc.compiler.backend.trust import checked_program

    _warn_unchecked(prog, role, skip_check)
    return checked_program(prog, role, skip_check)


def _warn_unchecked(prog: str, role: str, skip_check: bool) -> None:
    from fssc.compiler.backend.trust import CHECKED_ROLES

    if skip_check and role in CHECKED_ROLES:
        click.echo(f"fssc: warning: --skip-check: running {prog}/{role}/program.py as received, unchecked", err=True)


@click.command()
@PROG
@click.option("--party", required=True, help="0 (the data owner) or dealer.")
def check(prog, party):
    """Is PROG's program for a party the one fssc generates from PROG/manifest.json?

    Regenerates the data owner's (--party 0) or the dealer's (--party dealer) program from the manifest's
    public IR with this installation's fssc and compares it byte for byte with the received one; a difference
    is refused with one line naming the first differing statement (exit code 2). Nothing is run. `fssc run`
    and `fssc deal` make the same check and then run their own regenerated copy."""
    from fssc.compiler.backend.trust import check as check_program
    from fssc.compiler.backend.trust import role_name

    c = check_program(prog, role_name(party))
    click.echo(
        f"ok: {c.path} is the program fssc generates from {prog}/manifest.json "
        f"(program {c.program_hash}, {c.statements} statements)"
    )
    if c.role == "party0":  # what acts on the images before anything is sent, chosen by the model owner too
        click.echo(f"inputs: {printable(json.dumps(c.manifest['inputs']))}")
        click.echo(f"preprocessing: {printable(json.dumps(c.manifest.get('preprocess', {})))}")
        click.echo(f"input guard: {printable(json.dumps(c.manifest.get('input_guard', {})))}")


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@PROG
@click.option("--party", required=True, type=click.Choice(["0", "1"]), help="0: the data owner; 1: the model owner.")
@SKIP_CHECK
@click.argument("party_args", nargs=-1, type=click.UNPROCESSED)
def run(prog, party, skip_check, party_args):
    """Run a party's program of PROG: the data owner's (--party 0) or the model owner's (--party 1).

    The data owner's program is regenerated from PROG/manifest.json and compared with the received
    PROG/party0/program.py first (as `fssc check` does); the regenerated copy runs, the received file is never
    imported. The model owner runs its own program as it is. The party's options follow (`--keys`, `--peer`
    or `--listen`, `--certs`, `--images`, ...; list them with `fssc run PROG --party 0 -- --help`)."""
    import sys

    from fssc.compiler.backend.trust import role_name
    from fssc.runtime.party_main import main as party_main

    role = role_name(party)
    mod = _program(prog, role, skip_check)
    sys.exit(party_main(role, mod, list(party_args)))


@click.command()
@PROG
@click.option(
    "--keys",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    help="The model owner's key folder (KEYS/p1).",
)
@click.option("--listen", required=True, metavar="HOST:PORT", help="Where to accept data owners (port 0: any free).")
@click.option(
    "--certs",
    default="certs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory with ca.pem, party1.pem, party1.key.",
)
@click.option(
    "--max-sessions",
    type=int,
    default=2,
    show_default=True,
    help="Sessions served at once, one worker thread each; a data owner arriving when all are busy is refused "
    "at the handshake with a line saying so (nothing of its keys is used: it may retry).",
)
@click.option(
    "--connect-timeout",
    type=float,
    default=None,
    metavar="S",
    help="Stop (exit 0, as on SIGTERM) after S seconds with no session running and no data owner arriving "
    "[default: serve until stopped].",
)
@click.option(
    "--peer-timeout",
    type=float,
    default=None,
    metavar="S",
    help="Seconds a data owner may stay silent mid-session before its session fails [default: 30].",
)
@click.option("--ready-file", hidden=True)  # tests: written with the port once listening
def serve(prog, keys, listen, certs, max_sessions, connect_timeout, peer_timeout, ready_file):
    """The model owner's service: serve data owners' sessions of PROG until stopped.

    Runs the model owner's own program (PROG/party1, as `fssc run PROG --party 1` does) for sessions one
    after another and several at once (--max-sessions), each on its own key batches of KEYS (reserved at its
    handshake: two sessions never share a batch). A data owner that disconnects or dies costs only its
    session (the batches it started stay used); a client that fails authentication or sends garbage is
    logged and dropped. Without unused batches it refuses new sessions with a line saying so, and serves
    again once more are dealt into KEYS. One log line per session on stdout (peer, batches, seconds, bytes,
    ok or failed: reason). SIGTERM or Ctrl-C: no new sessions, running ones finish, a summary line, exit 0
    (a second signal aborts the running sessions)."""
    import sys

    from fssc.runtime.party_main import guarded, serve_party1
    from fssc.runtime.session import load_program
    from fssc.runtime.transport import PEER_TIMEOUT

    def body() -> int:
        for flag, v in (("--connect-timeout", connect_timeout), ("--peer-timeout", peer_timeout)):
            if v is not None and not v > 0:
                raise FsscError(f"{flag} {v:g}: expected a positive number of seconds")
        if max_sessions < 1:
            raise FsscError(f"--max-sessions {max_sessions}: expected at least 1")
        mod = load_program(prog, "party1")
        peer_s = PEER_TIMEOUT if peer_timeout is None else peer_timeout
        return serve_party1(mod, keys, listen, certs, connect_timeout, peer_s, ready_file, max_sessions)

    sys.exit(guarded("party1", body))


@click.command()
@PROG
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
    type=click.Path(file_okay=False),
    help="Key directory: writes OUT/p0 (for the data owner) and OUT/p1 (for the model owner), but for the "
    "parties streamed with --to. With --cluster, a path every worker sees (a shared file system).",
)
@click.option(
    "--to",
    "to",
    multiple=True,
    metavar="PARTY=HOST:PORT",
    help="Stream party PARTY's keys (0 or 1) over mutual TLS to its key receiver (`fssc keys receive`) "
    "instead of writing them to OUT/pPARTY; repeat for the other party. Needs --certs.",
)
@click.option(
    "--certs",
    type=click.Path(file_okay=False),
    help="With --to: folder with ca.pem, dealer.pem, dealer.key (`fssc certs`); with --cluster, at that path "
    "on every worker.",
)
@click.option(
    "--cluster",
    metavar="ADDRESS",
    help="Run the batch jobs on the Dask distributed scheduler at ADDRESS (tcp://HOST:PORT, or tls:// with "
    "Dask's TLS configuration) instead of local processes: as many at a time as its workers have threads. "
    "Needs `pip install 'fssc[cluster]'` here and on the workers; see docs/scaling.md.",
)
@click.option(
    "--connect-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds to wait for a key receiver (--to) or the Dask scheduler (--cluster) to answer.",
)
@SKIP_CHECK
def deal(prog, batches, workers, out, to, certs, cluster, connect_timeout, skip_check):
    """The dealer: make one-time FSS key batches for a compiled program.

    Each run is a new deal (a random deal id and a fresh setup seed for the weight masks). PROG needs only
    manifest.json and dealer/: the dealer never opens the model owner's weights (party1/). The dealer's
    program is regenerated from the manifest and compared with PROG/dealer/program.py (as `fssc check --party
    dealer` does); the regenerated copy runs, never the received file.

    Each party's keys go to OUT/p0 and OUT/p1, or with --to straight to that party's key receiver over
    mutual TLS (the same files, checked there and filed only once complete). --workers N deals N batches at a
    time in local processes, --cluster ADDRESS on a Dask cluster's workers."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fssc.compiler.backend import trust
    from fssc.runtime.keystream import parse_target

    if batches < 1:
        raise FsscError("--batches must be at least 1")
    if connect_timeout <= 0:
        raise FsscError(f"--connect-timeout {connect_timeout:g}: expected a positive number of seconds")
    targets: dict[int, str] = {}
    for spec in to:
        party, addr = parse_target(spec)
        if party in targets:
            raise FsscError(f"--to {spec}: party {party} is streamed to {targets[party]} already")
        targets[party] = addr
    if out is None and len(targets) < 2:
        left = " and ".join(f"party {p}" for p in (0, 1) if p not in targets)
        raise FsscError(f"-o DIR is needed: {left}'s keys are not streamed with --to")
    if targets and not certs:
        raise FsscError("--to needs --certs: a folder with ca.pem, dealer.pem and dealer.key (`fssc certs`)")
    if cluster is not None and workers != 1:
        raise FsscError("--workers is for local processes; with --cluster the cluster's worker threads deal")
    _warn_unchecked(prog, "dealer", skip_check)
    with Progress(
        TextColumn("dealing"), BarColumn(), TextColumn("{task.completed}/{task.total} batches"), TimeElapsedColumn()
    ) as bar:
        task = bar.add_task("deal", total=batches)
        progress = lambda i, n, dt: bar.update(task, completed=i)  # noqa: E731
        warn = lambda line: click.echo(f"fssc: warning: {printable(line)}", err=True)  # noqa: E731
        done = trust.deal(
            prog, out, batches, progress, workers, skip_check, targets, certs, cluster, connect_timeout, warn
        )
    for b, n0, n1, dt in done:
        click.echo(f"batch {b}: {n0 / 1e6:,.1f} MB for party 0, {n1 / 1e6:,.1f} MB for party 1 ({dt:.1f} s)")
    if not targets:
        click.echo(
            f"wrote {out}/p0 and {out}/p1 (give each party its own folder, nothing else; the dealer keeps no state)"
        )
        return
    sent = [f"streamed party {p}'s keys to {a}" for p, a in sorted(targets.items())]
    wrote = [f"wrote {out}/p{p} (give it to party {p}, nothing else)" for p in (0, 1) if p not in targets]
    click.echo("; ".join(sent + wrote) + " (the dealer keeps no state)")


@click.command()
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False))
@click.option("--days", type=int, default=365, show_default=True)
def certs(out, days):
    """Make a CA and TLS certificates for party 0, party 1 and the dealer (mutual TLS).

    The parties' certificates authenticate their session; the dealer's lets it stream a party's keys to that
    party's key receiver (`fssc deal --to`, `fssc keys receive`), which accepts no other client."""
    from fssc.runtime.certs import make_certs

    for p in make_certs(out, days):
        click.echo(f"wrote {p}")
    click.echo(
        "give party 0: ca.pem, party0.pem, party0.key; party 1: ca.pem, party1.pem, party1.key; "
        "the dealer (fssc deal --to): ca.pem, dealer.pem, dealer.key"
    )


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
                used += f" (key file still on disk: a session died mid-batch or could not delete it: {_ids(left)})"
            click.echo(f"    used batches:   {used}")
            click.echo(f"    setup files:    {', '.join(d['setup']) or 'none'}")


@keys.command("receive")
@PROG
@click.option("--listen", required=True, metavar="HOST:PORT", help="Where the dealer connects (port 0: any free one).")
@click.option(
    "--certs",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    help="Folder with ca.pem and this party's partyN.pem and partyN.key (`fssc certs`).",
)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="This party's key folder (KEYS/p0 or KEYS/p1), as `fssc run --keys` reads it.",
)
@click.option(
    "--party",
    type=click.Choice(["0", "1"]),
    help="0: the data owner, 1: the model owner (default: the party whose certificate is in --certs, if one).",
)
@click.option("--deals", type=int, help="Stop once this many deals have ended (default: run until interrupted).")
@click.option(
    "--connect-timeout",
    type=float,
    help="Give up (exit 2) when no dealer has been connected for this many seconds (default: wait on).",
)
@click.option(
    "--peer-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds a connected dealer may stay silent (it sends heartbeats while it computes).",
)
@click.option("--ready-file", type=click.Path(dir_okay=False), help="Write the port listened on here once listening.")
def keys_receive_command(prog, listen, certs, out, party, deals, connect_timeout, peer_timeout, ready_file):
    """A party's key receiver: the dealer streams this party's key batches here (`fssc deal --to`).

    Accepts only the dealer's certificate (fssc-dealer, from the CA in --certs) and only keys of PROG's program
    for this party. Each file is checked as `fssc run` checks a key file (program hash, party, batch id, deal,
    checksum) and filed in OUT under the name, mode and folder mode `fssc deal -o` gives it, only once the
    dealer has completed the batch for both parties; a batch id OUT already holds (used or not) is refused,
    and a cut or refused stream leaves no file. One line per file received and per refusal."""
    import signal

    from fssc.files import write_atomic
    from fssc.runtime.keystream import KeyReceiver
    from fssc.runtime.session import load_manifest

    for name, v in (("--connect-timeout", connect_timeout), ("--peer-timeout", peer_timeout)):
        if v is not None and v <= 0:
            raise FsscError(f"{name} {v:g}: expected a positive number of seconds")
    if deals is not None and deals < 1:
        raise FsscError("--deals must be at least 1")
    if party is None:
        import os

        have = [p for p in (0, 1) if os.path.exists(os.path.join(certs, f"party{p}.pem"))]
        if len(have) != 1:
            raise FsscError(f"{certs} holds the certificates of {len(have)} parties: say which one receives (--party)")
        party = have[0]
    program = load_manifest(prog)["program_hash"]
    log = lambda msg: click.echo(f"fssc keys receive: {printable(msg)}", err=True)  # noqa: E731

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with KeyReceiver(listen, certs, int(party), out, program, peer_timeout, log) as rx:
        log(f"party {party}'s key receiver for program {program[:12]} listening on port {rx.port}, filing into {out}")
        if ready_file:
            write_atomic(ready_file, str(rx.port))
        try:
            rx.serve(deals, connect_timeout)
        except KeyboardInterrupt:
            log("stopped (nothing uncommitted is kept)")
    log(f"{rx.files} file(s), {rx.bytes / 1e6:,.1f} MB received")


def _ids(ids: list[int]) -> str:
    return ", ".join(str(b) for b in ids) or "none"
