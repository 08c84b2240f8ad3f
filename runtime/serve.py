"""The model owner's sessions: one place for the one-shot party program and for ``fssc serve``.

* :class:`Service` runs one data owner's session (:meth:`Service.session`): the handshake, which reserves
  the batches it names, the masked weights W^ of their deal, then its batches, each opened only once the data
  owner has started it. Every session ends in one log line: its number, the peer (certificate name and
  address), its batches and deal, seconds, bytes sent and received, and ``ok`` or ``failed: <reason>``.
* Batches are reserved atomically across concurrent sessions (:class:`BatchLedger`): the handshake's
  validation reserves the batches a data owner asks for, so two sessions never claim the same batch. A
  session that ends (ok or failed) gives back the reservations of batches it did not start; a batch it
  started is marked used on disk and stays burned.
* W^ per deal is cached (:class:`MaskedWeights`): computed once per deal under that deal's lock, the last
  ``size`` deals kept (least recently used dropped), so sessions on different deals run at once.
* While no session asks for it, the key file of the lowest unused batch no session holds (the batch a data
  owner asks for first) is read and verified ahead (:meth:`Service._read_ahead`): a session that starts with it
  finds it ready. Reading ahead marks nothing used.
* :meth:`Service.serve` is the accept loop. One-shot (``fssc run PROG --party 1``): sessions run in the
  calling thread, one at a time; a refused or failed client is logged and the loop goes on until one session
  succeeds (exit 0) or no data owner comes within the connect timeout. As a service (``fssc serve``): a
  worker thread per session, at most ``max_sessions`` at once; a data owner arriving when all are busy is
  refused at the handshake with a line saying so (it may retry later; nothing of its keys is used);
  SIGTERM or Ctrl-C stops accepting, lets running sessions finish (a silent peer ends its session within
  the peer timeout), logs a summary line and returns 0; a second signal aborts the running sessions.
  Without unused key batches the service keeps running, logs that once, and refuses each new data owner
  with a line naming the problem; batches dealt into its folder later are served.
"""

from __future__ import annotations

import collections
import signal
import threading
import time
from collections.abc import Callable

from fssc.runtime.heap import release_freed_memory
from fssc.runtime.session import (
    SessionBatches,
    batch_deal,
    check_batches,
    p1_await_batch,
    p1_masked_weights,
    run_p1_batch,
    send_weights,
    unused_batches,
)
from fssc.runtime.transport import Listener, TcpChannel, server_handshake

from fssc.errors import FsscError, os_error_message, printable

TICK = 0.25  # seconds: how often the accept loop looks at signals, finished workers and the idle time
MAX_REFUSING = 8  # busy refusals answered at once (each reads one hello); more are dropped unanswered


def one_line(e: BaseException) -> str:
    """Any exception as one line."""
    if isinstance(e, FsscError):
        text = str(e)
    elif isinstance(e, OSError):
        text = os_error_message(e)
    elif isinstance(e, MemoryError):
        text = "out of memory"
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())


class BatchLedger:
    """The model owner's batches in use by running sessions: reserved at the handshake, atomically."""

    def __init__(self, keys_dir: str, program_hash: str, log: Callable[[str], None]):
        self.keys_dir, self.program_hash, self.log = keys_dir, program_hash, log
        self._lock = threading.Lock()
        self._reserved: set[int] = set()
        self._out = False  # "no unused batches" was logged (again once batches come back and run out)

    def reserve(self, asked: list[int], deal: str) -> list[str]:
        """Reserve ``asked`` (of ``deal``) for one session, or the problems that refuse it (nothing reserved)."""
        with self._lock:
            unused = set(unused_batches(self.keys_dir))
            free = unused - self._reserved
            if unused and not free:
                return ["every unused key batch of the model owner is in use by a running session; try again later"]
            if not free:
                if not self._out:
                    self._out = True
                    self.log(
                        f"{self.keys_dir}: no unused key batches left: refusing new sessions until more are dealt "
                        "(`fssc deal`)"
                    )
                return [
                    "the model owner has no unused key batches left; it needs more dealt (`fssc deal`) before "
                    "it can serve a session"
                ]
            self._out = False
            missing = [b for b in asked if b not in free]
            if missing:
                return [f"batches {missing} are not available (unused) at the model owner"]
            try:
                check_batches(self.keys_dir, 1, asked, self.program_hash, deal)
            except FsscError as e:  # the detail (another data owner's deal id, our paths) stays in our log
                self.log(f"refused batches {asked} of deal {printable(deal)[:16]}: {one_line(e)}")
                return [f"batches {asked} are not available for that deal at the model owner"]
            self._reserved.update(asked)
            return []

    def release(self, batches: list[int]) -> None:
        """A session ended: its batches are no longer reserved (those it started are marked used on disk)."""
        with self._lock:
            self._reserved.difference_update(batches)

    def reserved(self, batch: int) -> bool:
        with self._lock:
            return batch in self._reserved

    def unused(self) -> list[int]:
        with self._lock:
            return sorted(set(unused_batches(self.keys_dir)) - self._reserved)


class MaskedWeights:
    """W^ = W + A per deal (a deal's seed masks only the weights first bound to it): computed once per deal,
    under that deal's lock, the ``size`` most recently used deals kept."""

    def __init__(self, keys_dir: str, mod, W: dict, size: int):
        self.keys_dir, self.mod, self.W, self.size = keys_dir, mod, W, max(1, size)
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._deal_locks: dict[str, threading.Lock] = {}

    def get(self, deal: str) -> dict:
        with self._lock:
            if deal in self._cache:
                self._cache.move_to_end(deal)
                return self._cache[deal]
            lock = self._deal_locks.setdefault(deal, threading.Lock())
        with lock:  # one computation per deal; sessions on other deals go on
            with self._lock:
                if deal in self._cache:
                    return self._cache[deal]
            w_hat = p1_masked_weights(self.keys_dir, self.mod.PROGRAM_HASH, deal, self.mod, self.W)
            with self._lock:
                self._cache[deal] = w_hat
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)  # a session still sending it keeps its own reference
                self._deal_locks.pop(deal, None)
            return w_hat


class Service:
    """The model owner's side of data owners' sessions over one key folder (see the module's text)."""

    def __init__(
        self,
        mod,
        hello: dict,
        keys_dir: str,
        W: dict,
        log: Callable[[str], None],
        max_sessions: int = 1,
    ):
        if max_sessions < 1:
            raise FsscError(f"--max-sessions {max_sessions}: expected at least 1")
        self.mod, self.hello, self.keys_dir, self.W, self.log = mod, hello, keys_dir, W, log
        self.max_sessions = max_sessions
        self.ledger = BatchLedger(keys_dir, mod.PROGRAM_HASH, log)
        self.weights = MaskedWeights(keys_dir, mod, W, size=max_sessions)
        self._lock = threading.Lock()
        self._numbers = 0
        self.counts = {"ok": 0, "failed": 0, "busy": 0, "batches": 0}
        self._running: dict[threading.Thread, TcpChannel] = {}
        self._refusing = 0
        self._stop = threading.Event()
        self._signals: list[str] = []  # names of the signals received, appended by the handler
        self._handled = 0  # of them, acted on by the accept loop
        self._ahead: SessionBatches | None = None  # the likely next first batch, read while no session asked
        self._once = False
        self._closed = False  # the service ended: no more reading ahead
        self._ahead_failed = ""  # the last failure to read ahead, logged once

    def prepare(self) -> None:
        """Bind (or refuse) the weights of the deal a data owner will use first, before listening."""
        unused = unused_batches(self.keys_dir)
        if unused:
            self.weights.get(batch_deal(self.keys_dir, unused[0]))

    # -- the batch a data owner most likely asks for first, read while waiting for it --------------------------
    def _read_ahead(self) -> None:
        """Start reading and verifying the key file of the lowest unused batch that no session holds (the one a
        data owner's ``fssc run`` asks for first if it holds that deal: the lowest unused of its oldest deal),
        giving up one read ahead that is no longer that batch, unless the service stops. A session that starts
        with it finds its first batch ready instead of waiting for its disk (gigabytes at 224x224); it is not
        marked used until that session's data owner starts it, like any batch read ahead. Advice only: a
        failure is one log line, not repeated (the session that asks for the batch meets it again, and says so)."""
        try:
            self._start_read_ahead()
        except Exception as e:
            line = f"reading ahead: {one_line(e)}"
            if line != self._ahead_failed:
                self._ahead_failed = line
                self.log(line)

    def _start_read_ahead(self) -> None:
        unused = self.ledger.unused()  # the folder's listing and a header: outside the service's lock
        deal = batch_deal(self.keys_dir, unused[0]) if unused else None
        with self._lock:
            old = self._ahead
            if old is not None and old.reads_ahead() == unused[:1]:
                return
            self._ahead = None
            if deal is not None and not (self._closed or self._stop.is_set() or self.ledger.reserved(unused[0])):
                warn = lambda line: self.log(f"reading ahead: {line}")  # noqa: E731
                self._ahead = SessionBatches(self.keys_dir, 1, unused[:1], self.mod.PROGRAM_HASH, deal, warn)
        _give_up(old)

    def _batches(self, asked: list[int], deal: str, warn, on_error) -> SessionBatches:
        """A session's key batches, starting from the batch read ahead if the session asks for it first. A batch
        read ahead that the session asks for later is given up (read again in its turn), one it does not ask for
        is left for the next session."""
        with self._lock:
            ahead = self._ahead
            if ahead is not None and set(ahead.reads_ahead()) & set(asked):
                self._ahead = None
            else:
                ahead = None
        if ahead is not None and ahead.follow(asked, deal, warn, on_error):
            return ahead
        _give_up(ahead)
        return SessionBatches(self.keys_dir, 1, asked, self.mod.PROGRAM_HASH, deal, warn, on_error=on_error)

    def _close_ahead(self) -> None:
        """Stop reading ahead for good (the service ends) and close what was read (``SessionBatches.close``)."""
        with self._lock:
            self._closed = True
            ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.close()

    # -- one session ---------------------------------------------------------
    def session(self, chan: TcpChannel) -> bool:
        """One data owner's session on ``chan``, logged in one line; True if it completed."""
        with self._lock:
            self._numbers += 1
            number = self._numbers
        t = time.perf_counter()
        reserved: list[int] = []
        info = {"batches": "none", "deal": ""}
        done = 0
        hello = dict(self.hello)

        def validate(peer: dict) -> list[str]:
            asked = peer.get("batches", [])
            if not isinstance(asked, list) or not all(type(b) is int for b in asked):
                return ["batches: expected a list of batch ids"]
            if not asked or len(set(asked)) != len(asked):
                return ["batches: expected at least one batch id, each once"]
            if not isinstance(peer.get("deal"), str):
                return ["the data owner named no deal for its keys (an older fssc?)"]
            problems = self.ledger.reserve(asked, peer["deal"])
            if not problems:  # the deal is the keys' (checked): a hex id
                info["batches"], info["deal"] = _ids(asked), f" of deal {peer['deal'][:8]}"
                reserved.extend(asked)
                hello["deal"] = peer["deal"]  # our answer confirms the deal
            return problems

        try:
            peer = server_handshake(chan, hello, validate)
            warn = lambda line: self.log(f"session {number}: {line}")  # noqa: E731
            with self._batches(peer["batches"], peer["deal"], warn, chan.abort) as batches:
                send_weights(chan, self.weights.get(peer["deal"]))
                for b in peer["batches"]:
                    # our key file is read and verified ahead; it is marked used only once the data owner has
                    # started the batch (marked it used)
                    start = lambda b=b: p1_await_batch(chan, b)  # noqa: E731
                    with batches.use(b, before_marking=start) as keys:
                        done += 1
                        run_p1_batch(self.mod, chan, keys, self.W)
            chan.close()
            outcome, ok = "ok", True
        except Exception as e:  # a failed session ends that client only; the batches it started stay used
            chan.abort()
            outcome, ok = f"failed: {printable(one_line(e))}", False
        finally:
            self.ledger.release(reserved)
        seconds = time.perf_counter() - t
        if not (ok and self._once):  # another session may follow: its first batch is read while we wait for it
            self._read_ahead()
        release_freed_memory()  # a session thread's arena would keep its peak (fssc/runtime/heap.py)
        with self._lock:
            self.counts["ok" if ok else "failed"] += 1
            self.counts["batches"] += done
        what = f"[{info['batches']}]{info['deal']}"
        served = f"served {done} batch(es) {what}" if ok else f"batches {what}, {done} begun,"
        self.log(
            f"session {number} with {chan.peer_name or '?'} at {chan.peer}: {served} in {seconds:.2f} s, "
            f"sent {_size(chan.bytes_sent)}, received {_size(chan.bytes_received)}: {outcome}"
        )
        return ok

    def _refuse_busy(self, chan: TcpChannel) -> None:
        why = f"the model owner is serving its maximum of {self.max_sessions} session(s) at once; try again later"
        try:
            server_handshake(chan, self.hello, lambda peer: [why])
        except Exception:  # refused as intended (or the client left): either way it is dropped
            chan.abort()
        finally:
            with self._lock:
                self._refusing -= 1
        self.log(
            f"refused {chan.peer_name or '?'} at {chan.peer}: busy with {self.max_sessions} session(s) (--max-sessions)"
        )

    # -- the accept loop -------------------------------------------------------
    def serve(self, listener: Listener, connect_timeout: float | None, once: bool) -> int:
        """Accept data owners' sessions until one completes (``once``) or a signal stops the service.

        ``connect_timeout``: one-shot, an FsscError when no data owner comes within it (after each failed
        session, it starts again); as a service, None (serve until stopped) or the idle time after which it
        stops like on SIGTERM."""
        self._once = once
        self._read_ahead()
        try:
            if once:
                return self._serve_once(listener, connect_timeout)
            return self._serve_service(listener, connect_timeout)
        finally:
            self._close_ahead()  # read ahead and not asked for: stays unused

    def _serve_service(self, listener: Listener, connect_timeout: float | None) -> int:
        self.log(
            f"serving up to {self.max_sessions} session(s) at once; {len(unused_batches(self.keys_dir))} unused key "
            f"batch(es) in {self.keys_dir}"
        )
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._serve_many(listener, connect_timeout)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        c = self.counts
        self.log(
            f"stopped: {c['ok']} session(s) ok, {c['failed']} failed, {c['busy']} refused as busy; "
            f"{c['batches']} batch(es) used, {len(unused_batches(self.keys_dir))} unused left"
        )
        return 0

    def _serve_once(self, listener: Listener, connect_timeout: float | None) -> int:
        while True:  # until one data owner's session completes
            if not unused_batches(self.keys_dir):
                raise FsscError(f"{self.keys_dir}: no unused key batches left (deal more with `fssc deal --batches N`)")
            if self.session(listener.accept(connect_timeout)):
                return 0

    def _serve_many(self, listener: Listener, idle_timeout: float | None) -> None:
        idle_since = time.monotonic()
        while not self._stop.is_set():
            if self._reap():
                idle_since = time.monotonic()
            elif idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                self.log(f"no data owner for {idle_timeout:g} s (--connect-timeout): stopping")
                break
            chan = listener.poll(TICK)
            if chan is None:
                continue
            idle_since = time.monotonic()
            with self._lock:
                for worker in [w for w in self._running if not w.is_alive()]:
                    del self._running[worker]
                busy = len(self._running) >= self.max_sessions
                answer = busy and self._refusing < MAX_REFUSING
                if answer:
                    self._refusing += 1
                if busy:
                    self.counts["busy"] += 1
            if busy and not answer:
                chan.abort()
                self.log(f"refused {chan.peer_name or '?'} at {chan.peer}: busy (unanswered: too many waiting)")
            elif busy:
                threading.Thread(target=self._refuse_busy, args=(chan,), daemon=True).start()
            else:
                worker = threading.Thread(target=self.session, args=(chan,), daemon=True)
                with self._lock:
                    self._running[worker] = chan
                worker.start()
        listener.close()  # no new connections from here on
        self._on_signals()
        running = self._reap()
        if running:
            self.log(f"stopping: waiting for {running} running session(s) to finish")
        while self._reap():
            self._on_signals()
            time.sleep(TICK)

    def _reap(self) -> int:
        """Forget finished workers; the number still running."""
        with self._lock:
            for worker in [w for w in self._running if not w.is_alive()]:
                del self._running[worker]
            return len(self._running)

    def _on_signal(self, signum, frame) -> None:
        """The signal handler: note the signal and stop accepting (logging and aborting are the loop's, so
        the handler never waits for a lock the interrupted code holds)."""
        self._signals.append(signal.Signals(signum).name)
        self._stop.set()

    def _on_signals(self) -> None:
        """Act on the signals received since last time: the first stops the service, any further one aborts
        the running sessions."""
        while self._handled < len(self._signals):
            name = self._signals[self._handled]
            self._handled += 1
            if self._handled == 1:
                self.log(f"{name}: no new sessions; running ones finish (again: abort them)")
                continue
            with self._lock:
                chans = list(self._running.values())
            self.log(f"{name} again: aborting {len(chans)} running session(s)")
            for chan in chans:
                chan.abort()


def _give_up(ahead: SessionBatches | None) -> None:
    """Close a batch read ahead that no session will use, in a thread of its own (a check under way in a child
    process is stopped; one in this process, the fallback, runs to its end); the batch stays unused."""
    if ahead is not None:
        threading.Thread(target=ahead.close, daemon=True, name="fssc-give-up").start()


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _ids(batches: list[int]) -> str:
    """Batch ids, runs shortened: 0-3,7."""
    out: list[str] = []
    for b in sorted(batches):
        if out and out[-1].split("-")[-1] == str(b - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{b}"
        else:
            out.append(str(b))
    return ",".join(out)
