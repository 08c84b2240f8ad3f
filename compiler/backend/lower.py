"""Lowering: a compiled IR graph -> the secure program's statements.

Each IR op becomes one statement (``Stmt``) over program variables ``v0,
v1, ...``: ``input``, ``linear`` (an op with the model owner's weights:
the linear-layer protocol), a comparison gate (``relu``, ``trunc``,
``maxpool``, ``clip``, ``argmax2`` for two classes, ``argmax`` for more), a
``local`` op (public and linear: runs on masks and masked values alike) or
``output``. A constant operand of a local op (add, sub, concat) is the model
owner's: a ``const`` statement before the op makes it a masked wire (P1
sends c + r_c, r_c from the dealer), which the op then takes like any other.
The statements are role-independent; code generation renders them for P0,
P1 and the dealer, and the program hash is computed over them (public
parameters only), so the three programs agree on it by construction.
:func:`check_program` re-infers every statement's shape with the runtime's
own functions before anything is written.

The model owner's constants are encoded here into ring elements (weights at
``wscale``, biases at the output scale, constant operands at the scale of the
values they join) and go to P1's weights file only.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from fssc.compiler.backend.contract import bind_operands
from fssc.compiler.backend.gates import gate_tag
from fssc.compiler.ir.graph import Graph, Op
from fssc.compiler.ir.ops import OPS, Bilinear, Role
from fssc.passes.base import PassContext
from fssc.passes.plan_fixed_point import weight_bits
from fssc.runtime import lib, ring
from fssc.runtime.gates import STATEMENTS

from fssc import __version__
from fssc.errors import FsscError

PROTOCOL_VERSION = 1


@dataclass
class Stmt:
    kind: str
    out: str | None
    args: list[str]
    params: dict
    tag: str
    comment: str
    p1: dict = field(default_factory=dict)  # P1-only parameters (derived from the weights)

    @property
    def label(self) -> str:
        """The op a statement came from, as its comment names it ("concat %h")."""
        return self.comment.split(" [")[0]

    def public(self) -> dict:
        d = asdict(self)
        d.pop("p1")
        d.pop("comment")
        return d


@dataclass
class SecureProgram:
    name: str
    stmts: list[Stmt]
    inputs: list[dict]
    outputs: list[dict]
    frac_bits: int
    weights: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    ir_shapes: dict[str, tuple] = field(repr=False, default_factory=dict)  # var -> its IR value's shape

    @property
    def linears(self) -> list[Stmt]:
        return [s for s in self.stmts if s.kind == "linear"]

    def public(self) -> dict:
        return {
            "name": self.name,
            "protocol": PROTOCOL_VERSION,
            "fssc": __version__,
            "ring": 64,
            "frac_bits": self.frac_bits,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "stmts": [s.public() for s in self.stmts],
        }

    @property
    def hash(self) -> str:
        blob = json.dumps(self.public(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


def is_weighted(op: Op, graph: Graph) -> bool:
    """Ops computed with the model owner's weights (the linear-layer protocol)."""
    d = OPS.get(op.kind)
    return d is not None and d.role is Role.LINEAR


def _comment(op: Op, graph: Graph) -> str:
    v = graph.values[op.outputs[0]]
    shape = "x".join(map(str, v.shape))
    src = ", ".join(op.origin) if op.origin else "-"
    extra = f" s={v.scale}" if v.scale is not None else ""
    return f"{op.kind} %{op.outputs[0]} [{shape}]{extra} <- {src} ({op.created_by})"


def _bilinear(op: Op, graph: Graph, x_name: str) -> Bilinear:
    d = OPS.get(op.kind)
    if d is None or d.bilinear is None:
        raise FsscError(f"{op.kind} %{op.name} is not a linear layer with weights")
    return d.bilinear(op, graph, x_name)


def _encode_linear(op: Op, graph: Graph, x_name: str, bl: Bilinear) -> tuple[np.ndarray, np.ndarray | None]:
    """P1's ring encodings of a weighted op: W at ``wscale`` and the bias at the output scale."""
    s_in = graph.values[x_name].fixed_scale
    out_shape = graph.values[op.outputs[0]].shape
    ws = op.attrs["wscale"]
    w_enc = ring.encode(graph.values[bl.w].array.astype(np.float64), ws)
    b_enc = None
    if bl.b is not None:
        b = graph.values[bl.b].array.astype(np.float64)
        if bl.channel_bias:
            b = b.reshape((1, -1) + (1,) * (len(out_shape) - 2))
        b_enc = np.broadcast_to(ring.encode(b, s_in + ws), out_shape).copy()
    return w_enc, b_enc


def _encode_const(op: Op, graph: Graph, name: str) -> np.ndarray:
    """P1's constant operand of a local op, at the scale of the secret values it joins."""
    s = next(graph.values[i].fixed_scale for i in op.inputs if not graph.values[i].is_const)
    return ring.encode(graph.values[name].array.astype(np.float64), s)


def _public_weight_bits(op: Op, graph: Graph, w_enc: np.ndarray) -> int:
    """P1's operand width for the layer's exact products, from public values only (the weight scale and
    the public bound on |W|), so its limb counts and time do not depend on the weights; a weight beyond
    the bound is refused here (one line), never multiplied wrongly."""
    bound = graph.meta.get("weight_bound_bits", PassContext.weight_bound_bits)
    bits = weight_bits(op.attrs["wscale"], bound)
    if ring.signed_bits(w_enc) > bits:
        big = float(np.abs(ring.signed(w_enc)).max()) / 2.0 ** op.attrs["wscale"]
        raise FsscError(
            f"{op.kind} %{op.name}: a weight of magnitude {big:.4g} is beyond the public bound 2^{bound}; "
            f"recompile with --weight-bound-bits {math.floor(math.log2(big)) + 1} or more"
        )
    return bits


def lower(graph: Graph, with_weights: bool = True) -> SecureProgram:
    """Statements for the compiled graph. ``with_weights=False`` for a graph without constants' bytes."""
    var: dict[str | tuple, str] = {}

    def new_var(name: str | tuple) -> str:
        var[name] = f"v{len(var)}"
        return var[name]

    stmts: list[Stmt] = []
    weights: dict[str, np.ndarray] = {}
    inputs = []
    for name in graph.inputs:
        v = graph.values[name]
        stmts.append(
            Stmt(
                "input",
                new_var(name),
                [],
                {"name": name, "shape": list(v.shape)},
                f"in.{name}",
                f"input %{name} [{'x'.join(map(str, v.shape))}] s={v.scale} (the data owner's)",
            )
        )
        inputs.append({"name": name, "var": var[name], "shape": list(v.shape), "scale": v.scale})
    for op in graph.ops:
        k = op.kind
        tag = gate_tag(op)
        secret = [i for i in op.inputs if not graph.values[i].is_const]
        comment = _comment(op, graph)
        args = [var[i] for i in secret]
        g = op.gate or {}
        d = OPS.get(k)
        if d is None or d.role is Role.FOLDED:
            raise FsscError(f"op kind {k} (%{op.name}) is not supported by the secure runtime")
        if d.role is Role.GATE and not g:
            raise FsscError(f"{k} %{op.name} has no gate plan (the mark-comparisons pass should have run)")
        if d.role is Role.LINEAR:
            bl = _bilinear(op, graph, secret[0])
            params = {
                "fn": bl.fn,
                "fn_args": bl.fn_args,
                "k": bl.k,
                "x_shape": list(graph.values[secret[0]].shape),
                "y_shape": list(graph.values[op.outputs[0]].shape),
                "w_shape": list(graph.values[bl.w].shape),
                "bias": bl.b is not None,
            }
            st = Stmt("linear", new_var(op.outputs[0]), args, params, tag, comment)
            if with_weights:
                w_enc, b_enc = _encode_linear(op, graph, secret[0], bl)
                weights[tag + ".w"] = w_enc
                st.p1["w_bits"] = _public_weight_bits(op, graph, w_enc)
                if b_enc is not None:
                    weights[tag + ".b"] = b_enc
            stmts.append(st)
        elif d.role is Role.GATE:
            assert d.gate is not None and d.lower is not None
            params = d.lower(op, graph, g["bits"])
            kind = d.gate.runtime(op, graph).stmt
            stmts.append(Stmt(kind, new_var(op.outputs[0]), args, params, tag, comment))
        else:  # a local op
            assert d.lower is not None
            args = []
            for pos, i in enumerate(op.inputs):  # every operand, in order; P1's constants as masked wires
                if not graph.values[i].is_const:
                    args.append(var[i])
                    continue
                c_tag = f"{tag}.c{pos}"
                c_var = new_var(("const", c_tag))  # a wire of its own, not an IR value
                c = graph.values[i]
                stmts.append(
                    Stmt(
                        "const",
                        c_var,
                        [],
                        {"shape": list(c.shape)},
                        c_tag,
                        f"constant %{i} [{'x'.join(map(str, c.shape))}] of {k} %{op.name}: "
                        f"the model owner's, sent masked",
                    )
                )
                if with_weights:
                    weights[c_tag] = _encode_const(op, graph, i)
                args.append(c_var)
            stmts.append(Stmt("local", new_var(op.outputs[0]), args, d.lower(op, graph), tag, comment))
    outputs = []
    plain = {
        st.out for st in stmts if st.kind in STATEMENTS and STATEMENTS[st.kind].plain_output
    }  # results P0 already holds unmasked
    for o in graph.outputs:
        v = graph.values[o]
        is_label = v.dtype == "int64"
        outputs.append(
            {
                "name": o,
                "var": var[o],
                "shape": list(v.shape),
                "scale": v.scale,
                "kind": "labels" if is_label else "logits",
                "masked": var[o] not in plain,
            }
        )
        if var[o] not in plain:
            stmts.append(
                Stmt(
                    "output", None, [var[o]], {"name": o, "scale": v.scale}, f"out.{o}", f"output %{o} (P0 unmasks it)"
                )
            )
    ir_shapes = {v: tuple(graph.values[name].shape) for name, v in var.items() if isinstance(name, str)}
    prog = SecureProgram(graph.name, stmts, inputs, outputs, graph.meta.get("frac_bits", 12), weights, ir_shapes)
    check_program(prog)
    return prog


# ------------------------------------------------------------ the lowering verifier
def _shape_of(st: Stmt, ins: list[np.ndarray]) -> tuple:
    """The statement's output shape by the runtime's own rules: the functions the generated programs call,
    run on zeros (the bilinear maps on zero floats; no protocol)."""
    p = st.params
    if st.kind in ("input", "const"):
        return tuple(p["shape"])
    if st.kind == "linear":
        fn = getattr(lib, p["fn"])(**p["fn_args"])
        if tuple(ins[0].shape) != tuple(p["x_shape"]):
            raise FsscError(f"its operand has shape {ins[0].shape}, the statement expects {tuple(p['x_shape'])}")
        x, w = np.zeros(p["x_shape"]), np.zeros(p["w_shape"])
        per_row = p["fn"] in ("conv", "channelwise")  # maps each batch row alike: one row, then N of them
        y = (x.shape[0], *fn(x[:1], w).shape[1:]) if per_row else fn(x, w).shape
        if tuple(y) != tuple(p["y_shape"]):
            raise FsscError(f"lib.{p['fn']} gives {tuple(y)}, the statement claims {tuple(p['y_shape'])}")
        return tuple(y)
    if st.kind in STATEMENTS:
        return STATEMENTS[st.kind].out_shape(*[i.shape for i in ins], **p)
    if st.kind == "local":
        kw = {k: v for k, v in p.items() if k != "fn"}
        return getattr(lib, p["fn"])(**bind_operands(p["fn"], kw, ins), **kw).shape
    raise FsscError(f"unknown statement kind {st.kind!r}")


def check_program(prog: SecureProgram) -> None:
    """Refuse a program that disagrees with the IR: every operand defined before use, secret wires only into
    gates and linear layers (a constant of the model owner's is a wire of its own, for local ops only), and
    every statement's output shape, re-inferred with the runtime's functions, equal to its IR value's."""
    shapes: dict[str, np.ndarray] = {}  # var -> zeros of its shape (broadcast views: no memory)
    consts: set[str] = set()
    for st in prog.stmts:
        for a in st.args:
            if a not in shapes:
                raise FsscError(f"lowering: {st.label} reads {a} before any statement defines it")
        if st.kind in STATEMENTS or st.kind == "linear":
            want_args = len(getattr(STATEMENTS.get(st.kind), "operands", ("x",)))
            if len(st.args) != want_args:
                raise FsscError(
                    f"lowering: {st.label} ({st.kind}) takes {want_args} secret operand(s), got {len(st.args)}"
                )
            if any(a in consts for a in st.args):
                raise FsscError(
                    f"lowering: {st.label} ({st.kind}) cannot take the model owner's constant as its operand"
                )
        if st.kind == "output":
            continue
        try:
            shape = _shape_of(st, [shapes[a] for a in st.args])
        except FsscError as e:
            raise FsscError(f"lowering: {st.label} ({st.kind}): {e}") from None
        except (ValueError, TypeError, IndexError, KeyError) as e:
            raise FsscError(
                f"lowering: {st.label} ({st.kind}): the runtime cannot take its operands "
                f"{[tuple(shapes[a].shape) for a in st.args]}: {type(e).__name__}: {e}"
            ) from None
        if st.out is None:
            continue  # an output statement: it defines nothing
        want = prog.ir_shapes.get(st.out) if st.kind != "const" else tuple(st.params["shape"])
        if want is None or tuple(shape) != tuple(want):
            raise FsscError(f"lowering: {st.label} ({st.kind}) gives shape {tuple(shape)}, the IR says {want}")
        shapes[st.out] = np.broadcast_to(np.zeros((), dtype=np.uint64), shape)
        if st.kind == "const":
            consts.add(st.out)
