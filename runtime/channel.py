"""Message channels between the two parties.

A channel moves numpy arrays. ``exchange`` sends one array and receives the
peer's (both parties call it in the same step: one round). The in-process
pair (``queue_pair``) backs the simulator; the TCP transport implements the
same interface. Every channel counts bytes, messages and rounds, and can keep
a copy of what it received (``record``) for the security tests.
"""

from __future__ import annotations

import queue
import struct

import numpy as np

from fssc.compiler.errors import FsscError

from .keys import DTYPE_CODES as _CODE
from .keys import DTYPES as _DT


def encode_array(arr: np.ndarray) -> bytes:
    arr = np.require(arr, requirements="C")  # a 0-d array stays 0-d
    if arr.dtype not in _CODE:
        raise TypeError(f"cannot send dtype {arr.dtype}")
    return struct.pack(f"<BB{arr.ndim}Q", _CODE[arr.dtype], arr.ndim, *arr.shape) + arr.tobytes()


def decode_array(b: bytes | memoryview) -> np.ndarray:
    code, ndim = struct.unpack_from("<BB", b, 0)
    shape = struct.unpack_from(f"<{ndim}Q", b, 2)
    off = 2 + 8 * ndim
    return np.frombuffer(b, dtype=_DT[code], offset=off).reshape(shape)


class Channel:
    def __init__(self, record: bool = False):
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.rounds = 0
        self.received: list[bytes] | None = [] if record else None

    # transports implement these two
    def send_bytes(self, b: bytes) -> None:
        raise NotImplementedError

    def recv_bytes(self) -> bytes:
        raise NotImplementedError

    def send(self, arr: np.ndarray) -> None:
        b = encode_array(arr)
        self.bytes_sent += len(b)
        self.messages_sent += 1
        self.send_bytes(b)

    def recv(self) -> np.ndarray:
        b = self.recv_bytes()
        self.bytes_received += len(b)
        if self.received is not None:
            self.received.append(bytes(b))
        return decode_array(b)

    def exchange(self, arr: np.ndarray) -> np.ndarray:
        """Send ``arr`` and receive the peer's array of the same step (one round)."""
        self.send(arr)
        self.rounds += 1
        return self.recv()

    def close(self) -> None:
        pass


class QueueChannel(Channel):
    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, timeout: float = 120.0, record: bool = False):
        super().__init__(record)
        self.inbox, self.outbox, self.timeout = inbox, outbox, timeout

    def send_bytes(self, b: bytes) -> None:
        self.outbox.put(b)

    def recv_bytes(self) -> bytes:
        try:
            b = self.inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise FsscError(f"peer sent nothing for {self.timeout:.0f} s (dropped or stuck)") from None
        if b is None:
            raise FsscError("peer closed the channel")
        return b

    def close(self) -> None:
        self.outbox.put(None)


def queue_pair(timeout: float = 120.0, record: bool = False) -> tuple[QueueChannel, QueueChannel]:
    a, b = queue.Queue(), queue.Queue()
    return QueueChannel(a, b, timeout, record), QueueChannel(b, a, timeout, record)
