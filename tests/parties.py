"""The generated party programs as processes, for the tests that run them over TLS (not collected).

A compiled program folder holds ``party0/program.py`` and ``party1/program.py``;
a keys folder ``p0/`` and ``p1/``. The model owner (P1) listens on a free port
of 127.0.0.1 and writes it to a ready file; the data owner (P0) connects to it.

* :func:`party_cmd`: the command line of one party's program.
* :func:`start_p1`: P1 in the background, once it listens -> (process, port).
* :func:`p0_cmd`, :func:`run_p0`: P0's command line; P0 run to its end.
* :func:`stop`: a party's (stdout, stderr) once it ends, killed if it does not in time.
* :func:`uniform_bits`: a per-bit uniformity check of what a party receives.
* :class:`DelayProxy` (fssc.runtime.netdelay): a TCP proxy on 127.0.0.1 that delays every byte by a fixed
  time in each direction.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fssc.runtime.loopback import party_command
from fssc.runtime.netdelay import DelayProxy  # noqa: F401 (the tests import it from here)


def party_cmd(prog: Path, role: str, keys: Path, certs: Path, *args) -> list[str]:
    """``fssc run prog --party <b> --keys keys/p<b> --certs certs ARGS`` (the data owner's program checked
    against the manifest and regenerated)."""
    return party_command(str(prog), int(role[-1]), str(keys), str(certs), *args)


def start_p1(
    prog: Path,
    keys: Path,
    certs: Path,
    tmp: Path,
    timeout: float = 300,
    env: dict | None = None,
    peer_timeout: float | None = None,
    log: Path | None = None,
) -> tuple[subprocess.Popen, int]:
    """Start the model owner listening on a free port; returns (process, port) once it listens.

    ``timeout``: the program's ``--connect-timeout`` (seconds it waits for a data owner), and its
    ``--peer-timeout`` (seconds a session may stay silent) unless ``peer_timeout`` is given. Fails the test if
    P1 exits before it listens or takes more than 60 s to. ``env``: the process environment (default: the
    test's). ``log``: a file for its stdout and stderr, to read while it runs (default: pipes)."""
    ready = Path(tmp) / f"p1-{time.monotonic_ns()}.port"
    peer_timeout = timeout if peer_timeout is None else peer_timeout
    times = ["--connect-timeout", timeout, "--peer-timeout", peer_timeout]
    proc = subprocess.Popen(
        party_cmd(prog, "party1", keys, certs, "--listen", "127.0.0.1:0", "--ready-file", ready, *times),
        env=env,
        stdout=subprocess.PIPE if log is None else open(log, "w"),  # noqa: SIM115 (the child keeps it)
        stderr=subprocess.PIPE if log is None else subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 60
    while not ready.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            if log is not None:
                out, err = Path(log).read_text(), ""
            pytest.fail(f"party1 exited early ({proc.returncode}):\n{out}\n{err}")
        if time.time() > deadline:
            stop(proc, 0)
            pytest.fail("party1 did not start listening within 60 s")
        time.sleep(0.05)
    return proc, int(ready.read_text())


def p0_cmd(prog: Path, keys: Path, certs: Path, port: int, *args) -> list[str]:
    """The data owner's command line, connecting to P1 on 127.0.0.1:``port``."""
    return party_cmd(prog, "party0", keys, certs, "--peer", f"127.0.0.1:{port}", *args)


def run_p0(
    prog: Path, keys: Path, certs: Path, port: int, *args, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the data owner to its end (text output captured)."""
    return subprocess.run(
        p0_cmd(prog, keys, certs, port, *args),
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stop(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """Wait up to ``timeout`` s for a party to end (0: kill it now); returns its (stdout, stderr).

    Whatever happens, the process is gone afterwards."""
    try:
        if timeout > 0:
            return proc.communicate(timeout=timeout)
        proc.kill()
        return proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def uniform_bits(words: np.ndarray, z: float = 5.0) -> np.ndarray:
    """Per bit position, |ones - n/2| within z standard deviations (uint64 words)."""
    n = words.size
    ones = np.array([int(((words >> np.uint64(k)) & np.uint64(1)).sum()) for k in range(64)])
    return np.abs(ones - n / 2) <= z * np.sqrt(n / 4)
