"""``fssc keys status``: a key folder's batches, deals and bytes, read from file names and headers only.

Oracles: the batch ids ``deal`` returns, the markers ``open_batch`` writes, the files' sizes on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fssc.compiler.backend import trust
from fssc.runtime import session
from tiny_models import compile_tiny


@pytest.fixture(scope="module")
def dealt(tmp_path_factory):
    """A tiny compiled program."""
    tmp = tmp_path_factory.mktemp("keys_status")
    compile_tiny(tmp)
    program_hash = json.loads((tmp / "prog" / "manifest.json").read_text())["program_hash"]
    return {"prog": tmp / "prog", "hash": program_hash}


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def _deal_of(status: dict) -> dict:
    (d,) = status["deals"]
    return d


def test_status_lists_batches_and_tracks_their_use(dealt, tmp_path, run_fssc):
    keys = tmp_path / "keys"
    ids = [b for b, *_ in trust.deal(str(dealt["prog"]), str(keys), 3)]
    assert ids == [0, 1, 2]
    p0, p1 = session.keys_status(str(keys))
    assert (p0["party"], p1["party"]) == ([0], [1])
    for f, folder in ((p0, keys / "p0"), (p1, keys / "p1")):
        d = _deal_of(f)
        assert f["programs"] == [dealt["hash"]] and d["program"] == dealt["hash"]
        assert (d["unused"], d["used"], d["used_with_key_file"]) == (ids, [], [])
        assert d["bytes"] == f["bytes"] == _bytes(folder)
    deal = _deal_of(p1)["deal"]
    assert _deal_of(p0)["deal"] == deal and _deal_of(p1)["setup"] == [f"setup-{deal}.key"]
    assert _deal_of(p0)["setup"] == []

    # a session opens batch 1: it is used, its key file still there (as if the session died mid-batch)
    r = session.open_batch(str(keys / "p0"), 0, 1, dealt["hash"], deal)
    d = _deal_of(session.keys_status(str(keys))[0])
    assert (d["unused"], d["used"], d["used_with_key_file"]) == ([0, 2], [1], [1])
    before = d["bytes"]
    assert before == _bytes(keys / "p0")
    r.close()

    # a session's batch 2: its key file is deleted when the batch ends (by the session's end at the latest)
    key2 = keys / "p0" / "batch0002.key"
    size2 = key2.stat().st_size
    with session.SessionBatches(str(keys / "p0"), 0, [2], dealt["hash"], deal, pytest.fail) as s, s.use(2):
        pass
    assert not key2.exists()
    d = _deal_of(session.keys_status(str(keys))[0])
    assert (d["unused"], d["used"], d["used_with_key_file"]) == ([0], [1, 2], [1])
    marker2 = (keys / "p0" / "batch0002.used").stat().st_size
    assert d["bytes"] == before - size2 + marker2 == _bytes(keys / "p0")

    # the CLI: readable lines, and --json that parses to the same facts
    out = run_fssc("keys", "status", keys)
    assert out.returncode == 0, out.stderr
    assert "unused batches: 0" in out.stdout and "used batches:   1, 2 (key file still on disk" in out.stdout
    assert f"setup-{deal}.key" in out.stdout
    js = run_fssc("keys", "status", keys, "--json")
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    assert [f["party"] for f in doc["folders"]] == [[0], [1]]
    assert doc["folders"][0]["deals"][0]["used"] == [1, 2]
    assert doc["folders"][1]["deals"][0]["unused"] == ids

    # one party's folder given directly
    (own,) = session.keys_status(str(keys / "p1"))
    assert own["party"] == [1] and _deal_of(own)["unused"] == ids


def test_status_never_reads_a_key_body(dealt, tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    trust.deal(str(dealt["prog"]), str(keys), 1)
    monkeypatch.setattr(session, "KeyReader", None)  # any full read of a key file would fail
    (keys / "p0" / "batch0000.key").open("r+b").truncate(1024)  # body gone, header intact
    d = _deal_of(session.keys_status(str(keys))[0])
    assert d["unused"] == [0] and d["bytes"] == 1024


def test_a_folder_that_holds_no_keys_is_one_line_and_exit_2(tmp_path, run_fssc):
    (tmp_path / "p0").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    out = run_fssc("keys", "status", tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and str(tmp_path) in out.stderr and "not an fssc key folder" in out.stderr


def _key_folder(root: Path) -> Path:
    keys = root / "keys"
    (keys / "p0").mkdir(parents=True)
    (keys / "p0" / "batch0000.key").write_bytes(b"x" * 10)
    return keys


def test_the_demo_removes_its_keys_unless_kept(tmp_path):
    from fssc.compiler.demo import dispose_keys

    keys = _key_folder(tmp_path / "a")
    assert dispose_keys(str(keys), keep=True) == f"keys: kept in {keys} (see `fssc keys status {keys}`)"
    assert (keys / "p0" / "batch0000.key").exists()
    assert dispose_keys(str(keys), keep=False) == f"keys: removed {keys} (--keep-keys keeps them)"
    assert not keys.exists()
    assert dispose_keys(str(keys), keep=False) == "keys: none were dealt"


def test_a_demo_that_fails_midway_leaves_no_keys(tmp_path, monkeypatch, capsys):
    from fssc.compiler import demo

    def fail(con, fssc_dir, *args):
        _key_folder(Path(fssc_dir))  # dealt, then the run breaks
        raise RuntimeError("the two-party run broke")

    monkeypatch.setattr(demo, "_run", fail)
    with pytest.raises(RuntimeError):
        demo.run_demo(str(tmp_path / "w"))
    assert not (tmp_path / "w" / "keys").exists()
    assert "keys: removed" in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        demo.run_demo(str(tmp_path / "v"), keep_keys=True)
    assert (tmp_path / "v" / "keys" / "p0" / "batch0000.key").exists()
