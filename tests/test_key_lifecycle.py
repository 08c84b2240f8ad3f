"""Key and secret lifecycle, on a tiny CNN run by the real party programs.

* Weight masks are never reused across weights: every ``fssc deal`` makes a fresh setup seed, and the
  model owner commits (salted, in its own key folder) to the weights it first masks with a seed and
  refuses to mask any others with it. The experiment: two weight sets of one architecture (same
  program hash); a data owner that keeps the masked weights W^ and W'^ of two sessions must not get
  W - W'.
* One-time keys are durable: the used marker and its folder are fsync'd before a batch's first protocol
  message, a party killed at any point after that refuses the batch, a batch's key file is deleted when
  it completes (or when a used one is refused), and batches of two deals are never paired.
* Secret files are 0600 in 0700 folders whatever the umask.
* The dealer never opens the model owner's weights.

Oracles: the weights files (for W - W'), the fixed-point interpreter (for the labels and logits), file
modes and audit events of this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from fssc.compiler.backend import trust
from fssc.runtime import session
from fssc.runtime.keys import peek_header
from fssc.runtime.results import read_results
from onnx import numpy_helper
from parties import p0_cmd, party_cmd, start_p1, stop, uniform_bits
from tiny_models import tiny_cnn

from fssc.errors import FsscError

# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two programs of one architecture (W and W' = W + 0.002 N(0,1), same file name, so the same program
    hash), certificates and a folder of inputs."""
    from fssc.compiler.compile import compile_model
    from fssc.runtime.certs import make_certs
    from rich.console import Console

    tmp = tmp_path_factory.mktemp("lifecycle")
    _, proto, x = tiny_cnn(batch=2, size=12)
    other = onnx.ModelProto()
    other.CopyFrom(proto)
    gen = np.random.default_rng(7)  # test data only
    for init in other.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32:
            b = (a + 0.002 * gen.standard_normal(a.shape)).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(b, init.name))
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    progs = {}
    for name, p in (("a", proto), ("b", other)):
        (tmp / name).mkdir()
        onnx.save(p, tmp / name / "tiny.onnx")
        progs[name] = tmp / f"prog_{name}"
        compile_model(str(tmp / name / "tiny.onnx"), str(progs[name]), output_mode="logits", console=quiet)
    man = json.loads((progs["a"] / "manifest.json").read_text())
    assert man["program_hash"] == json.loads((progs["b"] / "manifest.json").read_text())["program_hash"]
    make_certs(str(tmp / "certs"))
    np.save(tmp / "x.npy", x)
    return {"tmp": tmp, "a": progs["a"], "b": progs["b"], "certs": tmp / "certs", "man": man, "x": tmp / "x.npy"}


def _hash(tiny) -> str:
    return tiny["man"]["program_hash"]


def _deal(prog: Path, keys: Path, n: int = 1) -> list[int]:
    return [b for b, *_ in trust.deal(str(prog), str(keys), n)]


def _linear_weights(prog: Path, program_hash: str) -> dict[str, np.ndarray]:
    mod = session.load_program(str(prog), "party1")
    W = session.load_weights(str(prog / "party1" / "weights.bin"), program_hash)
    return {tag: W[tag + ".w"] for tag in sorted(mod.LINEAR_WEIGHTS)}


def _wait_for(done, proc, seconds: float = 60.0) -> None:
    """Poll until done() holds (or the process exits), then give it a moment to finish what it was writing."""
    deadline = time.time() + seconds
    while not done() and proc.poll() is None:
        assert time.time() < deadline, "the model owner never got there"
        time.sleep(0.01)
    time.sleep(0.5)


def _collect_masked_weights(tiny, prog: Path, keys: Path, batch: int) -> dict[str, np.ndarray]:
    """A data owner that keeps what the model owner sends first (W^), starts the batch and hangs up."""
    from fssc.runtime.transport import client_handshake, connect

    man = tiny["man"]
    p1, port = start_p1(prog, keys, tiny["certs"], tiny["tmp"], timeout=60)
    try:
        chan = connect(f"127.0.0.1:{port}", str(tiny["certs"]), timeout=60)
        hello = {
            "protocol": man["protocol"],
            "program": man["program_hash"],
            "role": "party0",
            "fssc": man["fssc_version"],
            "batches": [batch],
            "deal": peek_header(str(keys / "p0" / f"batch{batch:04d}.key")).get("deal"),
        }
        client_handshake(chan, hello)
        shapes = session.load_program(str(prog), "party0").LINEAR_WEIGHTS
        w_hat = {t: np.array(a) for t, a in session.recv_weights(chan, shapes).items()}
        session.p0_start_batch(chan, batch)
        # it opens the batch (marked used), then finds the peer gone, logs the failed session and keeps
        # listening. Hang up only once the mark is there: closing at once could reset the connection
        # before the model owner read the start message (unread data makes the kernel send a reset).
        _wait_for((keys / "p1" / f"batch{batch:04d}.used").exists, p1)
        chan.close()
    finally:
        stop(p1, 0)
    return w_hat


# ----------------------------------------------------------------- point 1: weight-mask reuse


def test_a_second_deal_does_not_reveal_the_weight_difference(tiny, tmp_path):
    """Today's attack: deal, serve W; deal again into the same keys folder, serve W' (same program hash).
    The data owner subtracts the two W^ it received. It must not get W - W'."""
    h = _hash(tiny)
    keys = tmp_path / "keys"
    (b1,) = _deal(tiny["a"], keys)
    w_hat = _collect_masked_weights(tiny, tiny["a"], keys, b1)
    (b2,) = _deal(tiny["b"], keys)
    w_hat2 = _collect_masked_weights(tiny, tiny["b"], keys, b2)
    W, W2 = _linear_weights(tiny["a"], h), _linear_weights(tiny["b"], h)
    assert any((W[t] != W2[t]).any() for t in W)
    diff = np.concatenate([(w_hat[t] - w_hat2[t]).reshape(-1) for t in sorted(W)])
    leak = np.concatenate([(W[t] - W2[t]).reshape(-1) for t in sorted(W)])
    assert diff.size > 400
    assert np.mean(diff == leak) < 0.01, "W^ - W'^ = W - W': the two deals share the weight mask"
    assert uniform_bits(diff).all(), "W^ - W'^ is not uniform"


def test_other_weights_are_refused_on_a_seed_that_masked_weights(tiny, tmp_path):
    """One deal, one session with W; the model owner then starts with W' on the same deal's unused batch:
    it refuses before listening, in one line telling the operator to deal new keys."""
    keys = tmp_path / "keys"
    b1, b2 = _deal(tiny["a"], keys, 2)
    _collect_masked_weights(tiny, tiny["a"], keys, b1)  # commits the deal's seed to W
    ready = tmp_path / "port"
    proc = subprocess.Popen(  # not start_p1: this model owner must refuse before it listens
        party_cmd(tiny["b"], "party1", keys, tiny["certs"], "--listen", "127.0.0.1:0", "--ready-file", ready),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while proc.poll() is None and not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    _, err = stop(proc, 0)
    assert not ready.exists(), "the model owner listens with other weights on a used weight mask"
    assert proc.returncode == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "deal new keys" in err
    # the same weights on that deal are still served
    assert _collect_masked_weights(tiny, tiny["a"], keys, b2)


def test_commitment_is_salted_and_private(tiny, tmp_path):
    """The binding lives in the model owner's key folder only, 0600, and is not a plain hash of W."""
    import hashlib

    keys = tmp_path / "keys"
    (b1,) = _deal(tiny["a"], keys)
    deal = peek_header(str(keys / "p1" / f"batch{b1:04d}.key"))["deal"]
    _collect_masked_weights(tiny, tiny["a"], keys, b1)
    commits = list((keys / "p1").glob("*.commit"))
    assert [c.name for c in commits] == [f"setup-{deal}.commit"]
    assert not list((keys / "p0").glob("*.commit"))
    assert stat.S_IMODE(commits[0].stat().st_mode) == 0o600
    blob = commits[0].read_bytes()
    W = _linear_weights(tiny["a"], _hash(tiny))
    plain = hashlib.sha256(b"".join(W[t].tobytes() for t in sorted(W))).hexdigest()
    assert plain not in blob.decode()
    # two commitments to the same weights differ (fresh salt per deal)
    (b2,) = _deal(tiny["a"], keys)
    _collect_masked_weights(tiny, tiny["a"], keys, b2)
    blobs = [json.loads(c.read_text())["hmac_sha256"] for c in (keys / "p1").glob("*.commit")]
    assert len(blobs) == 2 and blobs[0] != blobs[1]


def test_every_deal_has_a_fresh_setup_and_id(tiny, tmp_path):
    keys = tmp_path / "keys"
    first = _deal(tiny["a"], keys, 2)
    second = _deal(tiny["a"], keys, 1)
    assert first == [0, 1] and second == [2]
    deals = [peek_header(str(keys / "p0" / f"batch{b:04d}.key"))["deal"] for b in (0, 1, 2)]
    assert deals[0] == deals[1] != deals[2]
    for b, d in zip((0, 1, 2), deals, strict=True):
        assert peek_header(str(keys / "p1" / f"batch{b:04d}.key"))["deal"] == d
    seeds = {d: session.read_setup(str(keys / "p1"), _hash(tiny), d) for d in set(deals)}
    assert len(set(seeds.values())) == 2
    assert not (keys / "dealer").exists(), "the dealer keeps no seed after a deal"
    # a batch cannot be read with another deal's id
    with pytest.raises(FsscError, match="deal"):
        session.open_batch(str(keys / "p0"), 0, 2, _hash(tiny), deal=deals[0])


def test_data_owner_uses_batches_of_one_deal(tiny, tmp_path):
    keys = tmp_path / "keys"
    _deal(tiny["a"], keys, 1)
    _deal(tiny["a"], keys, 2)
    deal, batches = session.choose_batches(str(keys / "p0"), 0, 2, _hash(tiny))
    assert batches == [1, 2]
    assert deal == peek_header(str(keys / "p0" / "batch0001.key"))["deal"]
    deal, batches = session.choose_batches(str(keys / "p0"), 0, 1, _hash(tiny))
    assert batches == [0]
    with pytest.raises(FsscError, match="one deal"):
        session.choose_batches(str(keys / "p0"), 0, 3, _hash(tiny))


# ----------------------------------------------------------------- point 2: durable one-time keys


class _FirstSendError(Exception):
    pass


@pytest.mark.parametrize("party", [0, 1])
def test_marker_and_folder_are_fsynced_before_the_first_message(tiny, tmp_path, monkeypatch, party):
    from fssc.runtime.channel import queue_pair
    from fssc.runtime.prg import Rng

    h = _hash(tiny)
    keys = tmp_path / "keys"
    (b,) = _deal(tiny["a"], keys)
    pdir = keys / f"p{party}"
    events: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    mine, peer = queue_pair(timeout=10)

    def send_bytes(data):
        events.append(("send", ""))
        raise _FirstSendError

    monkeypatch.setattr(mine, "send_bytes", send_bytes)
    role = f"party{party}"
    mod = session.load_program(str(tiny["a"]), role)
    x_shape = tuple(tiny["man"]["inputs"][0]["shape"])
    with pytest.raises(_FirstSendError):
        keys_r = session.open_batch(str(pdir), party, b, h)
        if party == 1:  # P1's first message follows the data owner's masked input
            peer.send(Rng().u64(x_shape))
            session.run_p1_batch(mod, mine, keys_r, session.load_weights(str(tiny["a"] / "party1" / "weights.bin"), h))
        else:
            shapes = session.load_program(str(tiny["a"]), "party1").LINEAR_WEIGHTS
            w_hat = {t: Rng().u64(tuple(s)) for t, s in shapes.items()}
            name = tiny["man"]["inputs"][0]["name"]
            session.run_p0_batch(mod, mine, keys_r, w_hat, {name: np.zeros(x_shape, np.uint64)})
    marker = str(pdir / f"batch{b:04d}.used")
    first_send = events.index(("send", ""))
    synced = [p for kind, p in events[:first_send] if kind == "fsync"]
    assert marker in synced, f"the used marker is not fsync'd before P{party}'s first message: {events}"
    assert str(pdir) in synced[synced.index(marker) :], "its folder is not fsync'd after it, before the message"


def _run_session(
    tiny, prog: Path, keys: Path, *p0_args, kill: str | None = None, delay: float = 0.0, p1_listens: bool = False
):
    """Both party programs as processes; ``kill`` ("p0" or "p1") is SIGKILLed ``delay`` s after its batch's
    used marker appears (it is made before the batch's first protocol message). With ``p1_listens`` the model
    owner is expected to keep listening after the data owner's session ends (a refused or failed session): it is
    stopped once the data owner has exited; so it is after a killed data owner, whether or not it still listens.
    Returns (rc0, err0, rc1, err1)."""
    p1, port = start_p1(prog, keys, tiny["certs"], tiny["tmp"], timeout=60)
    p0 = subprocess.Popen(
        p0_cmd(prog, keys, tiny["certs"], port, "--input", tiny["x"], *p0_args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if kill:
            victim = {"p0": p0, "p1": p1}[kill]
            marker = keys / kill / "batch0000.used"
            deadline = time.time() + 60
            while not marker.exists():
                assert time.time() < deadline and victim.poll() is None, "the batch never started"
                time.sleep(0.001)
            time.sleep(delay)
            victim.send_signal(signal.SIGKILL)
        out0, err0 = p0.communicate(timeout=120)
        if p1_listens:
            time.sleep(1.0)  # its one-line log of the refused session
            assert p1.poll() is None, "the model owner stopped listening after one refused data owner"
            p1.terminate()
        elif kill == "p0":  # a failed session: the model owner logs it and would listen until its --timeout
            time.sleep(1.0)
            if p1.poll() is None:
                p1.terminate()
        out1, err1 = p1.communicate(timeout=120)
    finally:
        for p in (p0, p1):
            if p.poll() is None:
                stop(p, 0)
    return p0.returncode, out0 + err0, p1.returncode, out1 + err1


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["p0", "p1"])
def test_a_party_killed_after_the_first_message_refuses_the_batch(tiny, tmp_path, victim):
    h = _hash(tiny)
    gen = np.random.default_rng()  # random kill points (test data, not key material)
    for trial, delay in enumerate(gen.uniform(0.0, 0.15, size=3)):
        keys = tmp_path / f"keys{trial}"
        _deal(tiny["a"], keys, 2)
        _run_session(tiny, tiny["a"], keys, kill=victim, delay=float(delay))
        party = int(victim[1])
        pdir = str(keys / victim)
        assert session.unused_batches(pdir) == [1]
        with pytest.raises(FsscError, match="already used") as e:
            session.open_batch(pdir, party, 0, h)
        assert "deleted" in str(e.value) and len(str(e.value).splitlines()) == 1
        assert not (keys / victim / "batch0000.key").exists(), f"trial {trial}: the used key file is still there"
        with pytest.raises(FsscError, match="already used"):
            session.check_batches(pdir, party, [0], h)


def test_a_completed_batch_leaves_no_key_file_and_matches_the_interpreter(tiny, tmp_path):
    from fssc.compiler.compile import compile_graph
    from fssc.compiler.frontend.onnx_import import import_onnx
    from fssc.compiler.reference.interp import run_fixed

    keys = tmp_path / "keys"
    _deal(tiny["a"], keys, 2)
    out = tmp_path / "out.jsonl"
    rc0, log0, rc1, log1 = _run_session(tiny, tiny["a"], keys, "--out", out, "--output", "logits")
    assert rc0 == 0 and rc1 == 0, log0 + log1
    for p in ("p0", "p1"):
        assert not (keys / p / "batch0000.key").exists(), f"{p}: a used key file stays on disk"
        assert (keys / p / "batch0000.used").exists()
        assert (keys / p / "batch0001.key").exists()
    x = np.load(tiny["x"])
    graph = compile_graph(import_onnx(str(tiny["tmp"] / "a" / "tiny.onnx")), echo=lambda s: None).graph
    want = run_fixed(graph, x)[0]
    got = np.array([r["logits"] for r in read_results(str(out))])
    assert np.abs(got - want).max() < 0.01
    # a new deal into the same folder does not reuse the used batch's id (its marker stays)
    assert _deal(tiny["a"], keys, 1) == [2]


def test_batches_of_two_deals_are_refused_at_the_handshake(tiny, tmp_path):
    ka, kb = tmp_path / "ka", tmp_path / "kb"
    _deal(tiny["a"], ka)
    _deal(tiny["a"], kb)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copytree(ka / "p0", mixed / "p0")
    shutil.copytree(kb / "p1", mixed / "p1")
    rc0, log0, _, log1 = _run_session(tiny, tiny["a"], mixed, p1_listens=True)
    assert rc0 == 2, log0 + log1
    err0 = [ln for ln in log0.splitlines() if "error" in ln]
    refused = [ln for ln in log1.splitlines() if "handshake refused" in ln]
    assert len(err0) == 1 and len(refused) == 1, log0 + log1
    assert "handshake refused" in err0[0] and "deal" in err0[0]
    assert "deal" in refused[0]
    assert "Traceback" not in log0 + log1
    # nothing was used: the batches stay available for their own deal's partner
    assert session.unused_batches(str(mixed / "p0")) == [0]
    assert session.unused_batches(str(mixed / "p1")) == [0]


# ----------------------------------------------------------------- point 3: secrets on disk


@pytest.mark.parametrize("umask", [0o000, pytest.param(0o022, marks=pytest.mark.slow)])
def test_secret_files_are_0600_in_0700_folders(tiny, tmp_path, umask):
    from fssc.compiler.compile import compile_model
    from rich.console import Console

    old = os.umask(umask)
    try:
        prog, keys = tmp_path / "prog", tmp_path / "keys"
        quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
        compile_model(str(tiny["tmp"] / "a" / "tiny.onnx"), str(prog), output_mode="logits", console=quiet)
        _deal(prog, keys, 2)
        out = tmp_path / "out.jsonl"
        rc0, log0, rc1, log1 = _run_session(tiny, prog, keys, "--out", out)  # children inherit the umask
        assert rc0 == 0 and rc1 == 0, log0 + log1
    finally:
        os.umask(old)
    secret_dirs = [prog / "party1", keys / "p0", keys / "p1"]
    secret_files = [prog / "party1" / "weights.bin", out]
    for d in (keys / "p0", keys / "p1"):
        secret_files += list(d.iterdir())
    names = {f.name for f in secret_files}
    assert {"weights.bin", "batch0001.key", "batch0000.used", "out.jsonl"} <= names
    assert any(n.startswith("setup-") and n.endswith(".key") for n in names)
    assert any(n.endswith(".commit") for n in names)
    for d in secret_dirs:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, f"{d} is {oct(stat.S_IMODE(d.stat().st_mode))}"
    for f in secret_files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f"{f} is {oct(stat.S_IMODE(f.stat().st_mode))}"
    # public files keep ordinary modes (the programs are handed out)
    assert stat.S_IMODE((prog / "party0" / "program.py").stat().st_mode) == 0o666 & ~umask


# ----------------------------------------------------------------- point 7: the dealer needs no weights


def test_the_dealer_never_opens_the_weights(tiny, tmp_path):
    """Every file this process opens while dealing (audit events of open(), os.open, io.open)."""
    opened: list[str] = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.abspath(os.fsdecode(args[0])))

    sys.addaudithook(hook)  # hooks cannot be removed: this one goes quiet below
    try:
        _deal(tiny["a"], tmp_path / "keys", 2)
    finally:
        active[0] = False
    prog = str(tiny["a"].resolve())
    assert any(p.startswith(os.path.join(prog, "dealer")) for p in opened), "the hook saw nothing"
    party1 = [p for p in opened if p.startswith(os.path.join(prog, "party1"))]
    assert not party1, f"fssc deal opened {party1}"
    assert not [p for p in opened if p.startswith(os.path.join(prog, "party0"))]
    # and a program folder without party1/ (what the dealer should be given) deals the same
    dealer_only = tmp_path / "dealer_view"
    dealer_only.mkdir()
    shutil.copytree(tiny["a"] / "dealer", dealer_only / "dealer")
    shutil.copy(tiny["a"] / "manifest.json", dealer_only / "manifest.json")
    assert _deal(dealer_only, tmp_path / "keys2", 1) == [0]
