"""``fssc serve``, the model owner's long-running service, on the tiny CNN over TLS loopback.

Two data owners, each with its own deal: the dealer deals into one folder, hands its ``p0/`` to the first
data owner, deals again into the same folder (batch ids continue) and hands the new ``p0/`` to the second;
the model owner's ``p1/`` holds both deals. Sessions one after another and two at once give the reference
labels; a data owner killed mid-session costs only its session; clients without a valid certificate or with
garbage are logged and dropped; a data owner arriving when all sessions are busy is refused with a line saying
so; SIGTERM during a session lets it finish, then the service exits 0 with a summary line (a second SIGTERM
aborts the session); a service out of key batches refuses new sessions and keeps running. The batch
reservations of concurrent handshakes are checked in process.

Oracles: the fixed-point interpreter (logits bit for bit, labels) and onnxruntime (logits within 0.05), as
tests/test_party_runs.py checks them.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fssc.runtime.results import read_results
from parties import DelayProxy, p0_cmd, run_p0, stop
from test_party_runs import _check_records
from tiny_models import compile_tiny

BATCH, SIZE = 2, 12
SHORT = 3  # seconds: the silence timeout of the fault tests
DEALS = {"a": 7, "b": 3}  # data owner -> batches of its deal (a: 0-6, b: 7-9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny CNN compiled (logits, batch 2, 12x12), certificates, a key store with two deals (its p1/) and
    each deal's p0/ handed to its data owner (owners/a, owners/b), x.npy and four images (two batches), with
    each input's interpreter and onnxruntime logits."""
    import onnxruntime as ort
    from fssc.compiler.backend import trust
    from fssc.compiler.compile import compile_graph
    from fssc.compiler.demo import _write_images
    from fssc.compiler.frontend.onnx_import import import_onnx
    from fssc.compiler.reference.interp import run_fixed
    from fssc.runtime.images import Preprocess, list_images, load_inputs

    tmp = tmp_path_factory.mktemp("serve")
    _, x = compile_tiny(tmp, batch=BATCH, size=SIZE, certs=True)
    for owner, n in DEALS.items():  # what `fssc deal PROG --batches n -o store` runs
        trust.deal(str(tmp / "prog"), str(tmp / "store"), n)
        (tmp / "owners" / owner).mkdir(parents=True)
        shutil.move(tmp / "store" / "p0", tmp / "owners" / owner / "p0")
    _write_images(str(tmp / "images"), 2 * BATCH, SIZE)
    man = json.loads((tmp / "prog" / "manifest.json").read_text())
    pre = Preprocess(**{k: man["preprocess"][k] for k in ("size", "resize", "mean", "std")})
    xi = load_inputs(str(tmp / "images"), pre, (3, SIZE, SIZE))
    graph = compile_graph(import_onnx(str(tmp / "tiny.onnx")), echo=lambda s: None, output_mode="logits").graph
    sess = ort.InferenceSession(str(tmp / "tiny.onnx"), providers=["CPUExecutionProvider"])
    ref = {}
    for inputs, names in ((x, [f"{tmp / 'x.npy'}[{i}]" for i in range(BATCH)]), (xi, list_images(str(tmp / "images")))):
        fixed = np.concatenate([run_fixed(graph, b)[0] for b in np.split(inputs, len(inputs) // BATCH)])
        onnx_rt = np.concatenate([sess.run(None, {"input": b})[0] for b in np.split(inputs, len(inputs) // BATCH)])
        ref.update({n: (fixed[i], onnx_rt[i]) for i, n in enumerate(names)})
    return {"tmp": tmp, "prog": tmp / "prog", "certs": tmp / "certs", "ref": ref, "x": tmp / "x.npy"}


@pytest.fixture
def keys(tiny, tmp_path) -> dict[str, Path]:
    """Private copies (batches are one-time): the model owner's store and each data owner's folder."""
    out = {"p1": tmp_path / "store"}
    shutil.copytree(tiny["tmp"] / "store", out["p1"])
    for owner in DEALS:
        out[owner] = tmp_path / "owners" / owner
        shutil.copytree(tiny["tmp"] / "owners" / owner, out[owner])
    return out


def start_serve(tiny, store: Path, tmp: Path, *args) -> tuple[subprocess.Popen, int, Path]:
    """``fssc serve`` on a free port of 127.0.0.1, once it listens -> (process, port, its log file)."""
    ready, log = tmp / f"serve-{time.monotonic_ns()}.port", tmp / f"serve-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-P", "-m", "fssc.cli", "serve", tiny["prog"], "--keys", store / "p1"]
    cmd += ["--listen", "127.0.0.1:0", "--certs", tiny["certs"], "--ready-file", ready, *args]
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            stop(proc, 0)
            pytest.fail(f"fssc serve did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc, int(ready.read_text()), log


def _lines(log: Path, word: str) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if word in ln]


def _wait_log(log: Path, word: str, n: int, proc: subprocess.Popen, seconds: float = 60) -> list[str]:
    deadline = time.time() + seconds
    while len(_lines(log, word)) < n:
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.05)
    return _lines(log, word)


def _marker(store: Path, b: int) -> Path:
    return store / "p1" / f"batch{b:04d}.used"


def _terminate(proc: subprocess.Popen, log: Path) -> str:
    """SIGTERM, then the service's exit 0; returns its log."""
    proc.send_signal(signal.SIGTERM)
    stop(proc, 60)
    assert proc.returncode == 0, log.read_text()
    return log.read_text()


def _owner(tiny, keys, owner: str, port: int, out: Path, *args) -> subprocess.Popen:
    cmd = p0_cmd(tiny["prog"], keys[owner], tiny["certs"], port, *args, "--out", out)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_marker(store: Path, b: int, proc: subprocess.Popen, log: Path) -> None:
    """Until the model owner has opened batch ``b`` (its session is running)."""
    deadline = time.time() + 60
    while not _marker(store, b).exists():
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.002)


def test_sessions_in_a_row_and_two_at_once(tiny, keys, tmp_path):
    """Three sessions one after another, then two data owners at once, each on its own deal: the first is
    paused (SIGSTOP) once its session runs, the second's session starts meanwhile, then both finish. Every
    label the reference's; one ok line per session."""
    store = keys["p1"]
    serve, port, log = start_serve(tiny, store, tmp_path, "--peer-timeout", 120)
    owners = []
    try:
        for i in range(3):
            out = tmp_path / f"row{i}.jsonl"
            r = run_p0(tiny["prog"], keys["a"], tiny["certs"], port, "--input", tiny["x"], "--out", out, timeout=120)
            assert r.returncode == 0, r.stderr + log.read_text()
            recs = read_results(str(out))
            assert [r["batch"] for r in recs] == [i, i]
            _check_records(tiny, recs)
        images = tiny["tmp"] / "images"
        owners.append(_owner(tiny, keys, "a", port, tmp_path / "a.jsonl", "--images", images))
        _wait_marker(store, 3, owners[0], log)  # a's session runs (its first batch, 3, begun)
        owners[0].send_signal(signal.SIGSTOP)
        owners.append(_owner(tiny, keys, "b", port, tmp_path / "b.jsonl", "--images", images))
        _wait_marker(store, 7, owners[1], log)  # b's session runs too, a's still paused before its batch 4
        assert not _marker(store, 4).exists()
        owners[0].send_signal(signal.SIGCONT)
        for p in owners:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err + log.read_text()
        for o, batches in (("a", [3, 3, 4, 4]), ("b", [7, 7, 8, 8])):
            recs = read_results(str(tmp_path / f"{o}.jsonl"))
            assert [r["batch"] for r in recs] == batches
            _check_records(tiny, recs)
        text = _terminate(serve, log)
    finally:
        for p in [serve, *owners]:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                stop(p, 0)
    ok = [ln for ln in text.splitlines() if ln.endswith(": ok")]
    assert len(ok) == 5 and not _lines(log, "failed:"), text
    assert all(" with fssc-party0 at 127.0.0.1:" in ln and "served" in ln and "B, received" in ln for ln in ok), ok
    assert "stopped: 5 session(s) ok, 0 failed" in text


def test_a_data_owner_killed_mid_session_costs_only_its_session(tiny, keys, tmp_path):
    store = keys["p1"]
    serve, port, log = start_serve(tiny, store, tmp_path, "--peer-timeout", SHORT)
    p0 = None
    try:
        with DelayProxy(port, delay=0.01) as proxy:
            p0 = _owner(tiny, keys, "a", proxy.port, tmp_path / "killed.jsonl", "--images", tiny["tmp"] / "images")
            _wait_marker(store, 0, p0, log)
            p0.kill()
            p0.communicate(timeout=30)
            failed = _wait_log(log, "failed:", 1, serve, seconds=SHORT + 30)
        assert "peer closed the connection" in failed[0] and "batches [0-1]" in failed[0], failed
        out = tmp_path / "next.jsonl"
        r = run_p0(tiny["prog"], keys["a"], tiny["certs"], port, "--input", tiny["x"], "--out", out, timeout=120)
        assert r.returncode == 0, r.stderr + log.read_text()
        assert serve.poll() is None, "the service ended after a session"
        text = _terminate(serve, log)
    finally:
        for p in (serve, p0):
            if p is not None and p.poll() is None:
                stop(p, 0)
    assert _marker(store, 0).exists(), "the killed session's batch is burned"
    recs = read_results(str(out))
    assert recs and all(r["batch"] > 0 for r in recs)
    _check_records(tiny, recs)
    assert "stopped: 1 session(s) ok, 1 failed" in text, text


def test_garbage_and_unauthenticated_clients_are_dropped(tiny, keys, tmp_path, run_fssc):
    """Plain garbage bytes, a client with another CA's certificate, and an authenticated client sending a
    malformed hello: each logged in one line and dropped; then a data owner is served."""
    from fssc.runtime.transport import connect

    store = keys["p1"]
    assert run_fssc("certs", "-o", tmp_path / "other").returncode == 0
    serve, port, log = start_serve(tiny, store, tmp_path, "--peer-timeout", SHORT)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)))
        r = run_p0(tiny["prog"], keys["a"], tmp_path / "other", port, "--input", tiny["x"], timeout=60)
        assert r.returncode == 2 and "TLS" in r.stderr, r.stderr
        chan = connect(f"127.0.0.1:{port}", str(tiny["certs"]), timeout=SHORT)
        chan.send_bytes(b"\x00garbage, not a hello")
        failed = _wait_log(log, "failed:", 1, serve)  # open till then: a close could reset the unread frame
        chan.close()
        _wait_log(log, "refused a connection", 2, serve)
        assert "malformed handshake" in failed[0], failed
        out = tmp_path / "ok.jsonl"
        r = run_p0(tiny["prog"], keys["a"], tiny["certs"], port, "--input", tiny["x"], "--out", out, timeout=120)
        assert r.returncode == 0, r.stderr + log.read_text()
        text = _terminate(serve, log)
    finally:
        if serve.poll() is None:
            stop(serve, 0)
    _check_records(tiny, read_results(str(out)))
    assert "Traceback" not in text and "stopped: 1 session(s) ok, 1 failed" in text, text


def test_sigterm_lets_the_running_session_finish(tiny, keys, tmp_path):
    """--max-sessions 1: while a session runs (its data owner paused with SIGSTOP, so it cannot end first), a
    second data owner is refused as busy (its keys untouched); SIGTERM, then the paused data owner goes on:
    its session completes with the reference labels, and the service exits 0 with its summary line."""
    store = keys["p1"]
    serve, port, log = start_serve(tiny, store, tmp_path, "--max-sessions", 1, "--peer-timeout", 60)
    p0 = None
    try:
        out = tmp_path / "a.jsonl"
        p0 = _owner(tiny, keys, "a", port, out, "--images", tiny["tmp"] / "images")
        _wait_marker(store, 0, p0, log)
        p0.send_signal(signal.SIGSTOP)
        busy = run_p0(tiny["prog"], keys["b"], tiny["certs"], port, "--input", tiny["x"], timeout=60)
        assert busy.returncode == 2 and "serving its maximum of 1 session(s)" in busy.stderr, busy.stderr
        assert not list((keys["b"] / "p0").glob("*.used")), "a refused data owner's batches stay unused"
        serve.send_signal(signal.SIGTERM)
        _wait_log(log, "SIGTERM: no new sessions", 1, serve)
        _wait_log(log, "stopping: waiting for 1 running session(s) to finish", 1, serve)
        p0.send_signal(signal.SIGCONT)
        _, err = p0.communicate(timeout=120)
        assert p0.returncode == 0, err + log.read_text()
        serve.communicate(timeout=60)
        assert serve.returncode == 0, log.read_text()
    finally:
        for p in (serve, p0):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                stop(p, 0)
    recs = read_results(str(out))
    assert [r["batch"] for r in recs] == [0, 0, 1, 1]
    _check_records(tiny, recs)
    text = log.read_text()
    assert "refused fssc-party0 at" in text, text
    assert text.splitlines()[-1].endswith(
        "stopped: 1 session(s) ok, 0 failed, 1 refused as busy; 2 batch(es) used, 8 unused left"
    ), text


@pytest.mark.slow
def test_a_second_sigterm_aborts_the_running_session(tiny, keys, tmp_path):
    """SIGTERM while a session runs (its data owner paused), then SIGTERM again: the session is aborted and
    logged as failed, its begun batch stays used, and the service exits 0."""
    store = keys["p1"]
    serve, port, log = start_serve(tiny, store, tmp_path, "--peer-timeout", 60)
    p0 = None
    try:
        p0 = _owner(tiny, keys, "a", port, tmp_path / "a.jsonl", "--images", tiny["tmp"] / "images")
        _wait_marker(store, 0, p0, log)
        p0.send_signal(signal.SIGSTOP)
        serve.send_signal(signal.SIGTERM)
        _wait_log(log, "stopping: waiting for 1 running session(s)", 1, serve)
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=60)
        assert serve.returncode == 0, log.read_text()
    finally:
        for p in (serve, p0):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                stop(p, 0)
    text = log.read_text()
    assert "SIGTERM again: aborting 1 running session(s)" in text, text
    assert len(_lines(log, "failed:")) == 1 and "stopped: 0 session(s) ok, 1 failed" in text, text
    assert _marker(store, 0).exists()


@pytest.mark.slow
def test_out_of_key_batches_refuses_new_sessions_and_keeps_serving(tiny, keys, tmp_path):
    """A store whose one unused batch is b's 7: b is served; the next data owner is refused with a line
    saying so (logged once), the service keeps running."""
    store = keys["p1"]
    for b in (*range(7), 8, 9):
        (store / "p1" / f"batch{b:04d}.key").unlink()
    serve, port, log = start_serve(tiny, store, tmp_path)
    try:
        r = run_p0(tiny["prog"], keys["b"], tiny["certs"], port, "--input", tiny["x"], timeout=120)
        assert r.returncode == 0, r.stderr + log.read_text()
        for _ in range(2):
            r = run_p0(tiny["prog"], keys["b"], tiny["certs"], port, "--input", tiny["x"], timeout=60)
            assert r.returncode == 2 and "no unused key batches left" in r.stderr, r.stderr
        assert serve.poll() is None
        text = _terminate(serve, log)
    finally:
        if serve.poll() is None:
            stop(serve, 0)
    assert len(_lines(log, "refusing new sessions until more are dealt")) == 1, text


def test_concurrent_handshakes_never_reserve_one_batch_twice(tiny, keys):
    """The reservation is atomic: 8 threads asking for overlapping batches at once; each batch goes to at most
    one, and a session's end gives back the batches it did not start."""
    from fssc.runtime.serve import BatchLedger
    from fssc.runtime.session import batch_deal

    p1 = str(keys["p1"] / "p1")
    deal = batch_deal(p1, 0)
    ledger = BatchLedger(p1, json.loads((tiny["prog"] / "manifest.json").read_text())["program_hash"], print)
    got: dict[int, list[int]] = {}
    go = threading.Barrier(8)

    def ask(i: int) -> None:
        want = [i % 6, (i + 1) % 6]
        go.wait()
        if not ledger.reserve(want, deal):
            got[i] = want

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [b for bs in got.values() for b in bs]
    assert got and len(claimed) == len(set(claimed)), got
    assert ledger.reserve([7], deal), "a batch of another deal is refused"
    ledger.release(claimed)
    assert ledger.unused() == list(range(10))


def test_a_refusal_names_neither_another_deal_nor_a_path(tiny, keys):
    """A data owner asking for another deal's batch learns only that it is not available: the other deal's id
    (which would let it claim that deal's batches) and the model owner's paths stay in the model owner's log."""
    from fssc.runtime.serve import BatchLedger
    from fssc.runtime.session import batch_deal

    p1 = str(keys["p1"] / "p1")
    mine, other = batch_deal(p1, 0), batch_deal(p1, 7)
    assert mine != other
    log: list[str] = []
    ledger = BatchLedger(p1, json.loads((tiny["prog"] / "manifest.json").read_text())["program_hash"], log.append)
    problems = ledger.reserve([7], mine)
    assert problems == ["batches [7] are not available for that deal at the model owner"], problems
    assert other in log[-1] and p1 in log[-1], log
    assert ledger.unused() == list(range(10)), "a refused session reserves nothing"
