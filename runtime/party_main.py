"""Command line of the party programs (``fssc run`` calls :func:`main` with the program to run).

    fssc run prog/ --party 1 --keys keys/p1 --listen 0.0.0.0:7601 --certs certs/
    fssc run prog/ --party 0 --keys keys/p0 --peer HOST:7601 --certs certs/ --images DIR --out labels.jsonl

``fssc run --party 0`` runs the data owner's program as fssc regenerates it from
``prog/manifest.json`` (after comparing it with the received file); running a
program file directly (``python prog/party0/program.py ...``) still works, for
the model owner's own program and for development.

The model owner (party1) listens, serves one data owner's session and exits;
it prints nothing about results (it has none). A client it refuses (a bad
certificate, an idle connection, a refused handshake) or whose session fails
(a message that is not what the program expects at that step, a peer that
closed or fell silent) is logged in one line and the model owner keeps
listening for the next, for up to ``--connect-timeout`` seconds each time.
``fssc serve`` (:func:`serve_party1` with ``max_sessions``) serves sessions
until stopped, several at once; both run the sessions of
:mod:`fssc.runtime.serve`.
The data owner (party0, :mod:`fssc.runtime.data_owner`) reads its images (or
``--input x.npy``), runs one key batch per image batch, prints the labels
(and logits with ``--output logits`` when the program outputs them) and
appends them to ``--out FILE`` (JSON lines) after each completed batch;
``--resume`` finishes a set an interrupted run left. Both take
``--connect-timeout`` (waiting for the peer to connect or listen) and
``--peer-timeout`` (a peer silent mid-session).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable

from fssc.runtime import dcf
from fssc.runtime.data_owner import add_timeout_args, timeouts
from fssc.runtime.heap import keep_freed_memory
from fssc.runtime.serve import Service, one_line
from fssc.runtime.session import check_interface, dcf_walk, load_manifest, load_weights, unused_batches
from fssc.runtime.transport import Listener

from fssc.errors import FsscError, os_error_message, printable
from fssc.files import write_atomic


def _prog_dir(mod) -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__)))


def _hello(mod, manifest: dict, extra: dict) -> dict:
    return {
        "protocol": manifest["protocol"],
        "program": mod.PROGRAM_HASH,
        "role": mod.ROLE,
        "fssc": manifest["fssc_version"],
        **extra,
    }


def _check_manifest(mod, manifest: dict) -> None:
    if manifest["program_hash"] != mod.PROGRAM_HASH:
        raise FsscError(
            f"{mod.__file__}: program hash {mod.PROGRAM_HASH} does not match manifest.json "
            f"({manifest['program_hash']}); recompile"
        )


def main(role: str, mod, argv: list[str]) -> int:
    keep_freed_memory()  # also for a party process started without the CLI (the benchmarks' children)

    def body() -> int:
        check_interface(mod, role, mod.__file__)
        if role == "party1":
            return main_party1(mod, argv)
        if role == "party0":
            return main_party0(mod, argv)
        raise FsscError(f"{role}: run the dealer with `fssc deal`")

    return guarded(role, body)


def guarded(role: str, body: Callable[[], int]) -> int:
    """``body()``'s exit code, every error one line on stderr: 2 for a user's error (FsscError, OSError), 130
    when interrupted, 1 for anything else (a bug or an exhausted machine)."""
    try:
        return body()
    except FsscError as e:
        if os.environ.get("FSSC_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"fssc {role}: error: {printable(str(e))}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # e.g. the listen port is in use, a certificate file is unreadable
        print(f"fssc {role}: error: {os_error_message(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"fssc {role}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an exhausted machine: one line, not a traceback
        if os.environ.get("FSSC_DEBUG"):
            import traceback

            traceback.print_exc()
        print(
            f"fssc {role}: error: internal error: {one_line(e)} (FSSC_DEBUG=1 shows where)", file=sys.stderr, flush=True
        )
        return 1


_log_lock = threading.Lock()


def _log(role: str):
    """One line per event on stdout, whole even when written from several threads."""

    def log(msg: str) -> None:
        with _log_lock:
            sys.stdout.write(f"fssc {role}: {msg}\n")
            sys.stdout.flush()

    return log


def main_party1(mod, argv) -> int:
    """The one-shot model owner: serves one data owner's session and exits (``fssc run PROG --party 1``)."""
    ap = argparse.ArgumentParser(
        prog="party1/program.py",
        description="fssc model owner (party 1): serve one data owner's session over mutual TLS. A refused "
        "client or a failed session (one line each) does not end it: it listens for the next. "
        "`fssc serve` serves sessions until stopped.",
    )
    ap.add_argument("--keys", required=True, help="this party's key directory (keys/p1)")
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--certs", default="certs", help="directory with ca.pem, party1.pem, party1.key")
    add_timeout_args(ap, "a data owner to connect, each time it listens")
    ap.add_argument("--ready-file", help=argparse.SUPPRESS)  # for tests/demo: written once listening
    a = ap.parse_args(argv)
    connect_s, peer_s = timeouts(a)
    return serve_party1(mod, a.keys, a.listen, a.certs, connect_s, peer_s, a.ready_file, max_sessions=None)


def serve_party1(
    mod,
    keys: str,
    listen: str,
    certs: str,
    connect_s: float | None,
    peer_s: float,
    ready_file: str | None = None,
    max_sessions: int | None = None,
) -> int:
    """The model owner's sessions (:class:`fssc.runtime.serve.Service`): one-shot with ``max_sessions`` None
    (until one session completes, each wait for a data owner bounded by ``connect_s``), else as a service,
    ``max_sessions`` at once until a signal (or ``connect_s`` without a data owner) stops it."""
    prog_dir = _prog_dir(mod)
    manifest = load_manifest(prog_dir)
    _check_manifest(mod, manifest)
    W = load_weights(os.path.join(prog_dir, "party1", "weights.bin"), mod.PROGRAM_HASH)
    log = _log("party1")
    service = Service(mod, _hello(mod, manifest, {}), keys, W, log, max_sessions or 1)
    dcf.set_walk(dcf_walk(manifest, "party1", len(unused_batches(keys))), dcf.explicit_walk(), log)  # before listening
    service.prepare()  # the deal a data owner will use first: bound (or refused) before listening
    with Listener(listen, certs, timeout=peer_s, log=log) as listener:
        log(f"listening on {listen.rpartition(':')[0]}:{listener.port}")
        if ready_file:
            write_atomic(ready_file, str(listener.port))
        return service.serve(listener, connect_s, once=max_sessions is None)


def main_party0(mod, argv) -> int:
    from fssc.runtime.data_owner import label, party0_parser

    a = party0_parser().parse_args(argv)
    manifest = load_manifest(_prog_dir(mod))
    _check_manifest(mod, manifest)
    if len(manifest["inputs"]) != 1:
        listed = ", ".join(i["name"] for i in manifest["inputs"])
        raise FsscError(
            f"this program has {len(manifest['inputs'])} inputs ({listed}); the data owner's command line feeds "
            f"one (--images or --input): run programs with several inputs through their online(P, X, Z0) function"
        )
    return label(mod, manifest, a, lambda extra: _hello(mod, manifest, extra))
