"""The party programs' runs on a tiny CNN: timeouts, faults, a slow network, bulk labelling and resume.

* Two timeouts: ``--connect-timeout`` (a model owner waiting for a data owner; a data owner started first
  retries until the model owner listens) and ``--peer-timeout`` (a peer silent mid-session; a live peer
  sends heartbeats while it computes).
* Faults: either party SIGKILLed (or SIGSTOPped: silent) once the online phase has begun. The other
  reports it in one line (exit 2 for the data owner; the model owner logs the failed session and keeps
  listening), no result is written for the batch, the batch stays used, and the next session, on the
  next key batch, gives the reference labels.
* A TCP proxy adding 10 ms each way: the run completes with the reference labels.
* Bulk labelling: ``--images DIR --out FILE`` (JSON lines per completed batch), a run killed after its
  first batch, then ``--resume``: one record per image, the reference labels.

Oracles: the fixed-point interpreter (logits bit for bit, labels) and onnxruntime (logits within 0.05).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fssc.runtime.results import ResultsFile, read_results
from parties import DelayProxy, p0_cmd, party_cmd, run_p0, start_p1, stop
from tiny_models import compile_tiny

from fssc.errors import FsscError

BATCH, SIZE = 2, 12
SHORT = 3  # seconds: the silence timeout the fault tests give both parties


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, run_fssc):
    """The tiny CNN compiled with logits (batch 2, 12x12), certificates, six key batches, a batch of inputs
    (x.npy) and five images, with each one's interpreter logits and onnxruntime logits."""
    import onnxruntime as ort
    from fssc.compiler.compile import compile_graph
    from fssc.compiler.demo import _write_images
    from fssc.compiler.frontend.onnx_import import import_onnx
    from fssc.compiler.reference.interp import run_fixed
    from fssc.runtime.images import Preprocess, list_images, load_inputs

    tmp = tmp_path_factory.mktemp("runs")
    _, x = compile_tiny(tmp, run_fssc, batch=BATCH, size=SIZE, certs=True, batches=6)
    _write_images(str(tmp / "images"), 5, SIZE)  # 5 images: batches of 2, 2 and 1 (padded)
    man = json.loads((tmp / "prog" / "manifest.json").read_text())
    pre = Preprocess(**{k: man["preprocess"][k] for k in ("size", "resize", "mean", "std")})
    xi = load_inputs(str(tmp / "images"), pre, (3, SIZE, SIZE))
    xi_padded = np.concatenate([xi, xi[-1:]])
    graph = compile_graph(import_onnx(str(tmp / "tiny.onnx")), echo=lambda s: None, output_mode="logits").graph
    sess = ort.InferenceSession(str(tmp / "tiny.onnx"), providers=["CPUExecutionProvider"])

    def refs(inputs: np.ndarray, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        fixed = np.concatenate([run_fixed(graph, b)[0] for b in np.split(inputs, len(inputs) // BATCH)])
        onnx_rt = np.concatenate([sess.run(None, {"input": b})[0] for b in np.split(inputs, len(inputs) // BATCH)])
        return {n: (fixed[i], onnx_rt[i]) for i, n in enumerate(names)}

    ref = refs(x, [f"{tmp / 'x.npy'}[{i}]" for i in range(BATCH)])
    ref.update(refs(xi_padded, [*list_images(str(tmp / "images")), "padding"]))
    return {"tmp": tmp, "prog": tmp / "prog", "certs": tmp / "certs", "keys": tmp / "keys", "ref": ref}


@pytest.fixture
def keys(tiny, tmp_path) -> Path:
    """A private copy of the key folders (batches are one-time)."""
    k = tmp_path / "keys"
    shutil.copytree(tiny["keys"], k)
    return k


def _check_records(tiny, recs: list[dict]) -> None:
    """Each record's logits equal the interpreter's bit for bit (within 0.05 of onnxruntime's), its label
    is their argmax and onnxruntime's (where onnxruntime's top two are at least that 0.05 apart), and no
    input appears twice."""
    names = [r["input"] for r in recs]
    assert len(names) == len(set(names)), f"an input labelled twice: {names}"
    for r in recs:
        fixed, onnx_rt = tiny["ref"][r["input"]]
        assert np.array_equal(np.array(r["logits"]), fixed), r
        assert np.abs(fixed - onnx_rt).max() < 0.05
        assert r["label"] == int(np.argmax(fixed)), r
        top2 = np.sort(onnx_rt.reshape(-1))[-2:]
        if top2[1] - top2[0] >= 0.05:
            assert r["label"] == int(np.argmax(onnx_rt)), r


def _errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "error" in ln]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- timeouts


def test_default_timeouts_are_long_to_connect_and_at_most_30_s_of_silence():
    """Both party programs take their timeouts from ``add_timeout_args``/``timeouts``: without options the
    connect wait is long and the silence timeout at most 30 s; each option sets its own; the older
    ``--timeout`` sets both."""
    import argparse

    from fssc.runtime.data_owner import add_timeout_args, timeouts
    from fssc.runtime.transport import CONNECT_TIMEOUT, PEER_TIMEOUT

    ap = argparse.ArgumentParser()
    add_timeout_args(ap, "the peer")
    assert timeouts(ap.parse_args([])) == (CONNECT_TIMEOUT, PEER_TIMEOUT) == (600.0, 30.0)
    assert timeouts(ap.parse_args(["--peer-timeout", "5"])) == (600.0, 5.0)
    assert timeouts(ap.parse_args(["--connect-timeout", "7"])) == (7.0, 30.0)
    assert timeouts(ap.parse_args(["--timeout", "9"])) == (9.0, 9.0)


def test_timeouts_must_be_positive(tiny, keys):
    r = run_p0(tiny["prog"], keys, tiny["certs"], 9, "--input", tiny["tmp"] / "x.npy", "--peer-timeout", "0")
    assert r.returncode == 2 and r.stderr.strip() == (
        "fssc party0: error: --peer-timeout 0: expected a positive number of seconds"
    ), r.stderr
    assert not list((keys / "p0").glob("*.used"))


def test_model_owner_waits_for_a_data_owner_within_its_connect_timeout(tiny, keys):
    p1 = subprocess.run(
        party_cmd(tiny["prog"], "party1", keys, tiny["certs"], "--listen", "127.0.0.1:0", "--connect-timeout", "1"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p1.returncode == 2, p1.stdout + p1.stderr
    assert _errors(p1.stderr) == [
        "fssc party1: error: no data owner connected to 127.0.0.1:0 within 1 s (--connect-timeout)"
    ], p1.stderr
    assert not list((keys / "p1").glob("*.used"))


def test_data_owner_gives_up_after_its_connect_timeout(tiny, keys):
    port = _free_port()  # nobody listens there
    r = run_p0(tiny["prog"], keys, tiny["certs"], port, "--input", tiny["tmp"] / "x.npy", "--connect-timeout", "1")
    assert r.returncode == 2, r.stderr
    err = _errors(r.stderr)
    assert len(err) == 1 and f"cannot connect to the model owner at 127.0.0.1:{port} within 1 s" in err[0], r.stderr
    assert "retrying for up to 1 s" in r.stderr  # it did retry
    assert not list((keys / "p0").glob("*.used")), "no key batch is used before the session starts"


def test_data_owner_started_first_retries_until_the_model_owner_listens(tiny, keys, tmp_path):
    port = _free_port()
    out = tmp_path / "out.jsonl"
    err0 = tmp_path / "p0.err"
    with open(err0, "w") as fh:
        p0 = subprocess.Popen(
            p0_cmd(tiny["prog"], keys, tiny["certs"], port, "--input", tiny["tmp"] / "x.npy", "--out", out),
            stdout=subprocess.DEVNULL,
            stderr=fh,
            text=True,
        )
    p1 = None
    try:
        deadline = time.time() + 60
        while "not reachable yet" not in err0.read_text():
            assert p0.poll() is None and time.time() < deadline, err0.read_text()
            time.sleep(0.05)
        p1 = subprocess.Popen(
            party_cmd(tiny["prog"], "party1", keys, tiny["certs"], "--listen", f"127.0.0.1:{port}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p0.wait(timeout=120) == 0, err0.read_text()
        out1, err1 = stop(p1)
        assert p1.returncode == 0, out1 + err1
    finally:
        for p in (p0, p1):
            if p is not None and p.poll() is None:
                stop(p, 0)
    _check_records(tiny, read_results(str(out)))


# ----------------------------------------------------------------- faults


def _wait_online(keys: Path, proxy: DelayProxy, procs, seconds: float = 60) -> None:
    """Until both parties have opened batch 0 and the data owner's masked input (its first message of the
    online phase, 2x3x12x12 words) has passed the proxy."""
    deadline = time.time() + seconds
    markers = [keys / p / "batch0000.used" for p in ("p0", "p1")]
    while not all(m.exists() for m in markers):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the batch never started"
        time.sleep(0.002)
    sent = proxy.forwarded["up"]
    while proxy.forwarded["up"] < sent + BATCH * 3 * SIZE * SIZE * 8:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the online phase never started"
        time.sleep(0.002)


@pytest.mark.parametrize(
    "sig",
    [signal.SIGKILL, pytest.param(signal.SIGSTOP, marks=pytest.mark.slow)],  # a stopped peer: its timeout runs out
    ids=["killed", "stopped"],
)
@pytest.mark.parametrize("victim", ["p0", "p1"])
def test_a_party_lost_mid_inference(tiny, keys, tmp_path, victim, sig):
    """Kill (or stop: a silent peer) one party in the online phase of batch 0; the other says so in one line
    within its silence timeout; nothing is written; batch 0 stays used; the next session labels right."""
    out = tmp_path / "out.jsonl"
    x = tiny["tmp"] / "x.npy"
    log1 = tmp_path / "p1.log"
    p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp_path, timeout=60, peer_timeout=SHORT, log=log1)
    p0 = None
    try:
        with DelayProxy(port, delay=0.01) as proxy:
            cmd = p0_cmd(tiny["prog"], keys, tiny["certs"], proxy.port, "--input", x, "--out", out)
            p0 = subprocess.Popen([*cmd, "--peer-timeout", str(SHORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _wait_online(keys, proxy, [p0, p1])
            target = p0 if victim == "p0" else p1
            assert target.poll() is None, "the session ended before the fault"
            target.send_signal(sig)
            if victim == "p1":  # the data owner fails in one line and exits 2
                _, err0 = p0.communicate(timeout=SHORT + 30)
                err0 = err0.decode()
                assert p0.returncode == 2, err0
                lines = _errors(err0)
                want = "peer closed the connection" if sig == signal.SIGKILL else f"peer sent nothing for {SHORT} s"
                assert len(lines) == 1 and want in lines[0], err0
                assert "Traceback" not in err0
                stop(p1, 0)
            else:  # the model owner logs the failed session in one line and keeps listening
                deadline = time.time() + SHORT + 30
                while "failed" not in log1.read_text():
                    assert time.time() < deadline and p1.poll() is None, "the model owner did not notice"
                    time.sleep(0.05)
                stop(p0, 0)
        assert not out.exists() or read_results(str(out)) == [], "a result of a batch that did not complete"
        for p in ("p0", "p1"):
            assert (keys / p / "batch0000.used").exists(), f"{p}: the lost batch is not burned"
        # the next session, on the next key batch (for a lost data owner: the same, still listening model owner)
        if victim == "p1":
            p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp_path, timeout=60)
        r0 = run_p0(tiny["prog"], keys, tiny["certs"], port, "--input", x, "--out", out, timeout=120)
        out1, err1 = stop(p1)
        assert r0.returncode == 0, r0.stderr
        assert p1.returncode == 0, out1 + err1
        if victim == "p0":
            failed = [ln for ln in log1.read_text().splitlines() if "failed" in ln]
            want = "peer closed the connection" if sig == signal.SIGKILL else f"peer sent nothing for {SHORT} s"
            assert len(failed) == 1 and want in failed[0], out1
    finally:
        for p in (p0, p1):
            if p is not None and p.poll() is None:
                stop(p, 0)
    recs = read_results(str(out))
    assert [r["batch"] for r in recs] == [1, 1]
    _check_records(tiny, recs)


def test_a_delaying_network_completes_with_the_reference_labels(tiny, keys, tmp_path):
    """10 ms each way between the parties (every round trip costs 20 ms more): the same results."""
    out = tmp_path / "out.jsonl"
    p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp_path, timeout=60, peer_timeout=SHORT)
    try:
        with DelayProxy(port, delay=0.01) as proxy:
            r0 = run_p0(tiny["prog"], keys, tiny["certs"], proxy.port, "--images", tiny["tmp"] / "images", "--out", out)
            out1, err1 = stop(p1)
        assert proxy.forwarded["up"] > 0 and proxy.forwarded["down"] > 0
    finally:
        if p1.poll() is None:
            stop(p1, 0)
    assert r0.returncode == 0, r0.stderr
    assert r0.stderr == "", "no progress bar when stderr is not a terminal"
    assert p1.returncode == 0, out1 + err1
    recs = read_results(str(out))
    assert [r["batch"] for r in recs] == [0, 0, 1, 1, 2]  # 5 images: the last batch padded, its padding dropped
    _check_records(tiny, recs)


# ----------------------------------------------------------------- bulk labelling


def test_bulk_labelling_resumes_after_a_killed_run(tiny, keys, tmp_path):
    """5 images at batch 2 (3 batches): the data owner is killed once the records of a random number k of
    batches (1 or 2, drawn from os.urandom and printed) are in the file, a crash mid-write is simulated (a
    cut-short last line), then --resume finishes the set on fresh key batches against the same model owner:
    one whole record per image, the reference results."""
    from fssc.runtime.images import list_images

    k = 1 + os.urandom(1)[0] % 2
    print(f"killed after batch {k}")

    images = tiny["tmp"] / "images"
    out, log1 = tmp_path / "labels.jsonl", tmp_path / "p1.log"
    p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp_path, timeout=60, peer_timeout=SHORT, log=log1)
    p0 = None
    try:
        with DelayProxy(port, delay=0.01) as proxy:
            cmd = p0_cmd(tiny["prog"], keys, tiny["certs"], proxy.port, "--images", images, "--out", out)
            p0 = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.time() + 60
            while not (out.exists() and len(read_results(str(out))) >= 2 * k):
                assert p0.poll() is None and time.time() < deadline, f"batch {k} never completed"
                time.sleep(0.002)
            p0.send_signal(signal.SIGKILL)
            p0.communicate(timeout=30)
            deadline = time.time() + 30
            while "failed" not in log1.read_text():  # the model owner logs the lost session, keeps listening
                assert p1.poll() is None and time.time() < deadline, log1.read_text()
                time.sleep(0.05)
        first = read_results(str(out))
        assert [r["batch"] for r in first] == [b for b in range(k) for _ in range(2)], "whole batches only"
        with open(out, "a") as fh:
            fh.write('{"input": "cut short')  # a write the crash interrupted: no newline
        r0 = run_p0(tiny["prog"], keys, tiny["certs"], port, "--images", images, "--out", out, "--resume", timeout=120)
        stop(p1)
        assert r0.returncode == 0, r0.stderr
        assert p1.returncode == 0, log1.read_text()
        assert f"({2 * k} already in {out})" in r0.stdout
    finally:
        for p in (p0, p1):
            if p is not None and p.poll() is None:
                stop(p, 0)
    text = out.read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines()), "a cut-short line stays"
    recs = read_results(str(out))
    assert sorted(r["input"] for r in recs) == list_images(str(images))
    _check_records(tiny, recs)
    # the killed run's unfinished batch (if it had begun) stays used and labelled nothing; the resumed run
    # used fresh batches after it
    used0 = sorted(int(p.stem[5:]) for p in (keys / "p0").glob("batch*.used"))
    labelled = sorted({r["batch"] for r in recs})
    burned = sorted(set(used0) - set(labelled))
    assert len(burned) <= 1 and labelled[:k] == list(range(k)) and len(labelled) == 3, (used0, labelled)
    assert all(b > burned[0] for b in labelled[k:]) if burned else labelled == [0, 1, 2]


def test_an_existing_results_file_needs_resume(tiny, keys, tmp_path):
    """Without --resume an existing --out FILE is refused (nothing used); --resume needs --out; a complete
    FILE with --resume has nothing left to do and does not even connect."""
    from fssc.runtime.images import list_images

    man = json.loads((tiny["prog"] / "manifest.json").read_text())
    images = tiny["tmp"] / "images"
    out = tmp_path / "labels.jsonl"
    done = ResultsFile(str(out), man["program_hash"], resume=False)
    done.append(
        [{"input": n, "label": 0, "batch": 0, "program": man["program_hash"]} for n in list_images(str(images))]
    )
    unused = 9  # nothing listens on port 9: none of these runs may connect
    r = run_p0(tiny["prog"], keys, tiny["certs"], unused, "--images", images, "--out", out)
    assert r.returncode == 2 and _errors(r.stderr) == [
        f"fssc party0: error: {out}: already holds results: --resume to label the inputs it lacks, or remove it"
    ], r.stderr
    r = run_p0(tiny["prog"], keys, tiny["certs"], unused, "--images", images, "--resume")
    assert r.returncode == 2 and "--resume needs --out FILE" in r.stderr, r.stderr
    r = run_p0(tiny["prog"], keys, tiny["certs"], unused, "--images", images, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"all 5 input(s) are already labelled in {out}" in r.stdout
    r = run_p0(tiny["prog"], keys, tiny["certs"], unused, "--images", f"{images}/./", "--out", out, "--resume")
    assert r.returncode == 0 and "already labelled" in r.stdout, "another spelling of the same folder"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(images, elsewhere)
    r = run_p0(tiny["prog"], keys, tiny["certs"], unused, "--images", elsewhere, "--out", out, "--resume")
    assert r.returncode == 2 and "none of them among these 5" in r.stderr, r.stderr
    assert not list((keys / "p0").glob("*.used"))


def test_results_file_keeps_whole_records(tmp_path):
    out = tmp_path / "r.jsonl"
    rf = ResultsFile(str(out), "prog-a", resume=False)
    assert not out.exists(), "no file before the first batch completes"
    rf.append([{"input": "a.png", "label": 1, "batch": 0, "program": "prog-a"}])
    assert oct(out.stat().st_mode & 0o777) == oct(0o600), "the labels are the data owner's secret"
    with open(out, "a") as fh:
        fh.write('{"input": "b.png", "lab')
    assert [r["input"] for r in read_results(str(out))] == ["a.png"], "a cut-short last line is no record"
    again = ResultsFile(str(out), "prog-a", resume=True)
    assert again.done == {"a.png"} and out.read_text().endswith("}\n"), "resume cuts the partial line off"
    again.append([{"input": "b.png", "label": 0, "batch": 1, "program": "prog-a"}])
    assert [r["input"] for r in read_results(str(out))] == ["a.png", "b.png"]
    with pytest.raises(FsscError, match="holds results of program prog-a, not of this program"):
        ResultsFile(str(out), "prog-b", resume=True)
    out.write_text('{"input": "a.png", "label": 1}\nnot json\n{"input": "b.png", "label": 0}\n')
    with pytest.raises(FsscError, match="line 2 is not a result record"):
        read_results(str(out))


def test_model_owner_opens_a_batch_only_once_the_data_owner_starts_it(tiny, keys, tmp_path):
    """A data owner that takes the masked weights and then names another batch (or hangs up) leaves the
    model owner's batch unused: it logs the failed session in one line and keeps listening."""
    from fssc.runtime import session
    from fssc.runtime.keys import peek_header
    from fssc.runtime.transport import client_handshake, connect

    man = json.loads((tiny["prog"] / "manifest.json").read_text())
    log1 = tmp_path / "p1.log"
    p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp_path, timeout=60, peer_timeout=SHORT, log=log1)
    try:
        hello = {
            "protocol": man["protocol"],
            "program": man["program_hash"],
            "role": "party0",
            "fssc": man["fssc_version"],
            "batches": [0],
            "deal": peek_header(str(keys / "p0" / "batch0000.key"))["deal"],
        }
        for start in ({"start": 1}, None):
            chan = connect(f"127.0.0.1:{port}", str(tiny["certs"]), timeout=SHORT)
            client_handshake(chan, hello)
            session.recv_weights(chan, session.load_program(str(tiny["prog"]), "party0").LINEAR_WEIGHTS)
            if start is not None:
                chan.send_json(start)
            chan.close()
        deadline = time.time() + 30
        while len([ln for ln in log1.read_text().splitlines() if "failed" in ln]) < 2:
            assert p1.poll() is None and time.time() < deadline, log1.read_text()
            time.sleep(0.05)
    finally:
        stop(p1, 0)
    failed = [ln for ln in log1.read_text().splitlines() if "failed" in ln]
    assert 'start of batch 0: the data owner sent {"start": 1}, expected batch 0' in failed[0], failed
    assert "start of batch 0: peer closed the connection" in failed[1], failed
    assert session.unused_batches(str(keys / "p1"))[:1] == [0], "the model owner used a batch nobody started"


@pytest.mark.slow  # waits out more than a silence timeout
def test_a_data_owner_computing_longer_than_the_silence_timeout_is_not_silent(tiny, keys, tmp_path, monkeypatch):
    """The data owner (in this process, default timeouts) spends twice the model owner's silence timeout
    on each batch before its first message: its heartbeats keep the session alive, and the results are right."""
    from fssc.runtime import data_owner, party_main, session

    slow = data_owner.run_p0_batch

    def run_p0_batch(*args, **kwargs):
        time.sleep(2 * SHORT)  # a long offline phase: nothing to send
        return slow(*args, **kwargs)

    monkeypatch.setattr(data_owner, "run_p0_batch", run_p0_batch)
    out = tmp_path / "out.jsonl"
    p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp_path, timeout=60, peer_timeout=SHORT)
    try:
        mod = session.load_program(str(tiny["prog"]), "party0")
        argv = ["--keys", keys / "p0", "--peer", f"127.0.0.1:{port}", "--certs", tiny["certs"]]
        rc = party_main.main("party0", mod, [str(a) for a in [*argv, "--input", tiny["tmp"] / "x.npy", "--out", out]])
        out1, err1 = stop(p1)
    finally:
        if p1.poll() is None:
            stop(p1, 0)
    assert rc == 0 and p1.returncode == 0, out1 + err1
    assert "failed" not in out1
    _check_records(tiny, read_results(str(out)))
