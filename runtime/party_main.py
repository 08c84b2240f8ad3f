"""Command line of the party programs (``fssc run`` calls :func:`main` with the program to run).

    fssc run prog/ --party 1 --keys keys/p1 --listen 0.0.0.0:7601 --certs certs/
    fssc run prog/ --party 0 --keys keys/p0 --peer HOST:7601 --certs certs/ --images DIR

``fssc run --party 0`` runs the data owner's program as fssc regenerates it from
``prog/manifest.json`` (after comparing it with the received file); running a
program file directly (``python prog/party0/program.py ...``) still works, for
the model owner's own program and for development.

The model owner (party1) listens, serves one data owner's session and exits;
it prints nothing about results (it has none). A client it refuses (a bad
certificate, an idle connection, a refused handshake) or whose session fails
(a message that is not what the program expects at that step) is logged in one
line and the model owner keeps listening for the next. The data owner (party0) reads
its images (or ``--input x.npy``), runs one key batch per image batch, prints
the labels (and logits with ``--output logits`` when the program outputs
them) and writes ``--out FILE`` (JSON) only after a batch completes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

import numpy as np
from fssc.runtime import ring
from fssc.runtime.guard import FIXES, out_of_range, unencodable
from fssc.runtime.session import (
    batch_deal,
    check_batches,
    check_interface,
    choose_batches,
    load_manifest,
    load_weights,
    p1_masked_weights,
    recv_weights,
    run_p0_batch,
    run_p1_batch,
    send_weights,
    unused_batches,
    use_batch,
)
from fssc.runtime.transport import Listener, client_handshake, connect, server_handshake

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
        description="fssc model owner (party 1): serve one data owner's session over mutual TLS.",
    )
    ap.add_argument("--keys", required=True, help="this party's key directory (keys/p1)")
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--certs", default="certs", help="directory with ca.pem, party1.pem, party1.key")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the peer")
    ap.add_argument("--ready-file", help=argparse.SUPPRESS)  # for tests/demo: written once listening
    a = ap.parse_args(argv)
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
    with Listener(a.listen, a.certs, timeout=a.timeout, log=log) as listener:
        log(f"listening on {a.listen.rpartition(':')[0]}:{listener.port}")
        if a.ready_file:
            write_atomic(a.ready_file, str(listener.port))
        while True:  # until one data owner's session completes
            if not unused_batches(a.keys):
                raise FsscError(f"{a.keys}: no unused key batches left (deal more with `fssc deal --batches N`)")
            chan = listener.accept(a.timeout)
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
        with use_batch(keys_dir, 1, b, mod.PROGRAM_HASH, peer["deal"]) as keys:
            run_p1_batch(mod, chan, keys, W)
    return len(peer["batches"]), time.perf_counter() - t


def main_party0(mod, argv) -> int:
    from fssc.runtime.images import Preprocess, batches, list_images, load_inputs

    ap = argparse.ArgumentParser(
        prog="party0/program.py",
        description="fssc data owner (party 0): label images "
        "with the model owner's network; only this party learns the results.",
    )
    ap.add_argument("--keys", required=True, help="this party's key directory (keys/p0)")
    ap.add_argument("--peer", required=True, metavar="HOST:PORT", help="the model owner's address")
    ap.add_argument("--certs", default="certs", help="directory with ca.pem, party0.pem, party0.key")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a folder of images (or an ImageFolder tree)")
    src.add_argument("--input", help="a .npy array [N,C,H,W] of preprocessed inputs")
    ap.add_argument(
        "--output",
        choices=("labels", "logits"),
        default=None,
        help="what to print (logits only if the program outputs them)",
    )
    ap.add_argument("--out", help="write results as JSON here (after each completed batch)")
    ap.add_argument(
        "--allow-out-of-range",
        action="store_true",
        help="run inputs outside the range the program was compiled for (results may be wrong; a warning)",
    )
    ap.add_argument("--timeout", type=float, default=600.0)
    a = ap.parse_args(argv)
    prog_dir = _prog_dir(mod)
    manifest = load_manifest(prog_dir)
    _check_manifest(mod, manifest)
    if len(manifest["inputs"]) != 1:
        listed = ", ".join(i["name"] for i in manifest["inputs"])
        raise FsscError(
            f"this program has {len(manifest['inputs'])} inputs ({listed}); the data owner's command line feeds "
            f"one (--images or --input): run programs with several inputs through their online(P, X, Z0) function"
        )
    inp = manifest["inputs"][0]
    shape = inp["shape"]
    kinds = {o["kind"] for o in manifest["outputs"]}
    want = a.output or ("logits" if "logits" in kinds else "labels")
    if want == "logits" and "logits" not in kinds:
        raise FsscError(
            "--output logits: this program was compiled to output labels only "
            "(recompile with `fssc compile --output-mode logits`)"
        )
    pre = Preprocess(
        **{k: v for k, v in manifest.get("preprocess", {}).items() if k in ("size", "resize", "mean", "std")}
    )
    path = a.images or a.input
    x = load_inputs(path, pre, tuple(shape[1:]))
    names = list_images(a.images) if a.images else [f"{a.input}[{i}]" for i in range(len(x))]
    broken = unencodable(x, inp["scale"], names)
    if broken:
        raise FsscError(f"input %{inp['name']}: {broken}")
    problem = out_of_range(manifest, inp["name"], ring.encode(x, inp["scale"]), names)  # before anything is sent
    if problem and not a.allow_out_of_range:
        raise FsscError(f"{problem}; {FIXES}")
    if problem:
        print(f"fssc party0: warning: {problem}; running anyway (--allow-out-of-range)", file=sys.stderr, flush=True)
    xb = batches(x, shape[0])
    deal, use = choose_batches(a.keys, 0, len(xb), mod.PROGRAM_HASH)
    chan = connect(a.peer, a.certs, timeout=a.timeout)
    peer = client_handshake(chan, _hello(mod, manifest, {"batches": use, "deal": deal}))
    if peer.get("deal") != deal:
        chan.close()
        raise FsscError(f"handshake refused: the model owner confirmed deal {peer.get('deal')}, our keys are of {deal}")
    timings: dict = {}
    t0 = time.perf_counter()
    w_hat = recv_weights(chan, mod.LINEAR_WEIGHTS)
    timings["setup"] = time.perf_counter() - t0
    results = []
    for bi, (b, xin) in enumerate(zip(use, xb, strict=True)):
        with use_batch(a.keys, 0, b, mod.PROGRAM_HASH, deal) as keys:
            out = run_p0_batch(mod, chan, keys, w_hat, {inp["name"]: ring.encode(xin, inp["scale"])}, timings)
        n_real = min(shape[0], len(x) - bi * shape[0])
        for i in range(n_real):
            rec: dict[str, Any] = {"input": names[bi * shape[0] + i], "batch": b}
            for o in manifest["outputs"]:
                v = out[o["name"]]
                if o["kind"] == "labels":
                    rec["label"] = int(np.asarray(v).reshape(shape[0], -1)[i, 0])
                else:
                    logits = ring.decode(np.asarray(v), o["scale"]).reshape(shape[0], -1)[i]
                    rec["logits"] = [float(z) for z in logits]
                    rec.setdefault("label", int(np.argmax(logits)))
            results.append(rec)
            line = f"{rec['input']}: label {rec['label']}"
            if want == "logits" and "logits" in rec:
                line += "  logits " + " ".join(f"{z:+.4f}" for z in rec["logits"])
            print(line, flush=True)
        if a.out:
            stats = {
                "timings": timings,
                "bytes_sent": chan.bytes_sent,
                "bytes_received": chan.bytes_received,
                "rounds": chan.rounds,
                "batches_done": bi + 1,
                "batches": len(use),
            }
            results_json = json.dumps({"results": results, "program": mod.PROGRAM_HASH, "stats": stats}, indent=1)
            write_atomic(a.out, results_json, private=True)  # the data owner's results are its secret
    total = time.perf_counter() - t0
    print(
        f"fssc party0: {len(results)} input(s), {len(use)} batch(es): setup {timings['setup']:.2f} s, "
        f"offline {timings.get('offline', 0):.2f} s, online {timings.get('online', 0):.2f} s, total {total:.2f} s; "
        f"sent {chan.bytes_sent / 1e6:.1f} MB, received {chan.bytes_received / 1e6:.1f} MB, "
        f"{chan.rounds} rounds",
        flush=True,
    )
    chan.close()
    return 0
