"""The data owner and the dealer never run the model owner's code.

A compiled folder's ``manifest.json`` is the program's public form (the public
IR: statements, inputs, outputs, and what the compiler recorded about them,
:mod:`fssc.compiler.backend.program`), and the program hash is its hash. P0's
and the dealer's programs are generated from it alone, so their own fssc
installation can regenerate them: :func:`check` compares the regenerated text
byte for byte with the received ``party0/program.py`` or
``dealer/program.py`` and refuses any difference with one line naming the
first differing statement; :func:`checked_program` returns a module of the
regenerated copy, so the received file is never imported (its top-level code
would run before any check could). ``fssc check``, ``fssc run`` and
``fssc deal`` use them; docs/protocol.md ("What the data owner trusts") says
what the check covers and what it cannot.

Imports nothing of the IR, the passes, torch or onnx: the code generator
(jinja2) and the runtime suffice (tests/test_layering.py checks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fssc.compiler.backend.codegen import render
from fssc.compiler.backend.program import from_manifest
from fssc.runtime import session

from fssc.errors import FsscError

CHECKED_ROLES = ("party0", "dealer")  # the model owner's own program (party1, with its weights) is its own affair


@dataclass
class Checked:
    """A received program that matched: the path, its (regenerated, identical) text, and what it is."""

    path: str
    role: str
    text: str
    program_hash: str
    statements: int
    manifest: dict


def role_name(party: str) -> str:
    """``0`` / ``party0`` -> ``party0``, ``dealer`` -> ``dealer``, ``1`` -> ``party1``."""
    r = {"0": "party0", "1": "party1"}.get(str(party), str(party))
    if r not in ("party0", "party1", "dealer"):
        raise FsscError(f"--party {party}: expected 0 (the data owner), 1 (the model owner) or dealer")
    return r


def _first_difference(want: str, got: str, path: str) -> str:
    """One line: the first line where ``got`` differs from ``want``, and the statement it belongs to."""
    if got.replace("\r\n", "\n") == want:
        return f"{path} differs only in its line endings (CRLF)"
    if got.rstrip("\n") == want.rstrip("\n"):
        return f"{path} differs only in the newlines at its end"
    w, g = want.splitlines(), got.splitlines()
    i = next((i for i, (a, b) in enumerate(zip(w, g, strict=False)) if a != b), min(len(w), len(g)))
    stmt = next((w[j].strip()[2:] for j in range(min(i, len(w) - 1), -1, -1) if w[j].strip().startswith("# ")), None)
    where = f"in the statement for `{stmt}`" if stmt else "before the first statement"
    if i >= len(g):
        return f"{path} ends at line {i}, {where}; the program ends at line {len(w)}"
    found = g[i].strip()
    if i >= len(w):
        return f"{path} line {i + 1} is extra (`{found[:120]}`): the program ends at line {len(w)}"
    return f"{path} line {i + 1} differs, {where}: expected `{w[i].strip()[:120]}`, found `{found[:120]}`"


def check(prog_dir: str, role: str) -> Checked:
    """Regenerate ``role``'s program from ``prog_dir/manifest.json`` with this installation's fssc and compare
    it with ``prog_dir/<role>/program.py``; FsscError (one line) at the first difference."""
    if role not in CHECKED_ROLES:
        raise FsscError(
            f"{role}: only the data owner's and the dealer's programs are checked (party 0, dealer); the model "
            f"owner's holds values derived from its weights and is its own program"
        )
    path = os.path.join(prog_dir, role, "program.py")
    manifest = session.load_manifest(prog_dir)
    prog = from_manifest(manifest, os.path.join(prog_dir, "manifest.json"))
    want = render(prog, role)
    if not os.path.exists(path):
        raise FsscError(f"{prog_dir}: no {role}/program.py")
    with open(path, "rb") as fh:
        got = fh.read()
    if got != want.encode():
        text = got.decode("utf-8", errors="replace")
        raise FsscError(
            f"refused: {_first_difference(want, text, path)} (it is not the program fssc generates from "
            f"{os.path.join(prog_dir, 'manifest.json')}; nothing was run)"
        )
    return Checked(path, role, want, prog.hash, len(prog.stmts), manifest)


def checked_program(prog_dir: str, role: str, skip_check: bool = False):
    """``role``'s program as a module to run. The data owner's and the dealer's: the copy regenerated from the
    manifest once :func:`check` found the received file identical (the received file itself is never
    imported); with ``skip_check`` (development only) the received file as it is. The model owner's: its own
    file."""
    if role in CHECKED_ROLES and not skip_check:
        c = check(prog_dir, role)
        return session.program_from_source(c.text, role, c.path)
    return session.load_program(prog_dir, role)


def dealer_source(prog_dir: str, skip_check: bool = False) -> str:
    """The dealer program's text to run: regenerated and checked (:func:`check`), or with ``skip_check`` the
    received file's (development only)."""
    if not skip_check:
        return check(prog_dir, "dealer").text
    path = os.path.join(prog_dir, "dealer", "program.py")
    if not os.path.exists(path):
        raise FsscError(f"{prog_dir}: no dealer/program.py")
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def deal(
    prog_dir: str,
    keys_dir: str | None,
    batches: int,
    progress=None,
    workers: int = 1,
    skip_check: bool = False,
    targets: dict[int, str] | None = None,
    certs: str | None = None,
    cluster: str | None = None,
    connect_timeout: float | None = None,
    warn=None,
):
    """``fssc deal`` without the command line: the dealer's program checked and regenerated
    (:func:`dealer_source`), then :func:`fssc.runtime.session.deal_batches` (``targets``: parties whose keys
    are streamed to their receivers; ``cluster``: a Dask scheduler running the batch jobs)."""
    source = dealer_source(prog_dir, skip_check)
    return session.deal_batches(
        prog_dir, keys_dir, batches, source, progress, workers, targets, certs, cluster, connect_timeout, warn
    )
