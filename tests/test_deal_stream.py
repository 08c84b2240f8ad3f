"""``fssc deal --to``: the dealer streams a party's key batches to its receiver (``fssc keys receive``) over
mutual TLS, and the parties run them as batches dealt to disk.

* Streamed to both parties' receivers (two batches, two worker processes): the receivers file them under the
  names and modes ``fssc deal -o`` gives (0600 files, 0700 folders, the setup file with the model owner),
  ``fssc keys status`` sees them as it sees dealt folders, and a two-party session on them gives the
  fixed-point interpreter's logits bit for bit (within 0.05 of onnxruntime's) and their labels.
* Refusals: a party's certificate posing as the dealer, another CA's dealer, a receiver whose certificate is
  the other party's (the dealer refuses it), keys for another party or program, a batch id the receiver
  holds (never overwritten, used or not), a file whose header names another batch, a stream cut mid-file and
  a dealer process that dies mid-batch: each leaves no file that looks complete, and no ``.part``.
* A file name other than the one a deal gives that batch (``batch00005.key``, other digits) is refused; a
  client with a party's certificate is dropped right after TLS, one with the dealer's that sends only
  heartbeats once the handshake timeout is over; connections that have not said their hello are capped.

Oracles: the fixed-point interpreter and onnxruntime (logits), the key files' bytes, headers and checksums
(``KeyReader``), the folders' listings and modes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import fssc_command
from fssc.compiler.backend import trust
from fssc.runtime import keystream, session
from fssc.runtime.keys import KeyReader, KeyWriter
from fssc.runtime.results import read_results
from parties import run_p0, start_p1, stop
from tiny_models import compile_tiny

from fssc.errors import FsscError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deal_stream")
    _, x = compile_tiny(tmp, certs=True)
    h = json.loads((tmp / "prog" / "manifest.json").read_text())["program_hash"]
    return {"tmp": tmp, "prog": tmp / "prog", "certs": tmp / "certs", "hash": h, "x": x, "onnx": tmp / "tiny.onnx"}


def run_session(tiny: dict, keys: Path, tmp: Path) -> None:
    """Both parties run two batches (four images) on ``keys``: the logits equal the fixed-point interpreter's
    bit for bit and are within 0.05 of onnxruntime's; each label is their argmax."""
    import onnxruntime as ort
    from fssc.compiler.compile import compile_graph
    from fssc.compiler.frontend.onnx_import import import_onnx
    from fssc.compiler.reference.interp import run_fixed

    x = np.concatenate([tiny["x"], tiny["x"][::-1]])
    np.save(tmp / "x4.npy", x)
    p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp, timeout=120)
    try:
        r = run_p0(
            tiny["prog"], keys, tiny["certs"], port, "--input", tmp / "x4.npy", "--out", tmp / "out.json", timeout=300
        )
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        stop(p1, 60)
    recs = read_results(str(tmp / "out.json"))
    graph = compile_graph(import_onnx(str(tiny["onnx"])), echo=lambda s: None, output_mode="logits").graph
    want = np.concatenate([run_fixed(graph, x[i : i + 2])[0] for i in (0, 2)])
    sess = ort.InferenceSession(str(tiny["onnx"]), providers=["CPUExecutionProvider"])
    onnx_rt = np.concatenate([sess.run(None, {"input": x[i : i + 2]})[0] for i in (0, 2)])
    got = np.array([r["logits"] for r in recs])
    assert got.shape == want.shape and np.array_equal(got, want)
    assert np.abs(want - onnx_rt).max() < 0.05
    assert [r["label"] for r in recs] == [int(i) for i in np.argmax(want, axis=1)]


def _receiver_cmd(tiny, out: Path, party: int, ready: Path, *args) -> list[str]:
    return [
        *fssc_command(),
        "keys",
        "receive",
        str(tiny["prog"]),
        "--listen",
        "127.0.0.1:0",
        "--certs",
        str(tiny["certs"]),
        "-o",
        str(out),
        "--party",
        str(party),
        "--ready-file",
        str(ready),
        *map(str, args),
    ]


def start_receiver(tiny, out: Path, party: int, tmp: Path, *args) -> tuple[subprocess.Popen, int]:
    """``fssc keys receive`` in the background -> (process, port) once it listens."""
    ready = tmp / f"rx{party}-{time.monotonic_ns()}.port"
    proc = subprocess.Popen(
        _receiver_cmd(tiny, out, party, ready, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 60
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            stop(proc, 0)
            pytest.fail(f"the key receiver did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    return proc, int(ready.read_text())


def test_streamed_batches_run_a_session(tiny, tmp_path, run_fssc):
    keys = tmp_path / "keys"
    rx = [start_receiver(tiny, keys / f"p{p}", p, tmp_path, "--deals", 1, "--connect-timeout", 120) for p in (0, 1)]
    try:
        to = [a for p, (_, port) in enumerate(rx) for a in ("--to", f"{p}=127.0.0.1:{port}")]
        r = run_fssc("deal", tiny["prog"], "--batches", 2, "--workers", 2, *to, "--certs", tiny["certs"])
        assert r.returncode == 0, r.stderr
        assert "streamed party 0's keys to 127.0.0.1:" in r.stdout and "batch 1: " in r.stdout
        logs = [stop(proc, 60)[1] for proc, _ in rx]
    finally:
        for proc, _ in rx:
            stop(proc, 0)
    assert [proc.returncode for proc, _ in rx] == [0, 0], logs
    for log in logs:
        assert "received batch0000.key" in log and "received batch0001.key" in log and "complete" in log, log
    # the files `fssc deal -o` writes, with its modes
    (deal,) = {KeyReader(str(keys / "p0" / "batch0000.key")).header["deal"]}
    assert sorted(os.listdir(keys / "p0")) == ["batch0000.key", "batch0001.key"]
    assert sorted(os.listdir(keys / "p1")) == ["batch0000.key", "batch0001.key", f"setup-{deal}.key"]
    for p in ("p0", "p1"):
        assert stat.S_IMODE((keys / p).stat().st_mode) == 0o700
        for f in (keys / p).iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
            session.check_header(str(f), tiny["hash"], int(p[1]), None, deal)
            KeyReader(str(f)).close()  # whole: trailer and checksum
    status = session.keys_status(str(keys))
    assert [(f["party"], f["deals"][0]["unused"]) for f in status] == [([0], [0, 1]), ([1], [0, 1])]
    assert status[1]["deals"][0]["setup"] == [f"setup-{deal}.key"]

    run_session(tiny, keys, tmp_path)
    for p in ("p0", "p1"):
        assert session.used_batches(str(keys / p)) == [0, 1]


# ----------------------------------------------------------------- refusals, with a receiver in this process
class Receiver:
    """A :class:`keystream.KeyReceiver` serving from a thread of the test; ``logs`` holds its lines."""

    def __init__(self, tiny, out: Path, party: int = 0, certs: Path | None = None, program: str | None = None, **kw):
        self.logs: list[str] = []
        self.rx = keystream.KeyReceiver(
            "127.0.0.1:0", str(certs or tiny["certs"]), party, str(out), program or tiny["hash"], 10, self.logs.append,
            **kw,
        )  # fmt: skip
        self.addr = f"127.0.0.1:{self.rx.port}"
        self.thread = threading.Thread(target=self.rx.serve, daemon=True)
        self.thread.start()

    def wait_logs(self, n: int, timeout: float = 20) -> list[str]:
        deadline = time.time() + timeout
        while len(self.logs) < n and time.time() < deadline:
            time.sleep(0.05)
        return self.logs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.rx.close()
        self.thread.join(timeout=10)


def _target(tiny, addr: str, party: int = 0, certs: Path | None = None) -> keystream.Target:
    return keystream.Target(party, addr, str(certs or tiny["certs"]), connect_timeout=5, timeout=10)


def _no_complete_looking_file(folder: Path, allowed: tuple[str, ...] = ()) -> None:
    names = sorted(os.listdir(folder)) if folder.exists() else []
    assert not [n for n in names if n.endswith(".part")], names
    assert sorted(n for n in names if n not in allowed) == [], names


def test_a_party_certificate_posing_as_the_dealer_is_refused(tiny, tmp_path):
    from fssc.runtime.certs import make_certs

    rogue = tmp_path / "rogue"
    shutil.copytree(tiny["certs"], rogue)
    for ext in ("pem", "key"):  # the data owner's certificate (same CA) as the dealer's
        shutil.copy(tiny["certs"] / f"party0.{ext}", rogue / f"dealer.{ext}")
    other_ca = tmp_path / "other"
    make_certs(str(other_ca))
    keys = tmp_path / "keys"
    with Receiver(tiny, keys / "p0") as rx:
        with pytest.raises(FsscError, match=r"refused the hello: client certificate is for 'fssc-party0'"):
            trust.deal(str(tiny["prog"]), str(keys), 1, targets={0: rx.addr}, certs=str(rogue), connect_timeout=5)
        with pytest.raises(FsscError, match=r"party 0's key receiver at .*(failed|lost)"):  # another CA's dealer
            trust.deal(str(tiny["prog"]), str(keys), 1, targets={0: rx.addr}, certs=str(other_ca), connect_timeout=5)
        logs = rx.wait_logs(2)
    assert "refused the dealer at 127.0.0.1:" in logs[0] and "not the dealer ('fssc-dealer')" in logs[0], logs
    assert "failed" in logs[1] and "SSL" in logs[1], logs  # TLS itself fails: no common CA
    _no_complete_looking_file(keys / "p0")


def test_the_dealer_streams_a_partys_keys_only_to_that_party(tiny, tmp_path):
    keys = tmp_path / "keys"
    wrong_party = r"TLS with party 0's key receiver at .* failed: .*(ostname|fssc-party0)"
    # the model owner's receiver, named as party 0's
    with Receiver(tiny, keys / "p1", party=1) as rx, pytest.raises(FsscError, match=wrong_party):
        trust.deal(str(tiny["prog"]), str(keys), 1, targets={0: rx.addr}, certs=str(tiny["certs"]))
    other_program = r"refused the hello: keys for program 'f+', not "
    with Receiver(tiny, keys / "p0") as rx, pytest.raises(FsscError, match=other_program):
        keystream.Stream(_target(tiny, rx.addr), "f" * 64, "ab" * 16)
    _no_complete_looking_file(keys / "p0")
    _no_complete_looking_file(keys / "p1")


def _batch_bytes(tiny, batch: int, deal: str, party: int = 0) -> bytes:
    """A real key batch of the tiny program (the dealer program, in memory)."""
    mod = session.load_program(str(tiny["prog"]), "dealer")
    from fssc.runtime.protocol import Dealer

    hdr = {"program": tiny["hash"], "batch": batch, "kind": "batch", "deal": deal}
    w = [KeyWriter(None, {**hdr, "party": p}) for p in (0, 1)]
    mod.deal(Dealer(w[0], w[1]), b"\x05" * 16)
    return [wr.close() for wr in w][party]


def _send(stream: keystream.Stream, name: str, data: bytes) -> None:
    sink = stream.file(name)
    sink.write(data)
    sink.end()
    sink.commit()


def test_an_existing_batch_id_is_refused_and_never_overwritten(tiny, tmp_path):
    deal = "cd" * 16
    out = tmp_path / "keys" / "p0"
    with Receiver(tiny, out) as rx:
        s = keystream.Stream(_target(tiny, rx.addr), tiny["hash"], deal)
        assert s.next == 0
        _send(s, "batch0000.key", _batch_bytes(tiny, 0, deal))
        s.close()
        first = (out / "batch0000.key").read_bytes()
        s = keystream.Stream(_target(tiny, rx.addr), tiny["hash"], deal)
        assert s.next == 1, "the receiver numbers after what it holds"
        with pytest.raises(FsscError, match=r"refused batch0000.key: .*batch0000.key exists \(keys are never overwr"):
            _send(s, "batch0000.key", _batch_bytes(tiny, 0, deal))
        s.close()
        # a used batch (its key file deleted, its marker left) is refused too
        (out / "batch0003.used").write_text(deal)
        s = keystream.Stream(_target(tiny, rx.addr), tiny["hash"], deal)
        assert s.next == 4
        with pytest.raises(FsscError, match="batch 3 was used here"):
            _send(s, "batch0003.key", _batch_bytes(tiny, 3, deal))
        s.close()
        # a file whose header is another batch's is refused when checked, and not kept
        s = keystream.Stream(_target(tiny, rx.addr), tiny["hash"], deal)
        with pytest.raises(FsscError, match=r"refused the end of batch0005.key: batch0005.key: keys are for batch 4"):
            _send(s, "batch0005.key", _batch_bytes(tiny, 4, deal))
        s.close()
        # and so is the other party's file
        s = keystream.Stream(_target(tiny, rx.addr), tiny["hash"], deal)
        with pytest.raises(FsscError, match=r"refused the end of batch0005.key: batch0005.key: keys are for party 1"):
            _send(s, "batch0005.key", _batch_bytes(tiny, 5, deal, party=1))
        s.close()
        rx.wait_logs(5)
    assert (out / "batch0000.key").read_bytes() == first
    _no_complete_looking_file(out, ("batch0000.key", "batch0003.used"))


def test_only_the_canonical_name_of_a_batch_is_accepted(tiny, tmp_path):
    assert [session.batch_of(n) for n in ("batch0005.key", "batch12345.key")] == [5, 12345]
    odd = ("batch00005.key", "batch5.key", "batch\u0660\u0660\u0660\u0665.key", "batch+005.key", "batch 005.key")
    assert [session.batch_of(n) for n in odd] == [None] * len(odd)
    deal = "ab" * 16
    out = tmp_path / "keys" / "p0"
    with Receiver(tiny, out) as rx:
        for name in ("batch00005.key", "batch\u0660\u0660\u0660\u0665.key"):  # batch 5 under another name
            s = keystream.Stream(_target(tiny, rx.addr), tiny["hash"], deal)
            with pytest.raises(FsscError, match=r"refused .*is not a key file of party 0"):
                s.file(name)
            s.close()
        rx.wait_logs(2)
    _no_complete_looking_file(out)


def _raw_client(certs: Path, identity: str, port: int, server_name: str = "fssc-party0"):
    import socket

    from fssc.runtime.transport import tls_context

    ctx = tls_context(str(certs), identity, server=False)
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname=server_name)


def _beat_until_dropped(sock, limit: float) -> float:
    """Send only heartbeats until the receiver drops the connection -> seconds it took (fails after ``limit``)."""
    from fssc.runtime.transport import send_heartbeat

    t0 = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - t0 < limit:
        try:
            send_heartbeat(sock)
            if sock.recv(1 << 16) == b"":
                break
        except TimeoutError:
            continue
        except OSError:
            break
    return time.monotonic() - t0


def test_a_client_that_sends_only_heartbeats_is_dropped_within_the_handshake_timeout(tiny, tmp_path):
    with Receiver(tiny, tmp_path / "keys" / "p0", handshake_timeout=1.0) as rx:
        # a party's certificate: refused right after TLS, before anything it sends is read
        with _raw_client(tiny["certs"], "party0", rx.rx.port) as c:
            assert _beat_until_dropped(c, 5) < 1.0
        # the dealer's certificate without a hello: dropped once the handshake timeout is over
        with _raw_client(tiny["certs"], "dealer", rx.rx.port) as c:
            assert 0.9 < _beat_until_dropped(c, 5) < 3.0
        logs = rx.wait_logs(2)
    assert "refused the dealer at" in logs[0] and "client certificate is for 'fssc-party0'" in logs[0], logs
    assert "no handshake within 1 s" in logs[1], logs


def test_pending_connections_are_capped(tiny, tmp_path):
    import socket

    with Receiver(tiny, tmp_path / "keys" / "p0", handshake_timeout=3.0, max_pending=1) as rx:
        first = socket.create_connection(("127.0.0.1", rx.rx.port))  # no TLS: it holds the one slot
        try:
            time.sleep(0.5)
            second = socket.create_connection(("127.0.0.1", rx.rx.port), timeout=5)
            with second, contextlib.suppress(ConnectionResetError):
                assert second.recv(1) == b""  # closed at once
            logs = rx.wait_logs(1)
            assert "too many pending handshakes (1)" in logs[0], logs
        finally:
            first.close()


def test_a_stream_cut_mid_batch_leaves_no_file(tiny, tmp_path):
    deal = "ef" * 16
    out = tmp_path / "keys" / "p0"
    data = _batch_bytes(tiny, 0, deal)
    with Receiver(tiny, out) as rx:
        s = keystream.Stream(_target(tiny, rx.addr), tiny["hash"], deal)
        sink = s.file("batch0000.key")
        sink.write(data[: len(data) // 2])
        deadline = time.time() + 10
        while not (out / "batch0000.key.part").exists() and time.time() < deadline:
            time.sleep(0.02)
        assert (out / "batch0000.key.part").exists()
        s.close()  # the dealer is gone mid-file
        logs = rx.wait_logs(2)
        # a whole file that is never committed (the other party's failed) is not kept either
        s = keystream.Stream(_target(tiny, rx.addr), tiny["hash"], deal)
        sink = s.file("batch0000.key")
        sink.write(data)
        sink.end()
        s.close()
        logs = rx.wait_logs(3)
    assert any("deleted the uncommitted batch0000.key" in ln for ln in logs), logs
    _no_complete_looking_file(out)


def test_a_dealer_that_dies_mid_batch_leaves_no_complete_looking_file(tiny, tmp_path):
    from concurrent.futures.process import BrokenProcessPool

    prog = tmp_path / "prog"
    shutil.copytree(tiny["prog"], prog)
    src = (prog / "dealer" / "program.py").read_text()
    hook = (  # batch 1's process dies once it has streamed part of its keys
        "    if D.w[0].path.endswith('batch0001.key'):\n"
        "        D.w[0].put('x', __import__('numpy').zeros(1 << 21, 'u8'))\n"
        "        D.w[0]._file.finish(lambda d: b'')\n"
        "        import os; os._exit(3)\n"
    )
    assert "    S = {}\n" in src
    (prog / "dealer" / "program.py").write_text(src.replace("    S = {}\n", "    S = {}\n" + hook, 1))
    keys = tmp_path / "keys"
    with Receiver(tiny, keys / "p0") as rx:
        with pytest.raises(BrokenProcessPool):
            trust.deal(
                str(prog), str(keys), 3, workers=2, skip_check=True, targets={0: rx.addr}, certs=str(tiny["certs"])
            )
        logs = rx.wait_logs(1)
        deadline = time.time() + 10
        while not any("deleted the uncommitted batch0001.key" in ln for ln in logs) and time.time() < deadline:
            time.sleep(0.05)
    assert any("deleted the uncommitted batch0001.key" in ln for ln in logs), logs
    names = sorted(os.listdir(keys / "p0"))
    assert "batch0001.key" not in names and not [n for n in names if n.endswith(".part")], names
    for name in names:  # whatever was filed is whole, and the model owner's side has it too
        KeyReader(str(keys / "p0" / name)).close()
        assert (keys / "p1" / name).exists()


def test_party_1s_file_is_filed_first_and_kept_when_party_0s_commit_fails(tiny, tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    seen = []

    def end(sink):  # party 0's file ends (and is checked) only once party 1's is filed
        seen.append((keys / "p1" / "batch0000.key").exists())
        return real_end(sink)

    def commit(sink):  # the receiver's answer to the commit is lost: party 0 may or may not hold the file
        raise FsscError(f"{sink.stream.target.who}: connection lost at the commit of {sink.name}")

    real_end = keystream.FileSink.end
    monkeypatch.setattr(keystream.FileSink, "end", end)
    monkeypatch.setattr(keystream.FileSink, "commit", commit)
    with Receiver(tiny, keys / "p0") as rx, pytest.raises(FsscError, match="connection lost at the commit"):
        trust.deal(str(tiny["prog"]), str(keys), 1, targets={0: rx.addr}, certs=str(tiny["certs"]))
    assert seen == [True]
    # a batch only party 1 holds is harmless (never dealt again); its file is whole
    assert sorted(n for n in os.listdir(keys / "p1") if n.startswith("batch")) == ["batch0000.key"]
    KeyReader(str(keys / "p1" / "batch0000.key")).close()
    _no_complete_looking_file(keys / "p0")
    assert session.next_batch_id([str(keys / "p1")]) == 1


def test_a_key_file_being_written_is_not_written_twice(tmp_path):
    path = tmp_path / "batch0000.key"
    w = KeyWriter(str(path), {"kind": "batch"})
    with pytest.raises(FsscError, match=r"batch0000.key.part exists: another run is writing batch0000.key"):
        KeyWriter(str(path), {"kind": "batch"})
    w.abort()
    assert os.listdir(tmp_path) == []
