"""Key batches streamed from the dealer to a party over mutual TLS: ``fssc deal --to`` and ``fssc keys receive``.

A party that receives its keys this way never needs the dealer's disk. The party runs a receiver
(:class:`KeyReceiver`, ``fssc keys receive``) on its own key folder; the dealer connects to it and sends
the party's files, the bytes a key file on disk holds (:class:`fssc.runtime.keys.KeyWriter` writes them
to a :class:`FileSink` instead of a file: one key format, one writer).

* TLS 1.3, both sides authenticated by certificates of one CA (``fssc certs``): the receiver accepts only
  the dealer's certificate (common name fssc-dealer, checked right after TLS, before anything the client
  sent is read) and the dealer sends a party's keys only to a server whose certificate is that party's
  (fssc-party0 or fssc-party1). As the parties' listener (:mod:`fssc.runtime.transport`): TLS, name and
  hello within ``HANDSHAKE_TIMEOUT`` in all (heartbeats do not extend it), at most ``MAX_PENDING``
  connections before their hello (more are closed at once), and only a dealer past its hello keeps the
  receiver from being idle (``connect_timeout``).
* A connection opens with the dealer's hello (protocol, party, program hash, deal id); the receiver refuses
  another party's or another program's keys and answers with the first batch id free in its folder (after
  every batch it holds, used or not, or is receiving), so the dealer numbers a deal's batches after them.
* Per file: its name, exactly the one a deal gives it (:func:`fssc.runtime.session._batch_path`:
  ``batch0005.key``, ASCII digits; or ``setup-<deal>.key`` for the model owner), which the receiver
  refuses if the file exists there (keys are never overwritten) or is being received; then the file's
  bytes in frames of at most ``CHUNK`` bytes, and an empty frame. The receiver writes them to
  ``NAME.part`` (0600, in a 0700 folder), then checks the whole file as a party opening it does
  (:class:`fssc.runtime.keys.KeyReader`: magic, format, program hash, party, batch id, deal, trailer and
  checksum), sending heartbeats while it hashes, and says so; the dealer then commits it (party 1's file of
  a batch is completed and filed before party 0's: ``session._deal_batch``), and the receiver files it
  under its name (a hard link: never over an existing file). A
  connection that ends any other way (cut, refused, timed out) leaves nothing: its ``.part`` files are
  deleted. Memory is a few frames on either side, whatever the file's size.
* The dealer sends heartbeats while it computes (as the parties do), so the receiver's silence timeout
  (``timeout``) catches only a dealer that died or lost the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from fssc.runtime import session
from fssc.runtime.certs import DEALER_NAME
from fssc.runtime.channel import FrameLengthError
from fssc.runtime.keys import KeyReader
from fssc.runtime.transport import (
    HANDSHAKE_TIMEOUT,
    MAX_HELLO,
    MAX_JSON,
    MAX_PENDING,
    PARTY_NAMES,
    PEER_TIMEOUT,
    _common_name,
    _connect_retrying,
    _parse_json,
    _reason,
    _recv_frame,
    _send_frame,
    _shutdown,
    _split,
    heartbeat_interval,
    send_heartbeat,
    tls_context,
)

from fssc.errors import FsscError
from fssc.files import open_new, private_dir

STREAM_PROTOCOL = 1
CHUNK = 4 << 20  # bytes of a file per frame
CONNECT_TIMEOUT = 60.0  # default seconds the dealer retries a receiver that is not listening yet


@dataclass(frozen=True)
class Target:
    """Where the dealer streams one party's keys: the party's receiver at ``addr``, with the dealer's
    certificates in ``certs`` (a folder every process that deals a batch can read)."""

    party: int
    addr: str
    certs: str
    connect_timeout: float = CONNECT_TIMEOUT
    timeout: float = PEER_TIMEOUT

    @property
    def who(self) -> str:
        return f"party {self.party}'s key receiver at {self.addr}"


def parse_target(spec: str) -> tuple[int, str]:
    """``--to P=HOST:PORT`` -> (party, address)."""
    party, sep, addr = spec.partition("=")
    if not sep or party not in ("0", "1"):
        raise FsscError(f"--to {spec}: expected PARTY=HOST:PORT with PARTY 0 or 1 (e.g. --to 0=10.0.0.5:7700)")
    _split(addr)
    return int(party), addr


class Stream:
    """The dealer's end of one connection to a party's receiver: ``next`` is the first batch id free there;
    ``file(name)`` a :class:`FileSink` for one file; ``done(ids)`` tells the receiver the deal is complete."""

    def __init__(self, target: Target, program: str, deal: str):
        self.target = target
        ctx = tls_context(target.certs, "dealer", server=False)
        raw = _connect(target)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=PARTY_NAMES[target.party])
        except (ssl.SSLError, OSError) as e:
            raw.close()
            raise FsscError(f"TLS with {target.who} failed: {_reason(e)}") from None
        self.sock.settimeout(target.timeout)
        self._lock = threading.Lock()  # one frame (or a request and its answer) at a time on the connection
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._beats = threading.Thread(target=self._heartbeats, name="key-stream-heartbeat", daemon=True)
        self._beats.start()
        hello = {"fssc": "keys", "protocol": STREAM_PROTOCOL, "party": target.party, "program": program, "deal": deal}
        try:
            reply = self.request(hello, "the hello")
            if not isinstance(reply.get("next"), int) or reply["next"] < 0:
                raise FsscError(f"{target.who} answered the hello with {str(reply)[:80]}")
        except BaseException:  # neither the connection nor its heartbeat thread outlives a failed hello
            self.close()
            raise
        self.next: int = reply["next"]

    def _heartbeats(self) -> None:
        beat = heartbeat_interval(self.target.timeout)
        while not self._closed.wait(beat):
            if time.monotonic() - self._last < beat or not self._lock.acquire(blocking=False):
                continue
            try:
                send_heartbeat(self.sock)
                self._last = time.monotonic()
            except OSError:
                return
            finally:
                self._lock.release()

    def send(self, b) -> None:
        try:
            with self._lock:
                _send_frame(self.sock, b)
                self._last = time.monotonic()
        except (OSError, ssl.SSLError) as e:
            raise FsscError(f"{self.target.who}: connection lost while sending ({_reason(e)})") from None

    def request(self, msg: dict | bytes, what: str) -> dict:
        """Send ``msg`` (a JSON message, or a frame as it is) and return the receiver's answer; its refusal
        is an FsscError naming ``what``."""
        with self._lock:
            try:
                _send_frame(self.sock, msg if isinstance(msg, bytes) else json.dumps(msg, sort_keys=True).encode())
                self._last = time.monotonic()
                reply = _parse_json(_recv_frame(self.sock, self.target.timeout, MAX_JSON, at_most=True))
            except (OSError, ssl.SSLError) as e:
                raise FsscError(f"{self.target.who}: connection lost at {what} ({_reason(e)})") from None
            except FsscError as e:
                raise FsscError(f"{self.target.who}, at {what}: {e}") from None
        if reply.get("error"):
            raise FsscError(f"{self.target.who} refused {what}: {reply['error']}")
        return reply

    def file(self, name: str) -> FileSink:
        self.request({"file": name}, name)
        return FileSink(self, name)

    def done(self, batches: list[int]) -> None:
        self.request({"done": batches}, "the end of the deal")

    def close(self) -> None:
        """End the connection (the receiver deletes whatever it holds uncommitted from it)."""
        self._closed.set()
        _shutdown(self.sock)
        with contextlib.suppress(OSError):
            self.sock.close()


class FileSink:
    """One file on its way to a receiver (a :class:`fssc.runtime.keys.KeySink`)."""

    def __init__(self, stream: Stream, name: str):
        self.stream, self.name = stream, name

    def write(self, b) -> None:
        mv = memoryview(b).cast("B")
        for i in range(0, len(mv), CHUNK):
            self.stream.send(mv[i : i + CHUNK])

    def close(self) -> None:
        """The background file's end: nothing of its own (``end`` and ``commit`` finish the file)."""

    def end(self) -> None:
        """The file's last byte was sent: returns once the receiver has checked the whole file."""
        reply = self.stream.request(b"", f"the end of {self.name}")
        if reply.get("verified") != self.name:
            raise FsscError(f"{self.stream.target.who} answered the end of {self.name} with {str(reply)[:80]}")

    def commit(self) -> None:
        self.stream.request({"commit": self.name}, f"the commit of {self.name}")

    def abort(self) -> None:
        self.stream.close()


def _connect(target: Target) -> socket.socket:
    """A TCP connection to the receiver, retried (a receiver not listening yet) for ``connect_timeout`` s."""
    host, port = _split(target.addr)
    deadline = time.monotonic() + target.connect_timeout
    sock = _connect_retrying(target.addr, host, port, deadline, target.connect_timeout, None, who=target.who)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # requests are small: no Nagle delay
    return sock


# ------------------------------------------------------------ the party's receiver
def _linger(sock) -> None:
    """After a refusal: end our side and discard (unread, undecrypted) what the client had sent already, for a
    moment, so that closing does not reset the connection before the client reads the refusal."""
    socket.socket.shutdown(sock, socket.SHUT_WR)
    sock.settimeout(0.5)
    end, got = time.monotonic() + 0.5, 0
    while got < 4 * MAX_HELLO and time.monotonic() < end:
        b = socket.socket.recv(sock, MAX_HELLO)
        if not b:
            return
        got += len(b)


@contextlib.contextmanager
def _beating(sock, timeout: float):
    """Heartbeats on ``sock`` from a thread while the caller works without using it (the receiver checking a
    file that may take a while to hash), so that the dealer waiting for the answer hears a live receiver."""
    stop = threading.Event()

    def beat() -> None:
        every = heartbeat_interval(timeout)
        while not stop.wait(every):
            try:
                send_heartbeat(sock)
            except (OSError, ssl.SSLError):
                return

    t = threading.Thread(target=beat, name="key-receiver-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


class _RefusedError(FsscError):
    """Refused a dealer's request: said to the dealer, logged, and the connection ends."""


class KeyReceiver:
    """A party's key receiver (``fssc keys receive``): files what the dealer streams into ``out`` (the
    party's key folder, ``keys/p0`` or ``keys/p1``) under the names and modes ``fssc deal -o`` gives them.

    A thread per connection; ``serve`` accepts dealers until ``deals`` deals have ended or, with
    ``connect_timeout``, no dealer has been connected for that long (an error). Every refusal and failure is
    logged in one line (``log``) and ends that connection only; its uncommitted files are deleted."""

    def __init__(
        self,
        addr: str,
        certs: str,
        party: int,
        out: str,
        program_hash: str,
        timeout: float = PEER_TIMEOUT,
        log=print,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_pending: int = MAX_PENDING,
    ):
        host, port = _split(addr)
        self.addr, self.party, self.out, self.program = addr, party, out, program_hash
        self.ctx = tls_context(certs, f"party{party}", server=True)
        self.timeout, self.log, self.handshake_timeout = timeout, log, handshake_timeout
        self.max_pending = max_pending
        private_dir(out)
        self.srv = socket.create_server((host, port))
        self.srv.settimeout(0.25)
        self.port = self.srv.getsockname()[1]
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()  # open connections
        self._parts: set[str] = set()  # .part files of open connections
        self._threads: list[threading.Thread] = []
        self._pending = 0  # connections accepted and not yet past the dealer's hello (or closed)
        self._inflight: dict[socket.socket, float] = {}  # those connections -> their handshake deadline
        self._sessions = 0  # connections of an authenticated dealer past its hello
        self._idle_since = time.monotonic()
        self._closed = False
        self.deals = 0  # deals ended (the dealer's "done")
        self.files = 0  # files committed
        self.bytes = 0

    # -- the accept loop ---------------------------------------------------
    def serve(self, deals: int | None = None, connect_timeout: float | None = None) -> None:
        while not self._closed and (deals is None or self.deals < deals):
            self._expire()
            with self._lock:
                idle = not self._sessions  # only a dealer that was let in keeps the receiver busy
                if not idle:
                    self._idle_since = time.monotonic()
            if idle and connect_timeout is not None and time.monotonic() - self._idle_since > connect_timeout:
                raise FsscError(
                    f"no dealer connected to {_split(self.addr)[0]}:{self.port} within {connect_timeout:g} s "
                    "(--connect-timeout)"
                )
            try:
                raw, addr = self.srv.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._closed:
                    return
                self.log(f"accept failed: {e}")
                time.sleep(0.25)
                continue
            peer = f"{addr[0]}:{addr[1]}"
            with self._lock:
                full = self._pending >= self.max_pending
                if not full:
                    self._pending += 1
                    self._socks.add(raw)
            if full:
                self.log(f"refused a connection from {peer}: too many pending handshakes ({self.max_pending})")
                raw.close()
                continue
            t = threading.Thread(target=self._connection, args=(raw, peer), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _expire(self) -> None:
        """Wake the connections whose TLS handshake and hello did not end within the handshake timeout."""
        now = time.monotonic()
        with self._lock:
            for sock, deadline in self._inflight.items():
                if now > deadline:
                    _shutdown(sock)  # its thread then fails and logs

    def close(self) -> None:
        """Stop: close the listening socket and every connection; nothing uncommitted is kept."""
        self._closed = True
        self.srv.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _shutdown(s)
        for t in self._threads:
            t.join(timeout=10)
        with self._lock:
            parts = list(self._parts)
        for p in parts:
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def next_batch(self) -> int:
        return session.next_batch_id([self.out])

    # -- one connection ------------------------------------------------------
    def _send(self, sock, msg: dict) -> None:
        _send_frame(sock, json.dumps(msg, sort_keys=True).encode())

    def _recv(self, sock) -> dict:
        try:
            return _parse_json(_recv_frame(sock, self.timeout, MAX_JSON, at_most=True))
        except FrameLengthError as e:
            raise FsscError(f"message: {e}") from None

    def _connection(self, raw: socket.socket, peer: str) -> None:
        sock: socket.socket = raw
        pending: dict[str, str] = {}  # name -> its .part file, received and not committed
        ended = False
        admitted = False  # past the certificate check and the hello: a session
        deadline = time.monotonic() + self.handshake_timeout
        try:
            raw.settimeout(self.handshake_timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            sock = tls
            with self._lock:
                self._socks.discard(raw)
                self._socks.add(tls)
                self._inflight[tls] = deadline  # TLS, certificate name and hello: within the handshake timeout
            tls.do_handshake()
            cn = _common_name(tls.getpeercert() or {})
            if cn != DEALER_NAME:  # before reading anything from it
                raise _RefusedError(f"client certificate is for {cn!r}, not the dealer ({DEALER_NAME!r})")
            try:
                hello = _parse_json(_recv_frame(tls, self.handshake_timeout, MAX_HELLO, at_most=True))
            except FrameLengthError as e:
                raise _RefusedError(f"hello: {e}") from None
            deal = self._hello(tls, hello)
            with self._lock:
                self._inflight.pop(tls, None)
                self._pending -= 1
                self._sessions += 1
                admitted = True
            tls.settimeout(self.timeout)
            while True:
                try:
                    msg = self._recv(tls)
                except FsscError:
                    if not pending:  # the dealer closed between files: the connection's normal end
                        ended = True
                        return
                    raise
                if "file" in msg:
                    self._file(tls, str(msg["file"]), deal, pending)
                elif "commit" in msg:
                    self._commit(tls, str(msg["commit"]), deal, pending, peer)
                elif "done" in msg:
                    self._send(tls, {"ok": True})
                    with self._lock:
                        self.deals += 1
                    self.log(
                        f"deal {deal[:8]} complete ({self.files} file(s), {self.bytes / 1e6:,.1f} MB received so far)"
                    )
                else:
                    raise _RefusedError(f"unexpected message {str(msg)[:60]}")
        except _RefusedError as e:
            with contextlib.suppress(OSError, ssl.SSLError):
                self._send(sock, {"error": str(e)})
                _linger(sock)
            self.log(f"refused the dealer at {peer}: {e}")
        except Exception as e:  # any failure ends this connection only
            if self._closed:
                pass
            elif not admitted and (isinstance(e, TimeoutError) or time.monotonic() >= deadline):
                self.log(f"refused the connection from {peer}: no handshake within {self.handshake_timeout:g} s")
            else:
                self.log(f"connection from {peer} failed: {_reason(e)}")
        finally:
            for name, part in pending.items():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(part)
                if not ended:
                    self.log(f"deleted the uncommitted {name} (its connection ended)")
            with self._lock:
                self._parts.difference_update(pending.values())
                self._socks.discard(sock)
                self._socks.discard(raw)
                self._inflight.pop(sock, None)
                if admitted:
                    self._sessions -= 1
                    self._idle_since = time.monotonic()
                else:
                    self._pending -= 1
            with contextlib.suppress(OSError):
                sock.close()

    def _hello(self, sock, hello: dict) -> str:
        problems = []
        if hello.get("fssc") != "keys" or hello.get("protocol") != STREAM_PROTOCOL:
            problems.append(f"key stream protocol {hello.get('protocol')!r}, this receiver speaks {STREAM_PROTOCOL}")
        if hello.get("party") != self.party:
            problems.append(f"keys for party {hello.get('party')!r}, this is party {self.party}'s receiver")
        if hello.get("program") != self.program:
            problems.append(f"keys for program {hello.get('program')!r}, not {self.program} (another model or options)")
        deal = hello.get("deal")
        if not isinstance(deal, str) or not re.fullmatch(r"[0-9a-f]{8,64}", deal):
            problems.append("no deal id")
        if problems:
            raise _RefusedError("; ".join(problems))
        self._send(sock, {"next": self.next_batch()})
        return str(deal)

    def _file(self, sock, name: str, deal: str, pending: dict[str, str]) -> None:
        batch = session.batch_of(name)
        if batch is None and not (self.party == 1 and name == os.path.basename(session.setup_path("", deal))):
            raise _RefusedError(f"{name[:80]!r} is not a key file of party {self.party} for deal {deal[:8]}")
        final = os.path.join(self.out, name)
        if os.path.exists(final):
            raise _RefusedError(f"{final} exists (keys are never overwritten)")
        if batch is not None and os.path.exists(session._marker(final)):
            raise _RefusedError(f"batch {batch} was used here (keys are one-time; its id is not dealt again)")
        part = final + ".part"
        try:
            fh = open_new(part, private=True, exclusive=True)
        except FileExistsError:
            raise _RefusedError(f"{part} exists (another deal is sending it, or a failed write left it)") from None
        pending[name] = part
        with self._lock:
            self._parts.add(part)
        self._send(sock, {"ok": name})
        size = 0
        with fh:
            while b := _recv_frame(sock, self.timeout, CHUNK, at_most=True):
                fh.write(b)
                size += len(b)
        try:  # the checks a party makes when it opens the file (heartbeats meanwhile: hashing GBs takes a while)
            with _beating(sock, self.timeout):
                r = KeyReader(part, program=self.program, party=self.party, batch=batch, deal=deal)
                kind = r.header.get("kind")
                r.close()
            if kind != ("batch" if batch is not None else "setup"):
                raise FsscError(f"a {kind!r} file sent as {name}")
        except FsscError as e:
            msg = str(e).replace(part, name)
            raise _RefusedError(msg if msg.startswith(name) else f"{name}: {msg}") from None
        self._send(sock, {"verified": name, "bytes": size})

    def _commit(self, sock, name: str, deal: str, pending: dict[str, str], peer: str) -> None:
        part = pending.get(name)
        if part is None:
            raise _RefusedError(f"commit of {name[:80]!r}, which this connection did not send")
        final = part[: -len(".part")]
        try:
            os.link(part, final)  # never over an existing file
        except FileExistsError:
            raise _RefusedError(f"{final} exists (keys are never overwritten)") from None
        os.remove(part)
        del pending[name]
        with self._lock:
            self._parts.discard(part)
            self.files += 1
            size = os.path.getsize(final)
            self.bytes += size
        self._send(sock, {"committed": name})
        self.log(f"received {name} ({size / 1e6:,.1f} MB, deal {deal[:8]}) from the dealer at {peer}")
