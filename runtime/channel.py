"""Message channels between the two parties.

A channel moves numpy arrays. ``exchange`` sends one array and receives the
peer's (both parties call it in the same step: one round). The in-process
pair (``queue_pair``) backs the simulator; the TCP transport implements the
same interface. Every channel counts bytes, messages and rounds, and can keep
a copy of what it received (``record``) for the security tests.

Every receive says what the program expects at that step (shape and dtype;
``exchange`` expects the peer's array to look like the one sent), so the
frame length is known before anything is read: a transport refuses a longer
frame before allocating for it, and the frame's length and the array's header
must match exactly. A mismatch is one FsscError naming the step (the gate's tag,
set by the party as it goes), what was expected and what came.
"""

from __future__ import annotations

import math
import queue
import struct
import time

import numpy as np
from fssc.runtime.keys import DTYPE_CODES as _CODE
from fssc.runtime.keys import DTYPES as _DT

from fssc.errors import FsscError


def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    return struct.pack(f"<BB{len(shape)}Q", _CODE[dtype], len(shape), *shape)


def encode_array(arr: np.ndarray) -> bytes:
    arr = np.require(arr, requirements="C")  # a 0-d array stays 0-d
    if arr.dtype not in _CODE:
        raise TypeError(f"cannot send dtype {arr.dtype}")
    return _header(arr.dtype, arr.shape) + arr.tobytes()


def decode_array(b: bytes | bytearray | memoryview) -> np.ndarray:
    code, ndim = struct.unpack_from("<BB", b, 0)
    shape = struct.unpack_from(f"<{ndim}Q", b, 2)
    off = 2 + 8 * ndim
    return np.frombuffer(b, dtype=_DT[code], offset=off).reshape(shape)


def describe(shape, dtype) -> str:
    """'2x3x12x12 uint64' (a scalar: 'scalar uint64')."""
    return f"{'x'.join(str(int(s)) for s in shape) or 'scalar'} {np.dtype(dtype).name}"


def _describe_frame(b) -> str:
    """What a frame holds, without trusting its header."""
    if len(b) >= 2:
        code, ndim = struct.unpack_from("<BB", b, 0)
        if code not in _DT:
            return f"a frame of {len(b)} bytes with unknown dtype code {code}"
        if len(b) >= 2 + 8 * ndim:
            shape = struct.unpack_from(f"<{ndim}Q", b, 2)
            desc = describe(shape, _DT[code])
            if len(b) == 2 + 8 * ndim + math.prod(shape) * _DT[code].itemsize:
                return desc
            return f"a frame of {len(b)} bytes claiming {desc}"
    return f"a malformed frame of {len(b)} bytes"


class FrameLengthError(FsscError):
    """A transport found a frame of the wrong length (raised before its payload is read)."""

    def __init__(self, got: int, want: int, at_most: bool):
        self.got = got
        limit = "at most " if at_most else ""
        super().__init__(f"peer sent a frame of {got} bytes, expected {limit}{want}")


def check_frame_length(got: int, want: int, at_most: bool = False) -> None:
    """The one length check every transport makes before reading a frame's payload."""
    if got > want or (got != want and not at_most):
        raise FrameLengthError(got, want, at_most)


class Channel:
    def __init__(self, record: bool = False):
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.rounds = 0
        self.wait_s = 0.0  # seconds spent in recv_bytes: blocked on the peer (or the network), not computing
        self.step = "start"  # the protocol step in progress (a gate's tag), for error messages
        self.received: list[bytes] | None = [] if record else None

    # transports implement these two
    def send_bytes(self, b: bytes) -> None:
        raise NotImplementedError

    def recv_bytes(self, size: int, at_most: bool = False) -> bytes | bytearray:
        """The next frame. Its length must be ``size`` (at most ``size`` with ``at_most``):
        ``check_frame_length`` before the payload is read."""
        raise NotImplementedError

    def send(self, arr: np.ndarray) -> None:
        b = encode_array(arr)
        self.bytes_sent += len(b)
        self.messages_sent += 1
        self.send_bytes(b)

    def recv(self, shape, dtype, step: str | None = None) -> np.ndarray:
        """The peer's array for this step, which must have exactly this shape and dtype."""
        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        head = _header(dtype, shape)
        size = len(head) + math.prod(shape) * dtype.itemsize
        self.messages_received += 1
        where = f"{step or self.step} (message {self.messages_received} from the peer)"
        want = describe(shape, dtype)
        # a longer frame is refused unread; a shorter one (no larger than expected) is read to say what it is
        t = time.perf_counter()
        try:
            b = self.recv_bytes(size, at_most=True)
        except FrameLengthError as e:
            raise FsscError(f"{where}: peer sent a frame of {e.got} bytes, expected {want} ({size} bytes)") from None
        except FsscError as e:  # a closed, dropped or silent peer: say at which step
            raise FsscError(f"{where}: {e}") from None
        self.wait_s += time.perf_counter() - t
        if len(b) != size or bytes(b[: len(head)]) != head:
            raise FsscError(f"{where}: peer sent {_describe_frame(b)}, expected {want}")
        self.bytes_received += len(b)
        if self.received is not None:
            self.received.append(bytes(b))
        return np.frombuffer(b, dtype=dtype, offset=len(head)).reshape(shape)

    def exchange(self, arr: np.ndarray) -> np.ndarray:
        """Send ``arr`` and receive the peer's array of the same step (one round; same shape and dtype)."""
        self.send(arr)
        self.rounds += 1
        return self.recv(arr.shape, arr.dtype)

    def close(self) -> None:
        pass


class QueueChannel(Channel):
    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, timeout: float = 120.0, record: bool = False):
        super().__init__(record)
        self.inbox, self.outbox, self.timeout = inbox, outbox, timeout

    def send_bytes(self, b: bytes) -> None:
        self.outbox.put(b)

    def recv_bytes(self, size: int, at_most: bool = False) -> bytes | bytearray:
        try:
            b = self.inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise FsscError(f"peer sent nothing for {self.timeout:.0f} s (dropped or stuck)") from None
        if b is None:
            raise FsscError("peer closed the channel")
        check_frame_length(len(b), size, at_most)
        return b

    def close(self) -> None:
        self.outbox.put(None)


def queue_pair(timeout: float = 120.0, record: bool = False) -> tuple[QueueChannel, QueueChannel]:
    a: queue.Queue = queue.Queue()
    b: queue.Queue = queue.Queue()
    return QueueChannel(a, b, timeout, record), QueueChannel(b, a, timeout, record)
