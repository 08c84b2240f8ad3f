"""Sessions: loading generated programs, dealing key batches, and running the
two parties' sides of an inference over a channel.

Key directory layout (``fssc deal prog/ -o keys/``)::

    keys/p0/batch0000.key ...      P0's key streams, one per batch
    keys/p1/batch0000.key ...      P1's key streams
    keys/p1/setup.key              P1's per-model setup: the seed of the weight mask A
    keys/dealer/setup.seed         the dealer's copy of that seed (private; reused by later deals)

A batch is used once: opening it for a run leaves ``batchNNNN.used`` beside
it, and a used batch is refused.

After the handshake P1 sends W^ = W + A for every weighted layer (once per
session); then, per batch, P0 computes its linear halves offline and both run
the online program.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import time
from typing import Callable

import numpy as np

from fssc.compiler.errors import FsscError

from .channel import Channel
from .keys import KeyReader, KeyWriter
from .prg import SEED_BYTES
from .protocol import Dealer, Party

ROLE_DIRS = {"party0": "p0", "party1": "p1"}


# ------------------------------------------------------------ programs
def load_manifest(prog_dir: str) -> dict:
    path = os.path.join(prog_dir, "manifest.json")
    if not os.path.exists(path):
        raise FsscError(f"{prog_dir}: no manifest.json (not a compiled fssc program directory)")
    with open(path) as fh:
        return json.load(fh)


def load_program(prog_dir: str, role: str):
    path = os.path.join(prog_dir, role, "program.py")
    if not os.path.exists(path):
        raise FsscError(f"{prog_dir}: no {role}/program.py")
    spec = importlib.util.spec_from_file_location(f"fssc_prog_{role}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_weights(path: str, program_hash: str) -> dict[str, np.ndarray]:
    r = KeyReader(path)
    if r.header.get("kind") != "weights" or r.header.get("program") != program_hash:
        raise FsscError(f"{path}: weights for program {r.header.get('program')}, not {program_hash}")
    return dict(r.records())


# ------------------------------------------------------------ dealing
def _batch_path(party_dir: str, batch: int) -> str:
    return os.path.join(party_dir, f"batch{batch:04d}.key")


def existing_batches(party_dir: str) -> list[int]:
    """Batch ids with a key file in one party's key folder (keys/p0 or keys/p1)."""
    out = []
    for p in glob.glob(os.path.join(party_dir, "batch*.key")):
        m = re.search(r"batch(\d+)\.key$", p)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def setup_seed_for(keys_dir: str, program_hash: str) -> bytes:
    """The dealer's per-model seed for the weight masks A (made once, then reused)."""
    path = os.path.join(keys_dir, "dealer", "setup.seed")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path, "rb") as fh:
            blob = fh.read()
        if blob[SEED_BYTES:].decode(errors="replace") != program_hash:
            raise FsscError(
                f"{path} belongs to program {blob[SEED_BYTES:].decode(errors='replace')}; "
                f"use a fresh keys directory for program {program_hash}"
            )
        return blob[:SEED_BYTES]
    seed = os.urandom(SEED_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(seed + program_hash.encode())
    w = KeyWriter(os.path.join(keys_dir, "p1", "setup.key"), {"kind": "setup", "program": program_hash, "party": 1})
    w.put("setup.seed", np.frombuffer(seed, dtype=np.uint8))
    w.close()
    return seed


def deal_batches(prog_dir: str, keys_dir: str, batches: int, progress: Callable[[int, int, float], None] = None):
    """Run the dealer program ``batches`` times; returns [(batch id, bytes p0, bytes p1, seconds)]."""
    manifest = load_manifest(prog_dir)
    h = manifest["program_hash"]
    mod = load_program(prog_dir, "dealer")
    if getattr(mod, "PROGRAM_HASH", None) != h:
        raise FsscError(f"{prog_dir}: dealer program and manifest disagree on the program hash")
    for p in (0, 1):
        os.makedirs(os.path.join(keys_dir, f"p{p}"), exist_ok=True)
    seed = setup_seed_for(keys_dir, h)
    dirs = [os.path.join(keys_dir, f"p{p}") for p in (0, 1)]
    start = max(existing_batches(dirs[0]) + existing_batches(dirs[1]), default=-1) + 1
    done = []
    for i in range(start, start + batches):
        t = time.perf_counter()
        hdr = {"program": h, "batch": i, "kind": "batch"}
        w0 = KeyWriter(_batch_path(dirs[0], i), {**hdr, "party": 0})
        w1 = KeyWriter(_batch_path(dirs[1], i), {**hdr, "party": 1})
        try:
            mod.deal(Dealer(w0, w1), seed)
        except BaseException:
            for w in (w0, w1):  # no partial key file that looks complete
                w.abort()
            raise
        w0.close()
        w1.close()
        dt = time.perf_counter() - t
        done.append((i, w0.bytes_written, w1.bytes_written, dt))
        if progress:
            progress(i - start + 1, batches, dt)
    return done


# ------------------------------------------------------------ key batches
def open_batch(party_dir: str, party: int, batch: int, program_hash: str) -> KeyReader:
    """Open one batch's keys (in keys/pN) for use, refusing a used one; marks it used."""
    path = _batch_path(party_dir, batch)
    used = path[:-4] + ".used"
    if os.path.exists(used):
        raise FsscError(f"{path}: batch {batch} was already used (keys are one-time)")
    r = KeyReader(path, program=program_hash, party=party, batch=batch)
    fd = os.open(used, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    return r


def check_batches(party_dir: str, party: int, batches: list[int], program_hash: str) -> None:
    """Headers of the batches about to be used: right program, party and batch id, not used yet."""
    from .keys import check_header

    for b in batches:
        path = _batch_path(party_dir, b)
        if os.path.exists(path[:-4] + ".used"):
            raise FsscError(f"{path}: batch {b} was already used (keys are one-time)")
        check_header(path, program_hash, party, b)


def unused_batches(party_dir: str) -> list[int]:
    return [b for b in existing_batches(party_dir) if not os.path.exists(_batch_path(party_dir, b)[:-4] + ".used")]


def read_setup(party_dir: str, program_hash: str) -> bytes:
    path = os.path.join(party_dir, "setup.key")
    r = KeyReader(path, program=program_hash)
    if r.header.get("kind") != "setup":
        raise FsscError(f"{path}: not a setup key")
    return r.get("setup.seed").tobytes()


# ------------------------------------------------------------ the two sides
def masked_weights(mod, W: dict[str, np.ndarray], setup_seed: bytes) -> dict[str, np.ndarray]:
    """W^ = W + A for the layers P1's program lists."""
    from . import lib

    return lib.masked_weights(W, setup_seed, mod.LINEAR_WEIGHTS)


def send_weights(chan: Channel, w_hat: dict[str, np.ndarray]) -> None:
    for tag in sorted(w_hat):
        chan.send(w_hat[tag])


def recv_weights(chan: Channel, tags: list[str]) -> dict[str, np.ndarray]:
    return {tag: chan.recv() for tag in sorted(tags)}


def run_p1_batch(mod, chan: Channel, keys: KeyReader, W: dict[str, np.ndarray]) -> None:
    mod.online(Party(1, keys, chan), W)
    if not keys.skip_to_end():
        raise FsscError(f"{keys.name}: key records left over after the program (program and keys out of step)")


def run_p0_batch(
    mod,
    chan: Channel,
    keys: KeyReader,
    w_hat: dict[str, np.ndarray],
    inputs: dict[str, np.ndarray],
    timings: dict | None = None,
) -> dict:
    """One batch on P0's side; ``inputs`` maps every input's name to its encoded batch."""
    P = Party(0, keys, chan)
    t = time.perf_counter()
    z0 = mod.offline(P, w_hat)
    t1 = time.perf_counter()
    out = mod.online(P, inputs, z0)
    t2 = time.perf_counter()
    if not keys.skip_to_end():
        raise FsscError(f"{keys.name}: key records left over after the program (program and keys out of step)")
    if timings is not None:
        timings["offline"] = timings.get("offline", 0.0) + t1 - t
        timings["online"] = timings.get("online", 0.0) + t2 - t1
    return out
