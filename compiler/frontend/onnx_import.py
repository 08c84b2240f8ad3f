"""ONNX -> fssc IR.

The importer checks the model (``onnx.checker``), runs shape inference,
requires static shapes, and turns every node into one IR op (or none, for
Identity and Dropout, which alias their input; Split gives one slice per
output; Squeeze and Unsqueeze become reshapes). Initializers and Constant
nodes become constant values: the model owner's. Structural constant inputs
(Reshape's shape, Pad's pads, Clip's bounds, Slice's indices, Gather's
indices...) become attributes. Nodes whose
inputs are all constants are folded at import, and so is shape arithmetic
(Shape, Size, ConstantOfShape, Expand, Cast, CastLike, and Div of
constants: the forms torch's exporters write), shapes being static.

The importer is a table of converters, :data:`CONVERTERS`: ONNX op type ->
a function ``(importer, node, label, attrs)`` that emits the node's IR op (or
aliases or adds a constant). A 1:1 op with no attributes is not listed here:
its :class:`~fssc.compiler.ir.ops.OpDef` names the ONNX op type (``onnx="Relu"``)
and gets the default converter, :func:`simple`, which refuses a node that
carries attributes. The supported op set, :data:`SUPPORTED`, is the table's keys.

Anything outside the supported op set is reported in one error that groups the
offending nodes by op type (a count and the first node of each) and lists the
set fssc accepts.

Input shapes must be static. A dynamic (symbolic or unknown) dimension, as
``torch.onnx.export(..., dynamic_axes=...)`` writes, is pinned by the caller:
``batch`` pins dimension 0 of every graph input, ``input_shapes`` pins whole
shapes by input name (``fssc compile --batch N --input-shape NAME:D0,D1,...``).
The pinned shapes are written into the model's inputs before ONNX shape
inference runs.
"""

from __future__ import annotations

import copy
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
from fssc.compiler.ir.graph import Graph, Value
from fssc.compiler.ir.ops import OPS, Scale, infer_shapes
from fssc.compiler.ir.verify import verify
from onnx import TensorProto, helper, numpy_helper

from fssc.errors import FsscError


def load_onnx(path: str) -> onnx.ModelProto:
    if not os.path.exists(path):
        raise FsscError(f"{path}: no such file")
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf raises several types for garbage
        raise FsscError(
            f"{path}: not an ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'cannot parse'})"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise FsscError(f"{path}: not an ONNX model (no graph)")
    return model


def parse_input_shapes(specs: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """``--input-shape NAME:D0,D1,...`` (repeatable) -> {name: shape}; an FsscError names a malformed one."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, colon, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not colon or not name or not shape or min(shape) < 1:
            raise FsscError(
                f"--input-shape {spec!r}: give NAME:D0,D1,... with positive dimensions, e.g. input:2,3,224,224"
            )
        if name in shapes:
            raise FsscError(f"--input-shape: input {name!r} is given twice")
        shapes[name] = shape
    return shapes


def pin_input_shapes(
    model: onnx.ModelProto,
    src: str,
    batch: int | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have the requested dimensions: ``batch`` for dimension 0 of
    every input, ``input_shapes`` for the named inputs' whole shapes. A dynamic dimension takes the
    requested value; a static one must already equal it. Intermediate shapes recorded by the exporter
    (value_info) are dropped, for shape inference to recompute them from the pinned inputs."""
    input_shapes = dict(input_shapes or {})
    if batch is None and not input_shapes:
        return model
    if batch is not None and batch < 1:
        raise FsscError(f"--batch {batch}: must be at least 1")
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise FsscError(
            f"{src}: --input-shape names {', '.join(map(repr, unknown))}, not an input of the model; "
            f"its inputs: {', '.join(map(repr, names))}"
        )
    model = copy.deepcopy(model)
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        want = input_shapes.get(inp.name)
        if want is not None and batch is not None and want[0] != batch:
            raise FsscError(
                f"{src}: input {inp.name!r}: --batch {batch} and --input-shape {inp.name}:"
                f"{','.join(map(str, want))} disagree on dimension 0"
            )
        if want is None:
            if batch is None:
                continue
            if tt.HasField("shape") and not tt.shape.dim:
                raise FsscError(f"{src}: input {inp.name!r} is a scalar; --batch pins dimension 0 of every input")
            if not tt.HasField("shape"):
                raise FsscError(
                    f"{src}: input {inp.name!r} has no shape; give it with --input-shape {inp.name}:D0,D1,..."
                )
            want = (batch,) + tuple(-1 for _ in tt.shape.dim[1:])  # -1: keep the model's dimension
            flag = f"--batch {batch}"
        else:
            flag = f"--input-shape {inp.name}:{','.join(map(str, want))}"
        if tt.HasField("shape") and len(tt.shape.dim) != len(want):
            raise FsscError(f"{src}: input {inp.name!r} has {len(tt.shape.dim)} dimensions; {flag} gives {len(want)}")
        if not tt.HasField("shape"):
            tt.shape.SetInParent()
            for _ in want:
                tt.shape.dim.add()
        for axis, (d, w) in enumerate(zip(tt.shape.dim, want, strict=True)):
            if w == -1:
                continue
            if d.HasField("dim_value") and d.dim_value >= 0:
                if d.dim_value != w:
                    raise FsscError(
                        f"{src}: input {inp.name!r} dimension {axis} is fixed at {d.dim_value} in the model; "
                        f"{flag} asks for {w}"
                    )
                continue
            d.Clear()
            d.dim_value = w
    del model.graph.value_info[:]
    return model


def import_onnx(
    path_or_model,
    name: str | None = None,
    batch: int | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    verbose: bool = False,
) -> Graph:
    """Import an ONNX file or ModelProto; ``batch`` and ``input_shapes`` pin dynamic input dimensions
    (see :func:`pin_input_shapes`). Unsupported ops are refused in one line per op type with its count and
    first node; with ``verbose`` the line names every node."""
    if isinstance(path_or_model, onnx.ModelProto):
        model, src = path_or_model, name or "<model>"
    else:
        src = str(path_or_model)
        model = load_onnx(src)
    model = pin_input_shapes(model, src, batch, input_shapes)
    return _Importer(model, src, verbose).run(
        name or (os.path.splitext(os.path.basename(src))[0] if src != "<model>" else "model")
    )


def _dynamic_dim_message(name: str, shape: onnx.TensorShapeProto, axis: int) -> str:
    """The refusal of an unpinned dynamic input dimension, naming the flag that pins it."""
    d = shape.dim[axis]
    what = f"dynamic dimension {d.dim_param!r}" if d.dim_param else "dynamic (unknown) dimension"
    dims = ",".join(
        str(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else f"D{i}" for i, x in enumerate(shape.dim)
    )
    pin = f"--batch N (or --input-shape {name}:{dims})" if axis == 0 else f"--input-shape {name}:{dims}"
    return f"input {name!r} has a {what} (axis {axis}); fssc needs static shapes: pin it with {pin}"


def _node_label(node: onnx.NodeProto, idx: int) -> str:
    return node.name or f"{node.op_type}_{idx}"


class _Importer:
    def __init__(self, model: onnx.ModelProto, src: str, verbose: bool = False):
        self.src = src
        self.verbose = verbose
        try:
            onnx.checker.check_model(model)
        except Exception as e:
            raise FsscError(f"{src}: invalid ONNX model: {str(e).splitlines()[0]}") from None
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        except Exception as e:
            raise FsscError(f"{src}: ONNX shape inference failed: {str(e).splitlines()[0]}") from None
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.g = Graph("")  # the graph being built (named in run)
        self.alias: dict[str, str] = {}

    # ---------------------------------------------------------------- helpers
    def resolve(self, name: str) -> str:
        """IR name of an ONNX value name (Identity/Dropout outputs alias their input)."""
        return self.alias.get(name, name)

    def ir_name(self, onnx_name: str) -> str:
        """Readable, unique IR name: '/layer1/layer1.0/conv1/Conv_output_0' -> 'layer1.0.conv1.Conv'."""
        parts = [p for p in onnx_name.split("/") if p]
        # torch's module path repeats each parent name: /layer1/layer1.0/downsample/downsample.0/Conv
        parts = [p for i, p in enumerate(parts) if i + 1 == len(parts) or not parts[i + 1].startswith(p + ".")]
        base = ".".join(parts) or onnx_name
        base = base.removesuffix("_output_0")
        name = self.g.fresh_name(base)
        self.alias[onnx_name] = name
        return name

    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        v = self.g.values.get(self.resolve(name))
        return None if v is None else v.data

    def need_const(self, node, idx, label, what) -> np.ndarray:
        c = self.const(node.input[idx]) if len(node.input) > idx else None
        if c is None:
            raise FsscError(f"{self.src}: node {label} ({node.op_type}): {what} must be a constant initializer")
        return c

    # ---------------------------------------------------------------- main
    def run(self, gname: str) -> Graph:
        gp = self.model.graph
        fused, absorbed = fusions(gp)  # SiLU and GELU written out in elementary ops: one spline each
        bad = [
            (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}", _node_label(n, i))
            for i, n in enumerate(gp.node)
            if i not in absorbed and (n.op_type not in CONVERTERS or n.domain not in ("", "ai.onnx"))
        ]
        if bad:
            count = Counter(op for op, _ in bad)
            nodes_of: dict[str, list[str]] = {}
            for op, label in bad:
                nodes_of.setdefault(op, []).append(label)  # in graph order
            if self.verbose:
                listed = ", ".join(f"{op} ({count[op]}: {' '.join(ls)})" for op, ls in nodes_of.items())
            else:
                listed = ", ".join(
                    f"{op} ({count[op]} nodes, first: {ls[0]})" if count[op] > 1 else f"{op} (1 node: {ls[0]})"
                    for op, ls in nodes_of.items()
                )
                listed += "; --verbose names every node" if any(count[op] > 1 for op in nodes_of) else ""
            n = len(nodes_of)
            kinds = "1 unsupported ONNX op type" if n == 1 else f"{n} unsupported ONNX op types"
            raise FsscError(f"{self.src}: {kinds}: {listed}; fssc supports: {', '.join(sorted(CONVERTERS))}")
        g = self.g = Graph(gname)
        inits = {t.name for t in gp.initializer}
        for t in gp.initializer:
            g.add_const(t.name, numpy_helper.to_array(t).copy())
        for inp in gp.input:
            if inp.name in inits:
                continue
            tt = inp.type.tensor_type
            if tt.elem_type != onnx.TensorProto.FLOAT:
                raise FsscError(
                    f"{self.src}: input {inp.name!r} has element type "
                    f"{onnx.TensorProto.DataType.Name(tt.elem_type)}; fssc takes float32 inputs"
                )
            dims = []
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value == 0:
                    raise FsscError(
                        f"{self.src}: input {inp.name!r} has a zero-size dimension (axis {i}); "
                        f"fssc needs non-empty tensors"
                    )
                if not d.HasField("dim_value") or d.dim_value < 0:
                    raise FsscError(f"{self.src}: {_dynamic_dim_message(inp.name, tt.shape, i)}")
                dims.append(d.dim_value)
            if not tt.HasField("shape"):
                raise FsscError(
                    f"{self.src}: input {inp.name!r} has no shape; fssc needs static shapes: "
                    f"give it with --input-shape {inp.name}:D0,D1,..."
                )
            g.add_value(Value(inp.name, tuple(dims), "float32"))
            g.inputs.append(inp.name)
        for idx, node in enumerate(gp.node):
            if idx in fused:  # the pattern's last node: its output is the fused activation's
                kind, x, attrs, labels = fused[idx]
                self.emit(node, ", ".join(labels), kind, [x], attrs)
            elif idx not in absorbed:
                self.convert(node, _node_label(node, idx))
        g.outputs = [self.resolve(o.name) for o in gp.output]
        for o in g.outputs:
            if o not in g.values or g.values[o].is_const:
                raise FsscError(f"{self.src}: graph output {o!r} does not depend on the input")
        g.meta["onnx_outputs"] = [o.name for o in gp.output]
        g.meta["opset"] = self.opset
        g.remove_unused()
        verify(g, "import")
        return g

    def emit(self, node, label, kind, inputs, attrs, outputs=None):
        g = self.g
        ins = [self.resolve(i) for i in inputs]
        shapes = [g.values[i].shape for i in ins]
        try:
            out_shapes = infer_shapes(kind, attrs, shapes)
        except FsscError as e:
            raise FsscError(f"{self.src}: node {label} ({node.op_type}): {e}") from None
        outs = outputs or [node.output[0]]
        if all(g.values[i].is_const for i in ins):  # fold constant subgraphs
            res = OPS[kind].run(attrs, *[g.values[i].data for i in ins])
            for o, r in zip(outs, res, strict=True):
                g.add_const(self.ir_name(o), np.asarray(r, dtype=np.int64 if kind == "argmax" else np.float32))
            return
        outs = [self.ir_name(o) for o in outs]
        for o, s in zip(outs, out_shapes, strict=True):
            g.add_value(Value(o, s, "int64" if OPS[kind].scale is Scale.INTEGER else "float32"))
        g.ops.append(g.make_op(kind, ins, outs, attrs, origin=(label,)))

    # ---------------------------------------------------------------- per op
    def convert(self, node: onnx.NodeProto, label: str) -> None:
        a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in a.items()}
        CONVERTERS[node.op_type](self, node, label, a)

    def unused_extra_outputs(self, node: onnx.NodeProto, label: str, n_keep: int) -> None:
        """Refuse a node whose outputs past the first ``n_keep`` are read (MaxPool's indices, BN's stats)."""
        gp = self.model.graph
        users = {i for nd in gp.node for i in nd.input} | {o.name for o in gp.output}
        extra = [o for o in node.output[n_keep:] if o and o in users]
        if extra:
            raise FsscError(f"{self.src}: node {label} ({node.op_type}): output(s) {extra} are not supported")

    def x_shape(self, node: onnx.NodeProto) -> tuple[int, ...]:
        """Shape of the node's first (data) input."""
        return self.g.values[self.resolve(node.input[0])].shape

    def pads(self, a, label, op, spatial, k, s, d):
        nd = len(spatial)
        auto = a.get("auto_pad", "NOTSET")
        if auto in ("NOTSET", ""):
            return list(a.get("pads", [0] * (2 * nd)))
        if auto == "VALID":
            return [0] * (2 * nd)
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            pads = [0] * (2 * nd)
            for i in range(nd):
                out = -(-spatial[i] // s[i])
                total = max(0, (out - 1) * s[i] + d[i] * (k[i] - 1) + 1 - spatial[i])
                small, big = total // 2, total - total // 2
                pads[i], pads[i + nd] = (small, big) if auto == "SAME_UPPER" else (big, small)
            return pads
        raise FsscError(f"{self.src}: node {label} ({op}): auto_pad {auto!r} is not supported")


# ---------------------------------------------------------------------------- the converters
Converter = Callable[[_Importer, onnx.NodeProto, str, dict[str, Any]], None]
CONVERTERS: dict[str, Converter] = {}


def converts(*op_types: str) -> Callable[[Converter], Converter]:
    """Register the decorated function as the converter of these ONNX op types."""

    def deco(fn: Converter) -> Converter:
        for t in op_types:
            CONVERTERS[t] = fn
        return fn

    return deco


def simple(kind: str) -> Converter:
    """The converter of a 1:1 op: IR ``kind`` over the node's inputs, no attributes."""

    def convert(imp: _Importer, node: onnx.NodeProto, label: str, a: dict[str, Any]) -> None:
        if a:  # a 1:1 op takes no attributes: one it does not know would change what the node computes
            raise FsscError(f"{imp.src}: node {label} ({node.op_type}): attribute(s) {sorted(a)} are not supported")
        imp.emit(node, label, kind, list(node.input), {})

    convert.__name__ = f"simple_{kind}"
    return convert


def default_converters(ops: Mapping[str, Any]) -> dict[str, Converter]:
    """:func:`simple` converters for the IR kinds whose op definition names an ONNX op type (``onnx``)."""
    return {d.onnx: simple(kind) for kind, d in ops.items() if getattr(d, "onnx", None)}


@converts("Constant")
def _constant(imp: _Importer, node, label, a) -> None:
    t = a.get("value")
    if t is None:
        for k in ("value_float", "value_floats", "value_int", "value_ints"):
            if k in a:
                imp.g.add_const(node.output[0], np.asarray(a[k], dtype=np.float32 if "float" in k else np.int64))
                return
        raise FsscError(f"{imp.src}: node {label} (Constant): unsupported constant form {sorted(a)}")
    imp.g.add_const(node.output[0], numpy_helper.to_array(t).copy())


@converts("Identity", "Dropout")
def _alias(imp: _Importer, node, label, a) -> None:
    ins = list(node.input)
    if node.op_type == "Dropout":
        imp.unused_extra_outputs(node, label, 1)
        if a.get("is_test") == 0 or (
            len(ins) > 2 and ins[2] and imp.const(ins[2]) is not None and bool(imp.const(ins[2]))
        ):
            raise FsscError(f"{imp.src}: node {label} (Dropout): training mode is not supported")
    imp.alias[node.output[0]] = imp.resolve(ins[0])


@converts("Conv")
def _conv(imp: _Importer, node, label, a) -> None:
    ins = list(node.input)
    w = imp.need_const(node, 1, label, "weight (input 1)")
    if len(ins) > 2 and ins[2]:
        imp.need_const(node, 2, label, "bias (input 2)")
    x_shape = imp.x_shape(node)
    nd = len(x_shape) - 2
    if "kernel_shape" in a and list(a["kernel_shape"]) != list(w.shape[2:]):
        raise FsscError(f"{imp.src}: node {label} (Conv): kernel_shape {a['kernel_shape']} != weight {w.shape}")
    attrs = {
        "strides": list(a.get("strides", [1] * nd)),
        "dilations": list(a.get("dilations", [1] * nd)),
        "group": int(a.get("group", 1)),
    }
    attrs["pads"] = imp.pads(a, label, "Conv", x_shape[2:], list(w.shape[2:]), attrs["strides"], attrs["dilations"])
    imp.emit(node, label, "conv", [i for i in ins if i], attrs)


@converts("Gemm")
def _gemm(imp: _Importer, node, label, a) -> None:
    ins = list(node.input)
    imp.need_const(node, 1, label, "B (input 1, the weights)")
    if len(ins) > 2 and ins[2]:
        imp.need_const(node, 2, label, "C (input 2, the bias)")
    attrs = {
        "alpha": float(a.get("alpha", 1.0)),
        "beta": float(a.get("beta", 1.0)),
        "transA": int(a.get("transA", 0)),
        "transB": int(a.get("transB", 0)),
    }
    imp.emit(node, label, "gemm", [i for i in ins if i], attrs)


@converts("MatMul", "Mul")
def _product(imp: _Importer, node, label, a) -> None:
    ins = list(node.input)
    if imp.const(ins[0]) is None and imp.const(ins[1]) is None:
        if node.op_type == "Mul":  # two secret operands: the secret x secret product gate
            imp.emit(node, label, "hmul", ins, {})
            return
        raise FsscError(
            f"{imp.src}: node {label} ({node.op_type}): one operand must be a constant (the model owner's weights)"
        )
    imp.emit(node, label, node.op_type.lower(), ins, {})


@converts("Clip")
def _clip(imp: _Importer, node, label, a) -> None:
    ins = list(node.input)
    attrs = {}
    if imp.opset < 11:  # bounds are attributes; an absent one is no bound (no comparison)
        attrs = {k: float(a[k]) for k in ("min", "max") if k in a}
    else:
        for key, idx in (("min", 1), ("max", 2)):
            if len(ins) > idx and ins[idx]:
                attrs[key] = float(imp.need_const(node, idx, label, key).reshape(()))
    imp.emit(node, label, "clip", ins[:1], attrs)


@converts("MaxPool", "AveragePool")
def _pool(imp: _Importer, node, label, a) -> None:
    op = node.op_type
    if op == "MaxPool":
        imp.unused_extra_outputs(node, label, 1)
    x_shape = imp.x_shape(node)
    nd = len(x_shape) - 2
    kernel = list(a["kernel_shape"])
    attrs = {
        "kernel_shape": kernel,
        "strides": list(a.get("strides", [1] * nd)),
        "dilations": list(a.get("dilations", [1] * nd)),
        "ceil_mode": int(a.get("ceil_mode", 0)),
    }
    attrs["pads"] = imp.pads(a, label, op, x_shape[2:], kernel, attrs["strides"], attrs["dilations"])
    if op == "AveragePool":
        attrs["count_include_pad"] = int(a.get("count_include_pad", 0))
    imp.emit(node, label, "maxpool" if op == "MaxPool" else "avgpool", list(node.input[:1]), attrs)


@converts("ReduceSum", "ReduceMean")
def _reduce(imp: _Importer, node, label, a) -> None:
    op, ins = node.op_type, list(node.input)
    r = len(imp.x_shape(node))
    if imp.opset < (13 if op == "ReduceSum" else 18):  # axes an attribute, then a constant input
        axes = [int(x) for x in a.get("axes", [])]
    elif len(ins) > 1 and ins[1]:
        axes = imp.need_const(node, 1, label, "axes (input 1)").astype(np.int64).reshape(-1).tolist()
    else:
        axes = []
    if any(not -r <= x < r for x in axes) or len({x % r for x in axes}) != len(axes):
        raise FsscError(f"{imp.src}: node {label} ({op}): axes {axes} are not distinct axes of a rank-{r} input")
    if not axes and not a.get("noop_with_empty_axes", 0):  # empty axes: all of them, unless a no-op
        axes = list(range(r))
    attrs = {"axes": sorted(x % r for x in axes), "keepdims": int(a.get("keepdims", 1))}
    imp.emit(node, label, op.lower(), ins[:1], attrs)


@converts("BatchNormalization")
def _batchnorm(imp: _Importer, node, label, a) -> None:
    imp.unused_extra_outputs(node, label, 1)
    if a.get("training_mode", 0):
        raise FsscError(f"{imp.src}: node {label} (BatchNormalization): training_mode is not supported")
    for i, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")):
        imp.need_const(node, i, label, what)
    imp.emit(node, label, "batchnorm", list(node.input[:5]), {"epsilon": float(a.get("epsilon", 1e-5))})


@converts("Flatten")
def _flatten(imp: _Importer, node, label, a) -> None:
    imp.emit(node, label, "flatten", list(node.input), {"axis": int(a.get("axis", 1))})


@converts("Reshape")
def _reshape(imp: _Importer, node, label, a) -> None:
    shp = imp.need_const(node, 1, label, "shape (input 1)").astype(np.int64).tolist()
    x_shape = imp.x_shape(node)
    out = []
    for i, d in enumerate(shp):
        out.append(x_shape[i] if d == 0 and not a.get("allowzero", 0) else d)
    if out.count(-1) == 1:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        out[out.index(-1)] = int(np.prod(x_shape, dtype=np.int64)) // max(known, 1)
    imp.emit(node, label, "reshape", list(node.input[:1]), {"shape": [int(d) for d in out]})


@converts("Concat")
def _concat(imp: _Importer, node, label, a) -> None:
    imp.emit(node, label, "concat", list(node.input), {"axis": int(a["axis"])})


@converts("Transpose")
def _transpose(imp: _Importer, node, label, a) -> None:
    r = len(imp.x_shape(node))
    perm = [int(p) for p in a.get("perm", range(r - 1, -1, -1))]
    imp.emit(node, label, "transpose", list(node.input[:1]), {"perm": perm})


def _axes(imp: _Importer, node, label, a) -> list[int] | None:
    """Squeeze's / Unsqueeze's axes: an attribute before opset 13, a constant input from 13; None if absent."""
    if imp.opset < 13:
        return [int(v) for v in a["axes"]] if "axes" in a else None
    if len(node.input) > 1 and node.input[1]:
        return [int(v) for v in imp.need_const(node, 1, label, "axes (input 1)").reshape(-1).tolist()]
    return None


def _normal_axes(imp: _Importer, node, label, axes: list[int], rank: int) -> list[int]:
    out = sorted(v % rank for v in axes if -rank <= v < rank)
    if len(out) != len(axes) or len(set(out)) != len(out):
        raise FsscError(f"{imp.src}: node {label} ({node.op_type}): axes {axes} out of range or repeated")
    return out


@converts("Squeeze", "Unsqueeze")
def _squeeze(imp: _Importer, node, label, a) -> None:
    """Both only change the shape: a reshape to the output shape."""
    x = list(imp.x_shape(node))
    axes = _axes(imp, node, label, a)
    if node.op_type == "Squeeze":
        axes = [i for i, d in enumerate(x) if d == 1] if axes is None else _normal_axes(imp, node, label, axes, len(x))
        if any(x[i] != 1 for i in axes):
            raise FsscError(f"{imp.src}: node {label} (Squeeze): axes {axes} of {tuple(x)} are not all 1")
        out = [d for i, d in enumerate(x) if i not in axes]
    else:
        if axes is None:
            raise FsscError(f"{imp.src}: node {label} (Unsqueeze): axes are required")
        out = x
        for i in _normal_axes(imp, node, label, axes, len(x) + len(axes)):
            out.insert(i, 1)
    imp.emit(node, label, "reshape", list(node.input[:1]), {"shape": out})


def _clamped(start: int, end: int, step: int, dim: int) -> tuple[int, int]:
    """ONNX Slice's index rules: negative counts from the end; a positive step clamps start and end into
    [0, dim], a negative one start into [0, dim - 1] and end into [-1, dim - 1] (-1: past the front)."""
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


@converts("Slice")
def _slice(imp: _Importer, node, label, a) -> None:
    x = imp.x_shape(node)
    if imp.opset < 10:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = a.get("axes"), None
    else:
        starts = imp.need_const(node, 1, label, "starts (input 1)").tolist()
        ends = imp.need_const(node, 2, label, "ends (input 2)").tolist()
        given = [len(node.input) > i and node.input[i] for i in (3, 4)]
        axes = imp.need_const(node, 3, label, "axes (input 3)").tolist() if given[0] else None
        steps = imp.need_const(node, 4, label, "steps (input 4)").tolist() if given[1] else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    st, en, sp = [0] * len(x), list(x), [1] * len(x)
    for axis, s, e, k in zip(axes, starts, ends, steps, strict=True):
        if not -len(x) <= axis < len(x) or k == 0:
            raise FsscError(f"{imp.src}: node {label} (Slice): axis {axis} or step {k} does not fit {tuple(x)}")
        ax = int(axis) % len(x)
        st[ax], en[ax] = _clamped(int(s), int(e), int(k), x[ax])
        sp[ax] = int(k)
    imp.emit(node, label, "slice", list(node.input[:1]), {"starts": st, "ends": en, "steps": sp})


@converts("Split")
def _split(imp: _Importer, node, label, a) -> None:
    """One slice op per output (each part is a Slice along ``axis``)."""
    x = imp.x_shape(node)
    ax = int(a.get("axis", 0)) % len(x)
    n = len(node.output)
    if "split" in a:
        sizes = [int(v) for v in a["split"]]
    elif len(node.input) > 1 and node.input[1]:
        sizes = [int(v) for v in imp.need_const(node, 1, label, "split (input 1)").tolist()]
    else:
        n = int(a.get("num_outputs", n))
        sizes = [-(-x[ax] // n)] * (n - 1) + [x[ax] - -(-x[ax] // n) * (n - 1)]
    if len(sizes) != len(node.output) or sum(sizes) != x[ax] or min(sizes) < 0:
        raise FsscError(f"{imp.src}: node {label} (Split): parts {sizes} do not split axis {ax} of {tuple(x)}")
    begin = 0
    for size, out in zip(sizes, node.output, strict=True):
        st, en = [0] * len(x), list(x)
        st[ax], en[ax] = begin, begin + size
        begin += size
        imp.emit(node, label, "slice", list(node.input[:1]), {"starts": st, "ends": en, "steps": [1] * len(x)}, [out])


@converts("Gather")
def _gather(imp: _Importer, node, label, a) -> None:
    x = imp.x_shape(node)
    ax = int(a.get("axis", 0))
    if not -len(x) <= ax < len(x):
        raise FsscError(f"{imp.src}: node {label} (Gather): axis {ax} does not fit {tuple(x)}")
    ax %= len(x)
    idx = imp.need_const(node, 1, label, "indices (input 1)").astype(np.int64)
    if idx.size and not (-x[ax] <= idx.min() and idx.max() < x[ax]):
        raise FsscError(f"{imp.src}: node {label} (Gather): indices outside axis {ax} of {tuple(x)}")
    idx = np.where(idx < 0, idx + x[ax], idx)
    imp.emit(node, label, "gather", list(node.input[:1]), {"indices": idx.tolist(), "axis": ax})


@converts("GatherND")
def _gathernd(imp: _Importer, node, label, a) -> None:
    """GatherND with constant indices (batch_dims 0), as torch's dynamo exporter writes adaptive average
    pooling to a size that does not divide the map: indices [..., K] pick along the first K axes, so it
    is a reshape merging those axes and a Gather of the flat positions (both local, no gate)."""
    x = imp.x_shape(node)
    if int(a.get("batch_dims", 0)):
        raise FsscError(f"{imp.src}: node {label} (GatherND): batch_dims {a['batch_dims']} is not supported (only 0)")
    idx = imp.need_const(node, 1, label, "indices (input 1)").astype(np.int64)
    k = idx.shape[-1] if idx.ndim else 0
    if idx.ndim < 1 or not 1 <= k <= len(x):
        raise FsscError(f"{imp.src}: node {label} (GatherND): indices of shape {idx.shape} do not fit {tuple(x)}")
    dims = np.asarray(x[:k], dtype=np.int64)
    if idx.size and not ((idx >= -dims).all() and (idx < dims).all()):
        raise FsscError(f"{imp.src}: node {label} (GatherND): indices outside the first {k} axes of {tuple(x)}")
    flat = np.ravel_multi_index(tuple(np.moveaxis(np.where(idx < 0, idx + dims, idx), -1, 0)), tuple(x[:k]))
    merged = _step(node, "merged")
    imp.emit(node, label, "reshape", list(node.input[:1]), {"shape": [int(np.prod(dims))] + list(x[k:])}, [merged])
    imp.emit(node, label, "gather", [merged], {"indices": np.asarray(flat, np.int64).tolist(), "axis": 0})


@converts("Where")
def _where(imp: _Importer, node, label, a) -> None:
    """Where with a constant condition (torch's dynamo exporter masks the padding of adaptive pools' variable
    windows with it: masked_fill): a public selection between the two operands, local."""
    cond = imp.need_const(node, 0, label, "condition (input 0)")
    for i in node.input[1:3]:
        c = imp.const(i)
        if c is not None and not np.isfinite(c).all():  # masked_fill(-inf) (attention masks, adaptive max pools)
            raise FsscError(f"{imp.src}: node {label} (Where): a non-finite constant ({i}) has no fixed-point encoding")
    imp.emit(node, label, "where", list(node.input[1:3]), {"cond": cond.astype(bool).tolist()})


@converts("Pad")
def _pad(imp: _Importer, node, label, a) -> None:
    ins = list(node.input)
    mode = a.get("mode", "constant")
    if mode != "constant":
        raise FsscError(f"{imp.src}: node {label} (Pad): mode {mode!r} is not supported (only constant 0)")
    r = len(imp.x_shape(node))
    if imp.opset < 11:
        pads, value = list(a["pads"]), float(a.get("value", 0.0))
    else:
        pads = imp.need_const(node, 1, label, "pads (input 1)").astype(np.int64).tolist()
        value = (
            float(imp.need_const(node, 2, label, "constant_value (input 2)").reshape(()))
            if len(ins) > 2 and ins[2]
            else 0.0
        )
        if len(ins) > 3 and ins[3]:
            axes = [int(x) % r for x in imp.need_const(node, 3, label, "axes (input 3)").tolist()]
            full = [0] * (2 * r)
            for j, ax in enumerate(axes):
                full[ax], full[ax + r] = pads[j], pads[j + len(axes)]
            pads = full
    if value != 0.0:
        raise FsscError(f"{imp.src}: node {label} (Pad): constant value {value} is not supported (only 0)")
    imp.emit(node, label, "pad", ins[:1], {"pads": [int(p) for p in pads]})


# Shape arithmetic, as torch's dynamo exporter writes it (a conv's zero bias as CastLike + Expand of a
# scalar to Shape(weight)[0:1], a reshape target from Shape + Gather + Concat): input shapes are static, so
# these fold to constants at import. A Cast or Expand of a secret value that changes nothing is an alias;
# any other use of them is refused.
def _np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))


def _value_dtype(imp: _Importer, name: str) -> np.dtype:
    v = imp.g.values[imp.resolve(name)]
    return np.dtype(v.data.dtype if v.data is not None else v.dtype)


def _fold_only(imp: _Importer, node, label, what: str) -> FsscError:
    return FsscError(f"{imp.src}: node {label} ({node.op_type}): {what} (fssc folds it only on constants)")


@converts("Shape", "Size")
def _shape(imp: _Importer, node, label, a) -> None:
    x = imp.x_shape(node)
    if node.op_type == "Size":
        imp.g.add_const(node.output[0], np.asarray(int(np.prod(x, dtype=np.int64)), dtype=np.int64))
        return
    r = len(x)
    start, end = int(a.get("start", 0)), int(a.get("end", r))
    start, end = min(max(start + r if start < 0 else start, 0), r), min(max(end + r if end < 0 else end, 0), r)
    imp.g.add_const(node.output[0], np.asarray(x[start:end], dtype=np.int64))


@converts("ConstantOfShape")
def _constant_of_shape(imp: _Importer, node, label, a) -> None:
    shape = imp.need_const(node, 0, label, "shape (input 0)").astype(np.int64).reshape(-1)
    fill = numpy_helper.to_array(a["value"]).reshape(-1) if "value" in a else np.zeros(1, np.float32)
    imp.g.add_const(node.output[0], np.full(tuple(int(d) for d in shape), fill[0], dtype=fill.dtype))


@converts("Expand")
def _expand(imp: _Importer, node, label, a) -> None:
    shape = tuple(int(d) for d in imp.need_const(node, 1, label, "shape (input 1)").astype(np.int64).reshape(-1))
    x = imp.const(node.input[0])
    x_shape = imp.x_shape(node)
    try:
        out = np.broadcast_shapes(x_shape, shape)
    except ValueError:
        raise FsscError(f"{imp.src}: node {label} (Expand): {tuple(x_shape)} does not broadcast to {shape}") from None
    if x is not None:
        imp.g.add_const(node.output[0], np.broadcast_to(x, out).copy())
    elif out == tuple(x_shape):
        imp.alias[node.output[0]] = imp.resolve(node.input[0])
    else:
        raise _fold_only(imp, node, label, f"broadcasting a computed {tuple(x_shape)} to {out} is not supported")


@converts("Cast", "CastLike")
def _cast(imp: _Importer, node, label, a) -> None:
    to = _np_dtype(int(a["to"])) if node.op_type == "Cast" else _value_dtype(imp, node.input[1])
    x = imp.const(node.input[0])
    if x is not None:
        imp.g.add_const(node.output[0], x.astype(to))
    elif _value_dtype(imp, node.input[0]) == to:
        imp.alias[node.output[0]] = imp.resolve(node.input[0])
    else:
        raise _fold_only(imp, node, label, f"casting a computed value to {to} is not supported")


@converts("ArgMax")
def _argmax(imp: _Importer, node, label, a) -> None:
    attrs = {
        "axis": int(a.get("axis", 0)),
        "keepdims": int(a.get("keepdims", 1)),
        "select_last_index": int(a.get("select_last_index", 0)),
    }
    imp.emit(node, label, "argmax", list(node.input), attrs)


def _step(node, what: str) -> str:
    """The ONNX-style name of an intermediate value of a node that becomes several IR ops."""
    return f"{node.output[0]}/{what}"


def _add_const(imp: _Importer, node, what: str, data: np.ndarray) -> str:
    name = imp.g.fresh_name(_step(node, what))
    imp.g.add_const(name, np.asarray(data, dtype=np.float32))
    return name


@converts("LeakyRelu")
def _leakyrelu(imp: _Importer, node, label, a) -> None:
    """alpha x + (1 - alpha) relu(x): one ReLU gate; the public scalings (``pmul``) and the add are local."""
    alpha = float(a.get("alpha", 0.01))
    x = node.input[0]
    imp.emit(node, label, "pmul", [x], {"factor": alpha}, [_step(node, "alpha_x")])
    imp.emit(node, label, "relu", [x], {}, [_step(node, "relu")])
    imp.emit(node, label, "pmul", [_step(node, "relu")], {"factor": 1.0 - alpha}, [_step(node, "relu_scaled")])
    imp.emit(node, label, "add", [_step(node, "alpha_x"), _step(node, "relu_scaled")], {})


@converts("PRelu")
def _prelu(imp: _Importer, node, label, a) -> None:
    """slope x + (1 - slope) relu(x): one ReLU gate and two products with the model owner's slopes
    (``mul``, the linear-layer protocol: the slopes never reach the data owner)."""
    slope = imp.need_const(node, 1, label, "slope (input 1, the model owner's weights)").astype(np.float64)
    x = node.input[0]
    imp.emit(node, label, "mul", [x, node.input[1]], {}, [_step(node, "slope_x")])
    imp.emit(node, label, "relu", [x], {}, [_step(node, "relu")])
    rest = _add_const(imp, node, "one_minus_slope", 1.0 - slope)
    imp.emit(node, label, "mul", [_step(node, "relu"), rest], {}, [_step(node, "relu_scaled")])
    imp.emit(node, label, "add", [_step(node, "slope_x"), _step(node, "relu_scaled")], {})


@converts("Div")
def _div(imp: _Importer, node, label, a) -> None:
    """x / c with the model owner's constant c: a ``mul`` by 1/c (float64, then encoded at the layer's weight
    scale: off by at most |x| 2^-(wscale + 1) before the later truncation). A secret divisor is refused."""
    ins = list(node.input)
    c = imp.const(ins[1])
    if c is None:
        raise FsscError(f"{imp.src}: node {label} (Div): the divisor (input 1) must be a constant initializer")
    c = np.asarray(c, dtype=np.float64)
    if not np.all(np.isfinite(c)) or np.any(c == 0):
        raise FsscError(f"{imp.src}: node {label} (Div): the divisor must be finite and non-zero")
    x = imp.const(ins[0])
    if x is not None:  # both constant (shape arithmetic, e.g. torch's traced chunk): fold, ONNX's semantics;
        # an integer Div truncates (the output's element type from ONNX shape inference: a folded Gather or
        # Add is stored as float32)
        gp = imp.model.graph
        types = {v.name: v.type.tensor_type.elem_type for v in list(gp.value_info) + list(gp.output)}
        integer = np.issubdtype(_np_dtype(types.get(node.output[0], TensorProto.FLOAT)), np.integer)
        q = x.astype(np.float64) / c
        imp.g.add_const(imp.ir_name(node.output[0]), np.trunc(q).astype(np.int64) if integer else q.astype(np.float32))
        return
    imp.emit(node, label, "mul", [ins[0], _add_const(imp, node, "reciprocal", 1.0 / c)], {})


@converts("LayerNormalization")
def _layernorm(imp: _Importer, node, label, a) -> None:
    """Normalization over the last axis (``layernorm``, a composite gate), then the model owner's scale as a
    linear layer (``mul``: P0 only sees it masked) and bias as a constant of P1's (``add``); normalizing over
    several trailing axes is a reshape to one axis and back."""
    imp.unused_extra_outputs(node, label, 1)
    x_shape = tuple(imp.x_shape(node))
    r = len(x_shape)
    axis = int(a.get("axis", -1))
    if not -r <= axis < r:
        raise FsscError(f"{imp.src}: node {label} (LayerNormalization): axis {axis} does not fit {x_shape}")
    axis %= r
    ins = list(node.input)
    scale = imp.need_const(node, 1, label, "scale (input 1, the model owner's weights)")
    if len(ins) > 2 and ins[2]:
        imp.need_const(node, 2, label, "bias (input 2, the model owner's weights)")
    folded = imp.const(ins[0])
    if folded is not None:  # a constant input: fold, ONNX's semantics
        x = folded.astype(np.float64)
        axes = tuple(range(axis, r))
        d = x - x.mean(axis=axes, keepdims=True)
        y = d / np.sqrt((d * d).mean(axis=axes, keepdims=True) + float(a.get("epsilon", 1e-5))) * scale
        if len(ins) > 2 and ins[2]:
            y = y + imp.const(ins[2])
        imp.g.add_const(imp.ir_name(node.output[0]), y.astype(np.float32))
        return
    src = ins[0]
    if axis != r - 1:  # over the axes from ``axis`` on: one axis of their product
        flat = (*x_shape[:axis], int(np.prod(x_shape[axis:], dtype=np.int64)))
        imp.emit(node, label, "reshape", [src], {"shape": list(flat)}, [_step(node, "flat")])
        src = _step(node, "flat")
    eps = float(a.get("epsilon", 1e-5))
    imp.emit(node, label, "layernorm", [src], {"epsilon": eps}, [_step(node, "normalized")])
    y = _step(node, "normalized")
    if axis != r - 1:
        imp.emit(node, label, "reshape", [y], {"shape": list(x_shape)}, [_step(node, "unflat")])
        y = _step(node, "unflat")
    last = not (len(ins) > 2 and ins[2])
    imp.emit(node, label, "mul", [y, ins[1]], {}, None if last else [_step(node, "scaled")])
    if not last:
        imp.emit(node, label, "add", [_step(node, "scaled"), ins[2]], {})


@converts("Softmax")
def _softmax(imp: _Importer, node, label, a) -> None:
    attrs = {"axis": int(a.get("axis", 1 if imp.opset < 13 else -1)), "coerce": int(imp.opset < 13)}
    imp.emit(node, label, "softmax", list(node.input), attrs)


@converts("HardSigmoid")
def _hardsigmoid(imp: _Importer, node, label, a) -> None:
    attrs = {"alpha": float(a.get("alpha", 0.2)), "beta": float(a.get("beta", 0.5))}
    imp.emit(node, label, "hardsigmoid", list(node.input[:1]), attrs)


@converts("Gelu")
def _gelu(imp: _Importer, node, label, a) -> None:
    approx = a.get("approximate", "none")
    if approx not in ("none", "tanh"):
        raise FsscError(f"{imp.src}: node {label} (Gelu): approximate={approx!r} is not supported (none, tanh)")
    imp.emit(node, label, "gelu", list(node.input[:1]), {"approximate": approx})


def _scalar_consts(gp: onnx.GraphProto) -> dict[str, float]:
    """Single-element constants (initializers and Constant nodes) by value name."""
    out: dict[str, float] = {}
    arrays = [(t.name, numpy_helper.to_array(t)) for t in gp.initializer]
    for n in gp.node:
        if n.op_type == "Constant" and n.output:
            for at in n.attribute:
                if at.name == "value":
                    arrays.append((n.output[0], numpy_helper.to_array(at.t)))
                elif at.name == "value_float":
                    arrays.append((n.output[0], np.asarray(at.f)))
    for name, arr in arrays:
        if arr.size == 1 and arr.dtype.kind == "f":
            out[name] = float(arr.reshape(()))
    return out


def fusions(gp: onnx.GraphProto) -> tuple[dict[int, tuple[str, str, dict, list[str]]], set[int]]:
    """Activations exported as elementary ops, found by their patterns, each to become one spline op:

    * SiLU: Mul(x, Sigmoid(x)) (either operand order); the Sigmoid stays if something else reads it;
    * GELU (erf form): Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5), with Mul(x, 1/sqrt 2) for the Div, the
      0.5 on either Mul (Mul(Mul(x, 0.5), Add(...))) and any operand order; every value inside it read once;
    * GELU (tanh form, torch's approximate='tanh'): the same with Tanh(Mul(sqrt(2/pi), Add(x, Mul(0.044715,
      x^3)))) in place of the Erf, x^3 as Mul(x, Mul(x, x)) or Pow(x, 3).

    Returns ({index of the pattern's last node: (kind, x, attrs, the pattern's node labels)}, indices of the
    other nodes it absorbs)."""
    nodes = list(gp.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for v in n.input:
            readers.setdefault(v, []).append(i)
    outputs = {o.name for o in gp.output}
    consts = _scalar_consts(gp)

    def node_of(v: str, op_type: str) -> onnx.NodeProto | None:
        i = producer.get(v)
        return (
            nodes[i] if i is not None and nodes[i].op_type == op_type and nodes[i].domain in ("", "ai.onnx") else None
        )

    def read_once(v: str) -> bool:
        return len(readers.get(v, [])) == 1 and v not in outputs

    def near(v: str, want: float) -> bool:
        return v in consts and abs(consts[v] - want) <= 1e-6 * max(1.0, abs(want))

    def other(n: onnx.NodeProto, v: str) -> str | None:
        """The other operand of a binary node that reads v."""
        ins = list(n.input)
        return ins[1] if len(ins) == 2 and ins[0] == v else ins[0] if len(ins) == 2 and ins[1] == v else None

    def scaled_input(v: str) -> str | None:
        """x for v = Div(x, sqrt 2) or Mul(x, 1/sqrt 2), v read once."""
        for op_type, c in (("Div", math.sqrt(2.0)), ("Mul", 1.0 / math.sqrt(2.0))):
            n = node_of(v, op_type)
            if n is not None and len(n.input) == 2:
                if near(n.input[1], c):
                    return n.input[0]
                if op_type == "Mul" and near(n.input[0], c):
                    return n.input[1]
        return None

    fused: dict[int, tuple[str, str, dict, list[str]]] = {}
    absorbed: set[int] = set()
    label = {i: _node_label(n, i) for i, n in enumerate(nodes)}
    for i, n in enumerate(nodes):
        if n.op_type != "Mul" or n.domain not in ("", "ai.onnx") or len(n.input) != 2 or i in absorbed:
            continue
        for x, s in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            sig = node_of(s, "Sigmoid")
            if sig is not None and sig.input[0] == x and x != s:
                fused[i] = ("silu", x, {}, [label[producer[s]], label[i]])
                if read_once(s):
                    absorbed.add(producer[s])
                break

    def cubic_input(v: str) -> tuple[str, list[int]] | None:
        """(x, the nodes) for v = Mul(sqrt(2/pi), Add(x, Mul(0.044715, x^3))), x^3 as Mul(x, Mul(x, x)) or
        Pow(x, 3), in any operand order, every value inside read once."""
        b = node_of(v, "Mul")
        if b is None or len(b.input) != 2:
            return None
        a_v = b.input[1] if near(b.input[0], math.sqrt(2 / math.pi)) else b.input[0]
        if not near(other(b, a_v) or "", math.sqrt(2 / math.pi)):
            return None
        a = node_of(a_v, "Add")
        if a is None or not read_once(a_v):
            return None
        for x, q_v in ((a.input[0], a.input[1]), (a.input[1], a.input[0])):
            q = node_of(q_v, "Mul")
            if q is None or not read_once(q_v) or len(q.input) != 2:
                continue
            p3_v = q.input[1] if near(q.input[0], 0.044715) else q.input[0]
            if not near(other(q, p3_v) or "", 0.044715) or not read_once(p3_v):
                continue
            p3 = node_of(p3_v, "Mul") or node_of(p3_v, "Pow")
            if p3 is None:
                continue
            if p3.op_type == "Pow":
                if p3.input[0] == x and near(p3.input[1], 3.0):
                    return x, [producer[v], producer[a_v], producer[q_v], producer[p3_v]]
                continue
            p2_v = other(p3, x)
            p2 = node_of(p2_v, "Mul") if p2_v else None
            if p2_v and p2 is not None and read_once(p2_v) and list(p2.input) == [x, x]:
                return x, [producer[v], producer[a_v], producer[q_v], producer[p3_v], producer[p2_v]]
        return None

    for i, n in enumerate(nodes):
        if n.op_type not in ("Erf", "Tanh") or i in absorbed or not read_once(n.output[0]):
            continue
        if not read_once(n.input[0]):
            continue
        if n.op_type == "Erf":
            x = scaled_input(n.input[0])
            inner = [producer[n.input[0]]] if x is not None else []
        else:
            found = cubic_input(n.input[0])
            x, inner = found if found is not None else (None, [])
        if x is None:
            continue
        add_i = readers[n.output[0]][0]
        add = nodes[add_i]
        one = other(add, n.output[0]) if add.op_type == "Add" else None
        if one is None or not near(one, 1.0) or not read_once(add.output[0]):
            continue
        m1_i = readers[add.output[0]][0]
        m1 = nodes[m1_i]
        h = other(m1, add.output[0]) if m1.op_type == "Mul" else None
        if h is None:
            continue
        chain = [*inner, i, add_i]
        if h == x and read_once(m1.output[0]):  # (x (1 + erf)) * 0.5
            m2_i = readers[m1.output[0]][0]
            m2 = nodes[m2_i]
            half = other(m2, m1.output[0]) if m2.op_type == "Mul" else None
            if half is None or not near(half, 0.5):
                continue
            chain, root = chain + [m1_i], m2_i
        else:  # (x * 0.5) (1 + erf)
            hn = node_of(h, "Mul")
            if hn is None or not read_once(h) or not any(near(o, 0.5) for o in hn.input) or x not in hn.input:
                continue
            chain, root = chain + [producer[h]], m1_i
        if root in fused or any(j in fused or j in absorbed for j in chain):
            continue
        approx = "none" if n.op_type == "Erf" else "tanh"
        fused[root] = ("gelu", x, {"approximate": approx}, [label[j] for j in sorted(chain + [root])])
        absorbed.update(chain)
    _layernorm_fusions(gp, nodes, producer, node_of, read_once, near, consts, label, fused, absorbed)
    return fused, absorbed


def _layernorm_fusions(gp, nodes, producer, node_of, read_once, near, consts, label, fused, absorbed) -> None:
    """Layer normalization as exporters write it before opset 17: Div(d, Sqrt(Add(ReduceMean(Pow(d, 2)), eps)))
    with d = Sub(x, ReduceMean(x)), both means over x's last axis with keepdims (either eps operand order); every
    value inside read only where the pattern reads it. It becomes one ``layernorm`` op (the scale's Mul and the
    bias's Add after it stay the graph's own nodes)."""
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*gp.input, *gp.value_info, *gp.output]}
    axes_of = {t.name: numpy_helper.to_array(t) for t in gp.initializer}
    for n in gp.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            axes_of[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def mean_over_last(v: str, x: str) -> bool:
        m = node_of(v, "ReduceMean")
        if m is None or m.input[0] != x or x not in ranks:
            return False
        a = {at.name: helper.get_attribute_value(at) for at in m.attribute}
        axes = a.get("axes")
        if axes is None and len(m.input) > 1 and m.input[1] in axes_of:
            axes = axes_of[m.input[1]].reshape(-1).tolist()
        r = ranks[x]
        return a.get("keepdims", 1) == 1 and axes is not None and [int(q) % r for q in axes] == [r - 1]

    for i, n in enumerate(nodes):
        if n.op_type != "Div" or n.domain not in ("", "ai.onnx") or i in absorbed or i in fused or len(n.input) != 2:
            continue
        d, s = n.input
        sub, sq = node_of(d, "Sub"), node_of(s, "Sqrt")
        if sub is None or sq is None or not read_once(s):
            continue
        x, mean = sub.input
        add = node_of(sq.input[0], "Add")
        if add is None or not mean_over_last(mean, x) or not read_once(mean) or not read_once(sq.input[0]):
            continue
        var, eps = (add.input[0], add.input[1]) if add.input[1] in consts else (add.input[1], add.input[0])
        if eps not in consts or not read_once(var):
            continue
        pw = node_of(var, "ReduceMean")
        sqr = pw.input[0] if pw is not None else ""
        pnode = node_of(sqr, "Pow") or node_of(sqr, "Mul")
        if pw is None or pnode is None or not mean_over_last(var, sqr) or not read_once(sqr):
            continue
        if not (
            list(pnode.input) == [d, d]
            or (pnode.op_type == "Pow" and pnode.input[0] == d and near(pnode.input[1], 2.0))
        ):
            continue
        readers = [j for j, m in enumerate(nodes) if d in m.input]
        if sorted(readers) != sorted({producer[sqr], i}) or any(o.name == d for o in gp.output):
            continue
        chain = [producer[v] for v in (mean, d, sqr, var, sq.input[0], s)]
        if any(j in fused or j in absorbed for j in chain):
            continue
        fused[i] = ("layernorm", x, {"epsilon": float(consts[eps])}, [label[j] for j in sorted(chain + [i])])
        absorbed.update(chain)


for _type, _conv_fn in default_converters(OPS).items():
    CONVERTERS.setdefault(_type, _conv_fn)  # an entry above (attributes to translate, checks) wins

# Shape arithmetic the importer folds on constants only (see above): converters, but not ops fssc computes, so
# not in SUPPORTED (the ONNX conformance table and its backend cases, which feed them computed inputs)
FOLDED_ONLY = frozenset({"Cast", "CastLike", "ConstantOfShape", "Expand", "Shape", "Size"})
SUPPORTED: tuple[str, ...] = tuple(sorted(set(CONVERTERS) - FOLDED_ONLY))
