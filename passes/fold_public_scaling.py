"""Fold public scalings into the next linear layer.

Rewrite rule: an average pool divides by a public count k. When every window
has the same k and the pooled value reaches a conv or gemm only through
reshapes (each with that single user), ``L(reshape*(avgpool(x)))`` becomes
``L'(reshape*(sumpool(x)))`` with L's weights multiplied by 1/k (biases
unchanged). In fixed point the sum pool is exact and local, and L's weights are
encoded with ceil(log2 k) extra fractional bits (``wscale_extra``) so the
1/k costs no precision; the truncation the division would have needed is gone.

``globalavgpool`` -> ``globalsumpool``; ``avgpool`` with uniform counts ->
``sumpool``; ``reducemean`` (every output the mean of n elements) ->
``reducesum``. A pool over single elements (k = 1) becomes a sum pool outright.
A pool with another user, or with border windows of different counts, is left
alone.
"""

from __future__ import annotations

import math

import numpy as np
from fssc.compiler.ir.graph import Graph
from fssc.compiler.ir.ops import reduce_count
from fssc.passes.base import PUBLIC_SCALING_FOLDED, REWRITE_INVALIDATES, PassContext, PassResult
from fssc.runtime.geometry import windows

NAME = "fold-public-scaling"
SUM_OF = {"globalavgpool": "globalsumpool", "avgpool": "sumpool", "reducemean": "reducesum"}
REQUIRES: frozenset[str] = frozenset()  # after canonicalize it also sees through flattens (now reshapes)
ENSURES = frozenset({PUBLIC_SCALING_FOLDED})
INVALIDATES = REWRITE_INVALIDATES


def _uniform_count(graph: Graph, op) -> int | None:
    x = graph.values[op.inputs[0]]
    if op.kind == "globalavgpool":
        return int(np.prod(x.shape[2:]))
    if op.kind == "reducemean":
        return reduce_count(graph, op)
    dummy = np.zeros((1, 1) + tuple(x.shape[2:]), dtype=np.int8)
    _, valid, inpad, nd = windows(dummy, op.attrs, 0)
    cnt = (inpad if op.attrs.get("count_include_pad", 0) else valid).sum(axis=tuple(range(-nd, 0)))
    return int(cnt.flat[0]) if (cnt == cnt.flat[0]).all() else None


def run(graph: Graph, ctx: PassContext) -> PassResult:
    modified = False
    for op in graph.ops:
        if op.kind not in SUM_OF:
            continue
        k = _uniform_count(graph, op)
        if k is None:
            continue
        if k == 1:  # averaging one element: the sum pool is the same map, nothing to fold
            op.kind = SUM_OF[op.kind]
            op.attrs = {key: v for key, v in op.attrs.items() if key != "count_include_pad"}
            op.created_by = NAME
            modified = True
            continue
        cur, consumer = op.outputs[0], None
        while cur not in graph.outputs and graph.n_users(cur) == 1:
            nxt = graph.users_of(cur)[0]
            if nxt.kind == "reshape":
                cur = nxt.outputs[0]
                continue
            if nxt.kind in ("gemm", "conv") and nxt.inputs[0] == cur and not nxt.attrs.get("transA", 0):
                consumer = nxt
            break
        if consumer is None:
            continue
        w = graph.values[consumer.inputs[1]].array.astype(np.float64)
        w_name = graph.fresh_name(consumer.inputs[1] + f".div{k}")
        graph.add_const(w_name, (w / k).astype(np.float32))
        consumer.inputs = [consumer.inputs[0], w_name] + consumer.inputs[2:]
        consumer.attrs["wscale_extra"] = consumer.attrs.get("wscale_extra", 0) + math.ceil(math.log2(k))
        consumer.origin = tuple(consumer.origin) + tuple(o for o in op.origin if o not in consumer.origin)
        op.kind = SUM_OF[op.kind]
        op.attrs = {key: v for key, v in op.attrs.items() if key != "count_include_pad"}
        op.created_by = NAME
        modified = True
    graph.remove_unused()
    return PassResult(graph, modified)
