"""Reorder ReLU and MaxPool: ``maxpool(relu(x))`` -> ``relu(maxpool(x))``.

ReLU is monotone and MaxPool pads with -inf, and every window holds at least
one real element, so max over a window commutes with max(., 0). The rewrite
applies only when the ReLU's output feeds just the MaxPool (otherwise the
ReLU would have to stay and nothing is saved); a chain of MaxPools after one
ReLU moves the ReLU past all of them. It cuts the ReLU count to the
pooled size: on ResNet-18's stem 802,816 -> 200,704 per image.
"""

from __future__ import annotations

from fssc.compiler.ir.graph import Graph, Op, Value
from fssc.passes.base import RELU_AFTER_MAXPOOL, REWRITE_INVALIDATES, PassContext, PassResult

NAME = "reorder-maxpool-relu"
REQUIRES: frozenset[str] = frozenset()
ENSURES = frozenset({RELU_AFTER_MAXPOOL})
INVALIDATES = REWRITE_INVALIDATES


def _movable_relu(graph: Graph, pool: Op) -> Op | None:
    """The plain ReLU ``pool`` reads, if the pool is its only reader (then the two can swap)."""
    relu = graph.producer_of(pool.inputs[0])
    if relu is None or relu.kind != "relu" or relu.attrs or graph.n_users(relu.outputs[0]) != 1:
        return None
    return relu


def run(graph: Graph, ctx: PassContext) -> PassResult:
    modified = False
    for pool in [op for op in graph.ops if op.kind == "maxpool"]:
        relu = _movable_relu(graph, pool)
        if relu is None:
            continue
        x, r, m = relu.inputs[0], relu.outputs[0], pool.outputs[0]
        pooled = graph.fresh_name(m + ".max")
        graph.add_value(Value(pooled, graph.values[m].shape, graph.values[m].dtype))
        graph.set_outputs(pool, [pooled])  # m moves from the pool to the relu
        graph.set_outputs(relu, [m])
        graph.set_inputs(pool, [x])
        graph.set_inputs(relu, [pooled])
        del graph.values[r]
        graph.swap_ops(pool, relu)  # pool takes the relu's slot, relu the pool's
        modified = True  # a following maxpool finds the relu as its producer and takes it too
    return PassResult(graph, modified)


def check(graph: Graph) -> str | None:
    """What ENSURES promises: no maxpool reads a ReLU it could move past."""
    pool = next((op for op in graph.ops if op.kind == "maxpool" and _movable_relu(graph, op)), None)
    return f"maxpool %{pool.name} still reads a movable relu" if pool else None
