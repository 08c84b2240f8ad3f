"""Time per statement of the generated programs (``fssc bench resnet --profile``).

With ``FSSC_PROFILE=DIR`` in its environment, a process that imports :mod:`fssc.runtime.lib` (either
party, the dealer) replaces the lib functions a program's statements call with timed wrappers
(``instrument``): per statement (function and tag) its calls, wall time, the part of it spent blocked
receiving from the peer (``Channel.wait_s``), rounds, bytes sent and received, and for the dealer the key
bytes it wrote. At exit the process writes them to ``DIR/<role>-<pid>.json``. Only the outermost call is
timed (a lib function calling another counts once). Without the variable lib's functions are left as they
are: no cost.

The figures are this process's own: nothing is sent to the peer. ``load`` reads a folder of them back.
"""

from __future__ import annotations

import atexit
import functools
import glob
import json
import os
import threading
import time

from fssc.runtime.protocol import Dealer, Party

ENV = "FSSC_PROFILE"
FIELDS = ("calls", "wall_s", "cpu_s", "wait_s", "rounds", "sent", "received", "key_bytes")
OFFLINE = frozenset({"linear_offline"})  # statements of the data owner's offline phase


class Recorder:
    """Per-statement figures of one process, by role (the in-process simulation runs the dealer and both
    parties in one process, the parties in two threads: each thread keeps its own nesting depth and role)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.local = threading.local()
        self.lock = threading.Lock()
        self.rows: dict[tuple[str, str, str], list[float]] = {}  # (role, function, tag) -> FIELDS, first-call order

    @staticmethod
    def _counters(ctx) -> tuple[float, int, int, int, int]:
        if isinstance(ctx, Party):
            c = ctx.chan
            return c.wait_s, c.rounds, c.bytes_sent, c.bytes_received, 0
        if isinstance(ctx, Dealer):
            return 0.0, 0, 0, 0, sum(w.bytes_written for w in ctx.w)
        return 0.0, 0, 0, 0, 0

    def wrap(self, name: str, f):
        local = self.local

        @functools.wraps(f)
        def timed(*args, **kw):
            if getattr(local, "depth", 0):
                return f(*args, **kw)
            ctx = args[0] if args and isinstance(args[0], (Party, Dealer)) else None
            if ctx is not None:  # a local op (no context) belongs to the role this thread last ran
                local.role = f"party{ctx.b}" if isinstance(ctx, Party) else "dealer"
            before = self._counters(ctx)
            local.depth = 1
            t, cpu = time.perf_counter(), time.process_time()
            try:
                return f(*args, **kw)
            finally:
                wall, cpu = time.perf_counter() - t, time.process_time() - cpu
                local.depth = 0
                after = self._counters(ctx)
                tag = kw.get("tag", args[1] if ctx is not None and len(args) > 1 else "")
                key = (getattr(local, "role", "unknown"), name, str(tag))
                with self.lock:
                    row = self.rows.setdefault(key, [0.0] * len(FIELDS))
                    row[0] += 1
                    row[1] += wall
                    row[2] += cpu
                    for i, (a, b) in enumerate(zip(after, before, strict=True)):
                        row[3 + i] += a - b

        return timed

    def dump(self) -> None:
        """One file per role this process ran: ``<role>-<pid>.json``."""
        with self.lock:
            items = list(self.rows.items())
        by_role: dict[str, list[dict]] = {}
        for (role, fn, tag), vals in items:
            row = {"fn": fn, "tag": tag, "phase": _phase(role, fn), **dict(zip(FIELDS, vals, strict=True))}
            by_role.setdefault(role, []).append(row)
        if by_role:
            os.makedirs(self.folder, exist_ok=True)
        for role, rows in by_role.items():
            path = os.path.join(self.folder, f"{role}-{os.getpid()}.json")
            with open(path, "w") as fh:
                json.dump({"role": role, "pid": os.getpid(), "statements": rows}, fh)


def _phase(role: str, fn: str) -> str:
    if role == "dealer":
        return "deal"
    return "offline" if fn in OFFLINE else "online"


def instrument(namespace: dict, names) -> Recorder | None:
    """If ``FSSC_PROFILE`` is set, wrap ``namespace[name]`` for each name (a module's globals) and write the
    figures at exit; returns the recorder (None when profiling is off: nothing is touched)."""
    folder = os.environ.get(ENV)
    if not folder:
        return None
    rec = Recorder(folder)
    for name in names:
        namespace[name] = rec.wrap(name, namespace[name])
    atexit.register(rec.dump)
    return rec


def load(folder: str) -> dict[str, list[dict]]:
    """role -> statement rows of every process that wrote into ``folder`` (a role's processes concatenated)."""
    out: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as fh:
            d = json.load(fh)
        out.setdefault(d["role"], []).extend(d["statements"])
    return out
