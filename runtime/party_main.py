"""Command line of the generated party programs.

    python prog/party1/program.py --keys keys/p1 --listen 0.0.0.0:7601 --certs certs/
    python prog/party0/program.py --keys keys/p0 --peer HOST:7601 --certs certs/ --images DIR

The model owner (party1) listens, serves one data owner's session and exits;
it prints nothing about results (it has none). The data owner (party0) reads
its images (or ``--input x.npy``), runs one key batch per image batch, prints
the labels (and logits with ``--output logits`` when the program outputs
them) and writes ``--out FILE`` (JSON) only after a batch completes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from fssc.compiler.errors import FsscError, os_error_message
from fssc.compiler.files import write_atomic

from . import ring
from .guard import FIXES, out_of_range
from .session import (
    check_batches,
    load_manifest,
    load_weights,
    masked_weights,
    open_batch,
    read_setup,
    recv_weights,
    run_p0_batch,
    run_p1_batch,
    send_weights,
    unused_batches,
)
from .transport import client_handshake, connect, listen, server_handshake


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
        if role == "party1":
            return main_party1(mod, argv)
        if role == "party0":
            return main_party0(mod, argv)
        raise FsscError(f"{role}: run the dealer with `fssc deal`")
    except FsscError as e:
        if os.environ.get("FSSC_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"fssc {role}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # e.g. the listen port is in use, a certificate file is unreadable
        print(f"fssc {role}: error: {os_error_message(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"fssc {role}: interrupted", file=sys.stderr)
        return 130


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
    seed = read_setup(a.keys, mod.PROGRAM_HASH)
    w_hat = masked_weights(mod, W, seed)

    def ready(port):
        print(f"fssc party1: listening on {a.listen.rpartition(':')[0]}:{port}", flush=True)
        if a.ready_file:
            write_atomic(a.ready_file, str(port))

    chan = listen(a.listen, a.certs, timeout=a.timeout, accept_timeout=a.timeout, on_ready=ready)
    free = set(unused_batches(a.keys))

    def validate(peer):
        missing = [b for b in peer.get("batches", []) if b not in free]
        if missing:
            return [f"batches {missing} are not available (unused) at the model owner"]
        try:
            check_batches(a.keys, 1, peer.get("batches", []), mod.PROGRAM_HASH)
        except FsscError as e:
            return [f"model owner's keys: {e}"]
        return []

    peer = server_handshake(chan, _hello(mod, manifest, {}), validate)
    t = time.perf_counter()
    send_weights(chan, w_hat)
    for b in peer["batches"]:
        keys = open_batch(a.keys, 1, b, mod.PROGRAM_HASH)
        run_p1_batch(mod, chan, keys, W)
        keys.close()
    print(
        f"fssc party1: served {len(peer['batches'])} batch(es) in {time.perf_counter() - t:.2f} s, "
        f"sent {chan.bytes_sent / 1e6:.1f} MB, received {chan.bytes_received / 1e6:.1f} MB",
        flush=True,
    )
    chan.close()
    return 0


def main_party0(mod, argv) -> int:
    from .images import Preprocess, batches, list_images, load_inputs

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
    problem = out_of_range(manifest, inp["name"], ring.encode(x, inp["scale"]), names)  # before anything is sent
    if problem and not a.allow_out_of_range:
        raise FsscError(f"{problem}; {FIXES}")
    if problem:
        print(f"fssc party0: warning: {problem}; running anyway (--allow-out-of-range)", file=sys.stderr, flush=True)
    xb = batches(x, shape[0])
    free = unused_batches(a.keys)
    if len(free) < len(xb):
        raise FsscError(
            f"{len(xb)} batch(es) of {shape[0]} images need {len(xb)} unused key batches; "
            f"{a.keys} has {len(free)} (deal more with `fssc deal --batches N`)"
        )
    use = free[: len(xb)]
    check_batches(a.keys, 0, use, mod.PROGRAM_HASH)
    chan = connect(a.peer, a.certs, timeout=a.timeout)
    client_handshake(chan, _hello(mod, manifest, {"batches": use}))
    timings: dict = {}
    t0 = time.perf_counter()
    w_hat = recv_weights(chan, mod.WEIGHT_TAGS)
    timings["setup"] = time.perf_counter() - t0
    results = []
    for bi, (b, xin) in enumerate(zip(use, xb)):
        keys = open_batch(a.keys, 0, b, mod.PROGRAM_HASH)
        out = run_p0_batch(mod, chan, keys, w_hat, ring.encode(xin, inp["scale"]), timings)
        keys.close()
        n_real = min(shape[0], len(x) - bi * shape[0])
        for i in range(n_real):
            rec = {"input": names[bi * shape[0] + i], "batch": b}
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
            write_atomic(a.out, json.dumps({"results": results, "program": mod.PROGRAM_HASH, "stats": stats}, indent=1))
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
