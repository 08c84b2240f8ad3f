"""``fssc deal --cluster ADDRESS``: the dealer's batch jobs on a Dask distributed cluster.

The test starts its own ``LocalCluster`` (two worker processes, one thread each). Through the CLI:

* batches dealt on the cluster into a key folder the workers see run a two-party session (logits equal to
  the fixed-point interpreter's bit for bit, within 0.05 of onnxruntime's, labels their argmax), with one
  deal id and the file layout of a local deal, and at most one warning line (workers that run with Dask's
  default ``MALLOC_TRIM_THRESHOLD_``, which slows dealing: docs/scaling.md);
* the model owner's keys written by the workers and the data owner's streamed from them to its receiver
  (``--to``) in the same deal;
* a scheduler that cannot be reached, and a worker that dies mid-batch: one line, exit code 2, and no key
  file of an unfinished batch, complete-looking or partial.

The session test and the worker-death test are slow (a worker restart, a session): ``-m slow``.

Skipped, with a message, where Dask is not installed (``pip install 'fssc[cluster]'``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import pytest
from fssc.compiler.backend import trust
from fssc.runtime import session
from fssc.runtime.keys import KeyReader, peek_header
from test_deal_stream import Receiver, run_session
from tiny_models import compile_tiny

from fssc.errors import FsscError

needs_dask = pytest.mark.skipif(
    importlib.util.find_spec("dask") is None, reason="fssc deal --cluster needs Dask: pip install 'fssc[cluster]'"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import json

    tmp = tmp_path_factory.mktemp("deal_cluster")
    _, x = compile_tiny(tmp, certs=True)
    h = json.loads((tmp / "prog" / "manifest.json").read_text())["program_hash"]
    return {"tmp": tmp, "prog": tmp / "prog", "certs": tmp / "certs", "hash": h, "x": x, "onnx": tmp / "tiny.onnx"}


@pytest.fixture(scope="module")
def cluster():
    import dask
    from dask import distributed

    # a job whose worker dies is not retried on another worker: one death fails the deal (the default
    # retries a few times, each costing a worker restart)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        c = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=50
        )
        try:
            yield c.scheduler_address
        finally:
            c.close()


@pytest.mark.slow
@needs_dask
def test_batches_dealt_on_the_cluster_run_a_session(tiny, cluster, tmp_path, run_fssc):
    keys = tmp_path / "keys"
    with Receiver(tiny, keys / "p0") as rx:  # party 0's keys streamed from the workers, party 1's on disk
        r = run_fssc(
            "deal", tiny["prog"], "--batches", 2, "--cluster", cluster, "-o", keys, "--to", f"0={rx.addr}",
            "--certs", tiny["certs"],
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "batch 0: " in r.stdout and "batch 1: " in r.stdout and "2/2 batches" in r.stdout, r.stdout
    # a cluster whose workers run with Dask's default allocator setting (MALLOC_TRIM_THRESHOLD_, set or not
    # depending on the Dask version and its config) is pointed out in one warning line (docs/scaling.md)
    lines = r.stderr.splitlines()
    assert len(lines) <= 1 and all(
        x.startswith("fssc: warning: --cluster: ") and "MALLOC_TRIM_THRESHOLD_" in x for x in lines
    ), r.stderr
    deals = {peek_header(str(keys / p / f"batch{b:04d}.key"))["deal"] for p in ("p0", "p1") for b in (0, 1)}
    assert len(deals) == 1, "the batches of one deal carry one deal id"
    (deal,) = deals
    assert sorted(os.listdir(keys / "p0")) == ["batch0000.key", "batch0001.key"]
    assert sorted(os.listdir(keys / "p1")) == ["batch0000.key", "batch0001.key", f"setup-{deal}.key"]
    run_session(tiny, keys, tmp_path)
    for p in ("p0", "p1"):
        assert session.used_batches(str(keys / p)) == [0, 1]


@needs_dask
def test_an_unreachable_scheduler_is_one_line(tiny, tmp_path):
    with pytest.raises(FsscError) as e:
        trust.deal(str(tiny["prog"]), str(tmp_path / "keys"), 1, cluster="tcp://127.0.0.1:9", connect_timeout=1)
    assert str(e.value).startswith("--cluster tcp://127.0.0.1:9: cannot reach the Dask scheduler within 1 s")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "keys").exists()


@pytest.mark.slow
@needs_dask
def test_a_worker_that_dies_mid_batch_is_one_line_and_leaves_no_batch(tiny, cluster, tmp_path):
    prog = tmp_path / "prog"
    shutil.copytree(tiny["prog"], prog)
    src = (prog / "dealer" / "program.py").read_text()
    hook = (  # batch 1's worker dies once part of its keys is on disk
        "    if D.w[0].path.endswith('batch0001.key'):\n"
        "        D.w[0].put('x', __import__('numpy').zeros(1 << 21, 'u8'))\n"
        "        D.w[0]._file.finish(lambda d: b'')\n"
        "        import os; os._exit(3)\n"
    )
    assert "    S = {}\n" in src
    (prog / "dealer" / "program.py").write_text(src.replace("    S = {}\n", "    S = {}\n" + hook, 1))
    keys = tmp_path / "keys"
    with pytest.raises(FsscError) as e:  # an edited dealer program: unchecked
        trust.deal(str(prog), str(keys), 3, skip_check=True, cluster=cluster)
    assert str(e.value).startswith(f"--cluster {cluster}: a cluster worker died dealing a batch"), str(e.value)
    assert "\n" not in str(e.value)
    for p in ("p0", "p1"):
        names = sorted(n for n in os.listdir(keys / p) if n.startswith("batch"))
        assert "batch0001.key" not in names and not [n for n in names if n.endswith(".part")], names
    kept0 = sorted(n for n in os.listdir(keys / "p0") if n.startswith("batch"))
    assert kept0 == sorted(n for n in os.listdir(keys / "p1") if n.startswith("batch"))
    for name in kept0:  # whatever is kept is whole
        for p in ("p0", "p1"):
            KeyReader(str(keys / p / name)).close()


def test_without_dask_the_cluster_is_one_line_and_the_rest_runs(tiny, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "dask" or m.startswith("dask.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "dask", None)  # `import dask` fails as where it is not installed
    with pytest.raises(FsscError) as e:
        trust.deal(str(tiny["prog"]), str(tmp_path / "keys"), 1, cluster="tcp://127.0.0.1:9")
    assert str(e.value) == "--cluster needs Dask distributed (no module 'dask'): pip install 'fssc[cluster]'"
    assert not (tmp_path / "keys").exists()
    assert [b for b, *_ in trust.deal(str(tiny["prog"]), str(tmp_path / "keys"), 1)] == [0]
