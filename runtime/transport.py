"""TCP transport with mutual TLS between the two parties.

* Certificates come from ``fssc certs`` (:mod:`fssc.runtime.certs`): one CA,
  one certificate per party. The model owner (P1) listens and requires a
  client certificate signed by the CA whose common name is ``fssc-party0``;
  the data owner (P0) checks the server certificate against the CA and the
  name ``fssc-party1``. A client without the right certificate cannot
  connect.
* Frames are length-prefixed (8 bytes, little-endian). A session is two TLS
  connections, one per direction (an OpenSSL connection must not be read and
  written from two threads at once): a sender thread drains an outgoing queue
  onto the outgoing connection while the caller reads the incoming one, so
  both directions flow at once and ``exchange`` costs one network round trip.
  P0 opens both and tags them with a random session token; P1 pairs them.
* Every receive has a timeout (the silence timeout, ``--peer-timeout``); a
  closed or silent peer is a clear error, not a hang. A party that has nothing
  to send (it is computing, e.g. the data owner's offline phase) sends a
  heartbeat (an 8-byte frame header of all ones, no payload, skipped by the
  receiver) every ``heartbeat_interval(timeout)`` seconds from its sender thread,
  so only a peer whose process stopped, died or lost the network falls silent.
  Heartbeats prove a live process, not progress: one receive waits at most
  ``STALL_TIMEOUTS`` silence timeouts in all, so a peer stuck while alive (or
  a malicious one that only beats) ends the session too.
* The data owner connects within a connect timeout (``--connect-timeout``):
  a model owner that is not listening yet is retried until then.
* Every frame's length is checked against what the program expects at
  that step before its payload is read (``Channel.recv``; JSON messages: at
  most ``MAX_JSON`` bytes), so a peer cannot make a party allocate more.
* P1's ``Listener`` handshakes concurrently: a thread per accepted connection,
  at most ``MAX_PENDING`` connections between accept and the start of their
  session (more are closed at once), each handshake (TLS, certificate name,
  the connection's hello, and the arrival of its second connection) bounded by
  ``HANDSHAKE_TIMEOUT`` in total. Idle or refused clients cost a slot for that
  long and are logged in one line; they never stop the listener.
* The handshake (``handshake``) exchanges protocol version, program hash,
  role and the batch ids, and refuses a peer made for another program.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import ssl
import struct
import threading
import time

from fssc.runtime.channel import Channel, FrameLengthError, check_frame_length

from fssc.errors import FsscError

PARTY_NAMES = {0: "fssc-party0", 1: "fssc-party1"}
MAX_JSON = 1 << 20  # a handshake message (the batch list of a session)
MAX_HELLO = 4096  # a connection's hello (direction and session token)
MAX_PENDING = 32  # connections between accept and their session
HANDSHAKE_TIMEOUT = 10.0  # seconds from accept to a paired, authenticated session
HEARTBEAT = (1 << 64) - 1  # a frame length that is no frame: "still here", skipped by the receiver
# Heartbeats show a peer's process is alive, not that its protocol progresses: one receive waits at most this
# many silence timeouts in all, heartbeats or not (20 minutes at the default 30 s), then the peer is stuck.
STALL_TIMEOUTS = 40
CONNECT_TIMEOUT = 600.0  # default seconds to wait for the peer to connect (P1) or to listen (P0)
PEER_TIMEOUT = 30.0  # default seconds a peer may stay silent mid-session


HEARTBEAT_EVERY = 1.0  # seconds: the peer's silence timeout is its own, so keep well inside any sensible one


def heartbeat_interval(timeout: float) -> float:
    """How long a sender with nothing to send waits before a heartbeat: every second (sooner if its own
    silence timeout is under 4 s), so a peer with a silence timeout of a few seconds never mistakes it."""
    return max(0.05, min(HEARTBEAT_EVERY, timeout / 4))


def tls_context(certs: str, identity: str, server: bool) -> ssl.SSLContext:
    """A TLS 1.3 context with ``identity``'s certificate from a folder ``fssc certs`` wrote (``party0``,
    ``party1`` or ``dealer``): a server's or a client's, either requiring the other side's certificate
    from the same CA (a client also checks the server's name)."""
    from fssc.runtime.certs import identity_files  # certs imports this module: the file names live there

    files = identity_files(certs, identity)
    for p in files:
        if not os.path.exists(p):
            hint = " (certificates made before the dealer had one lack dealer.pem: make new ones)"
            raise FsscError(
                f"certificates: {p} not found (create them with `fssc certs -o {certs}`)"
                + (hint if identity == "dealer" else "")
            )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(files[1], files[2])
    ctx.load_verify_locations(files[0])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = not server
    return ctx


def _context(certs: str, party: int) -> ssl.SSLContext:
    """A party's context for a session: the model owner (P1) serves, the data owner (P0) connects."""
    return tls_context(certs, f"party{party}", server=party == 1)


HEARTBEAT_FRAME = struct.pack("<Q", HEARTBEAT)


def send_heartbeat(sock) -> None:
    """One heartbeat on ``sock`` (the caller makes sure no other frame is being written on it)."""
    sock.sendall(HEARTBEAT_FRAME)


class TcpChannel(Channel):
    """Two connected TLS sockets (outgoing, incoming) and a sender thread."""

    def __init__(self, tx: ssl.SSLSocket, rx: ssl.SSLSocket, timeout: float, record: bool = False):
        super().__init__(record)
        self.tx, self.rx = tx, rx
        self.timeout = timeout
        self.peer = "the peer"  # the listener sets the data owner's address
        self.peer_name = ""  # and the common name of its certificate
        tx.settimeout(timeout)
        rx.settimeout(timeout)
        self._out: queue.Queue = queue.Queue()
        self._err: BaseException | None = None
        self._sender = threading.Thread(target=self._send_loop, daemon=True)
        self._sender.start()

    def _send_loop(self):
        beat = heartbeat_interval(self.timeout)
        while True:
            try:
                b = self._out.get(timeout=beat)
            except queue.Empty:
                b = b""  # nothing to send for a while: a heartbeat tells the peer we are alive
                head = HEARTBEAT_FRAME
            else:
                if b is None:
                    return
                head = struct.pack("<Q", len(b))
            try:
                self.tx.sendall(head)
                if b:
                    self.tx.sendall(b)
            except BaseException as e:
                self._err = e
                return

    def send_bytes(self, b: bytes) -> None:
        if self._err is not None:
            raise FsscError(f"connection to peer lost while sending: {self._err}")
        self._out.put(b)

    def recv_bytes(self, size: int, at_most: bool = False) -> bytes | bytearray:
        return _recv_frame(self.rx, self.timeout, size, at_most)

    def send_json(self, obj: dict) -> None:
        b = json.dumps(obj, sort_keys=True).encode()
        self.bytes_sent += len(b)
        self.send_bytes(b)

    def recv_json(self, within: float | None = None) -> dict:
        """One JSON message; ``within`` bounds the whole wait, heartbeats included (a hello)."""
        try:
            b = _recv_frame(self.rx, self.timeout, MAX_JSON, at_most=True, within=within)
        except FrameLengthError as e:
            raise FsscError(f"handshake: {e}") from None
        self.bytes_received += len(b)
        self.messages_received += 1
        return _parse_json(b)

    def close(self) -> None:
        """Let the sender drain, then close both connections."""
        self._out.put(None)
        self._sender.join(timeout=self.timeout)
        self._close_sockets()

    def abort(self) -> None:
        """End a failed session now: unblock the sender (a peer that stopped reading) and close."""
        for sock in (self.tx, self.rx):
            _shutdown(sock)
        self._out.put(None)
        self._sender.join(timeout=5)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self.tx, self.rx):
            with contextlib.suppress(OSError):
                sock.close()


def _shutdown(sock) -> None:
    """Wake any thread blocked on ``sock`` (the plain socket call: the TLS state is left alone)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _send_frame(sock, b: bytes) -> None:
    sock.sendall(struct.pack("<Q", len(b)))
    if b:
        sock.sendall(b)


def _recv_exact(sock, n: int, timeout: float) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], min(n - got, 1 << 22))
        except TimeoutError:
            raise FsscError(f"peer sent nothing for {timeout:.0f} s (dropped or stuck)") from None
        except (OSError, ssl.SSLError) as e:
            raise FsscError(f"connection to peer lost: {e}") from None
        if k == 0:
            raise FsscError("peer closed the connection (its program ended or was killed)")
        got += k
    return buf


def _recv_frame(sock, timeout: float, size: int, at_most: bool = False, within: float | None = None) -> bytearray:
    """One frame whose length must be ``size`` (at most ``size`` with ``at_most``), checked before allocating;
    heartbeats before it are skipped (each restarts the silence timeout). The wait is bounded by
    ``STALL_TIMEOUTS`` silence timeouts, or by ``within`` seconds when given (a hello)."""
    if within is not None and within < timeout:
        sock.settimeout(within)  # this thread alone reads the socket: the silence timeout comes back below
        try:
            return _recv_frame(sock, within, size, at_most, within)
        finally:
            sock.settimeout(timeout)
    limit = STALL_TIMEOUTS * timeout if within is None else within
    deadline = time.monotonic() + limit
    (n,) = struct.unpack("<Q", _recv_exact(sock, 8, timeout))
    while n == HEARTBEAT:
        if time.monotonic() > deadline:
            what = "" if within is not None else f" (stuck); {STALL_TIMEOUTS} x --peer-timeout bounds a wait"
            raise FsscError(f"peer sent only heartbeats for {limit:.0f} s: alive but making no progress{what}")
        (n,) = struct.unpack("<Q", _recv_exact(sock, 8, timeout))
    check_frame_length(n, size, at_most)
    return _recv_exact(sock, n, timeout)


def _parse_json(b) -> dict:
    try:
        obj = json.loads(bytes(b))
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise FsscError("peer sent a malformed handshake")
    return obj


class Listener:
    """P1's listening socket: authenticated data owners, one session (two connections) at a time.

    A background thread accepts connections and hands each to a handshake
    thread; ``accept`` returns the next session whose two connections passed
    TLS with a fssc-party0 certificate and sent their hello. Refused and
    timed-out connections are logged in one line (``log``) and closed.
    """

    def __init__(
        self,
        addr: str,
        certs: str,
        timeout: float = PEER_TIMEOUT,
        record: bool = False,
        log=print,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_pending: int = MAX_PENDING,
    ):
        host, port = _split(addr)
        self.addr = addr
        self.ctx = _context(certs, 1)
        self.timeout, self.record, self.log = timeout, record, log
        self.handshake_timeout, self.max_pending = handshake_timeout, max_pending
        self.srv = socket.create_server((host, port))
        self.srv.settimeout(0.25)  # the accept loop's tick: expiring handshakes, noticing close()
        self.port = self.srv.getsockname()[1]
        self._lock = threading.Lock()
        self._pending = 0  # connections accepted and not yet handed to a session (or closed)
        self._inflight: dict[ssl.SSLSocket, float] = {}  # handshakes in progress -> deadline
        self._halves: dict[str, tuple[float, str, dict[str, ssl.SSLSocket]]] = {}  # token -> (deadline, peer, socks)
        self._ready: queue.Queue = queue.Queue()  # (peer, certificate name, {"up": sock, "down": sock})
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    # -- the accept thread -------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            self._expire()
            try:
                raw, addr = self.srv.accept()
            except TimeoutError:
                continue
            except OSError as e:  # e.g. out of file descriptors: log, back off, keep listening
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
            if full:
                self.log(f"refused a connection from {peer}: too many pending handshakes ({self.max_pending})")
                raw.close()
                continue
            threading.Thread(target=self._handshake, args=(raw, peer), daemon=True).start()

    def _expire(self) -> None:
        """Wake handshakes past their deadline; drop sessions whose second connection did not come."""
        now = time.monotonic()
        stale = []
        with self._lock:
            for tls, deadline in self._inflight.items():
                if now > deadline:
                    _shutdown(tls)  # the handshake thread then fails and logs
            for token, (deadline, peer, socks) in list(self._halves.items()):
                if now > deadline:
                    del self._halves[token]
                    self._pending -= len(socks)
                    stale.append((peer, socks))
        for peer, socks in stale:
            self.log(f"refused a connection from {peer}: its second connection did not arrive in time")
            for sock in socks.values():
                sock.close()

    def _handshake(self, raw: socket.socket, peer: str) -> None:
        deadline = time.monotonic() + self.handshake_timeout
        tls = None
        try:
            raw.settimeout(self.handshake_timeout)
            tls = self.ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            with self._lock:
                self._inflight[tls] = deadline
            tls.do_handshake()
            cn = _common_name(tls.getpeercert() or {})
            if cn != PARTY_NAMES[0]:
                raise FsscError(f"client certificate is for {cn!r}, not {PARTY_NAMES[0]!r}")
            try:
                hello = _parse_json(_recv_frame(tls, self.handshake_timeout, MAX_HELLO, at_most=True))
            except FrameLengthError as e:
                raise FsscError(f"connection hello: {e}") from None
            token, direction = hello.get("token"), hello.get("conn")
            if direction not in ("up", "down") or not isinstance(token, str) or not token:
                raise FsscError("connection hello without a direction and a session token")
        except Exception as e:  # any failure refuses this connection only
            late = isinstance(e, TimeoutError) or time.monotonic() >= deadline
            why = f"no handshake within {self.handshake_timeout:.0f} s" if late else _reason(e)
            self._refuse(tls or raw, peer, why, inflight=tls)
            return
        with self._lock:
            self._inflight.pop(tls, None)
            if self._closed:
                problem: str | None = "closing"  # _refuse says why
            else:
                _, first, socks = self._halves.setdefault(token, (deadline, peer, {}))
                problem = f"a second {direction!r} connection for one session" if direction in socks else None
                if problem is None:
                    socks[direction] = tls
                    if len(socks) == 2:
                        del self._halves[token]
                        self._ready.put((first, cn, socks))
        if problem:
            self._refuse(tls, peer, problem)

    def _refuse(self, sock, peer: str, why: str, inflight=None) -> None:
        with self._lock:
            self._pending -= 1
            if inflight is not None:
                self._inflight.pop(inflight, None)
        if self._closed:
            why = "the model owner is shutting down"
        self.log(f"refused a connection from {peer}: {why}")
        with contextlib.suppress(OSError):
            sock.close()

    # -- the caller's side ---------------------------------------------------
    def accept(self, timeout: float | None = None) -> TcpChannel:
        """The next authenticated data owner's channel; ``chan.peer`` names its address."""
        chan = self.poll(timeout)
        if chan is None:
            raise FsscError(f"no data owner connected to {self.addr} within {timeout:g} s (--connect-timeout)")
        return chan

    def poll(self, timeout: float | None = None) -> TcpChannel | None:
        """The next authenticated data owner's channel, or None if none came within ``timeout`` s.
        ``chan.peer``: its address; ``chan.peer_name``: its certificate's common name."""
        try:
            peer, cn, socks = self._ready.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._lock:
            self._pending -= 2
        chan = TcpChannel(socks["down"], socks["up"], self.timeout, self.record)
        chan.peer, chan.peer_name = peer, cn
        return chan

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self.srv.close()
        with self._lock:
            socks = [s for _, _, half in self._halves.values() for s in half.values()]
            self._halves.clear()
            for tls in self._inflight:
                _shutdown(tls)
        while not self._ready.empty():
            socks += list(self._ready.get()[2].values())
        for sock in socks:
            sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _reason(e: BaseException) -> str:
    """One line for a refused connection."""
    text = str(e).replace("\n", " ").strip()
    return text if isinstance(e, (FsscError, OSError)) and text else f"{type(e).__name__}: {text}"


def connect(
    addr: str,
    certs: str,
    timeout: float = PEER_TIMEOUT,
    record: bool = False,
    connect_timeout: float = CONNECT_TIMEOUT,
    log=None,
) -> TcpChannel:
    """P0: open both connections to P1, authenticating both ways.

    A model owner that does not accept connections yet (refused, unreachable) is retried, with a growing
    pause, until ``connect_timeout`` s have passed; ``log(msg)`` hears of the first failed attempt. A TLS
    failure (a certificate) is not retried. ``timeout``: the session's silence timeout."""
    host, port = _split(addr)
    ctx = _context(certs, 0)
    token = os.urandom(16).hex()
    deadline = time.monotonic() + connect_timeout
    socks: dict[str, ssl.SSLSocket] = {}
    for direction in ("up", "down"):
        raw = _connect_retrying(addr, host, port, deadline, connect_timeout, log)
        try:
            tls = ctx.wrap_socket(raw, server_hostname=PARTY_NAMES[1])
            _send_frame(tls, json.dumps({"conn": direction, "token": token}).encode())
        except (ssl.SSLError, OSError) as e:
            raw.close()
            for s in socks.values():
                s.close()
            raise FsscError(f"TLS with the model owner at {addr} failed: {e}") from None
        socks[direction] = tls
    return TcpChannel(socks["up"], socks["down"], timeout, record)


def _connect_retrying(
    addr: str, host: str, port: int, deadline: float, connect_timeout: float, log, who: str | None = None
) -> socket.socket:
    """A TCP connection to ``host:port``, retried with a growing pause (a server not listening yet) until
    ``deadline``; ``who`` names the server in messages (default: the model owner at ``addr``)."""
    who = who or f"the model owner at {addr}"
    pause = 0.1
    told = False
    while True:
        left = deadline - time.monotonic()
        try:
            return socket.create_connection((host, port), timeout=max(0.1, min(30.0, left)))
        except OSError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FsscError(
                    f"cannot connect to {who} within {connect_timeout:g} s (--connect-timeout): {_reason(e)}"
                ) from None
            if log and not told:
                log(f"{who} is not reachable yet ({e}); retrying for up to {connect_timeout:g} s")
                told = True
            time.sleep(min(pause, left))
            pause = min(pause * 2, 2.0)


def _common_name(cert: dict) -> str | None:
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return None


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise FsscError(f"address {addr!r}: expected HOST:PORT")
    return host, int(port)


ROLE_NAMES = {"party0": "the data owner", "party1": "the model owner"}


def _check(peer: dict, mine: dict) -> list[str]:
    problems = []
    them = ROLE_NAMES.get(str(peer.get("role")), f"a peer claiming role {peer.get('role')!r}")
    us = ROLE_NAMES.get(str(mine.get("role")), str(mine.get("role")))
    if peer.get("protocol") != mine.get("protocol"):
        problems.append(f"{them} speaks protocol {peer.get('protocol')}, {us} {mine.get('protocol')}")
    if peer.get("program") != mine.get("program"):
        problems.append(
            f"{them} runs program {peer.get('program')}, {us} runs {mine.get('program')} "
            "(compiled from a different model or options)"
        )
    if peer.get("role") == mine.get("role") or peer.get("role") not in ("party0", "party1"):
        problems.append(f"peer role {peer.get('role')!r} does not complement ours {mine.get('role')!r}")
    return problems


def client_handshake(chan: TcpChannel, mine: dict) -> dict:
    """P0: send our hello, read P1's answer; refuse a peer for another program or role."""
    chan.send_json(mine)
    peer = chan.recv_json()
    if peer.get("error"):
        raise FsscError(f"handshake refused by the model owner: {peer['error']}")
    problems = _check(peer, mine)
    if problems:
        raise FsscError("handshake refused: " + "; ".join(problems))
    return peer


def server_handshake(chan: TcpChannel, mine: dict, validate=None) -> dict:
    """P1: read P0's hello (within ``HANDSHAKE_TIMEOUT``: a client that holds a session slot without asking
    for batches is dropped), check it (and ``validate(peer)`` -> problems), answer or refuse."""
    peer = chan.recv_json(within=HANDSHAKE_TIMEOUT)
    problems = _check(peer, mine)
    if not problems and validate:
        problems = validate(peer)
    if problems:
        chan.send_json({"error": "; ".join(problems)})
        chan.close()
        raise FsscError("handshake refused: " + "; ".join(problems))
    chan.send_json(mine)
    return peer
