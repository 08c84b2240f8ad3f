"""Reorder ReLU and MaxPool: ``maxpool(relu(x))`` -> ``relu(maxpool(x))``.

ReLU is monotone and MaxPool pads with -inf, and every window holds at least
one real element, so max over a window commutes with max(., 0). The rewrite
applies only when the ReLU's output feeds just the MaxPool (otherwise the
ReLU would have to stay and nothing is saved); a chain of MaxPools after one
ReLU moves the ReLU past all of them. It cuts the ReLU count to the
pooled size: on ResNet-18's stem 802,816 -> 200,704 per image.
"""

from __future__ import annotations

from fssc.compiler.ir.graph import Graph, Value
from fssc.passes.base import PassContext

NAME = "reorder-maxpool-relu"


def run(graph: Graph, ctx: PassContext) -> Graph:
    producer = graph.producer()
    ops = list(graph.ops)
    for i, pool in enumerate(ops):
        if pool.kind != "maxpool":
            continue
        relu = producer.get(pool.inputs[0])
        if relu is None or relu.kind != "relu" or relu.attrs or graph.n_users(relu.outputs[0]) != 1:
            continue
        x, r, m = relu.inputs[0], relu.outputs[0], pool.outputs[0]
        pooled = graph.fresh_name(m + ".max")
        graph.add_value(Value(pooled, graph.values[m].shape, graph.values[m].dtype))
        pool.inputs, pool.outputs = [x], [pooled]
        relu.inputs, relu.outputs = [pooled], [m]
        del graph.values[r]
        producer[pooled], producer[m] = pool, relu  # a following maxpool can take the relu too
        j = ops.index(relu)
        ops[j], ops[i] = pool, relu  # pool takes the relu's slot, relu the pool's
    graph.ops = ops
    return graph
