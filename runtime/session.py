"""Sessions: loading generated programs, dealing key batches, and running the
two parties' sides of an inference over a channel.

Key directory layout (``fssc deal prog/ -o keys/``)::

    keys/p0/batch0000.key ...      P0's key streams, one per batch
    keys/p1/batch0000.key ...      P1's key streams
    keys/p1/setup-<deal>.key       P1's setup for one deal: the seed of the weight masks A
    keys/p1/setup-<deal>.commit    written by P1: its salted commitment to the weights it masked with that seed
    keys/pN/batchNNNN.used         the batch was used (stays after its key file is deleted)

Every ``fssc deal`` is a new deal: a random deal id, written into every key
header of both parties and into the setup, and a fresh seed for A; the dealer
keeps nothing. Batch ids continue across deals dealt into one folder. A
session uses batches of one deal, checked at the handshake, so a party never
pairs a batch with another deal's batch or setup.

P1 masks its weights with a deal's seed only if they are the weights it first
masked with that seed (``bind_weights``): W^ = W + A and W'^ = W' + A would
give P0 W - W'.

A batch is used once: opening it makes ``batchNNNN.used`` beside it, durably
(file and folder fsync'd) before the batch's first protocol message; its key
file is deleted once the batch ends (before the session ends; if that fails, a
warning says to delete it by hand), and a used batch is refused. A session's
batches (``SessionBatches``) are read and verified one ahead, and their key
files deleted, by a thread of the session's own, beside the computation.

After the handshake P1 sends W^ = W + A for every weighted layer (once per
session); then, per batch, P0 opens its batch and says so (``p0_start_batch``),
P1 opens its own only once that message arrives (``p1_await_batch``), P0
computes its linear halves offline and both run the online program. So a batch
P1 has used is always used at P0 too, whenever either side dies: the batches
P0 picks for its next session are unused at P1 as well.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import hmac
import inspect
import itertools
import json
import multiprocessing
import os
import re
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
from fssc.runtime import dcf
from fssc.runtime.channel import Channel
from fssc.runtime.checksum import child_digest, file_digest
from fssc.runtime.heap import keep_freed_memory
from fssc.runtime.keys import KeyReader, KeyWriter, check_header, peek_header
from fssc.runtime.prg import SEED_BYTES
from fssc.runtime.protocol import Dealer, Party

from fssc.errors import FsscError, os_error_message
from fssc.files import create_durable, remove_durable

ROLE_DIRS = {"party0": "p0", "party1": "p1"}


# ------------------------------------------------------------ programs
def manifest_hash(public: dict) -> str:
    """The program hash: SHA-256 (hex) of ``manifest.json``'s content without its
    ``program_hash``, as canonical JSON. That content is everything P0's and the dealer's programs are
    generated from (the public IR) and the fssc version that generates them, so the hash names exactly what
    ``fssc check`` regenerates."""
    canonical = json.loads(json.dumps(public))  # as a reader of the file sees it (tuples as lists, str keys)
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def load_manifest(prog_dir: str) -> dict:
    """``prog_dir/manifest.json``, refused (one line) unless its content hashes to its ``program_hash``."""
    path = os.path.join(prog_dir, "manifest.json")
    if not os.path.exists(path):
        raise FsscError(f"{prog_dir}: no manifest.json (not a compiled fssc program directory)")
    try:
        with open(path) as fh:
            m = json.load(fh)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, an integer too long, nesting too deep
        raise FsscError(f"{path}: not a readable JSON manifest ({type(e).__name__})") from None
    if not isinstance(m, dict) or not isinstance(m.get("program_hash"), str):
        raise FsscError(f"{path}: not an fssc manifest (no program_hash)")
    if manifest_hash({k: v for k, v in m.items() if k != "program_hash"}) != m["program_hash"]:
        raise FsscError(
            f"{path}: its content does not hash to its program_hash {m['program_hash']} "
            f"(edited after fssc compile, or compiled by an older fssc: recompile)"
        )
    return m


# What each role's generated program defines (code generation writes them from this table): its constants,
# with their types, and its functions, with their parameters. The runtime calls nothing else.
PROGRAM_CONSTANTS: dict[str, dict[str, type]] = {
    "party0": {"PROGRAM_HASH": str, "ROLE": str, "LINEAR_WEIGHTS": dict},
    "party1": {"PROGRAM_HASH": str, "ROLE": str, "LINEAR_WEIGHTS": dict},
    "dealer": {"PROGRAM_HASH": str, "ROLE": str},
}
PROGRAM_FUNCTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "party0": {"offline": ("P", "WH"), "online": ("P", "X", "Z0")},
    "party1": {"online": ("P", "W")},
    "dealer": {"deal": ("D", "setup_seed")},
}


def check_interface(mod, role: str, where: str) -> None:
    """FsscError (one line naming ``where``) unless ``mod`` defines what a ``role`` program must."""
    if role not in PROGRAM_FUNCTIONS:
        raise FsscError(f"{where}: role {role!r} is none of {', '.join(PROGRAM_FUNCTIONS)}")
    missing = []
    for name, typ in PROGRAM_CONSTANTS[role].items():
        v = getattr(mod, name, None)
        if not isinstance(v, typ):
            missing.append(f"{name} ({typ.__name__})" if v is None else f"{name} as a {typ.__name__}")
    for name, params in PROGRAM_FUNCTIONS[role].items():
        f = getattr(mod, name, None)
        want = f"{name}({', '.join(params)})"
        try:
            ok = callable(f) and tuple(inspect.signature(f).parameters) == params
        except (TypeError, ValueError):
            ok = False
        if not ok:
            missing.append(want)
    if missing:
        raise FsscError(f"{where}: not a {role} program: it lacks {', '.join(missing)} (recompile with fssc compile)")
    if role != mod.ROLE:
        raise FsscError(f"{where}: the {mod.ROLE!r} program, not the {role} one")


def program_from_source(source: str, role: str, where: str):
    """A role's program as a module, from its text (the copy ``fssc run`` regenerated, or a file's content),
    its interface checked; ``where`` names it in messages and is its ``__file__``."""
    mod = types.ModuleType(f"fssc_program_{role}")
    mod.__file__ = where
    try:
        code = compile(source, where, "exec")
    except SyntaxError as e:
        raise FsscError(f"{where}: not a Python program (line {e.lineno}: {e.msg})") from None
    exec(code, mod.__dict__)
    check_interface(mod, role, where)
    return mod


def load_program(prog_dir: str, role: str):
    """Import ``prog_dir/role/program.py`` as it is, its interface checked. This runs the file's code: for
    a program of one's own (the model owner's), or for development (``--skip-check``); the data owner and the
    dealer run the copy they regenerate from the manifest instead (``fssc run``, ``fssc deal``)."""
    path = os.path.join(prog_dir, role, "program.py")
    if not os.path.exists(path):
        raise FsscError(f"{prog_dir}: no {role}/program.py")
    try:
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
    except UnicodeDecodeError:
        raise FsscError(f"{path}: not a Python program (not UTF-8 text)") from None
    return program_from_source(source, role, path)


def load_weights(path: str, program_hash: str) -> dict[str, np.ndarray]:
    r = KeyReader(path)
    if r.header.get("kind") != "weights" or r.header.get("program") != program_hash:
        raise FsscError(f"{path}: weights for program {r.header.get('program')}, not {program_hash}")
    return dict(r.records())


# ------------------------------------------------------------ dealing
DEAL_ID_BYTES = 16
SALT_BYTES = 32


def _batch_path(party_dir: str, batch: int) -> str:
    return os.path.join(party_dir, f"batch{batch:04d}.key")


def _marker(path: str) -> str:
    return path[: -len(".key")] + ".used"


def setup_path(party_dir: str, deal: str) -> str:
    return os.path.join(party_dir, f"setup-{deal}.key")


def batch_of(name: str, suffix: str = ".key") -> int | None:
    """The batch id whose file (``suffix``: .key, .used, ...) is called ``name``: exactly the name a deal gives
    it (ASCII digits, :func:`_batch_path`'s width), or None."""
    digits = name.removeprefix("batch").removesuffix(suffix)
    if not (0 < len(digits) <= 12 and digits.isascii() and digits.isdigit()):
        return None
    batch = int(digits)
    return batch if name == os.path.basename(_batch_path("", batch))[: -len(".key")] + suffix else None


def _ids(party_dir: str, suffix: str) -> list[int]:
    ids = (batch_of(os.path.basename(p), suffix) for p in glob.glob(os.path.join(party_dir, f"batch*{suffix}")))
    return sorted(b for b in ids if b is not None)


def existing_batches(party_dir: str) -> list[int]:
    """Batch ids with a key file in one party's key folder (keys/p0 or keys/p1)."""
    return _ids(party_dir, ".key")


def next_batch_id(party_dirs: list[str]) -> int:
    """The first batch id after every batch dealt into these folders: with a key file, used (a marker, its
    key file deleted) or being written (``.part``). A deal numbers its batches from here, so an id is never
    dealt twice into a folder."""
    suffixes = (".key", ".used", ".key.part")
    return max((b for d in party_dirs for s in suffixes for b in _ids(d, s)), default=-1) + 1


def deal_batches(
    prog_dir: str,
    keys_dir: str | None,
    batches: int,
    program: str,
    progress: Callable[[int, int, float], None] | None = None,
    workers: int = 1,
    targets: dict[int, str] | None = None,
    certs: str | None = None,
    cluster: str | None = None,
    connect_timeout: float | None = None,
    warn: Callable[[str], None] | None = None,
):
    """One deal: a fresh deal id and setup seed, then the dealer program once per batch.

    ``program`` is the dealer program's text: the copy ``fssc deal`` regenerated from the manifest and compared
    with ``prog_dir/dealer/program.py`` (fssc.compiler.backend.trust), or a program file's own text for a
    program of one's own (``--skip-check``). ``workers`` > 1 deals the batches in that many processes, each
    batch whole in one process (each process runs the same text); ``cluster`` (a Dask scheduler's address,
    :mod:`fssc.runtime.cluster`) on that cluster's workers instead, as many at a time as it has threads. The
    deal id and setup seed are the deal's, the same in every batch, and the files are the same as a serial
    deal's. ``progress(done, batches, seconds of the batch just done)`` as batches complete. If a batch fails,
    no batch is started after it, the ones being dealt finish, and only the batches reported done keep their
    files (as in a serial deal): no key file of another batch, complete or partial, is left, but for party 1's
    complete file of a batch whose party-0 file was streamed (its receiver may have filed it: a batch only
    party 1 holds is harmless, never dealt again; see ``_deal_batch``). The error is raised.

    ``targets`` ({party: HOST:PORT}) streams those parties' files to their key receivers
    (:mod:`fssc.runtime.keystream`) with the dealer's certificates in ``certs``, instead of writing them to
    ``keys_dir/pN`` (needed for the other parties); batch ids then follow every batch the receivers and the
    folders hold. ``warn(line)`` hears of a cluster set up to deal slowly. Reads only ``manifest.json`` of
    ``prog_dir`` (never P1's weights). Returns [(batch id, bytes p0, bytes p1, seconds)] in batch order."""
    from fssc.runtime import keystream

    targets = targets or {}
    if cluster is not None:  # the workers resolve paths on their own machines, from their own folders
        keys_dir = None if keys_dir is None else os.path.abspath(keys_dir)
        certs = None if certs is None else os.path.abspath(certs)
    if workers < 1:
        raise FsscError("--workers must be at least 1")
    if targets and not certs:
        raise FsscError("--to needs --certs: a folder with ca.pem, dealer.pem and dealer.key (`fssc certs`)")
    if keys_dir is None and len(targets) < 2:
        raise FsscError("-o DIR is needed for the parties whose keys are not streamed with --to")
    manifest = load_manifest(prog_dir)
    h = manifest["program_hash"]
    where = os.path.join(prog_dir, "dealer", "program.py")
    _dealer_program(program, where, h)  # refuse a bad program before anything is written
    walk = dcf_walk(manifest, "dealer", -(-batches // max(1, workers)))  # each process's batches; checks the env
    timeouts = {} if connect_timeout is None else {"connect_timeout": connect_timeout}
    outs: list = [
        keystream.Target(p, targets[p], str(certs), **timeouts)
        if p in targets
        else os.path.join(str(keys_dir), f"p{p}")
        for p in (0, 1)
    ]
    dirs = [o for o in outs if isinstance(o, str)]
    deal = os.urandom(DEAL_ID_BYTES).hex()
    seed = os.urandom(SEED_BYTES)  # fresh per deal: a seed never masks two weight sets
    executor = None
    if cluster is not None:  # connect first: an unreachable scheduler costs nothing
        from fssc.runtime.cluster import cluster_executor

        executor, window = cluster_executor(cluster, connect_timeout, warn)
    streams: dict[int, keystream.Stream] = {}
    try:
        # the receivers say where their ids continue (short connections: a deal may take hours)
        for o in outs:  # one at a time, into ``streams``: if party 1's fails, party 0's is closed below
            if not isinstance(o, str):
                streams[o.party] = keystream.Stream(o, h, deal)
        # ids continue after every batch dealt into these folders or held by these receivers
        start = max([next_batch_id(dirs), *(s.next for s in streams.values())])
        setup_hdr = {"kind": "setup", "program": h, "party": 1, "deal": deal}
        if 1 in streams:  # to the party it belongs to, as with -o
            name = os.path.basename(setup_path("", deal))
            sw = KeyWriter(f"{streams[1].target.who}: {name}", setup_hdr, sink=streams[1].file(name))
        else:
            sw = KeyWriter(setup_path(outs[1], deal), setup_hdr)
        sw.put("setup.seed", np.frombuffer(seed, dtype=np.uint8))
        sw.close()
        sw.commit()
        for s in streams.values():
            s.close()
        ids = list(range(start, start + batches))
        jobs = [(program, where, h, outs, deal, seed, i, walk, dcf.explicit_walk()) for i in ids]
        if executor is not None:
            from fssc.runtime.cluster import describe_failure

            try:
                done = _run_jobs(executor, jobs, window, progress, outs, ids)
            except Exception as e:
                line = describe_failure(e)
                if line is None:
                    raise
                raise FsscError(f"--cluster {cluster}: {line}") from None
        elif workers == 1 or batches == 1:
            done = []
            for job in jobs:
                done.append(_deal_batch(*job))
                if progress:
                    progress(len(done), batches, done[-1][3])
        else:
            # spawn: each worker a fresh interpreter (no state of this process but the job it is sent)
            n = min(workers, batches)
            with (
                _worker_blas(n),
                ProcessPoolExecutor(
                    n, mp_context=multiprocessing.get_context("spawn"), initializer=keep_freed_memory
                ) as pool,
            ):
                done = _run_jobs(pool, jobs, n, progress, outs, ids)
        for target in (o for o in outs if not isinstance(o, str)):  # the receivers hear the deal is complete
            streams[target.party] = keystream.Stream(target, h, deal)
            streams[target.party].done(sorted(b for b, *_ in done))
        return sorted(done)
    finally:
        for s in streams.values():
            s.close()
        if executor is not None:
            executor.shutdown(wait=False)


@contextlib.contextmanager
def _worker_blas(workers: int):
    """The environment the dealer's worker processes are spawned with: the cores shared out among them for
    BLAS (the linear layers' cross terms), with OpenBLAS threads that sleep as soon as a GEMM ends, beside each
    worker's writer thread. With every core each, two workers dealt no faster than one. A thread count the
    caller set is kept."""
    from fssc.runtime.loopback import blas_env

    added = {k: v for k, v in blas_env(max(1, (os.cpu_count() or 1) // workers)).items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _run_jobs(executor, jobs: list[tuple], window: int, progress, outs: list, ids: list[int]) -> list:
    """The batch jobs on ``executor`` (a concurrent.futures one: local processes, or a cluster's), at most
    ``window`` at a time. After a failure no job is started, the running ones finish, and the files of every
    batch not reported done are deleted from the key folders (a job that died leaves its ``.part`` files; a
    stream cut short leaves nothing at its receiver), but for those ``_unfiled`` keeps. The first error is
    raised."""
    from concurrent.futures import FIRST_COMPLETED, wait

    queue = list(jobs)
    running: set = set()
    done: list = []
    error: BaseException | None = None
    try:
        while queue or running:
            while queue and error is None and len(running) < window:
                try:
                    running.add(executor.submit(_deal_batch, *queue.pop(0)))
                except BaseException as e:  # a pool that broke takes no more jobs
                    error = error or e
                    queue.clear()
            if error is not None:
                queue.clear()
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                try:
                    done.append(f.result())
                except BaseException as e:
                    error = error or e
                    continue
                if progress:
                    progress(len(done), len(jobs), done[-1][3])
    except BaseException as e:  # interrupted: no more jobs, and what is not done is not kept
        error = error or e
        wait(running)
    if error is not None:
        reported = {b for b, *_ in done}
        for p, d in enumerate(outs):
            if not isinstance(d, str):
                continue
            for i in ids:
                if i not in reported:
                    for path in (_batch_path(d, i) + ".part", *_unfiled(outs, p, _batch_path(d, i))):
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(path)
        raise error
    return done


def _unfiled(outs: list, party: int, path: str) -> list[str]:
    """``[path]`` if a failed batch's complete local key file of ``party`` is to be deleted. Party 0's always
    is; party 1's is kept when party 0's file was streamed, which its receiver may have filed (its answer
    lost): a batch only party 1 holds is harmless (party 0 never asks for it), one only party 0 holds is not."""
    return [] if party == 1 and not isinstance(outs[0], str) else [path]


def _dealer_program(program: str, where: str, program_hash: str):
    """The dealer program from its text, checked against the manifest's hash (built per batch: milliseconds)."""
    mod = program_from_source(program, "dealer", where)
    if getattr(mod, "PROGRAM_HASH", None) != program_hash:
        raise FsscError(f"{where}: dealer program and manifest disagree on the program hash")
    return mod


def dcf_work(manifest: dict, role: str) -> float:
    """AES blocks of one batch's DCF work for ``role`` (party0, party1, dealer), from the compile report in the
    manifest: a party's online evaluation; the dealer's key generation expands both sides of both parties'
    nodes per level, about twice the parties' blocks together."""
    cost = manifest.get("cost", {})
    p0, p1 = float(cost.get("aes_blocks_p0", 0)), float(cost.get("aes_blocks_p1", 0))
    return {"party0": p0, "party1": p1, "dealer": 2 * (p0 + p1)}[role]


def dcf_walk(manifest: dict, role: str, batches: int) -> str:
    """The DCF walk (:func:`fssc.runtime.dcf.choose_walk`) for a process of ``role`` that runs ``batches``
    (a cluster's workers are counted as one process: an overestimate, which at worst readies the compiled walk
    for less work than pays)."""
    return dcf.choose_walk(dcf_work(manifest, role) * max(1, batches))


def _deal_batch(
    program: str,
    where: str,
    program_hash: str,
    outs: list,
    deal: str,
    seed: bytes,
    batch: int,
    walk: str | None = None,
    strict_walk: bool = True,
):
    """One batch of one deal: both parties' key files, complete, or none (-> (batch, bytes p0, bytes p1, s)).

    ``outs[p]``: party p's key folder, or a :class:`fssc.runtime.keystream.Target` to stream its file to
    (over a connection of this job's own). Party 1's file is completed and filed first, party 0's only after
    it: a failure can leave a batch only party 1 holds (harmless, its id is never dealt again), never one only
    party 0 holds."""
    from fssc.runtime import keystream

    mod = _dealer_program(program, where, program_hash)
    before = dcf.current_walk()
    if walk is not None:  # in this job's process, before its clock starts; restored after the job
        dcf.set_walk(walk, strict_walk)
    t = time.perf_counter()
    hdr = {"program": program_hash, "batch": batch, "kind": "batch", "deal": deal}
    name = os.path.basename(_batch_path("", batch))
    writers: list[KeyWriter] = []
    streams: list[keystream.Stream] = []
    filed: list[int] = []  # parties whose local file this job filed
    try:
        for p, out in enumerate(outs):  # one at a time: if P1's fails, P0's is aborted
            if isinstance(out, str):
                writers.append(KeyWriter(_batch_path(out, batch), {**hdr, "party": p}))
            else:
                streams.append(keystream.Stream(out, program_hash, deal))
                w = KeyWriter(f"{out.who}: {name}", {**hdr, "party": p}, sink=streams[-1].file(name))
                writers.append(w)
        mod.deal(Dealer(writers[0], writers[1]), seed)
        for p in (1, 0):  # complete (a streamed one checked by its receiver), then filed
            writers[p].close()
            writers[p].commit()
            if isinstance(outs[p], str):
                filed.append(p)
    except BaseException:
        for w in writers:  # no partial key file that looks complete
            w.abort()
        for p in filed:  # a party's file was complete when the other's failed (only this job's own files)
            for path in _unfiled(outs, p, _batch_path(outs[p], batch)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        raise
    finally:
        for s in streams:
            s.close()
        dcf.set_walk(before)
    return batch, writers[0].bytes_written, writers[1].bytes_written, time.perf_counter() - t


# ------------------------------------------------------------ key batches
def _refuse_used(path: str, batch: int):
    """A used batch is refused; a key file still beside its marker (a session that died) is deleted."""
    gone = "its leftover key file is now deleted" if remove_durable(path) else "its key file was deleted"
    raise FsscError(f"{path}: batch {batch} was already used (keys are one-time; {gone})")


def _read_batch(
    party_dir: str,
    party: int,
    batch: int,
    program_hash: str,
    deal: str | None,
    digest: Callable[[int, int], bytes] | None = None,
) -> KeyReader:
    """One batch's key file read and verified (header, then the checksum of every byte, computed by ``digest``
    as ``KeyReader`` says), refusing a used batch; not marked used yet (``_mark_used``)."""
    path = _batch_path(party_dir, batch)
    if os.path.exists(_marker(path)):
        _refuse_used(path, batch)
    return KeyReader(path, program=program_hash, party=party, batch=batch, deal=deal, digest=digest)


def _mark_used(r: KeyReader, batch: int, before_marking: Callable[[], None] | None) -> KeyReader:
    """Mark a verified batch used (durably), after ``before_marking``; if that raises, or the key file was written
    since it was verified (``KeyReader.changed``: a batch read ahead waits seconds, at ``fssc serve`` longer), the
    batch stays unused."""
    try:
        if before_marking is not None:
            before_marking()
        if r.changed():
            why = "key file written or replaced since it was verified; not used (check the key folder)"
            raise FsscError(f"{r.name}: {why}")
        created = create_durable(_marker(r.name), str(r.header.get("deal")).encode())
    except BaseException:
        r.close()
        raise
    if not created:
        r.close()
        _refuse_used(r.name, batch)
    return r


def open_batch(
    party_dir: str,
    party: int,
    batch: int,
    program_hash: str,
    deal: str | None = None,
    before_marking: Callable[[], None] | None = None,
) -> KeyReader:
    """Open one batch's keys (in keys/pN) for use, refusing a used one; marks it used.

    The marker is created (O_EXCL) and it and its folder are fsync'd before this returns, i.e. before
    the batch's first protocol message: after a crash or power loss the batch is still refused.
    ``before_marking`` runs once the key file is read and verified and before the marker exists (P1 waits
    there for the data owner's start of the batch, so its reading overlaps the data owner's); if it raises,
    the batch stays unused."""
    return _mark_used(_read_batch(party_dir, party, batch, program_hash, deal), batch, before_marking)


class SessionBatches:
    """The key batches of one session, used in the order given: each verified whole, then marked used (durably,
    ``open_batch``) before its first message, and its key file deleted once it ends, whatever happens.

    The disk work runs beside the computation, on one thread of the session's own. It reads and verifies the
    first batch's key file from the start, and each next batch's once the batch before it is marked used (a
    batch's files are gigabytes at 224x224: reading them is disk time and fills the page cache); a file of
    ``CHILD_DIGEST_MIN`` bytes or more is hashed by a child process (``checksum.child_digest``), which takes
    no share of this process's interpreter lock, a smaller one, or every one once the child could not run (one
    warning), in the thread. Once a batch ends, the thread deletes its key file. A batch is still verified
    whole before it is marked used and before its first message, only earlier; it is marked used only when it
    starts, so a session that ends early leaves its verified next batch unused. ``close`` cancels a read not
    begun, stops a running one whose checksum a child computes (``checksum.CheckCancelledError``; one hashed in
    the thread runs to its end), closes what it opened, waits for the deletions and reports each one that
    failed through ``warn`` (one line; the used marker stays). ``waited`` adds up the seconds ``use`` waited
    for a batch's key file. ``on_error`` runs first when the session leaves its ``with`` block by an exception."""

    CHILD_DIGEST_MIN = 64 << 20  # bytes: a smaller key file is hashed in this process

    def __init__(
        self,
        party_dir: str,
        party: int,
        batches: list[int],
        program_hash: str,
        deal: str,
        warn: Callable[[str], None],
        on_error: Callable[[], None] | None = None,
    ):
        self._dir, self._party, self._hash, self._deal = party_dir, party, program_hash, deal
        self._warn, self._on_error = warn, on_error
        self._next = dict(itertools.pairwise(batches))
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="fssc-keys")
        self._read: dict[int, Future] = {}
        self._deleted: list[tuple[str, Future]] = []
        self._no_child = False  # the checksum's child process could not run: hash in the thread
        self._closing = threading.Event()  # close() began: a check under way in a child is given up
        self.waited = 0.0  # seconds ``use`` waited for a batch's key file to be read and verified
        if batches:
            self._prepare(batches[0])

    def _prepare(self, batch: int) -> None:
        self._read[batch] = self._disk.submit(self._read_batch, batch)

    def _read_batch(self, batch: int) -> KeyReader:
        return _read_batch(self._dir, self._party, batch, self._hash, self._deal, self._digest)

    def _digest(self, fd: int, end: int) -> bytes:
        """A key file's checksum for ``KeyReader``: by a child process, or in this thread for a small file (not
        worth a process) or if the child cannot run (one warning line; the file is checked either way)."""
        if end >= self.CHILD_DIGEST_MIN and not self._no_child:
            try:
                return child_digest(fd, end, self._closing)
            except OSError as e:
                self._no_child = True
                self._warn(f"{os_error_message(e)}: checking key files in this process instead")
        return file_digest(fd, end)

    def follow(
        self,
        batches: list[int],
        deal: str,
        warn: Callable[[str], None],
        on_error: Callable[[], None] | None = None,
    ) -> bool:
        """Take ``batches``, a session's order, as this object's (and its ``warn`` and ``on_error``) if they start
        with the one batch it has read ahead, of ``deal``, and nothing has been used yet: True. Else False, and
        nothing changes. For a read begun before any session asked (``fssc serve`` reads the batch a data owner
        most likely asks for first while it waits for one)."""
        if not batches or deal != self._deal or list(self._read) != batches[:1] or self._deleted:
            return False
        self._next = dict(itertools.pairwise(batches))
        self._warn, self._on_error = warn, on_error
        return True

    def reads_ahead(self) -> list[int]:
        """The batches read (or queued to be read) and not used yet."""
        return list(self._read)

    @contextlib.contextmanager
    def use(self, batch: int, before_marking: Callable[[], None] | None = None):
        pending = self._read.get(batch)
        t = time.perf_counter()
        r = pending.result() if pending is not None else self._read_batch(batch)
        self._read.pop(batch, None)
        self.waited += time.perf_counter() - t
        keys = _mark_used(r, batch, before_marking)
        try:
            if batch in self._next:
                self._prepare(self._next[batch])
            yield keys
        finally:
            try:
                keys.close()
            finally:
                self._deleted.append((keys.name, self._disk.submit(remove_durable, keys.name)))

    def close(self) -> None:
        self._closing.set()  # a batch still being checked is never used now: stop its child
        try:
            for pending in self._read.values():  # verified ahead (or not begun), never started: stays unused
                if not pending.cancel():
                    with contextlib.suppress(Exception):
                        pending.result().close()
            self._read.clear()
        finally:
            self._disk.shutdown(wait=True)
            for path, done in self._deleted:
                e = done.exception()
                if e is None:
                    continue
                why = os_error_message(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}".splitlines()[0]
                if os.path.exists(path):
                    self._warn(
                        f"could not delete used key file {path} ({why}): delete it by hand (its batch is marked "
                        "used and is never run again)"
                    )
                else:
                    self._warn(f"used key file {path} deleted, but the deletion may not be durable ({why})")
            self._deleted.clear()

    def __enter__(self) -> SessionBatches:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self._on_error is not None:
            self._on_error()  # e.g. abort the channel: the peer hears of it now, not after this waits for its disk
        self.close()


def check_batches(party_dir: str, party: int, batches: list[int], program_hash: str, deal: str | None = None) -> None:
    """Headers of the batches about to be used: right program, party, batch id and deal, not used yet."""
    for b in batches:
        path = _batch_path(party_dir, b)
        if os.path.exists(_marker(path)):
            _refuse_used(path, b)
        check_header(path, program_hash, party, b, deal)


def unused_batches(party_dir: str) -> list[int]:
    return [b for b in existing_batches(party_dir) if not os.path.exists(_marker(_batch_path(party_dir, b)))]


def batch_deal(party_dir: str, batch: int) -> str:
    """The deal a batch was made in (from its header)."""
    path = _batch_path(party_dir, batch)
    deal = peek_header(path).get("deal")
    if not isinstance(deal, str):
        raise FsscError(f"{path}: keys without a deal id (made by an older fssc): deal new keys")
    return deal


def used_batches(party_dir: str) -> list[int]:
    """Batch ids with a used marker in one party's key folder (their key files are normally deleted)."""
    return _ids(party_dir, ".used")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def folder_status(party_dir: str) -> dict | None:
    """What one party's key folder holds, from file names, key headers and used markers only (no key body
    is read): None if it has no batch or setup file. Per deal: its program, unused and used batch ids, the
    used ones whose key file is still there (a session died mid-batch), bytes on disk, setup files."""
    unused, used = unused_batches(party_dir), used_batches(party_dir)
    setups = sorted(
        os.path.basename(p) for ext in (".key", ".commit") for p in glob.glob(os.path.join(party_dir, f"setup-*{ext}"))
    )
    if not (unused or used or setups):
        return None
    deals: dict[str, dict] = {}
    parties: set[int] = set()

    def entry(deal: str) -> dict:
        return deals.setdefault(
            deal,
            {
                "deal": deal,
                "program": None,
                "unused": [],
                "used": [],
                "used_with_key_file": [],
                "bytes": 0,
                "setup": [],
            },
        )

    def note(d: dict, header: dict) -> None:
        d["program"] = d["program"] or header.get("program")
        if isinstance(header.get("party"), int):
            parties.add(header["party"])

    for b in unused:
        path = _batch_path(party_dir, b)
        h = peek_header(path)
        d = entry(str(h.get("deal")))
        note(d, h)
        d["unused"].append(b)
        d["bytes"] += _size(path)
    for b in used:
        path = _batch_path(party_dir, b)
        marker = _marker(path)
        with open(marker) as fh:  # open_batch writes the batch's deal id into its marker
            deal = fh.read().strip() or "unknown"
        d = entry(deal)
        d["used"].append(b)
        d["bytes"] += _size(marker)
        if os.path.exists(path):
            d["used_with_key_file"].append(b)
            d["bytes"] += _size(path)
    for name in setups:
        m = re.fullmatch(r"setup-(.+)\.(key|commit)", name)
        if not m:
            continue
        d = entry(m.group(1))
        path = os.path.join(party_dir, name)
        if m.group(2) == "key":
            note(d, peek_header(path))
        d["setup"].append(name)
        d["bytes"] += _size(path)
    programs = sorted({d["program"] for d in deals.values() if d["program"]})
    return {
        "path": party_dir,
        "party": sorted(parties),
        "programs": programs,
        "deals": list(deals.values()),
        "bytes": sum(d["bytes"] for d in deals.values()),
    }


def keys_status(keys_dir: str) -> list[dict]:
    """``folder_status`` of each party folder in ``keys_dir`` (its p0/ and p1/, or ``keys_dir`` itself if it
    is one party's folder); FsscError if there is none."""
    subs = [os.path.join(keys_dir, d) for d in sorted(set(ROLE_DIRS.values()))]
    found = [s for s in (folder_status(d) for d in subs if os.path.isdir(d)) if s is not None]
    if not found and os.path.isdir(keys_dir):
        own = folder_status(keys_dir)
        found = [own] if own is not None else []
    if not found:
        raise FsscError(f"{keys_dir}: not an fssc key folder (no p0/ or p1/ with batch or setup files)")
    return found


def choose_batches(party_dir: str, party: int, n: int, program_hash: str) -> tuple[str, list[int]]:
    """P0: ``n`` unused batches of one deal (the oldest deal that has enough), checked; returns (deal, ids)."""
    by_deal: dict[str, list[int]] = {}
    for b in unused_batches(party_dir):
        by_deal.setdefault(batch_deal(party_dir, b), []).append(b)
    for deal, ids in by_deal.items():
        if len(ids) >= n:
            check_batches(party_dir, party, ids[:n], program_hash, deal)
            return deal, ids[:n]
    have = ", ".join(f"{len(ids)} of deal {d[:8]}" for d, ids in by_deal.items()) or "none"
    raise FsscError(
        f"{n} batch(es) of inputs need {n} unused key batches of one deal; {party_dir} has {have} "
        "(deal more with `fssc deal --batches N`)"
    )


def read_setup(party_dir: str, program_hash: str, deal: str) -> bytes:
    """P1: the seed of a deal's weight masks A (keys/p1/setup-<deal>.key)."""
    path = setup_path(party_dir, deal)
    r = KeyReader(path, program=program_hash, party=1, deal=deal)
    if r.header.get("kind") != "setup":
        raise FsscError(f"{path}: not a setup key")
    seed = r.get("setup.seed").tobytes()
    r.close()
    return seed


def _weights_mac(salt: bytes, program_hash: str, deal: str, W: dict[str, np.ndarray], tags) -> str:
    """HMAC-SHA256 keyed by P1's salt over the weights masked in the setup message (tag, dtype, shape, bytes)."""
    mac = hmac.new(salt, json.dumps([program_hash, deal]).encode(), hashlib.sha256)
    for tag in sorted(tags):
        w = np.ascontiguousarray(W[tag + ".w"])
        mac.update(json.dumps([tag, w.dtype.str, list(w.shape)]).encode())
        mac.update(w.data.cast("B") if w.size else b"")
    return mac.hexdigest()


def bind_weights(party_dir: str, program_hash: str, deal: str, W: dict[str, np.ndarray], tags) -> None:
    """P1: commit to the weights the first time a deal's seed masks them; refuse other weights afterwards.

    The commitment (keys/p1/setup-<deal>.commit, 0600) is an HMAC keyed by a random salt that never
    leaves P1's key folder, so nobody else could test a guess of W against it; it is written durably
    before W^ can be sent."""
    path = setup_path(party_dir, deal)[: -len(".key")] + ".commit"
    salt = os.urandom(SALT_BYTES)
    mac = _weights_mac(salt, program_hash, deal, W, tags)
    record = {"program": program_hash, "deal": deal, "salt": salt.hex(), "hmac_sha256": mac}
    if create_durable(path, json.dumps(record, sort_keys=True).encode()):
        return
    try:
        with open(path) as fh:
            old = json.load(fh)
        same = hmac.compare_digest(
            str(old["hmac_sha256"]), _weights_mac(bytes.fromhex(old["salt"]), program_hash, deal, W, tags)
        )
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if not same:
        raise FsscError(
            f"{path}: the weight masks of deal {deal[:8]} already hid other weights, and masking these with "
            "them would show the data owner the difference; deal new keys (`fssc deal`) for these weights"
        )


def p1_masked_weights(party_dir: str, program_hash: str, deal: str, mod, W: dict[str, np.ndarray]):
    """P1's setup message for a session on ``deal``'s batches: W^ = W + A, once the weights are bound."""
    seed = read_setup(party_dir, program_hash, deal)
    bind_weights(party_dir, program_hash, deal, W, mod.LINEAR_WEIGHTS)
    return masked_weights(mod, W, seed)


# ------------------------------------------------------------ the two sides
def masked_weights(mod, W: dict[str, np.ndarray], setup_seed: bytes) -> dict[str, np.ndarray]:
    """W^ = W + A for the layers P1's program lists."""
    from fssc.runtime import lib

    return lib.masked_weights(W, setup_seed, mod.LINEAR_WEIGHTS)


def send_weights(chan: Channel, w_hat: dict[str, np.ndarray]) -> None:
    for tag in sorted(w_hat):
        chan.send(w_hat[tag])


def recv_weights(chan: Channel, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """P0: W^ for each weighted layer (tag -> weight shape, the program's ``LINEAR_WEIGHTS``)."""
    return {tag: chan.recv(shapes[tag], np.uint64, step=f"masked weights {tag}") for tag in sorted(shapes)}


def p0_start_batch(chan, batch: int) -> None:
    """P0, once its batch is open (marked used, durably): tells P1 to open its half of ``batch``."""
    chan.send_json({"start": batch})


def p1_await_batch(chan, batch: int) -> None:
    """P1: wait for the data owner to start ``batch`` (it has marked the batch used) before opening it."""
    try:
        msg = chan.recv_json()
    except FsscError as e:
        raise FsscError(f"start of batch {batch}: {e}") from None
    if msg.get("start") != batch:
        raise FsscError(f"start of batch {batch}: the data owner sent {json.dumps(msg)[:80]}, expected batch {batch}")


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
    """One batch on P0's side; ``inputs`` maps every input's name to its encoded batch. ``timings`` adds up
    over batches: seconds ``offline`` and ``online`` (wall) and ``offline_cpu``, ``online_cpu`` (this process's CPU
    time: what a busy machine's other processes do not move), and of the online phase the seconds blocked receiving
    (``online_wait``), bytes sent and received (``online_sent``, ``online_received``) and rounds."""
    P = Party(0, keys, chan)
    t, c = time.perf_counter(), time.process_time()
    z0 = mod.offline(P, w_hat)
    t1, c1 = time.perf_counter(), time.process_time()
    before = (chan.wait_s, chan.bytes_sent, chan.bytes_received, chan.rounds)
    out = mod.online(P, inputs, z0)
    t2, c2 = time.perf_counter(), time.process_time()
    if not keys.skip_to_end():
        raise FsscError(f"{keys.name}: key records left over after the program (program and keys out of step)")
    if timings is not None:
        timings["offline"] = timings.get("offline", 0.0) + t1 - t
        timings["online"] = timings.get("online", 0.0) + t2 - t1
        timings["offline_cpu"] = timings.get("offline_cpu", 0.0) + c1 - c
        timings["online_cpu"] = timings.get("online_cpu", 0.0) + c2 - c1
        after = (chan.wait_s, chan.bytes_sent, chan.bytes_received, chan.rounds)
        names = ("online_wait", "online_sent", "online_received", "online_rounds")
        for name, a, b in zip(names, after, before, strict=True):
            timings[name] = timings.get(name, 0) + a - b
    return out
