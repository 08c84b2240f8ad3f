"""The key files' checksum, computed in this process or in a child process of its own.

``python -m fssc.runtime.checksum FD END`` prints the hex checksum of the first END bytes of the file open on
descriptor FD (inherited from its parent). A session verifies its next batch's key file that way while the
current batch runs (``session.SessionBatches``): hashing a file of gigabytes in a thread of the party's own
process starved for the interpreter lock, since the party's thread gives it up and takes it back around every
numpy call; at 224x224 a background check took 4.3-5.9 s instead of 2.2-2.9 s and became the bottleneck.
This module imports nothing heavier than xxhash, so the child starts in a few tens of milliseconds.
"""

from __future__ import annotations

import mmap
import subprocess
import sys
import threading

import xxhash


def checksum():
    """The key files' checksum, XXH3-128 (``DIGEST_BYTES`` bytes), updated with every byte before the trailer.

    It catches a file cut short, zeroed or corrupted by a crash or a bad disk before a party uses a single
    record (a zeroed mask would reveal a value). It is not a MAC: nothing keyed protects a key file, and an
    unkeyed hash, cryptographic or not, stops no one who can rewrite the file, since they could rewrite the
    checksum too. So the fastest hash that catches accidents is the right one: XXH3 runs at memory speed,
    where SHA-256 took about 4 s of the dealer's CPU for each ResNet-18 batch (docs/cost-model.md)."""
    return xxhash.xxh3_128()


DIGEST_BYTES = checksum().digest_size


def mapped_digest(buf, mv: memoryview, end: int) -> bytes:
    """The checksum of the first ``end`` bytes of a key file's mapping ``buf`` (``mv`` its view), hashed 16 MB
    at a time. Each chunk's pages are unmapped from this process once hashed (``MADV_DONTNEED``), so checking
    a 3 GB key file keeps this process's memory at one chunk, and they stay in the page cache for the batch
    that reads them next. Read through the mapping, a file on disk took less time and far less CPU here than
    ``read`` calls into a buffer (docs/cost-model.md, "The dealer's disk")."""
    h = checksum()
    drop = isinstance(buf, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED")
    step = 1 << 24  # a multiple of the page size: every chunk starts on a page
    for i in range(0, end, step):
        j = min(end, i + step)
        h.update(mv[i:j])
        if drop:
            buf.madvise(mmap.MADV_DONTNEED, i, j - i)
    return h.digest()


def file_digest(fd: int, end: int) -> bytes:
    """``mapped_digest`` of the first ``end`` bytes of the file open on ``fd``."""
    if end == 0:
        return checksum().digest()
    with mmap.mmap(fd, end, access=mmap.ACCESS_READ) as buf:
        mv = memoryview(buf)
        try:
            return mapped_digest(buf, mv, end)
        finally:
            mv.release()


class CheckCancelledError(Exception):
    """A child's checksum given up (``child_digest``'s ``cancel``): the file is neither verified nor refused."""


CHILD = [sys.executable, "-P", "-m", __name__]  # the child's command, before its FD and END
POLL_S = 0.1  # how often a child's parent looks at ``cancel``


def child_digest(fd: int, end: int, cancel: threading.Event | None = None) -> bytes:
    """``file_digest`` computed by a child process that inherits ``fd`` (the file this process has open, so
    both read the same file whatever its name points to meanwhile). The child runs with ``-P`` (nothing from
    the working directory on its path), no stdin and in a session of its own (a Ctrl-C or SIGTERM meant for
    this process's group does not kill it mid-check). Raises OSError, one line, if it cannot run or fails;
    once ``cancel`` is set, kills the child and raises ``CheckCancelledError`` (a session that ends does not wait for
    the check of a batch it will not use)."""
    proc = subprocess.Popen(
        [*CHILD, str(fd), str(end)],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    with proc:
        try:
            while True:
                try:
                    out, err = proc.communicate(timeout=None if cancel is None else POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if cancel is not None and cancel.is_set():
                        raise CheckCancelledError("the key file's check was given up") from None
        except BaseException:  # given up, or anything else: the child does not go on hashing
            proc.kill()
            proc.communicate()
            raise
    try:
        digest = bytes.fromhex(out.decode("ascii").strip())
    except ValueError:  # UnicodeDecodeError is one
        digest = b""
    if proc.returncode != 0 or len(digest) != DIGEST_BYTES:
        lines = err.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit code {proc.returncode}" if proc.returncode else "unexpected output"
        raise OSError(f"the checksum's child process failed ({why})")
    return digest


if __name__ == "__main__":
    sys.stdout.write(file_digest(int(sys.argv[1]), int(sys.argv[2])).hex())
