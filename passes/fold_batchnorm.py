"""Fold BatchNormalization into the preceding Conv.

Rewrite rule: ``y = batchnorm(conv(x, W, b), gamma, beta, mean, var, eps)``,
when the conv output feeds only the BN, becomes ``y = conv(x, W', b')`` with
a = gamma / sqrt(var + eps) (eps from the node's attribute),
W'[o] = W[o] * a[o] (per output channel, so grouped convs fold the same way)
and b' = (b - mean) * a + beta (b = 0 for a conv without bias).

A BN whose input is not such a conv (no conv before it, or a conv output with
another user: folding would change that user's value) becomes a per-channel
``affine(x, a, beta - mean * a)``. After this pass no batchnorm remains.
"""

from __future__ import annotations

import numpy as np
from fssc.compiler.ir.graph import Graph
from fssc.compiler.ir.ops import batchnorm_affine
from fssc.passes.base import NO_BATCHNORM, REWRITE_INVALIDATES, PassContext, PassResult

NAME = "fold-batchnorm"
REQUIRES: frozenset[str] = frozenset()
ENSURES = frozenset({NO_BATCHNORM})
INVALIDATES = REWRITE_INVALIDATES


def _bn_params(graph: Graph, op):
    return batchnorm_affine(op.attrs, *(graph.values[n].data for n in op.inputs[1:5]))


def run(graph: Graph, ctx: PassContext) -> PassResult:
    bns = [op for op in graph.ops if op.kind == "batchnorm"]
    for op in bns:
        a, shift = _bn_params(graph, op)
        conv = graph.producer_of(op.inputs[0])
        if conv is not None and conv.kind == "conv" and graph.n_users(conv.outputs[0]) == 1:
            w = graph.values[conv.inputs[1]].array.astype(np.float64)
            b = graph.values[conv.inputs[2]].array.astype(np.float64) if len(conv.inputs) > 2 else 0.0
            w_name = graph.fresh_name(conv.inputs[1] + ".bn")
            graph.add_const(w_name, (w * a.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32))
            b_name = graph.fresh_name((conv.inputs[2] if len(conv.inputs) > 2 else conv.inputs[1]) + ".bnbias")
            graph.add_const(
                b_name,
                (
                    (b - graph.values[op.inputs[3]].array.astype(np.float64)) * a
                    + graph.values[op.inputs[2]].array.astype(np.float64)
                ).astype(np.float32),
            )
            graph.set_inputs(conv, [conv.inputs[0], w_name, b_name])
            conv.origin = tuple(conv.origin) + tuple(op.origin)
            # the BN's users now read the conv's output (the conv keeps its name)
            graph.replace_all_uses_with(op.outputs[0], conv.outputs[0])
            graph.remove_op(op)
            continue
        a_name = graph.fresh_name(op.inputs[1] + ".a")
        graph.add_const(a_name, a.astype(np.float32))
        s_name = graph.fresh_name(op.inputs[2] + ".shift")
        graph.add_const(s_name, shift.astype(np.float32))
        op.kind = "affine"
        graph.set_inputs(op, [op.inputs[0], a_name, s_name])
        op.attrs = {}
        op.created_by = NAME
    graph.remove_unused()
    return PassResult(graph, bool(bns))


def check(graph: Graph) -> str | None:
    """What ENSURES promises: no batchnorm is left."""
    bn = next((op for op in graph.ops if op.kind == "batchnorm"), None)
    return f"batchnorm %{bn.name} is left" if bn else None
