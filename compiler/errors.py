"""Errors a user sees: one line, naming the file, node, op, shape or party."""


class FsscError(Exception):
    """A problem with the user's input or request; the CLI prints it and exits 2."""

    exit_code = 2


class VerifyError(FsscError):
    """The IR verifier found a broken invariant (names the pass that broke it)."""
