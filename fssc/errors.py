"""Errors a user sees: one line, naming the file, node, op, shape or party."""


class FsscError(Exception):
    """A problem with the user's input or request; the CLI prints it and exits 2."""

    exit_code = 2


def printable(text: str) -> str:
    """``text`` as one printable line: newlines become " | ", other control characters (a terminal's escape
    sequences among them) "?". Error messages quote names from files a user received (a manifest, a program):
    they must not be able to print lines of their own."""
    return "".join(c if c.isprintable() else "?" for c in text.replace("\r\n", "\n").replace("\n", " | "))


def os_error_message(e: OSError) -> str:
    """One line for a failed file or socket operation: the path (if any) and the reason."""
    where = e.filename if e.filename is not None else None
    reason = e.strerror or str(e)
    return f"{where}: {reason}" if where else reason


class VerifyError(FsscError):
    """The IR verifier found a broken invariant (names the pass that broke it)."""
