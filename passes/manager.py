"""The pass manager: an ordered pipeline, the verifier after every pass,
per-pass timing, an "IR changed" flag, printing and dumping of the IR.

``--dump-ir`` writes ``NN-name.txt`` per pass (``00-import.txt`` first), the
deterministic text form, so two runs give byte-identical dumps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fssc.compiler.ir.graph import Graph
from fssc.compiler.ir.verify import verify
from fssc.passes import (
    canonicalize,
    fold_batchnorm,
    fold_public_scaling,
    lower_maxpool,
    mark_comparisons,
    plan_fixed_point,
    range_analysis,
    reorder_maxpool_relu,
)
from fssc.passes.base import PassContext

from fssc.errors import FsscError, VerifyError
from fssc.files import write_atomic

PIPELINE = [
    canonicalize,
    fold_batchnorm,
    reorder_maxpool_relu,
    lower_maxpool,
    fold_public_scaling,
    plan_fixed_point,
    range_analysis,
    mark_comparisons,
]


def pass_names() -> list[str]:
    return [p.NAME for p in PIPELINE]


@dataclass
class PassRecord:
    index: int
    name: str
    seconds: float
    changed: bool
    text: str = field(repr=False)
    graph: Graph | None = field(default=None, repr=False)


def run_pipeline(
    graph: Graph,
    ctx: PassContext,
    passes=None,
    print_after: tuple[str, ...] = (),
    print_all: bool = False,
    dump_dir: str | None = None,
    keep_graphs: bool = False,
    echo: Callable[[str], None] = print,
) -> tuple[Graph, list[PassRecord]]:
    passes = PIPELINE if passes is None else passes
    known = {p.NAME for p in passes}
    for name in print_after:
        if name not in known:
            raise FsscError(f"--print-ir-after {name}: no such pass; passes: {', '.join(p.NAME for p in passes)}")
    text = graph.text()
    records = [PassRecord(0, "import", 0.0, True, text, graph.clone() if keep_graphs else None)]
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        write_atomic(os.path.join(dump_dir, "00-import.txt"), text)
    for i, p in enumerate(passes, start=1):
        t = time.perf_counter()
        try:
            new = p.run(graph.clone(), ctx)
        except (FsscError, VerifyError):
            raise
        except Exception as e:
            raise FsscError(f"pass '{p.NAME}' failed: {type(e).__name__}: {e}") from e
        verify(new, p.NAME)
        dt = time.perf_counter() - t
        new_text = new.text()
        rec = PassRecord(i, p.NAME, dt, new_text != text, new_text, new.clone() if keep_graphs else None)
        records.append(rec)
        if dump_dir:
            write_atomic(os.path.join(dump_dir, f"{i:02d}-{p.NAME}.txt"), new_text)
        if print_all or p.NAME in print_after:
            echo(f"// ----- IR after {p.NAME} -----\n{new_text}")
        graph, text = new, new_text
    return graph, records
