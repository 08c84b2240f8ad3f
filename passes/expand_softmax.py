"""Expand every softmax the secure programs evaluate into ops they have.

A softmax that is the graph's last op is dropped before the pipeline in labels mode (compile.add_label_output:
the argmax is unchanged); any other (logits mode, or one inside the graph) becomes, over rows of C elements,

    m = maxpool(x) (the row maximum: a 1 x C window), d = x - m (<= 0), e = exp(d) (spline),
    s = reducesum(e) (in [1, C]), r = reciprocal(s) (spline), y = e * r (secret x secret product)

with the softmax's axis moved last by a transpose (and back) when it is not, or with opset < 13's flattening
the input reshaped to [rows, C]. Semantics are those of ONNX Softmax up to the gates' stated error
(docs/protocol.md, "Softmax").
"""

from __future__ import annotations

import numpy as np
from fssc.compiler.ir.graph import Graph, Op, Value
from fssc.compiler.ir.splines import MAX_SOFTMAX_CLASSES
from fssc.passes.base import NO_SOFTMAX, REWRITE_INVALIDATES, PassContext, PassResult

from fssc.errors import FsscError

NAME = "expand-softmax"
REQUIRES: frozenset[str] = frozenset()
ENSURES = frozenset({NO_SOFTMAX})
INVALIDATES = REWRITE_INVALIDATES


def run(graph: Graph, ctx: PassContext) -> PassResult:
    """Every softmax the secure programs evaluate (logits mode, or one inside the graph), in ops they have: over
    rows of C elements (the axis moved last by a transpose if it is not; opset < 13's flattening reshapes to
    [rows, C]), as [R, 1, 1, C] so the row maximum is a 1 x C max pool:

        m = maxpool(x), d = x - m (<= 0), e = exp(d), s = reducesum(e) (in [1, C]), y = e * reciprocal(s)

    exp and reciprocal are spline gates, the product the secret x secret product gate (docs/protocol.md,
    "Softmax")."""
    if not any(op.kind == "softmax" for op in graph.ops):
        return PassResult(graph, False)
    ops = []
    for op in graph.ops:
        if op.kind != "softmax":
            ops.append(op)
            continue
        shape = graph.values[op.inputs[0]].shape
        ax = op.attrs["axis"] % max(len(shape), 1)
        new: list[Op] = []

        def emit(kind, inputs, attrs, out_shape, what, new=new, op=op):
            name = graph.fresh_name(f"{op.name}.{what}")
            graph.add_value(Value(name, tuple(int(d) for d in out_shape), "float32"))
            new.append(graph.make_op(kind, inputs, [name], attrs, origin=op.origin, created_by=NAME))
            return name

        x = op.inputs[0]
        perm = None
        if op.attrs.get("coerce"):
            rows, c = int(np.prod(shape[:ax], dtype=np.int64)), int(np.prod(shape[ax:], dtype=np.int64))
        else:
            if ax != len(shape) - 1:
                perm = [i for i in range(len(shape)) if i != ax] + [ax]
                x = emit("transpose", [x], {"perm": perm}, [shape[i] for i in perm], "last")
            c = shape[ax]
            rows = int(np.prod(shape, dtype=np.int64)) // c
        if c > MAX_SOFTMAX_CLASSES:
            raise FsscError(
                f"softmax {op.described}: rows of {c} elements; fssc evaluates softmax over at most "
                f"{MAX_SOFTMAX_CLASSES} elements per row"
            )
        flat = (rows, 1, 1, c)
        x = emit("reshape", [x], {"shape": list(flat)}, flat, "rows")
        pool = {"kernel_shape": [1, c], "strides": [1, c], "dilations": [1, 1], "ceil_mode": 0, "pads": [0, 0, 0, 0]}
        m = emit("maxpool", [x], pool, (rows, 1, 1, 1), "max")
        d = emit("sub", [x, m], {}, flat, "centred")
        e = emit("exp", [d], {}, flat, "exp")
        s = emit("reducesum", [e], {"axes": [3], "keepdims": 1}, (rows, 1, 1, 1), "sum")
        r = emit("reciprocal", [s], {"classes": c}, (rows, 1, 1, 1), "inverse")
        y = emit("hmul", [e, r], {}, flat, "normalized")
        back = [shape[i] for i in perm] if perm else list(shape)
        y = emit("reshape", [y], {"shape": back}, back, "shaped")
        if perm:
            inv = [perm.index(i) for i in range(len(shape))]
            y = emit("transpose", [y], {"perm": inv}, shape, "back")
        new[-1].outputs = list(op.outputs)  # the last op writes the softmax's own output value
        del graph.values[y]
        ops.extend(new)
    graph.ops = ops
    return PassResult(graph, True)


def check(graph: Graph) -> str | None:
    """What ENSURES promises: no softmax is left."""
    op = next((op for op in graph.ops if op.kind == "softmax"), None)
    return f"softmax %{op.name} is not expanded" if op else None
