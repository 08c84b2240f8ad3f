"""Key batches streamed from the dealer to a party over mutual TLS: ``fssc deal --to`` and ``fssc keys receive``.

A party that receives its keys this way never needs the dealer's disk. The party runs a receiver
(:class:`KeyReceiver`, ``fssc keys receive``) on its own key folder; the dealer connects to it and sends
the party's files, the bytes a key file on disk holds (:class:`fssc.runtime.keys.KeyWriter` writes them
to a :class:`FileSink` instead of a file: one key format, one writer).

* TLS 1.3, both sides authenticated by certificates of one CA (``fssc certs``): the receiver accepts only
  the dealer's certificate (common name fssc-dealer) and the dealer sends a party's keys only to a server
  whose certificate is that party's (fssc-party0 or fssc-party1).
* A connection opens with the dealer's hello (protocol, party, program hash, deal id); the receiver refuses
  another party's or another program's keys and answers with the first batch id free in its folder (after
  every batch it holds, used or not, or is receiving), so the dealer numbers a deal's batches after them.
* Per file: its name (``batchNNNN.key``, or ``setup-<deal>.key`` for the model owner), which the receiver
  refuses if the file exists there (keys are never overwritten) or is being received; then the file's
  bytes in frames of at most ``CHUNK`` bytes, and an empty frame. The receiver writes them to
  ``NAME.part`` (0600, in a 0700 folder), then checks the whole file as a party opening it does
  (:class:`fssc.runtime.keys.KeyReader`: magic, format, program hash, party, batch id, deal, trailer and
  checksum) and says so; the dealer then commits it, once all of the batch's files (both parties') are
  complete, and the receiver files it under its name (a hard link: never over an existing file). A
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
import struct
import threading
import time
from dataclasses import dataclass

from fssc.runtime import session
from fssc.runtime.certs import DEALER_NAME, identity_files
from fssc.runtime.channel import FrameLengthError
from fssc.runtime.keys import KeyReader
from fssc.runtime.transport import (
    HANDSHAKE_TIMEOUT,
    HEARTBEAT,
    MAX_JSON,
    PARTY_NAMES,
    PEER_TIMEOUT,
    _common_name,
    _parse_json,
    _reason,
    _recv_frame,
    _send_frame,
    _shutdown,
    _split,
    heartbeat_interval,
)

from fssc.errors import FsscError
from fssc.files import open_new, private_dir

STREAM_PROTOCOL = 1
CHUNK = 4 << 20  # bytes of a file per frame
CONNECT_TIMEOUT = 60.0  # default seconds the dealer retries a receiver that is not listening yet


def _context(certs: str, identity: str, server: bool) -> ssl.SSLContext:
    files = identity_files(certs, identity)
    for p in files:
        if not os.path.exists(p):
            raise FsscError(
                f"certificates: {p} not found (create them with `fssc certs -o DIR`; certificates made "
                "before the dealer had one lack dealer.pem: make new ones)"
            )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(files[1], files[2])
    ctx.load_verify_locations(files[0])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = not server
    return ctx


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
        ctx = _context(target.certs, "dealer", server=False)
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
        reply = self.request(hello, "the hello")
        if not isinstance(reply.get("next"), int) or reply["next"] < 0:
            self.close()
            raise FsscError(f"{target.who} answered the hello with {str(reply)[:80]}")
        self.next: int = reply["next"]

    def _heartbeats(self) -> None:
        beat = heartbeat_interval(self.target.timeout)
        while not self._closed.wait(beat):
            if time.monotonic() - self._last < beat or not self._lock.acquire(blocking=False):
                continue
            try:
                self.sock.sendall(struct.pack("<Q", HEARTBEAT))
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
    pause = 0.1
    while True:
        left = deadline - time.monotonic()
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, min(30.0, left)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # requests are small: no Nagle delay
            return sock
        except OSError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FsscError(
                    f"cannot connect to {target.who} within {target.connect_timeout:g} s (--connect-timeout): "
                    f"{_reason(e)}"
                ) from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 2.0)


# ------------------------------------------------------------ the party's receiver
BATCH_FILE = re.compile(r"batch(\d{4,9})\.key")


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
    ):
        host, port = _split(addr)
        self.addr, self.party, self.out, self.program = addr, party, out, program_hash
        self.ctx = _context(certs, f"party{party}", server=True)
        self.timeout, self.log, self.handshake_timeout = timeout, log, handshake_timeout
        private_dir(out)
        self.srv = socket.create_server((host, port))
        self.srv.settimeout(0.25)
        self.port = self.srv.getsockname()[1]
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()  # open connections
        self._parts: set[str] = set()  # .part files of open connections
        self._threads: list[threading.Thread] = []
        self._idle_since = time.monotonic()
        self._closed = False
        self.deals = 0  # deals ended (the dealer's "done")
        self.files = 0  # files committed
        self.bytes = 0

    # -- the accept loop ---------------------------------------------------
    def serve(self, deals: int | None = None, connect_timeout: float | None = None) -> None:
        while not self._closed and (deals is None or self.deals < deals):
            with self._lock:
                idle = not self._socks
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
            with self._lock:
                self._socks.add(raw)
            t = threading.Thread(target=self._connection, args=(raw, f"{addr[0]}:{addr[1]}"), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

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
        try:
            raw.settimeout(self.handshake_timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.ctx.wrap_socket(raw, server_side=True)
            sock = tls
            with self._lock:
                self._socks.discard(raw)
                self._socks.add(tls)
            tls.settimeout(self.timeout)
            hello = self._recv(tls)  # read before any refusal, so that the dealer hears the refusal
            cn = _common_name(tls.getpeercert() or {})
            if cn != DEALER_NAME:
                raise _RefusedError(f"client certificate is for {cn!r}, not the dealer ({DEALER_NAME!r})")
            deal = self._hello(tls, hello)
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
            self.log(f"refused the dealer at {peer}: {e}")
        except Exception as e:  # any failure ends this connection only
            if not self._closed:
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
        m = BATCH_FILE.fullmatch(name)
        batch = int(m.group(1)) if m else None
        if batch is None and not (self.party == 1 and name == f"setup-{deal}.key"):
            raise _RefusedError(f"{name[:80]!r} is not a key file of party {self.party} for deal {deal[:8]}")
        final = os.path.join(self.out, name)
        if os.path.exists(final):
            raise _RefusedError(f"{final} exists (keys are never overwritten)")
        if batch is not None and os.path.exists(final[: -len(".key")] + ".used"):
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
        try:  # the checks a party makes when it opens the file
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
