"""Mark comparison sites: every op that needs an FSS gate gets ``op.gate``.

For ReLU, max (MaxPool trees), ArgMax and Clip ops: ``gate = {kind, count,
per_image, bits, depth[, trunc]}`` where count is the number of gate
evaluations for the whole batch (:func:`fssc.compiler.backend.gates.gate_count`),
bits is the comparison bitwidth m from range analysis, depth the sequential
gate layers and trunc the bits a ReLU gate drops (fused truncation). The cost
model sums these into the compile report. Semantics are unchanged.
"""

from __future__ import annotations

from fssc.compiler.backend.gates import gate_count, gate_depth, gate_kind
from fssc.compiler.ir.graph import Graph, Op
from fssc.passes.base import COMPARISONS_MARKED, RANGES, PassContext, PassResult

from fssc.errors import FsscError

NAME = "mark-comparisons"
REQUIRES = frozenset({RANGES})
ENSURES = frozenset({COMPARISONS_MARKED})
INVALIDATES: frozenset[str] = frozenset()


def plan_gate(op: Op, graph: Graph, bits: int) -> dict | None:
    """The gate plan of one op at comparison bitwidth ``bits`` (None for an op without comparisons); the
    viewer prices unmarked ops with it too."""
    kind = gate_kind(op)
    if not kind:
        return None
    batch = graph.values[graph.inputs[0]].shape[0] if graph.inputs else 1
    n = gate_count(op, graph)
    gate = {"kind": kind, "count": n, "per_image": n // batch, "bits": bits, "depth": gate_depth(op, graph)}
    for key in ("trunc", "shift"):
        if op.attrs.get(key):
            gate[key] = op.attrs[key]
    return gate


def run(graph: Graph, ctx: PassContext) -> PassResult:
    before = [op.gate for op in graph.ops]
    for op in graph.ops:
        if not gate_kind(op):
            op.gate = None
            continue
        bits = op.bits
        if bits is None:
            raise FsscError(f"{NAME}: no bitwidth for {op.kind} %{op.name}; run range-analysis first")
        op.gate = plan_gate(op, graph, bits)
    return PassResult(graph, [op.gate for op in graph.ops] != before)


def check(graph: Graph) -> str | None:
    """What ENSURES promises: every comparison op carries its gate plan."""
    op = next((op for op in graph.ops if gate_kind(op) and not op.gate), None)
    return f"{op.kind} %{op.name} has no gate plan" if op else None
