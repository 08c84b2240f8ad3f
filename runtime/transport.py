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
* Every receive has a timeout; a closed or silent peer is a clear error, not a
  hang.
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

from fssc.compiler.errors import FsscError

from .channel import Channel

PARTY_NAMES = {0: "fssc-party0", 1: "fssc-party1"}
MAX_FRAME = 1 << 36


def _context(certs: str, party: int) -> ssl.SSLContext:
    ca = os.path.join(certs, "ca.pem")
    cert = os.path.join(certs, f"party{party}.pem")
    key = os.path.join(certs, f"party{party}.key")
    for p in (ca, cert, key):
        if not os.path.exists(p):
            raise FsscError(f"certificates: {p} not found (create them with `fssc certs -o {certs}`)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if party == 1 else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if party == 0:
        ctx.check_hostname = True
    return ctx


class TcpChannel(Channel):
    """Two connected TLS sockets (outgoing, incoming) and a sender thread."""

    def __init__(self, tx: ssl.SSLSocket, rx: ssl.SSLSocket, timeout: float, record: bool = False):
        super().__init__(record)
        self.tx, self.rx = tx, rx
        self.timeout = timeout
        tx.settimeout(timeout)
        rx.settimeout(timeout)
        self._out: queue.Queue = queue.Queue()
        self._err: BaseException | None = None
        self._sender = threading.Thread(target=self._send_loop, daemon=True)
        self._sender.start()

    def _send_loop(self):
        while True:
            b = self._out.get()
            if b is None:
                return
            try:
                _send_frame(self.tx, b)
            except BaseException as e:
                self._err = e
                return

    def send_bytes(self, b: bytes) -> None:
        if self._err is not None:
            raise FsscError(f"connection to peer lost while sending: {self._err}")
        self._out.put(b)

    def recv_bytes(self) -> bytes:
        return _recv_frame(self.rx, self.timeout)

    def send_json(self, obj: dict) -> None:
        b = json.dumps(obj, sort_keys=True).encode()
        self.bytes_sent += len(b)
        self.send_bytes(b)

    def recv_json(self) -> dict:
        b = self.recv_bytes()
        self.bytes_received += len(b)
        return _parse_json(b)

    def close(self) -> None:
        self._out.put(None)
        self._sender.join(timeout=self.timeout)
        for sock in (self.tx, self.rx):
            with contextlib.suppress(OSError):
                sock.close()


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
            raise FsscError("peer closed the connection")
        got += k
    return buf


def _recv_frame(sock, timeout: float) -> bytearray:
    (n,) = struct.unpack("<Q", _recv_exact(sock, 8, timeout))
    if n > MAX_FRAME:
        raise FsscError(f"peer sent a frame of {n} bytes; refusing")
    return _recv_exact(sock, n, timeout)


def _parse_json(b) -> dict:
    try:
        obj = json.loads(bytes(b))
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise FsscError("peer sent a malformed handshake")
    return obj


def listen(
    addr: str,
    certs: str,
    timeout: float = 600.0,
    accept_timeout: float | None = None,
    record: bool = False,
    on_ready=None,
) -> TcpChannel:
    """P1: accept one authenticated data owner (its two connections)."""
    host, port = _split(addr)
    ctx = _context(certs, 1)
    srv = socket.create_server((host, port))
    if on_ready:
        on_ready(srv.getsockname()[1])
    srv.settimeout(accept_timeout)
    pending: dict[str, dict[str, ssl.SSLSocket]] = {}
    try:
        while True:
            try:
                raw, peer = srv.accept()
            except TimeoutError:
                raise FsscError(f"no data owner connected to {addr} within {accept_timeout:.0f} s") from None
            raw.settimeout(30)
            try:
                tls = ctx.wrap_socket(raw, server_side=True)
                cn = _common_name(tls.getpeercert())
                if cn != PARTY_NAMES[0]:
                    raise ssl.SSLError(f"client certificate is for {cn!r}, not {PARTY_NAMES[0]!r}")
                hello = _parse_json(_recv_frame(tls, 30))
                token, direction = str(hello.get("token")), hello.get("conn")
                if direction not in ("up", "down"):
                    raise ssl.SSLError("connection without a direction")
            except (ssl.SSLError, OSError, FsscError) as e:
                print(f"fssc: refused a connection from {peer[0]}: {e}", flush=True)
                raw.close()
                continue
            pair = pending.setdefault(token, {})
            pair[direction] = tls
            if len(pair) == 2:
                for other in pending.values():
                    for sock in other.values():
                        if sock not in pair.values():
                            sock.close()
                return TcpChannel(pair["down"], pair["up"], timeout, record)
    finally:
        srv.close()


def connect(addr: str, certs: str, timeout: float = 600.0, record: bool = False) -> TcpChannel:
    """P0: open both connections to P1, authenticating both ways."""
    host, port = _split(addr)
    ctx = _context(certs, 0)
    token = os.urandom(16).hex()
    socks = {}
    for direction in ("up", "down"):
        try:
            raw = socket.create_connection((host, port), timeout=30)
        except OSError as e:
            raise FsscError(f"cannot connect to the model owner at {addr}: {e}") from None
        try:
            tls = ctx.wrap_socket(raw, server_hostname=PARTY_NAMES[1])
            _send_frame(tls, json.dumps({"conn": direction, "token": token}).encode())
        except (ssl.SSLError, OSError) as e:
            raw.close()
            raise FsscError(f"TLS with the model owner at {addr} failed: {e}") from None
        socks[direction] = tls
    return TcpChannel(socks["up"], socks["down"], timeout, record)


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
    them = ROLE_NAMES.get(peer.get("role"), f"a peer claiming role {peer.get('role')!r}")
    us = ROLE_NAMES.get(mine.get("role"), mine.get("role"))
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
    """P1: read P0's hello, check it (and ``validate(peer)`` -> problems), answer or refuse."""
    peer = chan.recv_json()
    problems = _check(peer, mine)
    if not problems and validate:
        problems = validate(peer)
    if problems:
        chan.send_json({"error": "; ".join(problems)})
        chan.close()
        raise FsscError("handshake refused: " + "; ".join(problems))
    chan.send_json(mine)
    return peer
