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
import time

from fssc.runtime.data_owner import add_timeout_args, timeouts
from fssc.runtime.session import (
    batch_deal,
    check_batches,
    check_interface,
    load_manifest,
    load_weights,
    p1_await_batch,
    p1_masked_weights,
    run_p1_batch,
    send_weights,
    unused_batches,
    use_batch,
)
from fssc.runtime.transport import Listener, server_handshake

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
    try:
        check_interface(mod, role, mod.__file__)
        if role == "party1":
            return main_party1(mod, argv)
        if role == "party0":
            return main_party0(mod, argv)
        raise FsscError(f"{role}: run the dealer with `fssc deal`")
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


def one_line(e: BaseException) -> str:
    """Any exception as one line."""
    if isinstance(e, FsscError):
        text = str(e)
    elif isinstance(e, OSError):
        text = os_error_message(e)
    elif isinstance(e, MemoryError):
        text = "out of memory"
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())


_log_lock = threading.Lock()


def _log(role: str):
    """One line per event on stdout, whole even when written from several threads."""

    def log(msg: str) -> None:
        with _log_lock:
            sys.stdout.write(f"fssc {role}: {msg}\n")
            sys.stdout.flush()

    return log


def main_party1(mod, argv) -> int:
    ap = argparse.ArgumentParser(
        prog="party1/program.py",
        description="fssc model owner (party 1): serve one data owner's session over mutual TLS. A refused "
        "client or a failed session (one line each) does not end it: it listens for the next.",
    )
    ap.add_argument("--keys", required=True, help="this party's key directory (keys/p1)")
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--certs", default="certs", help="directory with ca.pem, party1.pem, party1.key")
    add_timeout_args(ap, "a data owner to connect, each time it listens")
    ap.add_argument("--ready-file", help=argparse.SUPPRESS)  # for tests/demo: written once listening
    a = ap.parse_args(argv)
    connect_s, peer_s = timeouts(a)
    prog_dir = _prog_dir(mod)
    manifest = load_manifest(prog_dir)
    _check_manifest(mod, manifest)
    W = load_weights(os.path.join(prog_dir, "party1", "weights.bin"), mod.PROGRAM_HASH)
    w_hats: dict[str, dict] = {}  # deal -> W^ (a deal's seed masks only the weights first bound to it)

    def w_hat_for(deal: str) -> dict:
        if deal not in w_hats:
            w_hats.clear()
            w_hats[deal] = p1_masked_weights(a.keys, mod.PROGRAM_HASH, deal, mod, W)
        return w_hats[deal]

    unused = unused_batches(a.keys)
    if unused:  # the deal a data owner will use first: bound (or refused) before listening
        w_hat_for(batch_deal(a.keys, unused[0]))

    log = _log("party1")
    with Listener(a.listen, a.certs, timeout=peer_s, log=log) as listener:
        log(f"listening on {a.listen.rpartition(':')[0]}:{listener.port}")
        if a.ready_file:
            write_atomic(a.ready_file, str(listener.port))
        while True:  # until one data owner's session completes
            if not unused_batches(a.keys):
                raise FsscError(f"{a.keys}: no unused key batches left (deal more with `fssc deal --batches N`)")
            chan = listener.accept(connect_s)
            try:
                n, seconds = _serve_p1(mod, manifest, a.keys, chan, W, w_hat_for)
            except Exception as e:  # a failed session ends that client, not the model owner
                chan.abort()
                log(f"session with {chan.peer} failed: {one_line(e)}")
                continue
            log(
                f"served {n} batch(es) in {seconds:.2f} s, "
                f"sent {chan.bytes_sent / 1e6:.1f} MB, received {chan.bytes_received / 1e6:.1f} MB"
            )
            chan.close()
            return 0


def _serve_p1(mod, manifest: dict, keys_dir: str, chan, W: dict, w_hat_for) -> tuple[int, float]:
    """One data owner's session: handshake, masked weights, its batches. Returns (batches, seconds)."""
    free = set(unused_batches(keys_dir))
    hello = _hello(mod, manifest, {})

    def validate(peer):
        asked = peer.get("batches", [])
        if not isinstance(asked, list) or not all(type(b) is int for b in asked):
            return ["batches: expected a list of batch ids"]
        if not asked or len(set(asked)) != len(asked):
            return ["batches: expected at least one batch id, each once"]
        missing = [b for b in asked if b not in free]
        if missing:
            return [f"batches {missing} are not available (unused) at the model owner"]
        if not isinstance(peer.get("deal"), str):
            return ["the data owner named no deal for its keys (an older fssc?)"]
        try:
            check_batches(keys_dir, 1, asked, mod.PROGRAM_HASH, peer["deal"])
        except FsscError as e:
            return [f"model owner's keys: {e}"]
        hello["deal"] = peer["deal"]  # our answer confirms the deal
        return []

    peer = server_handshake(chan, hello, validate)
    t = time.perf_counter()
    send_weights(chan, w_hat_for(peer["deal"]))
    for b in peer["batches"]:
        # our key file is read and verified while the data owner opens its own; ours is marked used only once
        # the data owner has started the batch (marked it used)
        start = lambda b=b: p1_await_batch(chan, b)  # noqa: E731
        with use_batch(keys_dir, 1, b, mod.PROGRAM_HASH, peer["deal"], before_marking=start) as keys:
            run_p1_batch(mod, chan, keys, W)
    return len(peer["batches"]), time.perf_counter() - t


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
