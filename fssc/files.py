"""Writing files: never a partial file that looks complete, and secrets private from the start.

Every file fssc writes goes through here. ``private=True`` is for secrets (P1's weights, key batches,
setup keys, commitments, certificate keys, P0's results): the file is created 0600, set explicitly, so
the umask neither widens nor narrows it; the folders fssc makes for secrets (``keys/p0``, ``keys/p1``,
``prog/party1``) are made 0700 by :func:`private_dir`. ``durable=True`` fsyncs the file and
its folder, so the file survives a power loss once the call returns.
"""

from __future__ import annotations

import os

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_dir(path: str) -> str:
    """Create ``path`` (and missing parents) if needed; the folder itself ends up 0700."""
    os.makedirs(path, mode=PRIVATE_DIR, exist_ok=True)
    os.chmod(path, PRIVATE_DIR)
    return path


def fsync_dir(path: str) -> None:
    """Make a folder's entries (a created, renamed or deleted file) durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_new(path: str, private: bool = False, exclusive: bool = False):
    """A binary file opened for writing; a private file is 0600 from its creation (its folder is the
    caller's: fssc's own secret folders are made with :func:`private_dir`)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    if private:
        fd = os.open(path, flags, PRIVATE_FILE)
        os.fchmod(fd, PRIVATE_FILE)  # also if it existed, or the umask took owner bits
    else:
        fd = os.open(path, flags, 0o666)
    return os.fdopen(fd, "wb")


def write_atomic(path: str, data: str | bytes, private: bool = False, durable: bool = False) -> None:
    """Write ``data`` to ``path`` via a ``.part`` file of this call's own (created exclusively: two writers
    of one path never write into one file) and an atomic rename; a failed write leaves no ``.part``."""
    tmp = f"{path}.{os.getpid()}-{os.urandom(4).hex()}.part"
    try:
        with open_new(tmp, private, exclusive=True) as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(path))


def create_durable(path: str, data: bytes = b"") -> bool:
    """Create a new private file holding ``data``, durably (file and folder fsync'd) before returning.

    Returns False, writing nothing, if ``path`` already exists: the creation is the atomic test."""
    try:
        fh = open_new(path, private=True, exclusive=True)
    except FileExistsError:
        return False
    with fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(os.path.dirname(path))
    return True


def remove_durable(path: str) -> bool:
    """Delete a file (if there) and make the deletion durable; returns whether it was there."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    fsync_dir(os.path.dirname(path))
    return True
