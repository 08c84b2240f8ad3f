"""Writing outputs so a reader never sees a partial file: write beside, then rename."""

from __future__ import annotations

import os


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via ``path.part`` and an atomic rename."""
    tmp = path + ".part"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
