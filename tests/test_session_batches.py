"""A session's key batches (``session.SessionBatches``): the next batch's key file is read and verified while
the current batch runs, used batches' key files are deleted by the same thread, and nothing about one-time
use changes: a batch is verified whole before it is marked used, marked used only when it starts, and a
session that ends early leaves the batch it verified ahead unused.

Oracles: the key files and used markers on disk, ``KeyReader``'s checksum, the calls this process makes.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest
from fssc.compiler.backend import trust
from fssc.runtime import session
from tiny_models import compile_tiny

from fssc.errors import FsscError


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("session_batches")
    compile_tiny(tmp)
    return tmp / "prog"


def _dealt(prog: Path, keys: Path, n: int) -> tuple[str, str, Path]:
    """n batches dealt into keys/: (program hash, deal id, P0's folder)."""
    assert [b for b, *_ in trust.deal(str(prog), str(keys), n)] == list(range(n))
    program_hash = json.loads((prog / "manifest.json").read_text())["program_hash"]
    deal = session.batch_deal(str(keys / "p0"), 0)
    return program_hash, deal, keys / "p0"


def _corrupt(path: Path, bit: int = 0x01) -> None:
    """Flip one bit in the middle of a key file (its checksum then fails)."""
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= bit
    path.write_bytes(bytes(body))


def _service(program_hash: str, p1: Path, log: list[str]):
    """The model owner's ``serve.Service`` over key folder p1, as far as its batches go (no program loaded)."""
    from types import SimpleNamespace

    from fssc.runtime.serve import Service

    return Service(SimpleNamespace(PROGRAM_HASH=program_hash), {}, str(p1), {}, log.append)


def _state(folder: Path, b: int) -> tuple[bool, bool]:
    """(key file there, used marker there) of batch b."""
    return (folder / f"batch{b:04d}.key").exists(), (folder / f"batch{b:04d}.used").exists()


def test_the_next_batch_is_verified_while_one_runs_and_used_files_are_deleted(prog, tmp_path, monkeypatch):
    program_hash, deal, p0 = _dealt(prog, tmp_path / "keys", 3)
    read: dict[int, threading.Event] = {b: threading.Event() for b in range(3)}
    real = session._read_batch

    def recording(party_dir, party, batch, *rest):
        r = real(party_dir, party, batch, *rest)
        assert threading.current_thread() is not threading.main_thread()  # the session's disk thread
        read[batch].set()
        return r

    monkeypatch.setattr(session, "_read_batch", recording)
    warnings: list[str] = []
    with session.SessionBatches(str(p0), 0, [0, 1, 2], program_hash, deal, warnings.append, pytest.fail) as batches:
        for b in range(3):
            with batches.use(b) as keys:
                assert keys.header["batch"] == b and _state(p0, b) == (True, True)
                if b < 2:  # the next batch is read and verified during this one, and not marked used
                    assert read[b + 1].wait(30)
                    assert _state(p0, b + 1) == (True, False)
    assert warnings == []
    assert [_state(p0, b) for b in range(3)] == [(False, True)] * 3


def test_a_corrupt_next_batch_is_refused_before_it_is_marked_used(prog, tmp_path):
    program_hash, deal, p0 = _dealt(prog, tmp_path / "keys", 2)
    _corrupt(p0 / "batch0001.key", 0x40)
    with session.SessionBatches(str(p0), 0, [0, 1], program_hash, deal, pytest.fail) as batches:
        with batches.use(0):
            pass
        with pytest.raises(FsscError, match="checksum mismatch"), batches.use(1):
            pytest.fail("a corrupt batch was handed out")
    assert _state(p0, 0) == (False, True) and _state(p0, 1) == (True, False)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_session_that_ends_early_leaves_its_verified_next_batch_unused(prog, tmp_path, monkeypatch):
    program_hash, deal, p0 = _dealt(prog, tmp_path / "keys", 2)
    fds = _open_fds()
    opened: dict[int, object] = {}
    read_ahead = threading.Event()
    real = session._read_batch

    def recording(party_dir, party, batch, *rest):
        opened[batch] = r = real(party_dir, party, batch, *rest)  # held here: only close() can close it
        if batch == 1:
            read_ahead.set()
        return r

    monkeypatch.setattr(session, "_read_batch", recording)
    aborted: list[bool] = []  # on_error (the channel's abort) runs before close() waits for the disk thread
    with (
        pytest.raises(RuntimeError, match="peer gone"),
        session.SessionBatches(
            str(p0), 0, [0, 1], program_hash, deal, pytest.fail, on_error=lambda: aborted.append(opened[1]._fh.closed)
        ) as batches,
        batches.use(0),
    ):
        assert read_ahead.wait(30)  # batch 1 is read and verified: close() must close what it opened
        raise RuntimeError("peer gone")
    assert _state(p0, 0) == (False, True) and _state(p0, 1) == (True, False)
    assert session.unused_batches(str(p0)) == [1]
    assert aborted == [False] and all(r._fh.closed for r in opened.values())
    opened.clear()
    assert _open_fds() == fds


@pytest.mark.parametrize("child_runs", [True, False])
def test_files_read_ahead_are_hashed_by_a_child_process_or_here_if_it_cannot_run(
    prog, tmp_path, monkeypatch, child_runs
):
    """Above ``CHILD_DIGEST_MIN`` bytes the checksum comes from ``checksum.child_digest``; if that cannot run,
    from this process, with one warning line: a key file is checked either way (the corrupt one is refused)."""
    program_hash, deal, p0 = _dealt(prog, tmp_path / "keys", 3)
    _corrupt(p0 / "batch0002.key")
    calls: list[int] = []
    real = session.child_digest

    def child(fd, end, cancel=None):
        calls.append(end)
        if not child_runs:
            raise OSError("the checksum's child process failed (it could not start)")
        return real(fd, end, cancel)

    monkeypatch.setattr(session, "child_digest", child)
    monkeypatch.setattr(session.SessionBatches, "CHILD_DIGEST_MIN", 0)
    warnings: list[str] = []
    with session.SessionBatches(str(p0), 0, [0, 1, 2], program_hash, deal, warnings.append, pytest.fail) as batches:
        for b in (0, 1):
            with batches.use(b) as keys:
                assert keys.header["batch"] == b
        with pytest.raises(FsscError, match="checksum mismatch"), batches.use(2):
            pytest.fail("a corrupt batch was handed out")
    if child_runs:
        assert len(calls) == 3 and warnings == []  # every batch was read ahead (the first from the start)
    else:  # tried once, then every file is hashed in the thread: one warning for the session
        assert len(calls) == 1 and len(warnings) == 1 and "\n" not in warnings[0]
        assert (
            warnings[0].startswith("the checksum's child process failed") and "in this process instead" in warnings[0]
        )
    assert [_state(p0, b) for b in range(3)] == [(False, True), (False, True), (True, False)]


def test_a_refused_start_leaves_the_batch_unused(prog, tmp_path):
    """P1 marks its batch used only once the data owner has started it (``before_marking``)."""
    program_hash, deal, p0 = _dealt(prog, tmp_path / "keys", 1)

    def peer_left():
        raise FsscError("the data owner left")

    with (
        session.SessionBatches(str(p0), 0, [0], program_hash, deal, pytest.fail) as batches,
        pytest.raises(FsscError, match="left"),
        batches.use(0, before_marking=peer_left),
    ):
        pytest.fail("the batch ran")
    assert _state(p0, 0) == (True, False)


@pytest.mark.parametrize("removed", [False, True])
def test_a_failed_deletion_is_one_warning_and_the_batch_stays_used(prog, tmp_path, monkeypatch, removed):
    """The warning names the file: still there (delete it by hand), or gone but maybe not durably (the folder's
    fsync failed after the removal)."""
    program_hash, deal, p0 = _dealt(prog, tmp_path / "keys", 1)
    path = p0 / "batch0000.key"

    def refuse(name):
        if removed:
            os.remove(name)
            raise OSError(errno.EIO, "Input/output error")  # as fsync_dir's error: no file name
        raise PermissionError(errno.EACCES, "Permission denied", name)

    monkeypatch.setattr(session, "remove_durable", refuse)
    warnings: list[str] = []
    batches = session.SessionBatches(str(p0), 0, [0], program_hash, deal, warnings.append)
    with batches, batches.use(0):
        pass
    batches.close()  # a second close reports nothing again
    assert len(warnings) == 1 and "\n" not in warnings[0] and str(path) in warnings[0]
    if removed:
        assert "deleted, but the deletion may not be durable (Input/output error)" in warnings[0]
        assert _state(p0, 0) == (False, True)
        return
    assert "Permission denied" in warnings[0] and "delete it by hand" in warnings[0]
    assert _state(p0, 0) == (True, True)
    monkeypatch.undo()
    with pytest.raises(FsscError, match=r"already used.*now deleted"):  # refused, and the leftover file goes
        session.open_batch(str(p0), 0, 0, program_hash, deal)
    assert _state(p0, 0) == (False, True)


def test_the_child_process_checksum_is_the_in_process_one(tmp_path):
    """``checksum.child_digest`` hashes the file its parent has open (the descriptor, not the name)."""
    from fssc.runtime import checksum

    data = bytes(range(256)) * 40_000 + b"tail"  # ends in a partial page
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        path.rename(tmp_path / "moved.bin")  # the name now points nowhere: the child reads the open file
        for end in (0, 1, 4096, len(data) - 3, len(data)):
            want = checksum.checksum()
            want.update(data[:end])
            assert checksum.child_digest(fh.fileno(), end) == checksum.file_digest(fh.fileno(), end) == want.digest()
        with pytest.raises(OSError, match=r"checksum's child process failed .*length is greater than file size"):
            checksum.child_digest(fh.fileno(), len(data) + 1)  # the child fails: one line saying why


def test_the_service_reads_the_likely_first_batch_before_a_session_asks(prog, tmp_path, monkeypatch):
    """``fssc serve`` reads the lowest unused batch's key file while it waits for a data owner. A session that
    asks for that batch first gets it read and verified (not read again) and uses it as usual; one that asks for
    it later makes the service give it up (it is read again in its turn); one that does not ask for it leaves it
    for the next session. Reading ahead marks nothing used, and stopping the service closes what it read."""
    program_hash, deal, _ = _dealt(prog, tmp_path / "keys", 3)
    p1 = tmp_path / "keys" / "p1"
    reads: list[int] = []
    real = session._read_batch
    monkeypatch.setattr(session, "_read_batch", lambda d, party, b, *rest: reads.append(b) or real(d, party, b, *rest))
    log: list[str] = []
    service = _service(program_hash, p1, log)
    service._read_ahead()
    ahead = service._ahead
    assert ahead is not None and ahead.reads_ahead() == [0]

    other = service._batches([1, 2], deal, log.append, None)  # does not ask for batch 0: it stays read ahead
    assert other is not ahead and service._ahead is ahead
    other.close()
    later = service._batches([1, 0], deal, log.append, None)  # asks for it second: given up, read in its turn
    assert later is not ahead and service._ahead is None
    later.close()

    service._read_ahead()
    ahead = service._ahead
    assert ahead is not None
    with service._batches([0, 1], deal, log.append, pytest.fail) as batches:
        assert batches is ahead and service._ahead is None
        with batches.use(0) as keys:
            assert keys.header["batch"] == 0
    assert reads.count(0) == 2, reads  # batch 0: read ahead twice (the first given up), never by the session
    assert _state(p1, 0) == (False, True) and _state(p1, 1) == (True, False) and _state(p1, 2) == (True, False)

    service._read_ahead()  # the lowest unused batch now: 1
    assert service._ahead is not None and service._ahead.reads_ahead() == [1]
    assert not service.ledger.reserve([1], deal)  # a session holds 1 (it reserved it before taking a read ahead)
    service._read_ahead()  # 1 is no longer the batch to read ahead: given up for 2
    assert service._ahead is not None and service._ahead.reads_ahead() == [2]
    service.ledger.release([1])
    service._close_ahead()
    service._read_ahead()  # the service ended: nothing more is read ahead
    assert service._ahead is None and _state(p1, 1) == (True, False) and _state(p1, 2) == (True, False)
    assert not log, log


def test_a_corrupt_batch_read_ahead_fails_only_the_session_that_asks_for_it(prog, tmp_path):
    """The service reads a corrupt first batch ahead without a word; the session that starts with it is refused
    as before (the checksum), the batch stays unused, and the next batch is read ahead for the next session."""
    program_hash, deal, _ = _dealt(prog, tmp_path / "keys", 2)
    p1 = tmp_path / "keys" / "p1"
    _corrupt(p1 / "batch0000.key")
    log: list[str] = []
    service = _service(program_hash, p1, log)
    service._read_ahead()
    aborted: list[bool] = []
    ahead = service._ahead
    with (
        pytest.raises(FsscError, match="checksum"),
        service._batches([0], deal, log.append, lambda: aborted.append(True)) as batches,
    ):
        assert batches is ahead  # the session took the batch read ahead, and meets its failure there
        with batches.use(0):
            pytest.fail("a corrupt batch was used")
    assert aborted == [True] and _state(p1, 0) == (True, False)
    assert not log, log
    service.ledger.reserve([0], deal)  # what a session that failed on 0 would still hold while it logs
    service._read_ahead()
    assert service._ahead is not None and service._ahead.reads_ahead() == [1]
    service._close_ahead()


def test_a_batch_written_after_it_was_verified_ahead_is_not_used(prog, tmp_path):
    """A key file read ahead is verified once, and its records are read from the file again as they are used:
    one written in between (here: one byte rewritten with its own value, which changes only the file's
    modification time) is refused before it is marked used, and the batch stays unused."""
    program_hash, deal, p0 = _dealt(prog, tmp_path / "keys", 2)
    with session.SessionBatches(str(p0), 0, [0, 1], program_hash, deal, pytest.fail) as batches:
        with batches.use(0):
            pass  # batch 1 is read and verified meanwhile
        assert batches.reads_ahead() == [1]
        batches._read[1].result()  # verified
        path = p0 / "batch0001.key"
        st = path.stat()
        with open(path, "r+b") as fh:
            fh.seek(100)
            byte = fh.read(1)
            fh.seek(100)
            fh.write(byte)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock may not have moved
        with pytest.raises(FsscError, match="since it was verified"), batches.use(1):
            pytest.fail("a key file written after its check was used")
    assert _state(p0, 1) == (True, False)


def test_closing_a_session_stops_the_check_of_a_batch_it_will_not_use(prog, tmp_path, monkeypatch):
    """A session that ends while its next batch's key file is being checked by a child process (gigabytes at
    224x224) does not wait for the check: ``close`` kills the child, without a warning, and the batch stays
    unused. The child here would take ten minutes."""
    import sys

    from fssc.runtime import checksum

    program_hash, deal, p0 = _dealt(prog, tmp_path / "keys", 1)
    pid_file = tmp_path / "child.pid"
    slow = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    monkeypatch.setattr(checksum, "CHILD", [sys.executable, "-c", slow])
    monkeypatch.setattr(session.SessionBatches, "CHILD_DIGEST_MIN", 0)
    warnings: list[str] = []
    batches = session.SessionBatches(str(p0), 0, [0], program_hash, deal, warnings.append)
    while not (pid_file.exists() and pid_file.read_text()):
        time.sleep(0.01)
    closer = threading.Thread(target=batches.close, daemon=True)
    closer.start()
    closer.join(60)
    assert not closer.is_alive(), "close() waited for the check of a batch it will not use"
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pid_file.read_text()), 0)
    assert warnings == [] and _state(p0, 0) == (True, False)


def test_a_key_file_replaced_under_its_name_after_its_check_is_not_used(prog, tmp_path):
    """The used marker and the deletion go by the file's name: a batch whose name now names another file (here:
    the same bytes, copied and renamed over it) is refused before it is marked used."""
    program_hash, deal, p0 = _dealt(prog, tmp_path / "keys", 1)
    with session.SessionBatches(str(p0), 0, [0], program_hash, deal, pytest.fail) as batches:
        batches._read[0].result()  # verified
        path = p0 / "batch0000.key"
        copy = p0 / "copy.part"
        copy.write_bytes(path.read_bytes())
        os.replace(copy, path)
        with pytest.raises(FsscError, match="since it was verified"), batches.use(0):
            pytest.fail("a key file replaced after its check was used")
    assert _state(p0, 0) == (True, False)
