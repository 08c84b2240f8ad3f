"""The dealer's speed work must not change a key byte, and parallel dealing must deal what serial dealing does.

* Byte identity: with a fixed PRG seed, the dealer as it writes key files (DCF keys streamed block by
  block, a background thread hashing and writing) gives the same bytes as the straightforward path (whole
  ``dcf.keygen`` arrays, ``KeyWriter.put``, in memory), and ``dcf.keygen`` gives the bytes recorded before
  the streaming rewrite (tests/test_dcf.py pins them).
* ``trust.deal(..., workers=2)``: two batches dealt by two processes, one deal id and setup for both,
  and the party programs then run both batches to the fixed-point interpreter's logits.
* A worker that fails (an exception, or the process dying) leaves no key file of an unfinished batch,
  complete-looking or partial; a key writer whose disk write fails leaves no file either.

Oracles: the in-memory straightforward dealer (bytes), the fixed-point interpreter (logits), the folder's
files and their headers.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fssc.compiler.backend import trust
from fssc.runtime import dcf, session
from fssc.runtime.keys import KeyReader, KeyWriter, _BackgroundFile, peek_header
from fssc.runtime.prg import Rng
from fssc.runtime.protocol import CARRY_DCF, DCF, Dealer
from fssc.runtime.results import read_results
from parties import run_p0, start_p1, stop
from tiny_models import compile_tiny

from fssc.errors import FsscError

SEED = b"\x07" * 16
SETUP = b"\x09" * 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dealing")
    _, x = compile_tiny(tmp, certs=True)
    man = json.loads((tmp / "prog" / "manifest.json").read_text())
    return {"tmp": tmp, "prog": tmp / "prog", "certs": tmp / "certs", "hash": man["program_hash"], "x": x}


class _WholeArrayDealer(Dealer):
    """The dealer's DCF records the straightforward way: the whole batch's keys, then ``put``."""

    def _put_dcf(self, tag, alpha, n):
        k0, k1 = dcf.keygen(alpha, n, None, self.rng)
        self.w[0].put(tag, k0.data)
        self.w[1].put(tag, k1.data)


def _deal_fixed(tiny, dealer_cls, paths=(None, None)) -> list[bytes]:
    mod = session.load_program(str(tiny["prog"]), "dealer")
    hdr = {"program": tiny["hash"], "batch": 0, "kind": "batch", "deal": "f" * 32}
    w = [KeyWriter(p, {**hdr, "party": b}) for b, p in enumerate(paths)]
    mod.deal(dealer_cls(w[0], w[1], rng=Rng(SEED)), SETUP)
    out = [wr.close() for wr in w]
    return [o if o is not None else Path(p).read_bytes() for o, p in zip(out, paths, strict=True)]


def test_streamed_key_files_equal_the_straightforward_dealer(tiny, tmp_path):
    want = _deal_fixed(tiny, _WholeArrayDealer)
    got_mem = _deal_fixed(tiny, Dealer)
    got_files = _deal_fixed(tiny, Dealer, (str(tmp_path / "k0.key"), str(tmp_path / "k1.key")))
    assert got_mem == want and got_files == want
    tags = [t for t, _ in KeyReader(want[0], party=0).records()]
    assert any(t.endswith(DCF) for t in tags) and any(t.endswith(CARRY_DCF) for t in tags), "no DCF record dealt"
    assert sorted(os.listdir(tmp_path)) == ["k0.key", "k1.key"]


def test_keygen_blocks_are_keygen_in_pieces():
    for n, k, count in [(20, 0, 3 * dcf.BLOCK + 5), (9, 2, dcf.BLOCK), (30, 1, 7)]:
        r = Rng(SEED)
        alpha = r.u64(count, n)
        beta = None if k == 0 else r.u64((count, k))
        keys = dcf.keygen(alpha, n, beta, Rng(SEED))
        params, blocks = dcf.keygen_blocks(alpha, n, beta, Rng(SEED))
        pieces = [[], []]
        for m0, m1 in blocks:
            assert m0.flags.c_contiguous and m1.flags.c_contiguous
            pieces[0].append(m0.tobytes())
            pieces[1].append(m1.tobytes())
        assert params == keys[0].params
        assert [b"".join(p) for p in pieces] == [keys[0].to_bytes(), keys[1].to_bytes()]


def test_a_record_in_pieces_must_fill_its_shape():
    w = KeyWriter(None, {"program": "p", "batch": 0, "party": 0})
    rec = w.record("t", np.uint64, (4,))
    with pytest.raises(RuntimeError, match="still being written"):
        w.put("u", np.zeros(1, np.uint64))
    rec.write(np.arange(3, dtype=np.uint64))
    with pytest.raises(ValueError, match="more bytes"):
        rec.write(np.arange(2, dtype=np.uint64))
    with pytest.raises(ValueError, match="short"):
        rec.close()
    rec.write(np.arange(1, dtype=np.uint64))
    rec.close()
    w.put("u", np.ones(2, np.uint8))
    r = KeyReader(w.close(), party=0)
    np.testing.assert_array_equal(r.get("t"), [0, 1, 2, 0])
    np.testing.assert_array_equal(r.get("u"), [1, 1])


def test_a_failed_disk_write_leaves_no_file(tmp_path):
    path = tmp_path / "p0" / "batch0000.key"
    w = KeyWriter(str(path), {"program": "p", "batch": 0, "party": 0})

    def full(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    w._file._fh.write = full  # type: ignore[union-attr]
    with pytest.raises(OSError, match="No space"):
        for _ in range(8):  # more than the staging buffers hold: the error surfaces in a write or at close
            w.put("big", np.zeros(1 << 20, np.uint64))
        w.close()
    w.abort()
    assert os.listdir(tmp_path / "p0") == []


def _spy_fadvise(monkeypatch) -> list[tuple[int, int, int]]:
    """Record the key writer's fadvise calls; each must name bytes already in the file when it is made."""
    calls: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        assert length > 0 and offset + length <= os.fstat(fd).st_size, "advice ahead of the bytes written"
        calls.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    monkeypatch.setattr(_BackgroundFile, "DROP_BEHIND", 1 << 20)
    monkeypatch.setattr(_BackgroundFile, "SIZE", 1 << 18)  # staging buffers and hand-overs of 256 KB and up
    return calls


def _records(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.integers(0, 1 << 63, size=n, dtype=np.uint64) for n in (1, 300_000, 5, 700_000, 123_457)]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this system")
def test_drop_behind_hands_written_ranges_back_in_order_and_the_file_is_whole(tmp_path, monkeypatch):
    """The key writer asks the kernel to write, then drop, the ranges it has written (never one ahead of the
    bytes it wrote), and the file reads back record for record; one flipped byte fails its checksum."""
    calls = _spy_fadvise(monkeypatch)
    arrays = _records(np.random.default_rng(7))
    path = tmp_path / "p0" / "batch0000.key"
    w = KeyWriter(str(path), {"program": "p", "batch": 0, "party": 0})
    for i, a in enumerate(arrays):
        w.put(f"r{i}", a)  # through the staging buffers
    handed = np.concatenate([arrays[3], arrays[1][:100_000]])
    rec = w.record("handed", np.uint64, (2, 400_000))
    for row in handed.reshape(2, -1):
        rec.write(row.copy(), owned=True)  # handed to the thread without a copy
    rec.close()
    w.close()
    size = path.stat().st_size
    assert {a for _, _, a in calls} == {os.POSIX_FADV_DONTNEED}
    kicks, drops = [calls[0], *calls[1::2]], calls[2::2]  # each time a range started; from the 2nd, one dropped
    assert len(kicks) >= 8 and all(length >= 1 << 20 for _, length, _ in kicks)
    ends = [o + n for o, n, _ in kicks]
    assert [o for o, _, _ in kicks] == [0, *ends[:-1]] and ends[-1] <= size  # they tile the file, in order
    assert [(o, n) for o, n, _ in drops] == [(o, n) for o, n, _ in kicks[: len(drops)]]  # dropped one call later
    r = KeyReader(str(path), party=0)
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(r.get(f"r{i}"), a)
    np.testing.assert_array_equal(r.get("handed").reshape(-1), handed)
    r.close()
    raw = bytearray(path.read_bytes())
    raw[size // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(FsscError, match="checksum mismatch"):
        KeyReader(str(path), party=0)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this system")
def test_a_stream_that_is_not_a_file_gets_no_drop_behind(monkeypatch):
    calls = _spy_fadvise(monkeypatch)

    class Sink(io.BytesIO):
        def end(self) -> None:
            pass

        def commit(self) -> None:
            pass

        def abort(self) -> None:
            pass

        def close(self) -> None:  # keep the bytes readable after the writer closes its sink
            self.closed_by_writer = True

    sink = Sink()
    arrays = _records(np.random.default_rng(8))
    w = KeyWriter("p0/batch0000.key", {"program": "p", "batch": 0, "party": 0}, sink=sink)
    for i, a in enumerate(arrays):
        w.put(f"r{i}", a)
    w.close()
    assert calls == []
    r = KeyReader(sink.getvalue(), party=0)
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(r.get(f"r{i}"), a)


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc for the resident memory")
def test_checking_a_key_file_leaves_it_unmapped_but_readable(tmp_path):
    """The checksum pass reads the file through its mapping and hands each chunk back: the process's resident
    memory does not grow with the file (here 256 MB), and every record still reads back."""
    path = tmp_path / "p0" / "batch0000.key"
    w = KeyWriter(str(path), {"program": "p", "batch": 0, "party": 0})
    rng = np.random.default_rng(9)
    parts = [rng.integers(0, 1 << 63, size=1 << 22, dtype=np.uint64) for _ in range(8)]  # 8 x 32 MB
    for i, a in enumerate(parts):
        w.put(f"r{i}", a)
    w.close()
    before = _rss_mb()
    r = KeyReader(str(path), party=0)  # checks magic, header, trailer and checksum
    grown = _rss_mb() - before
    assert grown < 64, f"checking a 256 MB key file left {grown:.0f} MB resident"
    for i, a in enumerate(parts):
        np.testing.assert_array_equal(r.get(f"r{i}"), a)
    r.close()


def _run_two_batches(tiny, keys: Path, tmp: Path) -> np.ndarray:
    x = np.concatenate([tiny["x"], tiny["x"][::-1]])  # 4 images: two batches of 2
    np.save(tmp / "x4.npy", x)
    p1, port = start_p1(tiny["prog"], keys, tiny["certs"], tmp, timeout=120)
    try:
        r = run_p0(
            tiny["prog"], keys, tiny["certs"], port, "--input", tmp / "x4.npy", "--out", tmp / "out.json", timeout=300
        )
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        stop(p1, 60)
    return np.array([res["logits"] for res in read_results(str(tmp / "out.json"))]), x


def test_two_workers_deal_two_batches_that_the_parties_run(tiny, tmp_path):
    from fssc.compiler.compile import compile_graph
    from fssc.compiler.frontend.onnx_import import import_onnx
    from fssc.compiler.reference.interp import run_fixed

    keys = tmp_path / "keys"
    seen = []
    done = trust.deal(str(tiny["prog"]), str(keys), 2, lambda i, n, dt: seen.append((i, n)), workers=2)
    assert [b for b, *_ in done] == [0, 1] and seen == [(1, 2), (2, 2)]
    deals = {peek_header(str(keys / p / f"batch{b:04d}.key"))["deal"] for p in ("p0", "p1") for b in (0, 1)}
    assert len(deals) == 1, "the batches of one deal carry one deal id"
    (deal,) = deals
    assert sorted(os.listdir(keys / "p1")) == ["batch0000.key", "batch0001.key", f"setup-{deal}.key"]
    assert sorted(os.listdir(keys / "p0")) == ["batch0000.key", "batch0001.key"]
    for b, n0, n1, _ in done:  # same sizes as a serial deal's
        assert os.path.getsize(keys / "p0" / f"batch{b:04d}.key") == n0
        assert os.path.getsize(keys / "p1" / f"batch{b:04d}.key") == n1
    serial = trust.deal(str(tiny["prog"]), str(tmp_path / "serial"), 1)
    assert serial[0][1:3] == done[0][1:3]

    got, x = _run_two_batches(tiny, keys, tmp_path)
    graph = compile_graph(import_onnx(str(tiny["tmp"] / "tiny.onnx")), echo=lambda s: None).graph
    want = np.concatenate([run_fixed(graph, x[i : i + 2])[0] for i in (0, 2)])
    assert got.shape == want.shape and np.abs(got - want).max() < 0.01
    for p in ("p0", "p1"):
        assert session.used_batches(str(keys / p)) == [0, 1]


def _failing_copy(tiny, tmp_path: Path, how: str) -> Path:
    """The tiny program with a dealer that writes some keys of batch 1 and then fails (``how``)."""
    prog = tmp_path / f"prog_{how}"
    shutil.copytree(tiny["prog"], prog)
    src = (prog / "dealer" / "program.py").read_text()
    fail = {"raise": "raise RuntimeError('dealer failed mid-batch')", "die": "os._exit(3)"}[how]
    hook = (
        "    if D.w[0].path.endswith('batch0001.key'):\n"
        "        D.w[0].put('x', __import__('numpy').zeros(1 << 22, 'u8'))\n"
        "        D.w[0]._file.finish(lambda d: b'')\n"  # the bytes reach the .part file
        f"        import os; {fail}\n"
    )
    marker = "    S = {}\n"
    assert marker in src
    (prog / "dealer" / "program.py").write_text(src.replace(marker, marker + hook, 1))
    return prog


@pytest.mark.parametrize("how", ["raise", "die"])
def test_a_failed_worker_leaves_no_key_file_of_an_unfinished_batch(tiny, tmp_path, how):
    from concurrent.futures.process import BrokenProcessPool

    prog = _failing_copy(tiny, tmp_path, how)
    keys = tmp_path / "keys"
    err = RuntimeError if how == "raise" else BrokenProcessPool
    with pytest.raises(err):
        trust.deal(str(prog), str(keys), 3, workers=2, skip_check=True)  # an edited dealer program: unchecked
    for p in ("p0", "p1"):
        names = sorted(n for n in os.listdir(keys / p) if n.startswith("batch"))
        assert not any(n.endswith(".part") for n in names), names
        assert "batch0001.key" not in names
    kept0 = sorted(n for n in os.listdir(keys / "p0") if n.startswith("batch"))
    kept1 = sorted(n for n in os.listdir(keys / "p1") if n.startswith("batch"))
    assert kept0 == kept1, "a batch is kept for both parties or for neither"
    for name in kept0:  # whatever is kept is whole
        for p in ("p0", "p1"):
            KeyReader(str(keys / p / name)).close()


def test_workers_below_one_is_a_one_line_error(tiny, tmp_path, run_fssc):
    proc = run_fssc("deal", tiny["prog"], "--workers", 0, "-o", tmp_path / "keys")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--workers" in proc.stderr
    assert not (tmp_path / "keys").exists()
