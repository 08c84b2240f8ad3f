"""Both parties as two processes on 127.0.0.1 (the demo and the benchmark).

Starts the model owner's program (`fssc run --party 1`) listening on a free port, waits
until it listens, runs the data owner's program against it, and returns both
outputs, exit codes, the wall time and each process's peak resident memory.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from fssc.runtime.netdelay import DelayProxy

from fssc.errors import FsscError


@dataclass
class LoopbackRun:
    p0_out: str
    p0_err: str
    p0_rc: int
    p1_out: str
    p1_rc: int
    seconds: float
    p0_max_rss_mb: float
    p1_max_rss_mb: float


def _hwm_mb(pid: int) -> float | None:
    """Peak resident memory of a live process (VmHWM; reset at exec, unlike ru_maxrss)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def wait_for(proc: subprocess.Popen, timeout: float, also: dict | None = None) -> tuple[int, float]:
    """Exit code and peak RSS (MB) of a child, polling /proc while it runs.

    ``also`` maps other live processes to their peak so far; they are polled too.
    """
    deadline = time.time() + timeout
    peak = 0.0
    others = also if also is not None else {}
    while True:
        peak = max(peak, _hwm_mb(proc.pid) or 0.0)
        for other in others:
            others[other] = max(others[other], _hwm_mb(other.pid) or 0.0)
        rc = proc.poll()
        if rc is not None:
            return rc, peak
        if time.time() > deadline:
            proc.kill()
            name = " ".join(map(str, proc.args[3:7])) if isinstance(proc.args, list) else proc.args
            raise FsscError(f"party process {name!s} did not finish within {timeout:.0f} s")
        time.sleep(0.02)


def party_command(prog: str, party: int, keys: str, certs: str, *args) -> list[str]:
    """``fssc run prog --party <b> --keys keys/p<b> --certs certs ARGS``: one party's program as a process
    (the data owner's regenerated from the manifest and checked against the received file first)."""
    return [
        sys.executable,
        "-P",  # not the current folder first on the import path: it may hold files the model owner sent
        "-m",
        "fssc.cli",
        "run",
        prog,
        "--party",
        str(party),
        "--keys",
        os.path.join(keys, f"p{party}"),
        "--certs",
        certs,
        *map(str, args),
    ]


BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def party_env() -> dict[str, str]:
    """The environment of a party process that shares this machine with its peer. The parties' heavy BLAS
    phases never overlap (the data owner's offline halves run while the model owner waits for the batch, the
    model owner's online halves while the data owner waits for them), so each gets every core; but OpenBLAS
    threads spin after a GEMM (about 2^28 cycles by default) and would take the cores from the peer's next
    gate, so they sleep at once (OPENBLAS_THREAD_TIMEOUT=4, the shortest). Measured on ResNet-18 224x224
    batch 2 on 2 cores: online 3.5-3.9 s against 4.0-4.7 s with one thread each. Values the caller set are kept."""
    return {**blas_env(os.cpu_count() or 1), **os.environ}


def blas_env(threads: int) -> dict[str, str]:
    """BLAS on ``threads`` threads that sleep as soon as a GEMM ends (the parties here, the dealer's workers)."""
    return {**dict.fromkeys(BLAS_THREADS, str(threads)), "OPENBLAS_THREAD_TIMEOUT": "4"}


def run_loopback(
    prog: str, keys: str, certs: str, p0_args: list[str], timeout: float = 1800, delay_s: float = 0.0
) -> LoopbackRun:
    """Both parties to the end of the data owner's run. ``delay_s`` > 0: the data owner reaches the model owner
    through a :class:`~fssc.runtime.netdelay.DelayProxy` that delays every byte by ``delay_s`` each way."""
    with tempfile.TemporaryDirectory(prefix="fssc-loopback-") as tmp, contextlib.ExitStack() as files:
        ready = os.path.join(tmp, "port")
        logs = {n: files.enter_context(open(os.path.join(tmp, n), "w+")) for n in ("p1", "p0out", "p0err")}
        p1 = subprocess.Popen(
            party_command(
                prog,
                1,
                keys,
                certs,
                "--listen",
                "127.0.0.1:0",
                "--ready-file",
                ready,
                "--connect-timeout",
                int(timeout),
            ),
            stdout=logs["p1"],
            stderr=subprocess.STDOUT,
            env=party_env(),
        )
        try:
            deadline = time.time() + 120
            while not os.path.exists(ready):
                if p1.poll() is not None or time.time() > deadline:
                    logs["p1"].seek(0)
                    raise FsscError(f"the model owner did not start:\n{logs['p1'].read()}")
                time.sleep(0.05)
            with open(ready) as fh:
                port = int(fh.read())
            if delay_s > 0:
                port = files.enter_context(DelayProxy(port, delay_s)).port
            t = time.perf_counter()
            p0 = subprocess.Popen(
                party_command(prog, 0, keys, certs, "--peer", f"127.0.0.1:{port}", *p0_args),
                stdout=logs["p0out"],
                stderr=logs["p0err"],
                env=party_env(),
            )
            peaks = {p1: 0.0}
            rc0, rss0 = wait_for(p0, timeout, peaks)
            seconds = time.perf_counter() - t
            rc1, rss1 = wait_for(p1, 120)
            rss1 = max(rss1, peaks[p1])
        finally:
            if p1.returncode is None and p1.poll() is None:
                p1.kill()
        out = {}
        for n, fh in logs.items():
            fh.seek(0)
            out[n] = fh.read()
            fh.close()
    return LoopbackRun(out["p0out"], out["p0err"], rc0, out["p1"], rc1, seconds, rss0, rss1)
