"""The data owner's side of the command line: label a set of inputs, one key batch per batch of inputs.

* Inputs: ``--images DIR`` (a folder or an ImageFolder tree, read a batch at a time) or ``--input x.npy``.
  Every input to label is read and checked (readable, encodable, within the compiled range) before
  anything is sent; then one session with the model owner runs one key batch per batch of inputs.
* The last batch may hold fewer inputs than the program's batch size: it is padded by repeating its last
  input, and the padding's results are dropped (the model owner cannot tell padding from an input).
* ``--out FILE`` (:mod:`fssc.runtime.results`): JSON lines, a batch's records appended and fsync'd once
  the batch completes; ``--resume`` labels only the inputs FILE lacks, with fresh key batches (a batch
  cut short by a crash stays used: keys are one-time). ``--stats FILE``: the session's figures (JSON).
* A progress bar (inputs labelled, of those to label) goes to stderr when it is a terminal; each input's
  label goes to stdout as its batch completes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fssc.runtime import dcf, ring
from fssc.runtime.guard import FIXES, out_of_range, unencodable
from fssc.runtime.results import ResultsFile
from fssc.runtime.session import (
    SessionBatches,
    choose_batches,
    dcf_walk,
    p0_start_batch,
    recv_weights,
    run_p0_batch,
)
from fssc.runtime.transport import CONNECT_TIMEOUT, PEER_TIMEOUT, client_handshake, connect

from fssc.errors import FsscError
from fssc.files import write_atomic


def add_timeout_args(ap: argparse.ArgumentParser, waiting: str) -> None:
    """The two timeouts both party programs take (``waiting``: what the connect timeout waits for)."""
    ap.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds to wait for {waiting} (default {CONNECT_TIMEOUT:g})",
    )
    ap.add_argument(
        "--peer-timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds the peer may stay silent mid-session before the session fails (default {PEER_TIMEOUT:g}; "
        "a live peer that is computing sends heartbeats)",
    )
    ap.add_argument("--timeout", type=float, default=None, help=argparse.SUPPRESS)  # older: sets both


def timeouts(a: argparse.Namespace) -> tuple[float, float]:
    """(connect timeout, silence timeout) from the parsed options."""
    connect_s = a.connect_timeout if a.connect_timeout is not None else a.timeout
    peer_s = a.peer_timeout if a.peer_timeout is not None else a.timeout
    connect_s = CONNECT_TIMEOUT if connect_s is None else connect_s
    peer_s = PEER_TIMEOUT if peer_s is None else peer_s
    for flag, v in (("--connect-timeout", connect_s), ("--peer-timeout", peer_s)):
        if not v > 0:
            raise FsscError(f"{flag} {v:g}: expected a positive number of seconds")
    return connect_s, peer_s


def party0_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="party0/program.py",
        description="fssc data owner (party 0): label images with the model owner's network; only this party "
        "learns the results. One key batch per batch of inputs (the program's batch size; a short last batch is "
        "padded and the padding's results dropped).",
    )
    ap.add_argument("--keys", required=True, help="this party's key directory (keys/p0)")
    ap.add_argument("--peer", required=True, metavar="HOST:PORT", help="the model owner's address")
    ap.add_argument("--certs", default="certs", help="directory with ca.pem, party0.pem, party0.key")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="a folder of images (or an ImageFolder tree)")
    src.add_argument("--input", metavar="X.npy", help="a .npy array [N,C,H,W] of preprocessed inputs")
    ap.add_argument(
        "--output",
        choices=("labels", "logits"),
        default=None,
        help="what to print and record (logits only if the program outputs them; the default then)",
    )
    ap.add_argument(
        "--out",
        metavar="FILE",
        help="append results here as JSON lines, one record per input (input, label, logits, batch, program), "
        "fsync'd after each completed batch; an existing FILE is refused without --resume",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="label only the inputs --out FILE lacks (with fresh key batches) and append them",
    )
    ap.add_argument("--stats", metavar="FILE", help="write the session's times, bytes and rounds here (JSON)")
    ap.add_argument(
        "--allow-out-of-range",
        action="store_true",
        help="run inputs outside the range the program was compiled for (results may be wrong; a warning)",
    )
    add_timeout_args(ap, "the model owner to listen, retrying")
    return ap


class InputSet:
    """The data owner's inputs: their names and a loader of any subset as float32 [k, C, H, W]."""

    def __init__(self, names: list[str], load: Callable[[list[int]], np.ndarray]):
        self.names, self.load = names, load


def input_set(a: argparse.Namespace, manifest: dict) -> InputSet:
    from fssc.runtime.images import Preprocess, list_images, load_image, load_inputs

    pre = Preprocess(
        **{k: v for k, v in manifest.get("preprocess", {}).items() if k in ("size", "resize", "mean", "std")}
    )
    chw = tuple(manifest["inputs"][0]["shape"][1:])
    if a.input:
        x = load_inputs(a.input, pre, chw)
        return InputSet([f"{a.input}[{i}]" for i in range(len(x))], lambda idx: x[idx])
    files = list_images(a.images)
    if not files:
        load_inputs(a.images, pre, chw)  # the one-line "no images found"

    def load(idx: list[int]) -> np.ndarray:
        out = []
        for i in idx:
            im = load_image(files[i], pre)
            if tuple(im.shape) != chw:
                raise FsscError(f"{files[i]}: the image gives {im.shape}, the model expects {chw}")
            out.append(im)
        return np.stack(out)

    return InputSet(files, load)


def check_batch(manifest: dict, x: np.ndarray, names: list[str], allow_out_of_range: bool) -> str | None:
    """Raise if a batch of inputs cannot be encoded, or is out of the compiled range (unless allowed);
    returns the out-of-range sentence when it is allowed."""
    inp = manifest["inputs"][0]
    broken = unencodable(x, inp["scale"], names)
    if broken:
        raise FsscError(f"input %{inp['name']}: {broken}")
    problem = out_of_range(manifest, inp["name"], ring.encode(x, inp["scale"]), names)
    if problem and not allow_out_of_range:
        raise FsscError(f"{problem}; {FIXES}")
    return problem


def check_inputs(manifest: dict, inputs: InputSet, todo: list[int], batch: int, allow_out_of_range: bool) -> None:
    """Read and check every input to label, a batch at a time, before anything is sent (each batch is
    checked again as it is read for its session)."""
    problem = None
    for k in range(0, len(todo), batch):
        idx = todo[k : k + batch]
        found = check_batch(manifest, inputs.load(idx), [inputs.names[i] for i in idx], allow_out_of_range)
        problem = problem or found  # the first one is reported
    if problem:
        print(f"fssc party0: warning: {problem}; running anyway (--allow-out-of-range)", file=sys.stderr, flush=True)


def _progress(total: int):
    """A rich progress bar on stderr (shown only when stderr is a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(file=sys.stderr)
    bar = Progress(
        TextColumn("labelling"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    task = bar.add_task("labelling", total=total)
    return bar, task


def records(manifest: dict, out: dict, names: list[str], batch_id: int, program: str, want: str) -> list[dict]:
    """One record per real input of a batch (padding dropped) from the program's decoded outputs."""
    n = manifest["inputs"][0]["shape"][0]
    recs = []
    for i, name in enumerate(names):
        rec: dict[str, Any] = {"input": name, "batch": batch_id, "program": program}
        for o in manifest["outputs"]:
            v = out[o["name"]]
            if o["kind"] == "labels":
                rec["label"] = int(np.asarray(v).reshape(n, -1)[i, 0])
            else:
                logits = ring.decode(np.asarray(v), o["scale"]).reshape(n, -1)[i]
                if want == "logits":
                    rec["logits"] = [float(z) for z in logits]
                rec.setdefault("label", int(np.argmax(logits)))
        recs.append(rec)
    return recs


def label(mod, manifest: dict, a: argparse.Namespace, hello: Callable[[dict], dict]) -> int:
    """The data owner's run: inputs -> one session -> labels (stdout, ``--out``, ``--stats``). Returns 0."""
    inp = manifest["inputs"][0]
    bs = inp["shape"][0]
    kinds = {o["kind"] for o in manifest["outputs"]}
    want = a.output or ("logits" if "logits" in kinds else "labels")
    if want == "logits" and "logits" not in kinds:
        raise FsscError(
            "--output logits: this program was compiled to output labels only "
            "(recompile with `fssc compile --output-mode logits`)"
        )
    if a.resume and not a.out:
        raise FsscError("--resume needs --out FILE (the results to continue)")
    connect_s, peer_s = timeouts(a)
    inputs = input_set(a, manifest)
    results = ResultsFile(a.out, mod.PROGRAM_HASH, a.resume) if a.out else None
    done = {os.path.normpath(n) for n in results.done} if results is not None else set()
    todo = [i for i, n in enumerate(inputs.names) if os.path.normpath(n) not in done]
    if done and len(todo) == len(inputs.names):
        raise FsscError(
            f"{a.out}: labels {len(done)} input(s), none of them among these {len(inputs.names)} (it names inputs "
            f"by their path as given, e.g. {sorted(done)[0]}): resume with the first run's --images or --input path"
        )
    if not todo:
        print(f"fssc party0: all {len(inputs.names)} input(s) are already labelled in {a.out}", flush=True)
        return 0
    check_inputs(manifest, inputs, todo, bs, a.allow_out_of_range)
    groups = [todo[k : k + bs] for k in range(0, len(todo), bs)]
    deal, use = choose_batches(a.keys, 0, len(groups), mod.PROGRAM_HASH)

    def note(msg: str) -> None:
        print(f"fssc party0: {msg}", file=sys.stderr, flush=True)

    # readied before the session, not in its first gate
    dcf.set_walk(dcf_walk(manifest, "party0", len(groups)), dcf.explicit_walk(), note)
    chan = connect(a.peer, a.certs, timeout=peer_s, connect_timeout=connect_s, log=note)
    try:
        peer = client_handshake(chan, hello({"batches": use, "deal": deal}))
        if peer.get("deal") != deal:
            raise FsscError(
                f"handshake refused: the model owner confirmed deal {peer.get('deal')}, our keys are of {deal}"
            )
        timings: dict = {}
        t0 = time.perf_counter()
        with SessionBatches(a.keys, 0, use, mod.PROGRAM_HASH, deal, note, on_error=chan.abort) as batches:
            w_hat = recv_weights(chan, mod.LINEAR_WEIGHTS)
            timings["setup"] = time.perf_counter() - t0
            bar, task = _progress(len(todo))
            with bar:
                for b, idx in zip(use, groups, strict=True):
                    x = inputs.load(idx)
                    check_batch(manifest, x, [inputs.names[i] for i in idx], a.allow_out_of_range)  # changed since?
                    if len(x) < bs:  # the last batch: pad with its last input, whose extra results are dropped
                        x = np.concatenate([x, np.repeat(x[-1:], bs - len(x), axis=0)])
                    with batches.use(b) as keys:
                        p0_start_batch(chan, b)
                        out = run_p0_batch(mod, chan, keys, w_hat, {inp["name"]: ring.encode(x, inp["scale"])}, timings)
                    recs = records(manifest, out, [inputs.names[i] for i in idx], b, mod.PROGRAM_HASH, want)
                    if results is not None:
                        results.append(recs)
                    for rec in recs:
                        line = f"{rec['input']}: label {rec['label']}"
                        if "logits" in rec:
                            line += "  logits " + " ".join(f"{z:+.4f}" for z in rec["logits"])
                        print(line, flush=True)  # a live bar redirects stdout above itself
                    bar.advance(task, len(idx))
        timings["keys"] = batches.waited  # waiting for key files to be read and verified (their disk time)
        total = time.perf_counter() - t0
    except BaseException:
        chan.abort()
        raise
    chan.close()
    before = len(inputs.names) - len(todo)
    print(
        f"fssc party0: {len(todo)} input(s), {len(use)} batch(es)"
        + (f" ({before} already in {a.out})" if before else "")
        + f": setup {timings['setup']:.2f} s, offline {timings.get('offline', 0):.2f} s, "
        f"online {timings.get('online', 0):.2f} s, total {total:.2f} s; "
        f"sent {chan.bytes_sent / 1e6:.1f} MB, received {chan.bytes_received / 1e6:.1f} MB, {chan.rounds} rounds",
        flush=True,
    )
    if a.stats:
        stats = {
            "program": mod.PROGRAM_HASH,
            "inputs": len(todo),
            "batches": len(use),
            "timings": timings,
            "total_s": total,
            "bytes_sent": chan.bytes_sent,
            "bytes_received": chan.bytes_received,
            "rounds": chan.rounds,
            "dcf_walk": dcf.current_walk(),
        }
        write_atomic(a.stats, json.dumps(stats, indent=1))
    return 0
