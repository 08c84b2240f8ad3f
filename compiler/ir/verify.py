"""The IR verifier: single definition, topological order, known kinds,
consistent shapes, no dangling values. Runs after import and after every pass;
a failure names the pass that broke the invariant."""

from __future__ import annotations

from fssc.compiler.ir.graph import Graph, topo_check
from fssc.compiler.ir.ops import OPS, infer_shapes

from fssc.errors import FsscError, VerifyError


def problems(graph: Graph) -> list[str]:
    out = list(topo_check(graph))
    if out:
        return out
    for op in graph.ops:
        if op.kind not in OPS:
            out.append(f"%{op.name}: unknown op kind {op.kind!r}")
            continue
        if op.uid < 0:
            out.append(f"{op.kind} %{op.name}: op has no uid")
        try:
            want = infer_shapes(op.kind, op.attrs, [graph.values[i].shape for i in op.inputs])
        except (FsscError, KeyError, IndexError, ValueError, TypeError) as e:
            out.append(f"{op.kind} %{op.name}: bad operands: {e}")
            continue
        if len(want) != len(op.outputs):
            out.append(f"{op.kind} %{op.name}: {len(op.outputs)} outputs, kind has {len(want)}")
            continue
        for o, s in zip(op.outputs, want, strict=True):
            if tuple(graph.values[o].shape) != tuple(s):
                out.append(f"{op.kind} %{op.name}: output %{o} has shape {graph.values[o].shape}, rule gives {s}")
    uids = [op.uid for op in graph.ops]
    if len(set(uids)) != len(uids):
        out.append("two ops share a uid")
    return out


def verify(graph: Graph, after: str) -> None:
    found = problems(graph)
    if found:
        more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
        raise VerifyError(f"IR verifier failed after pass '{after}': {found[0]}{more}")
