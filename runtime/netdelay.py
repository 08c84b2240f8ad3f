"""A delaying TCP proxy on 127.0.0.1: a WAN-like latency between the two parties on one machine (the kernel
here has no netem). The benchmarks run a session through it (``fssc bench resnet --rtt-ms``, via
:func:`fssc.runtime.loopback.run_loopback`) and the transport tests use it for a slow network."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time


class DelayProxy:
    """A TCP proxy on 127.0.0.1 (``port``) to ``127.0.0.1:target``: every chunk it reads is written on
    ``delay`` s later, in order, in both directions (a WAN-like latency; TLS passes through untouched).
    An end of stream or a reset on one side is passed on to the other. ``forwarded[d]``: bytes passed
    towards the target (``"up"``) and back (``"down"``). Use as a context manager."""

    def __init__(self, target: int, delay: float = 0.01):
        self.target, self.delay = target, delay
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.srv.settimeout(0.2)
        self.port = self.srv.getsockname()[1]
        self.forwarded = {"up": 0, "down": 0}
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.srv.accept()
            except (TimeoutError, OSError):
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(None)
            with self._lock:
                self._socks += [client, server]
            for src, dst, d in ((client, server, "up"), (server, client, "down")):
                q: queue.Queue = queue.Queue()
                threading.Thread(target=self._read, args=(src, q, d), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, q), daemon=True).start()

    def _read(self, src: socket.socket, q: queue.Queue, direction: str) -> None:
        while True:
            try:
                b = src.recv(1 << 16)
            except OSError:
                b = b""
            q.put((time.monotonic() + self.delay, b))
            if not b:
                return
            with self._lock:
                self.forwarded[direction] += len(b)

    def _write(self, dst: socket.socket, q: queue.Queue) -> None:
        while True:
            due, b = q.get()
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                if not b:
                    dst.shutdown(socket.SHUT_WR)  # the end of stream, passed on
                    return
                dst.sendall(b)
            except OSError:
                return

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self.srv.close()
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
