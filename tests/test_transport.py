"""The transport is bounded.

Two real processes on a tiny CNN: the model owner (P1) runs its generated
program; data owners are either the real party0 program in a subprocess, or
the real party0 program run in this process with one message forged (an
authenticated but misbehaving peer: it holds party 0's certificate). P1 must
refuse each misbehaving or idle client with one line and keep serving until
one data owner's session completes.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from fssc.runtime.transport import TcpChannel
from parties import run_p0, start_p1, stop
from tiny_models import compile_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, run_fssc):
    """A compiled tiny CNN (logits), certificates, keys for six batches and one input batch."""
    tmp = tmp_path_factory.mktemp("transport")
    compile_tiny(tmp, run_fssc, certs=True, batches=6)
    return {"prog": tmp / "prog", "certs": tmp / "certs", "keys": tmp / "keys", "x": tmp / "x.npy"}


@pytest.fixture
def keys(tiny, tmp_path) -> Path:
    """A private copy of the key directories (batches are one-time)."""
    k = tmp_path / "keys"
    shutil.copytree(tiny["keys"], k)
    return k


def _serve_right_peer(tiny, keys, p1, port):
    """The real data owner completes its session; P1 then exits 0. Returns P1's (stdout, stderr)."""
    r0 = run_p0(tiny["prog"], keys, tiny["certs"], port, "--input", tiny["x"], timeout=120)
    out1, err1 = stop(p1)
    assert r0.returncode == 0, f"data owner failed:\n{r0.stderr}\nP1:\n{out1}\n{err1}"
    assert "label" in r0.stdout
    assert p1.returncode == 0, f"model owner failed:\n{out1}\n{err1}"
    assert "served 1 batch(es)" in out1
    assert "Traceback" not in out1 + err1
    return out1, err1


def _forging_p0(tiny, keys, monkeypatch, forge):
    """Run the real party0 program in this process; ``forge(chan, arr, orig)`` replaces its first array send
    (the masked input). Returns its exit code."""
    from fssc.runtime import party_main, session

    mod = session.load_program(str(tiny["prog"]), "party0")
    orig = TcpChannel.send
    state = {"first": True}

    def send(self, arr):
        if state["first"]:
            state["first"] = False
            return forge(self, arr, orig)
        return orig(self, arr)

    monkeypatch.setattr(TcpChannel, "send", send)
    return party_main.main(
        "party0",
        mod,
        ["--keys", str(keys / "p0"), "--peer", f"127.0.0.1:{tiny['port']}", "--certs", str(tiny["certs"])]
        + ["--input", str(tiny["x"]), "--timeout", "60"],
    )


class _Claims2To36(bytes):
    """No bytes that say they are 2^36: the channel's sender frames them with that length, in its order."""

    def __len__(self) -> int:
        return 1 << 36


def _oversize(chan, arr, orig):
    """A frame length of 2^36 bytes (the old MAX_FRAME) and no payload, queued behind what the data owner sent
    before (its sender thread writes the frames in order)."""
    chan.send_bytes(_Claims2To36())


def _wrong_shape(chan, arr, orig):
    """The right number of bytes in the wrong shape (2x3x144 instead of 2x3x12x12)."""
    orig(chan, arr.reshape(arr.shape[0], arr.shape[1], -1))


def _wrong_dtype(chan, arr, orig):
    """The right shape as int64 instead of uint64."""
    orig(chan, arr.view(np.int64))


FORGED = [  # (forge, what P1's one line must say it received)
    (_oversize, "frame of 68719476736 bytes"),
    (_wrong_shape, "peer sent 2x3x144 uint64"),
    (_wrong_dtype, "peer sent 2x3x12x12 int64"),
]


def test_forged_input_is_refused_and_p1_keeps_serving(tiny, keys, tmp_path, monkeypatch, capsys):
    """Three authenticated data owners send a forged masked input (oversize, wrong shape, wrong dtype); each
    session is refused with one line naming the step, and the fourth, honest data owner is served."""
    p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp_path, timeout=120)
    try:
        for forge, _ in FORGED:
            with monkeypatch.context() as m:
                rc = _forging_p0({**tiny, "port": port}, keys, m, forge)
            assert rc == 2, capsys.readouterr()
            assert p1.poll() is None, f"the model owner died on a forged message ({forge.__name__})"
    except BaseException:
        stop(p1, 5)
        raise
    out1, err1 = _serve_right_peer(tiny, keys, p1, port)
    failed = [ln for ln in (out1 + err1).splitlines() if "failed" in ln]
    assert len(failed) == len(FORGED), out1 + err1
    for line, (_, received) in zip(failed, FORGED, strict=True):
        # one line naming the step, what was expected and what came
        assert "in.input" in line and "expected 2x3x12x12 uint64" in line and received in line, line


def test_exchange_of_the_wrong_shape_is_refused_at_its_gate():
    """In process: a peer whose opened values have the wrong shape is refused naming the gate."""
    from fssc.runtime.channel import queue_pair

    from fssc.errors import FsscError

    a, b = queue_pair(timeout=5)
    b.step = "op7.L1"
    a.send(np.zeros(5, np.uint64))  # longer than expected: refused before its payload is read
    with pytest.raises(FsscError, match=r"op7\.L1 .*frame of 50 bytes, expected 4 uint64 \(42 bytes\)"):
        b.exchange(np.zeros(4, np.uint64))
    a.send(np.zeros(3, np.uint64))
    with pytest.raises(FsscError, match=r"peer sent 3 uint64, expected 4 uint64"):
        b.exchange(np.zeros(4, np.uint64))
    a.send(np.zeros((1, 4), np.uint64))  # as many bytes, another shape
    with pytest.raises(FsscError, match=r"peer sent 1x4 uint64, expected 2x2 uint64"):
        b.exchange(np.zeros((2, 2), np.uint64))
    a.send(np.zeros(4, np.uint8))
    with pytest.raises(FsscError, match=r"peer sent 4 uint8, expected 4 uint64"):
        b.exchange(np.zeros(4, np.uint64))
    a.send_bytes(b"\x07")  # not even a header
    with pytest.raises(FsscError, match="peer sent a malformed frame of 1 bytes, expected 4 uint64"):
        b.exchange(np.zeros(4, np.uint64))


def test_data_owner_refuses_masked_weights_of_the_wrong_shape(tiny):
    """P0's side: the model owner's W^ must have the weight shapes P0's program lists."""
    from fssc.runtime import session
    from fssc.runtime.channel import queue_pair

    from fssc.errors import FsscError

    shapes = session.load_program(str(tiny["prog"]), "party0").LINEAR_WEIGHTS
    tag = sorted(shapes)[-1]
    p1, p0 = queue_pair(timeout=5)
    for t in sorted(shapes):
        p1.send(np.zeros([shapes[t][0] + (t == tag), *shapes[t][1:]], np.uint64))
    want = "x".join(map(str, shapes[tag]))
    with pytest.raises(FsscError, match=rf"masked weights {tag} .*expected {want} uint64"):
        session.recv_weights(p0, shapes)


@pytest.mark.slow
def test_idle_connections_do_not_stop_the_data_owner(tiny, keys, tmp_path):
    p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp_path, timeout=120)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        time.sleep(0.2)  # both are accepted before the data owner connects
        _serve_right_peer(tiny, keys, p1, port)
    finally:
        for s in idle:
            s.close()
        stop(p1, 5)


def test_pending_handshakes_are_bounded(tiny, keys, tmp_path):
    from fssc.runtime.transport import MAX_PENDING

    p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp_path, timeout=120)
    idle = []
    try:
        idle += [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_PENDING)]
        time.sleep(0.5)
        extra = socket.create_connection(("127.0.0.1", port))
        idle.append(extra)
        extra.settimeout(10)
        assert extra.recv(1) == b"", "a connection beyond the bound was not closed"
        assert p1.poll() is None
        for s in idle:
            s.close()
        idle = []
        out1, _ = _serve_right_peer(tiny, keys, p1, port)
        assert "too many pending" in out1
    finally:
        for s in idle:
            s.close()
        stop(p1, 5)


@pytest.mark.slow
def test_bad_certificate_is_refused_and_p1_keeps_listening(tiny, keys, tmp_path, run_fssc):
    rogue = tmp_path / "rogue"
    assert run_fssc("certs", "-o", rogue).returncode == 0
    p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp_path, timeout=120)
    try:
        r0 = run_p0(tiny["prog"], keys, rogue, port, "--input", tiny["x"], timeout=60)
        assert r0.returncode == 2 and "Traceback" not in r0.stderr, r0.stderr
        assert p1.poll() is None
    except BaseException:
        stop(p1, 5)
        raise
    out1, _ = _serve_right_peer(tiny, keys, p1, port)
    assert "refused a connection" in out1


def test_refused_handshake_does_not_end_the_model_owner(tiny, keys, tmp_path):
    """A data owner asking for a batch the model owner has used is refused; the next one is served."""
    (keys / "p1" / "batch0000.used").touch()
    p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp_path, timeout=120)
    try:
        r0 = run_p0(tiny["prog"], keys, tiny["certs"], port, "--input", tiny["x"], timeout=60)
        assert r0.returncode == 2 and "not available" in r0.stderr, r0.stderr
        time.sleep(0.5)
        assert p1.poll() is None, "the model owner exited after one refused handshake"
    except BaseException:
        stop(p1, 5)
        raise
    (keys / "p0" / "batch0000.used").touch()  # the data owner moves on to batch 1
    out1, _ = _serve_right_peer(tiny, keys, p1, port)
    assert "handshake refused" in out1


def test_any_exception_is_one_line(tiny, keys, monkeypatch, capsys):
    """An exception that is not an FsscError (here: memory runs out) is one line, not a traceback."""
    from fssc.runtime import data_owner, party_main, session

    def connect(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(data_owner, "connect", connect)
    mod = session.load_program(str(tiny["prog"]), "party0")
    argv = ["--keys", str(keys / "p0"), "--peer", "127.0.0.1:9", "--certs", str(tiny["certs"]), "--input", tiny["x"]]
    assert party_main.main("party0", mod, [str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "fssc party0: error: internal error: out of memory (FSSC_DEBUG=1 shows where)", err


def test_a_peer_that_only_sends_heartbeats_is_stuck_not_alive(monkeypatch):
    """Heartbeats prove a live process, not progress: a receive gives up after STALL_TIMEOUTS silence timeouts
    in all (here 3 x 0.4 s), in one line, although the peer never fell silent."""
    import socket as socketlib

    from fssc.runtime import transport

    from fssc.errors import FsscError

    monkeypatch.setattr(transport, "STALL_TIMEOUTS", 3)
    a_tx, b_rx = socketlib.socketpair()
    b_tx, a_rx = socketlib.socketpair()
    a = transport.TcpChannel(a_tx, a_rx, timeout=0.4)  # sends nothing but its heartbeats
    b = transport.TcpChannel(b_tx, b_rx, timeout=0.4)
    t = time.monotonic()
    with pytest.raises(FsscError, match=r"^peer sent only heartbeats for 1 s: alive but making no progress"):
        b.recv_json()
    assert 1.2 <= time.monotonic() - t < 10
    for c in (a, b):
        c.close()


def test_a_hello_wait_is_bounded_even_by_a_beating_peer():
    """A client that sends only heartbeats (or nothing) cannot hold a session slot past the hello bound: the
    bounded read fails after ``within`` seconds, not after the session's 40 silence timeouts."""
    import struct
    import threading

    from fssc.runtime.transport import HEARTBEAT, _recv_frame

    from fssc.errors import FsscError

    for beating in (True, False):
        a, b = socket.socketpair()
        a.settimeout(30.0)
        stop_beats = threading.Event()

        def beat(b=b, beating=beating, stop_beats=stop_beats):
            while beating and not stop_beats.is_set():
                b.sendall(struct.pack("<Q", HEARTBEAT))
                time.sleep(0.05)

        t = threading.Thread(target=beat, daemon=True)
        t.start()
        t0 = time.monotonic()
        with pytest.raises(FsscError, match="heartbeats for 1 s" if beating else "sent nothing for 1 s"):
            _recv_frame(a, 30.0, 1024, at_most=True, within=1.0)
        assert time.monotonic() - t0 < 10, "the hello bound did not hold"
        assert a.gettimeout() == 30.0, "the silence timeout is restored"
        stop_beats.set()
        t.join()
        a.close()
        b.close()
