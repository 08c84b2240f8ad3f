"""Canonicalisation: one form for each construct the later passes match.

Rewrite rules:

* ``flatten(x, axis)`` -> ``reshape(x, shape)`` with the explicit shape;
  a reshape to the shape it already has is dropped.
* ``gemm(a, B, C; alpha, beta, transA, transB)`` -> ``gemm(a, W, b)`` with
  W = alpha * (B^T if transB else B) of shape [K, N] and b = beta * C (a [N]
  vector when C broadcasts along rows); no attributes remain but ``transA=1``
  (the data operand is read transposed: y = a^T W + b).
* ``matmul(x, W)`` with a 2-D constant W and a 2-D x -> ``gemm(x, W)``.
* ``gemm`` / ``conv`` followed by ``add`` of a constant bias (shape [N] or
  [1, N] for gemm, [C,1,1] or [1,C,1,1] for conv), when the linear op's output
  has no other user -> the bias moves into the linear op.
* ``sub(x, c)`` with a constant c -> ``add(x, -c)``.
* ``clip`` with neither bound -> ``reshape`` to its own shape (an identity,
  dropped like any such reshape); with min > max -> min = max (ONNX: every
  output is max), the form the secure gate computes.

Every rewrite preserves the float semantics exactly (up to float rounding of
the folded constants).
"""

from __future__ import annotations

import numpy as np
from fssc.compiler.ir.graph import Graph
from fssc.passes.base import CANONICAL, REWRITE_INVALIDATES, PassContext, PassResult

NAME = "canonicalize"
REQUIRES: frozenset[str] = frozenset()
ENSURES = frozenset({CANONICAL})
INVALIDATES = REWRITE_INVALIDATES


def _new_const(graph: Graph, base: str, data: np.ndarray) -> str:
    name = graph.fresh_name(base)
    graph.add_const(name, np.asarray(data, dtype=np.float32))
    return name


def run(graph: Graph, ctx: PassContext) -> PassResult:
    modified = False
    for op in list(graph.ops):
        v = graph.values
        before = (op.kind, list(op.inputs), dict(op.attrs))
        if op.kind == "clip" and "min" not in op.attrs and "max" not in op.attrs:
            op.kind = "reshape"
            op.attrs = {"shape": list(v[op.outputs[0]].shape)}
        if op.kind == "clip" and op.attrs.get("min", -np.inf) > op.attrs.get("max", np.inf):
            op.attrs["min"] = op.attrs["max"]
        if op.kind == "flatten":
            op.kind = "reshape"
            op.attrs = {"shape": list(v[op.outputs[0]].shape)}
        if (
            op.kind == "reshape"
            and tuple(op.attrs["shape"]) == tuple(v[op.inputs[0]].shape)
            and op.outputs[0] not in graph.outputs
        ):
            graph.replace_all_uses_with(op.outputs[0], op.inputs[0])
            graph.remove_op(op)
            modified = True
            continue
        if op.kind == "gemm" and any(k in op.attrs for k in ("alpha", "beta", "transB", "transA")):
            a = op.attrs
            w = v[op.inputs[1]].array.astype(np.float64)
            w = (w.T if a.get("transB", 0) else w) * a.get("alpha", 1.0)
            ins = [op.inputs[0], _new_const(graph, op.inputs[1] + ".kn", w)]
            if len(op.inputs) > 2:
                c = v[op.inputs[2]].array.astype(np.float64) * a.get("beta", 1.0)
                n = w.shape[1]
                if c.size == 1:
                    c = np.full((n,), float(c.reshape(())))
                elif c.shape in ((n,), (1, n)):
                    c = c.reshape(n)
                ins.append(_new_const(graph, op.inputs[2] + ".b", c))
            graph.set_inputs(op, ins)
            op.attrs = {"transA": 1} if op.attrs.get("transA", 0) else {}
        if (
            op.kind == "matmul"
            and v[op.inputs[1]].is_const
            and v[op.inputs[1]].array.ndim == 2
            and len(v[op.inputs[0]].shape) == 2
            and not v[op.inputs[0]].is_const
        ):
            op.kind = "gemm"
            op.attrs = {}
        if op.kind == "sub" and v[op.inputs[1]].is_const and not v[op.inputs[0]].is_const:
            op.kind = "add"
            graph.set_inputs(op, [op.inputs[0], _new_const(graph, op.inputs[1] + ".neg", -v[op.inputs[1]].array)])
        modified |= before != (op.kind, list(op.inputs), dict(op.attrs))
        if op.kind == "add" and _fold_bias(graph, op):
            modified = True
    graph.remove_unused()
    return PassResult(graph, modified)


def _fold_bias(graph: Graph, op) -> bool:
    """Move add(linear(x), c) into linear's bias when that is exact and local; the linear op takes
    over the add's output (and its name)."""
    v = graph.values
    prev = next((p for p in map(graph.producer_of, op.inputs) if p is not None), None)
    if prev is None or prev.kind not in ("gemm", "conv") or prev.attrs.get("transA", 0):
        return False
    if prev.kind == "gemm" and prev.attrs:
        return False
    y = prev.outputs[0]
    if graph.n_users(y) != 1:
        return False
    c_name = op.inputs[1] if op.inputs[0] == y else op.inputs[0]
    if not v[c_name].is_const:
        return False
    c = v[c_name].array.astype(np.float64)
    out_shape = v[y].shape
    nout = out_shape[1]
    if prev.kind == "gemm":
        ok = c.shape in ((nout,), (1, nout))
    else:
        ok = c.shape in ((nout, 1, 1), (1, nout, 1, 1)) and len(out_shape) == 4
    if not ok:
        return False
    c = c.reshape(nout)
    if len(prev.inputs) > 2:
        c = c + v[prev.inputs[2]].array.astype(np.float64)
    graph.set_inputs(prev, prev.inputs[:2] + [_new_const(graph, c_name + ".bias", c)])
    prev.origin = tuple(prev.origin) + tuple(o for o in op.origin if o not in prev.origin)
    out = op.outputs[0]
    graph.set_outputs(op, [])  # the add gives its output to the linear op
    graph.set_outputs(prev, [out])
    v[out].shape = out_shape
    graph.remove_op(op)
    del v[y]
    return True


def check(graph: Graph) -> str | None:
    """What ENSURES promises: no flatten is left, every gemm is gemm(a, W[K, N], b)."""
    for op in graph.ops:
        if op.kind == "flatten" or (op.kind == "gemm" and {"alpha", "beta", "transB"} & op.attrs.keys()):
            return f"{op.kind} %{op.name} is not canonical"
    return None
