"""Key material streams: what the dealer writes for one party and one batch.

A stream is written sequentially in evaluation order and read back through a
memory map, so a party's memory does not grow with the model's key size.

File layout (little-endian)::

    magic  b"FSSCKEY\\0"                 8 bytes
    hlen   uint32                        header length
    header JSON {format, program, party, batch, deal, ...}   (deal: random id of the `fssc deal` run)
    records, each:
        tag    uint16 length + utf-8     (e.g. "op12.dcf": op uid, record)
        dtype  uint8 code, ndim uint8, dims uint64 x ndim
        pad to 8 bytes, then the array bytes, padded to 8 bytes
    trailer b"FSSCEND\\0" + the checksum (``checksum``) of every byte before the trailer

The reader checks magic, format version, program hash, party and batch, then
the checksum, before handing out a single record; records are read in order
and each read names the tag it expected, so a program and a stream that are
out of step fail loudly instead of computing garbage.
"""

from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
import queue
import stat
import struct
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np
from fssc.runtime.checksum import DIGEST_BYTES, checksum, mapped_digest
from fssc.runtime.dcf import LAYOUT_VERSION as DCF_LAYOUT  # key headers record the DCF layout they hold

from fssc.errors import FsscError
from fssc.files import open_new, private_dir

MAGIC = b"FSSCKEY\0"
TRAILER = b"FSSCEND\0"
FORMAT_VERSION = 2  # 2: the trailer's checksum is XXH3-128 (1: SHA-256)


AGAIN = " (written by another fssc version: deal the keys again, or compile again for a weights file)"
DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<u8"),
    1: np.dtype("u1"),
    2: np.dtype("<i8"),
    3: np.dtype("<f8"),
}  # record/message codes
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


def _pad8(n: int) -> int:
    return (-n) % 8


class _BackgroundFile:
    """A file hashed and written by a thread of its own, so the dealer computes the next keys while
    the disk takes the last ones. ``write`` copies the bytes into one of a few staging buffers (memory
    speed; the caller may reuse its memory at once) and hands full buffers to the thread, which feeds
    each to ``digest`` (``checksum()``, or anything with ``update``) and then to the file, in order;
    ``write`` waits only when every buffer is still on its way. ``hand_over`` passes a large array
    itself, without the copy: the caller gives it up (never writes to it again). A write error
    surfaces at the next ``write`` or ``hand_over``, or at ``finish``.

    Drop-behind: a regular file's pages are handed back to the kernel behind the writer. Every
    ``DROP_BEHIND`` bytes the thread asks the kernel to start writing the newest range and to drop
    the one it started a step earlier (``posix_fadvise(DONTNEED)`` queues dirty pages for writing and
    drops clean ones; pages still being written then stay cached, as do the file's last one or two
    ranges). The dealer never reads its keys again; left in the page cache, a batch's gigabytes made
    the kernel find a fresh page for every 4 KB written, which cost about a core for the whole deal
    (docs/cost-model.md, "The dealer's disk"). A party then reads its file from disk when it opens
    the batch, as it would keys dealt on another machine."""

    BUFFERS = 3
    SIZE = 8 << 20
    DROP_BEHIND = 64 << 20

    def __init__(self, fh, digest):
        self._fh = fh
        self._hash = digest
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(self.BUFFERS):
            self._free.put(bytearray(self.SIZE))
        self._full: queue.Queue[tuple[bytearray | memoryview, int, bool] | None] = queue.Queue()
        self._slots = threading.Semaphore(self.BUFFERS)  # arrays handed over and not yet written
        self._cur: bytearray | None = None
        self._fill = 0
        self._error: BaseException | None = None
        self._fd = _regular_fd(fh) if hasattr(os, "posix_fadvise") else None
        self._pos = self._kicked = self._dropped = 0  # bytes written, started, dropped (_drop_behind)
        self._thread = threading.Thread(target=self._run, name="key-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            buf, n, staged = item
            if self._error is None:
                try:
                    self._hash.update(memoryview(buf)[:n])
                    self._fh.write(memoryview(buf)[:n])
                    self._pos += n
                    if self._fd is not None and self._pos - self._kicked >= self.DROP_BEHIND:
                        self._drop_behind()
                except BaseException as e:  # reported to the dealer's thread
                    self._error = e
            if staged:
                self._free.put(buf)  # type: ignore[arg-type]
            else:
                self._slots.release()

    def _drop_behind(self) -> None:
        """Start writing [kicked, pos), the bytes written since the last call, and drop [dropped, kicked),
        the range that call started (on disk by now; pages still being written stay cached)."""
        assert self._fd is not None
        self._fh.flush()
        try:
            os.posix_fadvise(self._fd, self._kicked, self._pos - self._kicked, os.POSIX_FADV_DONTNEED)
            if self._kicked > self._dropped:
                os.posix_fadvise(self._fd, self._dropped, self._kicked - self._dropped, os.POSIX_FADV_DONTNEED)
        except OSError:  # advice only: a file system that refuses it keeps the file cached
            self._fd = None
        self._dropped, self._kicked = self._kicked, self._pos

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, b) -> None:
        mv = memoryview(b).cast("B")
        while len(mv):
            if self._cur is None:
                self._cur, self._fill = self._free.get(), 0
                self._check()
            n = min(len(mv), self.SIZE - self._fill)
            self._cur[self._fill : self._fill + n] = mv[:n]
            self._fill += n
            mv = mv[n:]
            if self._fill == self.SIZE:
                self._push()

    def _push(self) -> None:
        """Hand the staging buffer being filled to the thread (if it holds anything)."""
        if self._cur is not None and self._fill:
            self._full.put((self._cur, self._fill, True))
            self._cur = None

    def hand_over(self, b) -> None:
        """Write ``b`` (a large C-contiguous buffer) without copying it: the thread holds it until it is
        written, and the caller must not change it after this call."""
        mv = memoryview(b).cast("B")
        if len(mv) < self.SIZE // 8:  # small: the copy costs less than a write of its own
            self.write(mv)
            return
        self._push()  # what was written before goes first
        self._slots.acquire()
        self._check()
        self._full.put((mv, len(mv), False))

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()

    def finish(self, trailer) -> None:
        """Hash and write what is left, wait for the thread, then write ``trailer(digest)`` and close
        the file; raises the thread's write error."""
        try:
            self._push()
            self._stop()
            self._check()
            self._fh.write(trailer(self._hash.digest()))
        finally:
            self._fh.close()

    def abort(self) -> None:
        self._stop()
        self._fh.close()


def _regular_fd(fh) -> int | None:
    """The descriptor of ``fh`` if it is a regular file (drop-behind applies), else None (a sink, a pipe)."""
    try:
        fd = fh.fileno()
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (AttributeError, OSError, ValueError):
        return None


def _open_part(path: str, exclusive: bool = True):
    """``path.part``, created exclusively: two writers of one key file (two runs dealing one batch into a
    shared folder) never write into one file; the second is refused. Not ``exclusive`` (the compiler's
    weights file, which one compile writes): a stale ``.part`` a killed run left is overwritten."""
    try:
        return open_new(path + ".part", private=True, exclusive=exclusive)
    except FileExistsError:
        raise FsscError(
            f"{path}.part exists: another run is writing {os.path.basename(path)}, or one that failed left it "
            "(delete it if no run is)"
        ) from None


class KeySink(Protocol):
    """Where a :class:`KeyWriter` sends a file's bytes instead of a local file (``fssc deal --to``: a party's
    key receiver, :mod:`fssc.runtime.keystream`). ``write`` gets the file's bytes in order (from the writer's
    background thread), ``end`` follows the last of them and returns once the receiver has the whole file and
    found it sound, ``commit`` files it under its name there, ``abort`` drops it (nothing is filed); ``close``
    is called by the background file when it is done writing and does nothing of its own."""

    def write(self, b) -> object: ...
    def close(self) -> None: ...
    def end(self) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class KeyWriter:
    """Sequential writer; ``path=None`` keeps the stream in memory (the simulator).

    Everything written in this format is a secret of its party (key batches, setup keys, P1's
    weights): the file is 0600 and its folder 0700 from the start. It is written as ``path.part``,
    by a background thread (``_BackgroundFile``), and renamed to ``path`` by ``close`` once complete,
    so a file under its final name is whole as far as this process goes. It is not fsync'd: a crash
    of the machine can leave it cut short or zeroed, which the trailer and checksum catch when a
    party opens it (the one-time-use ``.used`` markers are the files that must be durable, see
    ``session.open_batch``).

    With a ``sink`` the same bytes go to it instead of a file (``path`` then only names the file in
    messages): ``close`` ends the file at the receiver, ``commit`` files it there (for a local file,
    ``close`` renamed it already and ``commit`` does nothing)."""

    def __init__(self, path: str | None, header: dict, sink: KeySink | None = None, exclusive: bool = True):
        self.path = path
        self.sink = sink
        if sink is None and path and os.path.dirname(path):
            private_dir(os.path.dirname(path))
        self._hash = checksum()
        self._mem = None if path or sink is not None else io.BytesIO()
        fh = sink if sink is not None else _open_part(path, exclusive) if path else None
        self._file = _BackgroundFile(fh, self._hash) if fh is not None else None
        self._open_record: _Record | None = None
        self.bytes_written = 0
        hdr = json.dumps({"format": FORMAT_VERSION, "dcf_layout": DCF_LAYOUT, **header}, sort_keys=True).encode()
        self._write(MAGIC + struct.pack("<I", len(hdr)) + hdr + b"\0" * _pad8(len(hdr) + 12))
        self.records = 0

    def _write(self, b: bytes | memoryview, owned: bool = False) -> None:
        if self._file is not None:  # hashed by the writer thread
            if owned:
                self._file.hand_over(b)
            else:
                self._file.write(b)
        else:
            assert self._mem is not None
            self._hash.update(b)
            self._mem.write(b)
        self.bytes_written += len(b)

    def _head(self, tag: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        if self._open_record is not None:
            raise RuntimeError(f"key record {tag}: record {self._open_record.tag} is still being written")
        if dtype not in DTYPE_CODES:
            raise TypeError(f"key record {tag}: unsupported dtype {dtype}")
        t = tag.encode()
        head = struct.pack("<H", len(t)) + t + struct.pack("<BB", DTYPE_CODES[dtype], len(shape))
        head += struct.pack(f"<{len(shape)}Q", *shape)
        head += b"\0" * _pad8(len(head))
        self._write(head)

    def put(self, tag: str, arr: np.ndarray) -> None:
        arr = np.require(arr, requirements="C")  # C order; a 0-d array stays 0-d (ascontiguousarray makes it 1-d)
        if arr.dtype not in DTYPE_CODES:
            arr = arr.astype(np.uint64) if arr.dtype.kind in "iu" and arr.dtype.itemsize == 8 else arr
        self._head(tag, arr.dtype, arr.shape)
        self._write(np.ascontiguousarray(arr).data.cast("B") if arr.size else b"")
        self._write(b"\0" * _pad8(arr.nbytes))
        self.records += 1

    def record(self, tag: str, dtype, shape) -> _Record:
        """One record whose array arrives in pieces, in C order (``write`` each, then ``close``): the same
        bytes ``put(tag, arr)`` writes for the whole array, without holding it in memory."""
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        self._head(tag, dtype, shape)
        self._open_record = _Record(self, tag, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return self._open_record

    def abort(self) -> None:
        """Drop a stream that will not be completed: no partial file is left behind."""
        if self._file is not None:
            self._file.abort()
        if self.sink is not None:
            self.sink.abort()
        elif self.path and os.path.exists(self.path + ".part"):
            os.remove(self.path + ".part")

    def close(self) -> bytes | None:
        if self._open_record is not None:
            raise RuntimeError(f"key record {self._open_record.tag} was not completed")
        self.bytes_written += len(TRAILER) + self._hash.digest_size
        if self._file is not None:
            try:
                self._file.finish(lambda digest: TRAILER + digest)
                if self.sink is not None:
                    self.sink.end()
            except BaseException:
                self.abort()
                raise
            if self.sink is None and self.path:
                os.replace(self.path + ".part", self.path)
            return None
        assert self._mem is not None
        self._mem.write(TRAILER + self._hash.digest())
        return self._mem.getvalue()

    def commit(self) -> None:
        """File a closed stream under its name at a sink's receiver (a local file is filed by ``close``)."""
        if self.sink is not None:
            self.sink.commit()


class _Record:
    """A record being written in pieces (``KeyWriter.record``)."""

    def __init__(self, writer: KeyWriter, tag: str, nbytes: int):
        self.writer, self.tag, self.nbytes, self.left = writer, tag, nbytes, nbytes

    def write(self, arr: np.ndarray, owned: bool = False) -> None:
        """The next piece of the array. ``owned``: the caller gives ``arr`` up (never changes it again),
        so a file writer may keep it until it is on disk instead of copying it."""
        owned = owned and arr.flags.c_contiguous
        arr = np.ascontiguousarray(arr)
        if arr.nbytes > self.left:
            raise ValueError(f"key record {self.tag}: more bytes than its shape holds")
        self.left -= arr.nbytes
        if arr.nbytes:
            self.writer._write(arr.data.cast("B"), owned)

    def close(self) -> None:
        if self.left:
            raise ValueError(f"key record {self.tag}: {self.left} bytes short of its shape")
        self.writer._write(b"\0" * _pad8(self.nbytes))
        self.writer._open_record = None
        self.writer.records += 1


def peek_header(path: str) -> dict:
    """The header of a key (or weights) file, without reading or checking the rest."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:8] != MAGIC:
                raise FsscError(f"{path}: not an fssc key file")
            (hlen,) = struct.unpack("<I", head[8:12])
            return json.loads(fh.read(hlen))
    except FileNotFoundError:
        raise FsscError(f"key file {path}: not found") from None
    except ValueError:
        raise FsscError(f"{path}: corrupt key header") from None


def check_header(path: str, program: str, party: int, batch: int | None = None, deal: str | None = None) -> None:
    """Refuse keys made for another program, party, batch or deal (before any work starts)."""
    h = peek_header(path)
    if h.get("format") != FORMAT_VERSION:
        raise FsscError(f"{path}: key format {h.get('format')}, this fssc reads {FORMAT_VERSION}{AGAIN}")
    if h.get("program") != program:
        raise FsscError(f"{path}: keys made for program {h.get('program')}, not {program} (another model or options)")
    if h.get("party") != party:
        raise FsscError(f"{path}: keys for party {h.get('party')}, not party {party}")
    if batch is not None and h.get("batch") != batch:
        raise FsscError(f"{path}: keys of batch {h.get('batch')} filed as batch {batch}")
    if h.get("kind") == "batch" and not isinstance(h.get("deal"), str):
        raise FsscError(f"{path}: keys without a deal id (made by an older fssc): deal new keys")
    if deal is not None and h.get("deal") != deal:
        raise FsscError(f"{path}: keys of deal {h.get('deal')}, not deal {deal} (keys of two deals are never paired)")


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """A file as its checks compare it: device and inode (another file under the name), size and modification time."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class KeyReader:
    """Checks a stream and hands out its records in order (zero-copy views)."""

    def __init__(
        self,
        source: str | bytes,
        program: str | None = None,
        party: int | None = None,
        batch: int | None = None,
        deal: str | None = None,
        digest: Callable[[int, int], bytes] | None = None,
    ):
        """``digest(fd, end)``: how the checksum of a key file's first ``end`` bytes is computed (e.g.
        ``checksum.child_digest``; a file source only); by default in this process, through the file's
        mapping."""
        self.name = source if isinstance(source, str) else "<memory>"
        self._fh: io.BufferedReader | None = None
        self._stat: tuple[int, ...] | None = None  # the file as it was before its checksum was computed
        self.buf: mmap.mmap | bytes
        if isinstance(source, str):
            if not os.path.exists(source):
                raise FsscError(f"key file {source}: not found")
            self._fh = open(source, "rb")  # noqa: SIM115 - the reader maps it; closed by close()
            try:
                self._stat = _identity(os.fstat(self._fh.fileno()))
                size = self._stat[2]
                if size < 64:
                    raise FsscError(f"key file {source}: truncated ({size} bytes)")
                self.buf = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            except BaseException:
                self._fh.close()
                raise
        else:
            self.buf = source
        mv = memoryview(self.buf)
        try:
            if bytes(mv[:8]) != MAGIC:
                raise FsscError(f"{self.name}: not an fssc key file")
            (hlen,) = struct.unpack("<I", mv[8:12])
            try:
                self.header = json.loads(bytes(mv[12 : 12 + hlen]))
            except ValueError:
                raise FsscError(f"{self.name}: corrupt key header") from None
            if self.header.get("format") != FORMAT_VERSION or self.header.get("dcf_layout") != DCF_LAYOUT:
                raise FsscError(
                    f"{self.name}: key format {self.header.get('format')} (DCF layout "
                    f"{self.header.get('dcf_layout')}), this fssc reads {FORMAT_VERSION} ({DCF_LAYOUT}){AGAIN}"
                )
            for key, want in (("program", program), ("party", party), ("batch", batch), ("deal", deal)):
                if want is not None and self.header.get(key) != want:
                    got = self.header.get(key)
                    raise FsscError(
                        f"{self.name}: keys are for {key} {got!r}, not {want!r}"
                        + (" (keys made for a different program)" if key == "program" else "")
                        + (" (keys of two deals are never paired)" if key == "deal" else "")
                    )
            end = len(mv) - len(TRAILER) - DIGEST_BYTES
            if end < 0 or bytes(mv[end : end + len(TRAILER)]) != TRAILER:
                raise FsscError(f"{self.name}: truncated key file (no trailer)")
            if digest is not None and self._fh is not None:
                found = digest(self._fh.fileno(), end)
            else:
                found = mapped_digest(self.buf, mv, end)
            if found != bytes(mv[end + len(TRAILER) :]):
                raise FsscError(f"{self.name}: checksum mismatch (corrupt key file)")
        except BaseException:  # a refused file is closed at once, not when its traceback goes
            with contextlib.suppress(BufferError):
                mv.release()
            self.close()
            raise
        self._mv: memoryview | None = mv
        self._end = end
        self.pos = 12 + hlen + _pad8(hlen + 12)
        self._dropped = 0  # bytes before this offset were handed back to the kernel
        self._prev = self.pos  # start of the previous record

    def changed(self) -> bool:
        """Whether the file was written (or truncated) since it was opened for its checksum, or its name now
        names another file (or none): its pages are read from the file again as records are used, and its
        used marker and deletion go by its name, so a batch verified ahead is checked for this before it is
        used (``session._mark_used``)."""
        if self._fh is None or self._stat is None:
            return False
        try:
            by_name = _identity(os.stat(self.name))
        except OSError:
            return True
        return _identity(os.fstat(self._fh.fileno())) != self._stat or by_name != self._stat

    def _release(self, upto: int) -> None:
        """Let the kernel drop mapped pages of records read two steps ago.

        Pages of a file mapping are reloaded from the file if touched again, so
        this is safe even if an old view is still in use; it keeps a party's
        resident memory at a few records instead of the whole key file.
        """
        if not isinstance(self.buf, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        upto -= upto % mmap.PAGESIZE
        if upto - self._dropped >= 1 << 24:
            self.buf.madvise(mmap.MADV_DONTNEED, self._dropped, upto - self._dropped)
            self._dropped = upto

    def _next(self) -> tuple[str, np.ndarray]:
        mv = self._mv
        if mv is None:
            raise FsscError(f"{self.name}: key file read after close")
        self._release(self._prev)
        self._prev = self.pos
        if self.pos >= self._end:
            raise FsscError(f"{self.name}: key stream exhausted (program and keys out of step)")
        (tl,) = struct.unpack_from("<H", mv, self.pos)
        tag = bytes(mv[self.pos + 2 : self.pos + 2 + tl]).decode()
        p = self.pos + 2 + tl
        code, ndim = struct.unpack_from("<BB", mv, p)
        p += 2
        shape = struct.unpack_from(f"<{ndim}Q", mv, p)
        p += 8 * ndim
        p += _pad8(p - self.pos)
        dt = DTYPES[code]
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        arr = np.frombuffer(mv[p : p + n], dtype=dt).reshape(shape)
        self.pos = p + n + _pad8(n)
        return tag, arr

    def records(self):
        """Every remaining (tag, array), in order."""
        while not self.skip_to_end():
            yield self._next()

    def get(self, tag: str) -> np.ndarray:
        got, arr = self._next()
        if got != tag:
            raise FsscError(f"{self.name}: expected key record {tag!r}, found {got!r} (program and keys out of step)")
        return arr

    def skip_to_end(self) -> bool:
        return self.pos >= self._end

    def close(self) -> None:
        self._mv = None
        if self._fh:
            with contextlib.suppress(BufferError):  # views still alive; the map closes when they go
                if isinstance(self.buf, mmap.mmap):
                    self.buf.close()
            self._fh.close()
