"""End to end: compile -> programs, deal, two real processes over mutual TLS.

Uses ResNet-18 at 64x64, batch 2 (the real graph, small images) so the whole
path runs within the CI budget. Oracles: onnxruntime on the same
preprocessed images; the weight tensors' bytes for the program scan.
"""

from __future__ import annotations

import filecmp
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from fssc.runtime import ring
from fssc.runtime.keys import KeyReader
from fssc.runtime.results import read_results
from parties import run_p0, start_p1, stop, uniform_bits

SIZE = 64


def _images(folder: Path, n: int = 2) -> Path:
    from fssc.compiler.demo import _write_images

    _write_images(str(folder), n, SIZE)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, export_resnet18, run_fssc):
    """One compiled program (``fssc compile --output-mode logits``'s function, in this process: its IR is the
    fixed-point oracle), certificates and three key batches."""
    from fssc.compiler.compile import compile_model
    from rich.console import Console

    tmp = tmp_path_factory.mktemp("e2e")
    onnx_path = export_resnet18(SIZE, 2)
    prog = tmp / "prog"
    res = compile_model(str(onnx_path), str(prog), output_mode="logits", console=Console(quiet=True))
    r = run_fssc("certs", "-o", tmp / "certs")
    assert r.returncode == 0, r.stderr
    r = run_fssc("deal", prog, "--batches", 3, "-o", tmp / "keys")
    assert r.returncode == 0, r.stderr
    return {"tmp": tmp, "onnx": onnx_path, "prog": prog, "certs": tmp / "certs", "keys": tmp / "keys", "res": res}


def test_compile_writes_three_programs_and_manifest(setup):
    prog = setup["prog"]
    for f in ("party0/program.py", "party1/program.py", "party1/weights.bin", "dealer/program.py", "manifest.json"):
        assert (prog / f).is_file(), f
    man = json.loads((prog / "manifest.json").read_text())
    for key in (
        "program_hash",
        "ring_bits",
        "frac_bits",
        "inputs",
        "outputs",
        "preprocess",
        "cost",
        "fssc_version",
        "output_mode",
    ):
        assert key in man
    src = (prog / "party1" / "program.py").read_text()
    assert "# conv %" in src and "<- /conv1/Conv" in src, "statements carry their IR op and ONNX node"
    assert man["program_hash"] in src


def test_party0_and_dealer_hold_no_weight_bytes(setup):
    """Scan party0/ and dealer/ for every weight tensor's bytes (float32 and ring-encoded)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(setup["onnx"]))
    needles = []
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.size >= 8 and a.dtype == np.float32:
            raw = a.tobytes()
            needles += [raw[:32], raw[len(raw) // 2 : len(raw) // 2 + 32]]
    r = KeyReader(str(setup["prog"] / "party1" / "weights.bin"))
    while not r.skip_to_end():
        _, arr = r._next()
        raw = arr.tobytes()
        if arr.size >= 4:
            needles += [raw[:32], raw[len(raw) // 2 : len(raw) // 2 + 32]]
    assert len(needles) > 40
    for role in ("party0", "dealer"):
        for f in (setup["prog"] / role).rglob("*"):
            if f.is_file():
                blob = f.read_bytes()
                hits = [n for n in needles if len(set(n)) > 4 and n in blob]
                assert not hits, f"{f} contains weight bytes"
    # and P1's weights file does hold them (the scan can find what it looks for)
    blob = (setup["prog"] / "party1" / "weights.bin").read_bytes()
    assert any(n in blob for n in needles)


@pytest.mark.slow  # a second compile of ResNet-18 (test_trust compiles the tiny CNN twice in the fast suite)
def test_compiling_twice_is_byte_identical(setup, run_fssc, tmp_path):
    again = tmp_path / "prog2"
    r = run_fssc("compile", setup["onnx"], "-o", again, "--output-mode", "logits")
    assert r.returncode == 0, r.stderr
    cmp = filecmp.dircmp(setup["prog"], again)

    def diffs(c):
        out = list(c.diff_files) + list(c.left_only) + list(c.right_only)
        for sub in c.subdirs.values():
            out += diffs(sub)
        return out

    # dircmp compares by stat first; force a byte comparison
    for f in setup["prog"].rglob("*"):
        if f.is_file():
            assert f.read_bytes() == (again / f.relative_to(setup["prog"])).read_bytes(), f
    assert not diffs(cmp)


def test_two_processes_label_images_like_onnxruntime(setup, ort_session, tmp_path):
    from fssc.runtime.images import Preprocess, load_inputs

    images = _images(tmp_path / "images")
    # the parties on the compiled DCF walk (a program this small would get numpy's), the dealer on numpy's: the
    # comparison with the fixed-point interpreter below checks it through real processes and across walks
    env = {**os.environ, "FSSC_DCF_WALK": "compiled"}
    p1, port = start_p1(setup["prog"], setup["keys"], setup["certs"], tmp_path, env=env)
    out_json = tmp_path / "out.jsonl"
    r0 = run_p0(
        setup["prog"],
        setup["keys"],
        setup["certs"],
        port,
        "--images",
        images,
        "--out",
        out_json,
        "--output",
        "logits",
        "--stats",
        tmp_path / "stats.json",
        env=env,
    )
    out1, err1 = stop(p1, 120)
    assert r0.returncode == 0, r0.stderr
    assert p1.returncode == 0, err1
    assert json.loads((tmp_path / "stats.json").read_text())["dcf_walk"] == "compiled"
    x = load_inputs(str(images), Preprocess(size=SIZE), (3, SIZE, SIZE))
    ref = ort_session(setup["onnx"]).run(None, {"input": x})[0]
    res = read_results(str(out_json))
    assert [r["label"] for r in res] == list(ref.argmax(1))
    secure = np.array([r["logits"] for r in res])
    # the secure run computes the fixed-point semantics of the compiled IR exactly (exact truncation)...
    from fssc.compiler.reference.interp import run_fixed

    fixed = run_fixed(setup["res"].graph, x)[0]
    assert (secure == fixed).all(), np.abs(secure - fixed).max()
    # ...and f = 12 at 64x64 stays within 0.05 of onnxruntime (0.02 is the 224x224 figure: the demo and
    # tests/test_overflow.py check that one)
    assert np.abs(secure - ref).max() < 0.05
    for i, line in enumerate(r0.stdout.splitlines()[:2]):
        assert f"label {ref[i].argmax()}" in line
    # the model owner prints nothing about results
    assert "label" not in out1 and "logits" not in out1


def _record_session(setup, x: np.ndarray):
    """Run the generated programs in-process, recording what each party receives."""
    from fssc.runtime import session
    from fssc.runtime.channel import decode_array
    from fssc.runtime.prg import Rng
    from fssc.runtime.simulate import deal_in_memory, run_parties

    prog = str(setup["prog"])
    man = session.load_manifest(prog)
    mods = {r: session.load_program(prog, r) for r in ("party0", "party1", "dealer")}
    W = session.load_weights(os.path.join(prog, "party1", "weights.bin"), man["program_hash"])
    seed = Rng().seed_bytes()
    _, k0, k1 = deal_in_memory(lambda D: mods["dealer"].deal(D, seed))

    def p1(P):
        session.send_weights(P.chan, session.masked_weights(mods["party1"], W, seed))
        mods["party1"].online(P, W)

    def p0(P):
        wh = session.recv_weights(P.chan, mods["party0"].LINEAR_WEIGHTS)
        z0 = mods["party0"].offline(P, wh)
        inp = man["inputs"][0]
        return mods["party0"].online(P, {inp["name"]: ring.encode(x, inp["scale"])}, z0)

    out0, _, c0, c1 = run_parties(p0, p1, k0, k1, record=True)
    return out0, [decode_array(b) for b in c0.received], [decode_array(b) for b in c1.received], W


@pytest.mark.slow
def test_model_owner_receives_uniform_bytes_and_data_owner_no_weights(setup):
    from fssc.models.export import synthetic_images

    xa = synthetic_images(2, SIZE, seed=11).numpy()
    xb = np.zeros_like(xa)  # a very different input: all zeros
    for x in (xa, xb):
        _, to_p0, to_p1, W = _record_session(setup, x)
        words = np.concatenate(
            [a.reshape(-1).view(np.uint64) if a.dtype != np.uint8 else np.zeros(0, np.uint64) for a in to_p1]
        )
        bits = np.concatenate([a.reshape(-1) for a in to_p1 if a.dtype == np.uint8])
        assert words.size > 100_000
        assert uniform_bits(words).all(), "P1's inbound words are not uniform"
        ones = int(np.unpackbits(bits).sum())
        assert abs(ones - bits.size * 4) <= 5 * np.sqrt(bits.size * 2), "P1's inbound bits are not uniform"
        # P0 receives W^ = W + A, never W: no received array equals a weight tensor, and the
        # masked weights are uniform words
        weights = {k: v for k, v in W.items() if k.endswith(".w")}
        for arr in to_p0:
            for w in weights.values():
                if arr.shape == w.shape:
                    assert np.mean(arr == w) < 1e-3
        setup_words = np.concatenate([a.reshape(-1) for a in to_p0[: len(weights)]])
        assert uniform_bits(setup_words).all()


@pytest.mark.slow
def test_handshake_refuses_another_program(setup, run_fssc, export_resnet18, tmp_path):
    other = tmp_path / "other"
    r = run_fssc("compile", export_resnet18(SIZE, 2, num_classes=3), "-o", other, "--output-mode", "logits")
    assert r.returncode == 0, r.stderr
    p1, port = start_p1(setup["prog"], setup["keys"], setup["certs"], tmp_path)
    r0 = run_p0(other, setup["keys"], setup["certs"], port, "--images", _images(tmp_path / "im"))
    stop(p1, 0)
    assert r0.returncode == 2
    assert "Traceback" not in r0.stderr
    # P0's keys were made for the first program: refused before connecting, naming the program
    assert "keys made for program" in r0.stderr


@pytest.mark.slow
def test_handshake_refuses_peer_of_another_model(setup, run_fssc, export_resnet18, tmp_path):
    other = tmp_path / "other"
    r = run_fssc("compile", export_resnet18(SIZE, 2, num_classes=3), "-o", other, "--output-mode", "logits")
    assert r.returncode == 0, r.stderr
    okeys = tmp_path / "okeys"
    assert run_fssc("deal", other, "--batches", 1, "-o", okeys).returncode == 0
    p1, port = start_p1(setup["prog"], setup["keys"], setup["certs"], tmp_path)
    r0 = run_p0(other, okeys, setup["certs"], port, "--images", _images(tmp_path / "im"))
    time.sleep(0.5)
    alive = p1.poll() is None  # a refused data owner does not end the model owner: it keeps listening
    out1, err1 = stop(p1, 0)
    assert r0.returncode == 2 and alive
    assert "handshake refused" in r0.stderr and "program" in r0.stderr
    assert "handshake refused" in out1
    assert "Traceback" not in r0.stderr + out1 + err1


def test_keys_of_another_batch_are_refused(setup, tmp_path):
    import shutil

    keys = tmp_path / "keys"
    shutil.copytree(setup["keys"], keys)
    for f in keys.rglob("*.used"):
        f.unlink()
    b = sorted((keys / "p0").glob("batch*.key"))
    # swap two batches' files: the header names the batch it was made for
    b[0].rename(tmp_path / "tmp.key")
    b[1].rename(b[0])
    (tmp_path / "tmp.key").rename(b[1])
    p1, port = start_p1(setup["prog"], keys, setup["certs"], tmp_path)
    r0 = run_p0(setup["prog"], keys, setup["certs"], port, "--images", _images(tmp_path / "im"))
    stop(p1, 0)
    assert r0.returncode == 2
    assert "keys of batch" in r0.stderr


def test_client_without_the_right_certificate_cannot_connect(setup, run_fssc, tmp_path):
    rogue = tmp_path / "rogue"
    assert run_fssc("certs", "-o", rogue).returncode == 0
    p1, port = start_p1(setup["prog"], setup["keys"], setup["certs"], tmp_path, timeout=20)
    try:
        r0 = run_p0(setup["prog"], setup["keys"], rogue, port, "--images", _images(tmp_path / "im"), timeout=60)
        assert r0.returncode == 2
        assert "TLS" in r0.stderr or "connection" in r0.stderr
        assert "Traceback" not in r0.stderr
        # a client presenting party 1's own certificate (wrong name) is refused too
        import shutil

        wrong = tmp_path / "wrong"
        wrong.mkdir()
        shutil.copy(setup["certs"] / "ca.pem", wrong / "ca.pem")
        shutil.copy(setup["certs"] / "party1.pem", wrong / "party0.pem")
        shutil.copy(setup["certs"] / "party1.key", wrong / "party0.key")
        r0 = run_p0(setup["prog"], setup["keys"], wrong, port, "--images", _images(tmp_path / "im"), timeout=60)
        assert r0.returncode == 2
    finally:
        out1, _ = stop(p1, 0)
    assert "refused a connection" in out1


def test_used_batch_is_refused(setup, tmp_path):
    from fssc.runtime.session import open_batch

    from fssc.errors import FsscError

    man = json.loads((setup["prog"] / "manifest.json").read_text())
    import shutil

    keys = tmp_path / "k"
    shutil.copytree(setup["keys"] / "p0", keys)
    for f in keys.glob("*.used"):
        f.unlink()
    r = open_batch(str(keys), 0, 2, man["program_hash"])
    r.close()
    with pytest.raises(FsscError, match="already used"):
        open_batch(str(keys), 0, 2, man["program_hash"])
