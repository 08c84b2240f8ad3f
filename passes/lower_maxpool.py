"""Lower a k_h x k_w MaxPool into two separable 1-D MaxPools.

Rewrite rule: ``maxpool(x; [kh, kw], strides [sh, sw], pads [ph0, pw0, ph1, pw1])``
-> ``maxpool(maxpool(x; [1, kw], [1, sw], [0, pw0, 0, pw1]); [kh, 1], [sh, 1], [ph0, 0, ph1, 0])``
(or the other axis first, whichever needs fewer max gates). Max is associative
and commutative and -inf padding is neutral, so the result is identical;
ceil_mode and dilations carry over per axis. Each 1-D window is a tree of
max gates with padding skipped: a 3x3/2 pool costs 6 max gates per output
instead of 8.
"""

from __future__ import annotations

from fssc.compiler.backend.gates import gate_count
from fssc.compiler.ir.graph import Graph, Value
from fssc.compiler.ir.ops import infer_shapes
from fssc.passes.base import REWRITE_INVALIDATES, SEPARABLE_MAXPOOL, PassContext, PassResult

NAME = "lower-maxpool"
REQUIRES: frozenset[str] = frozenset()
ENSURES = frozenset({SEPARABLE_MAXPOOL})
INVALIDATES = REWRITE_INVALIDATES


def _axis_attrs(a: dict, axis: int) -> dict:
    """The 1-D part of 2-D pool attrs along spatial axis 0 (H) or 1 (W)."""
    keep = lambda vals, other: [vals[0] if axis == 0 else other, vals[1] if axis == 1 else other]  # noqa: E731
    p = a["pads"]
    return {
        "kernel_shape": keep(a["kernel_shape"], 1),
        "strides": keep(a["strides"], 1),
        "dilations": keep(a["dilations"], 1),
        "ceil_mode": a.get("ceil_mode", 0),
        "pads": [
            p[0] if axis == 0 else 0,
            p[1] if axis == 1 else 0,
            p[2] if axis == 0 else 0,
            p[3] if axis == 1 else 0,
        ],
    }


def _split(graph: Graph, op, first: int):
    x = op.inputs[0]
    a1, a2 = _axis_attrs(op.attrs, first), _axis_attrs(op.attrs, 1 - first)
    mid_shape = infer_shapes("maxpool", a1, [graph.values[x].shape])[0]
    return a1, a2, mid_shape


def _splittable(op) -> bool:
    """A 2-D maxpool whose window is wider than one along both axes."""
    return op.kind == "maxpool" and len(op.attrs["kernel_shape"]) == 2 and min(op.attrs["kernel_shape"]) > 1


def run(graph: Graph, ctx: PassContext) -> PassResult:
    pools = [op for op in graph.ops if _splittable(op)]
    for op in pools:
        best: tuple[int, dict, dict, tuple[int, ...]] | None = None
        for first in (1, 0):  # W first, then H first
            a1, a2, mid_shape = _split(graph, op, first)
            probe = Graph()
            probe.values = {"x": graph.values[op.inputs[0]], "m": Value("m", mid_shape)}
            cost = sum(
                gate_count(probe.make_op("maxpool", [i], [], a, uid=-1), probe) for i, a in (("x", a1), ("m", a2))
            )
            if best is None or cost < best[0]:
                best = (cost, a1, a2, mid_shape)
        assert best is not None  # the loop ran twice
        _, a1, a2, mid_shape = best
        mid = graph.fresh_name(op.outputs[0] + ".sep")
        graph.add_value(Value(mid, mid_shape, graph.values[op.inputs[0]].dtype))
        graph.insert_op_before(
            op, graph.make_op("maxpool", [op.inputs[0]], [mid], a1, origin=op.origin, created_by=NAME)
        )
        graph.set_inputs(op, [mid])
        op.attrs = a2
        op.created_by = NAME
    return PassResult(graph, bool(pools))


def check(graph: Graph) -> str | None:
    """What ENSURES promises: every 2-D maxpool window is 1 x k or k x 1."""
    pool = next((op for op in graph.ops if _splittable(op)), None)
    return f"maxpool %{pool.name} has a {pool.attrs['kernel_shape']} window" if pool else None
