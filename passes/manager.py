"""The pass manager: an ordered pipeline, its contracts, the verifier after
every pass, per-pass timing, the pass's "modified" flag, printing and dumping
of the IR.

Before anything runs, the pipeline's order is checked against each pass's
``REQUIRES`` (from the properties the graph already has, :attr:`Graph.properties`,
and what the earlier passes ensure minus what they invalidate): a wrong order
is refused with one line naming the pass and the missing property. After each
pass the graph's properties lose its ``INVALIDATES`` and gain its ``ENSURES``.
A pass that reports ``modified=False`` must leave the IR text as it was; one
that returns a bare graph instead of a :class:`PassResult` (an ad-hoc pass in a
test) counts as modifying.

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
    expand_softmax,
    fold_batchnorm,
    fold_public_scaling,
    lower_maxpool,
    mark_comparisons,
    plan_fixed_point,
    range_analysis,
    reorder_maxpool_relu,
)
from fssc.passes.base import PROPERTIES, PassContext, PassResult

from fssc.errors import FsscError, VerifyError
from fssc.files import write_atomic

PIPELINE = [
    expand_softmax,
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


def contract(p) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(REQUIRES, ENSURES, INVALIDATES) of a pass. A pass that declares none (an ad-hoc one) requires
    and ensures nothing and may invalidate everything."""
    req = frozenset(getattr(p, "REQUIRES", ()))
    ens = frozenset(getattr(p, "ENSURES", ()))
    inv = frozenset(getattr(p, "INVALIDATES", PROPERTIES))
    unknown = sorted((req | ens | inv) - PROPERTIES)
    if unknown:
        raise FsscError(f"pass '{p.NAME}': unknown propert{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}")
    return req, ens, inv


def after(properties: set[str] | frozenset[str], p) -> set[str]:
    """The graph's properties once pass ``p`` has run."""
    _, ens, inv = contract(p)
    return (set(properties) - inv) | ens


def check_order(passes, properties: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuse a pipeline in which a pass would run before what it requires holds."""
    have = set(properties)
    for p in passes:
        missing = sorted(contract(p)[0] - have)
        if missing:
            raise FsscError(
                f"pass '{p.NAME}' requires {', '.join(missing)}, which no earlier pass ensures "
                f"(pipeline: {', '.join(q.NAME for q in passes)})"
            )
        have = after(have, p)


@dataclass
class PassRecord:
    index: int
    name: str
    seconds: float
    modified: bool  # as the pass reported it (the import record: True)
    text: str = field(repr=False)
    graph: Graph | None = field(default=None, repr=False)
    ensured: frozenset[str] = frozenset()  # the graph's properties after this pass


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
    check_order(passes, graph.properties)
    text = graph.text()
    records = [
        PassRecord(0, "import", 0.0, True, text, graph.clone() if keep_graphs else None, frozenset(graph.properties))
    ]
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        write_atomic(os.path.join(dump_dir, "00-import.txt"), text)
    for i, p in enumerate(passes, start=1):
        t = time.perf_counter()
        try:
            res = p.run(graph.clone(), ctx)
        except (FsscError, VerifyError):
            raise
        except Exception as e:
            raise FsscError(f"pass '{p.NAME}' failed: {type(e).__name__}: {e}") from e
        if isinstance(res, Graph):  # an ad-hoc pass (a test's) that says nothing: counted as modifying
            res = PassResult(res, True)
        if not isinstance(res, PassResult):
            raise FsscError(f"pass '{p.NAME}' returned {type(res).__name__}, not a PassResult")
        new = res.graph
        verify(new, p.NAME)
        dt = time.perf_counter() - t
        new_text = new.text()
        if not res.modified and new_text != text:
            raise FsscError(f"pass '{p.NAME}' reported no modification but changed the IR")
        check = getattr(p, "check", None)  # the predicate behind the pass's ENSURES, where one can be stated
        problem = check(new) if check else None
        if problem:
            raise FsscError(f"pass '{p.NAME}' ensures {', '.join(sorted(contract(p)[1]))}, but {problem}")
        new.properties = after(graph.properties, p)
        rec = PassRecord(
            i, p.NAME, dt, res.modified, new_text, new.clone() if keep_graphs else None, frozenset(new.properties)
        )
        records.append(rec)
        if dump_dir:
            write_atomic(os.path.join(dump_dir, f"{i:02d}-{p.NAME}.txt"), new_text)
        if print_all or p.NAME in print_after:
            echo(f"// ----- IR after {p.NAME} -----\n{new_text}")
        graph, text = new, new_text
    return graph, records
