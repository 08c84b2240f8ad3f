"""The data owner's results file (``--out FILE``): JSON lines, one record per input.

A record is ``{"input": NAME, "label": L, "logits": [...], "batch": B, "program": HASH}``: NAME is the
image's path as found under ``--images DIR`` as given (or ``x.npy[i]`` for ``--input x.npy``; ``--resume``
matches inputs by it), ``logits`` only when the program outputs them and
they were asked for (``--output logits``, the default for such programs), B the key batch that labelled
it. A batch's records are appended in one write, flushed and fsync'd once the batch has completed,
never before: an interrupted run leaves whole records of whole batches. A crash inside that write can
leave a last line without its newline; readers ignore it and ``--resume`` cuts it off before appending.
The file is private (0600): the labels are the data owner's secret.
"""

from __future__ import annotations

import json
import os

from fssc.errors import FsscError
from fssc.files import PRIVATE_FILE, fsync_dir


def _scan(path: str) -> tuple[list[dict], int]:
    """The complete records of ``path`` and the byte offset just after the last one."""
    with open(path, "rb") as fh:
        data = fh.read()
    end = data.rfind(b"\n") + 1  # a last line without its newline was cut short: not a record
    records = []
    for no, line in enumerate(data[:end].splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("input"), str) or "label" not in rec:
            raise FsscError(f"{path}: line {no} is not a result record (not written by fssc?)")
        records.append(rec)
    return records, end


def read_results(path: str) -> list[dict]:
    """The complete records of a results file, in order (a cut-short last line is ignored)."""
    return _scan(path)[0]


class ResultsFile:
    """``--out FILE`` of one run: ``done`` holds the inputs it already labels; ``append`` adds a batch.

    Without ``resume`` an existing non-empty FILE is refused (it is not silently replaced); with it,
    its records must come from this program, and a cut-short last line is removed."""

    def __init__(self, path: str, program: str, resume: bool):
        self.path, self.program = path, program
        self.records: list[dict] = []
        exists = os.path.exists(path) and os.path.getsize(path) > 0
        if exists and not resume:
            raise FsscError(f"{path}: already holds results: --resume to label the inputs it lacks, or remove it")
        if exists:
            self.records, end = _scan(path)
            others = sorted({str(r.get("program")) for r in self.records} - {program})
            if others:
                raise FsscError(
                    f"{path}: holds results of program {others[0]}, not of this program ({program}): "
                    "resume only with the program that wrote it"
                )
            if end < os.path.getsize(path):
                os.truncate(path, end)  # the cut-short line of an interrupted write
        self.done = {r["input"] for r in self.records}

    def append(self, records: list[dict]) -> None:
        """One batch's records: one write, then flush and fsync (and the folder's, when the file is new)."""
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        new = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE)
        try:
            os.fchmod(fd, PRIVATE_FILE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(os.path.dirname(self.path))
        self.records += records
        self.done.update(r["input"] for r in records)
