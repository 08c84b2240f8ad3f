"""Fixed-point planning: a scale for every value and where truncation happens.

Rewrite rule (each op kind's rule is its registry entry's ``scale``,
:class:`fssc.compiler.ir.ops.Scale`). Inputs are encoded at scale f. Constants are encoded where they
are used: weights and multipliers at scale f (``wscale``), biases and added
constants at the scale of the value they join. Then, in program order:

* a linear op with a constant operand (conv, gemm, matmul, mul, batchnorm,
  affine, avgpool, globalavgpool) adds its weight scale ``wscale`` to its
  input's scale. Public multipliers (pools' 1/k) use f (+ ``wscale_extra``
  bits set by fold-public-scaling); the model owner's weights use
  f + ``weight_extra_bits`` (5) more, independent of their values (see
  ``weight_scale``), so small weights keep their precision. Every weight must
  satisfy the public bound |W| < 2^``weight_bound_bits`` (``weight_bits``); If an input above scale f
  would pass ``max_scale`` (2f by default), a ``trunc`` op first brings it
  back to f;
* add, sub and concat of two secret values align scales by ``upscale`` (a
  local multiplication by 2^k, exact) of the lower-scale operand;
* relu on a value above scale f absorbs the truncation: its ``trunc``
  attribute says how many bits the comparison gate drops (docs/protocol.md, section 6,
  fused truncation), and its output is at scale f;
* a product of two secret values (``hmul``) is at s_x + s_y; if that would pass
  ``max_scale``, the operands above f are first truncated to f (so it is at most 2f
  unless an operand sits below f), and later truncations bring it down like a
  linear layer's output;
* maxpool, clip, pad, flatten, reshape and the sum pools keep their input's scale; argmax
  outputs integers (scale 0);
* a spline gate (sigmoid, tanh, SiLU, GELU...) takes its input at scale min(f, 14) (a ``trunc`` first
  if it is above) and outputs scale f;
* graph outputs keep whatever scale they have; the decoder reads it.

Semantics: the float meaning of every value is unchanged; truncation is
floor division by 2^k, exactly what the secure gates compute.
"""

from __future__ import annotations

from fssc.compiler.ir.graph import Graph, Value
from fssc.compiler.ir.ops import OPS, Scale
from fssc.compiler.ir.splines import input_scale as spline_input_scale
from fssc.passes.base import COMPARISONS_MARKED, FIXED_POINT, RANGES, PassContext, PassResult

from fssc.errors import FsscError

NAME = "plan-fixed-point"
REQUIRES: frozenset[str] = frozenset()
ENSURES = frozenset({FIXED_POINT})
INVALIDATES = frozenset({RANGES, COMPARISONS_MARKED})  # truncations move: the measured ranges are stale


def weight_scale(op, ctx: PassContext) -> int:
    """Fractional bits for a layer's constant multiplier.

    Public multipliers (pools' 1/k) use f (+ ``wscale_extra`` from
    fold-public-scaling). The model owner's weights use f + ``weight_extra_bits``
    (+ ``wscale_extra``) whatever their values: the scale is part of the public
    program, so it must not depend on the weights (a per-layer choice from
    max|W| would tell the data owner each layer's largest weight to a factor
    of 2). Weights encoded at f bits alone would lose most of their precision
    (a weight of 0.01 is 41 units at f = 12).
    """
    base = ctx.frac_bits + op.attrs.get("wscale_extra", 0)
    return base + ctx.weight_extra_bits if OPS[op.kind].scale is Scale.WEIGHTED else base


def weight_bits(wscale: int, bound_bits: int) -> int:
    """Signed bit width of every encoded weight of a layer: |W| < 2^bound_bits at scale wscale.

    Public (the scale and the bound are), so P1's float64 limb counts (``ring.plan_limbs``), and with
    them its online time, do not depend on the weights' values; a weight beyond the bound is a compile
    error (``fssc.compiler.backend.lower``), never a wrong product.
    """
    return wscale + bound_bits + 1


def run(graph: Graph, ctx: PassContext) -> PassResult:
    before = _planned_state(graph)
    f = ctx.frac_bits
    smax = ctx.max_scale
    scale: dict[str, int] = dict.fromkeys(graph.inputs, f)
    new_ops = []

    def rescale(name: str, target: int, op) -> str:
        """Insert trunc/upscale so value `name` reaches scale `target`; return the new name."""
        cur = scale[name]
        if cur == target:
            return name
        v = graph.values[name]
        out = graph.fresh_name(f"{name}.{'trunc' if cur > target else 'up'}{abs(cur - target)}")
        graph.add_value(Value(out, v.shape, v.dtype))
        k = "trunc" if cur > target else "upscale"
        new_ops.append(graph.make_op(k, [name], [out], {"shift": abs(cur - target)}, origin=op.origin, created_by=NAME))
        scale[out] = target
        return out

    spline_inputs: dict[str, str] = {}  # value above scale f -> its truncation to f, for spline gates
    for op in graph.ops:
        secret = [i for i in op.inputs if not graph.values[i].is_const]
        d = OPS.get(op.kind)
        rule = d.scale if d is not None else None  # the registry entry's scale rule
        if rule in (Scale.WEIGHTED, Scale.PUBLIC_WEIGHTED):
            x = secret[0]
            ws = weight_scale(op, ctx)
            if scale[x] + ws > smax and scale[x] > f:
                x_new = rescale(x, f, op)
                op.inputs = [x_new if i == x else i for i in op.inputs]
                x = x_new
            op.attrs["wscale"] = ws
            out_scale = scale[x] + ws
        elif rule is Scale.ALIGNING:
            target = max(scale[i] for i in secret)
            op.inputs = [rescale(i, target, op) if i in secret else i for i in op.inputs]
            out_scale = target
        elif rule is Scale.FUSED_TRUNC:
            s = scale[secret[0]]
            if s > f:
                op.attrs["trunc"] = s - f
                out_scale = f
            else:
                op.attrs.pop("trunc", None)
                out_scale = s
        elif rule is Scale.PRESERVING:
            out_scale = scale[secret[0]]
        elif rule is Scale.INTEGER:
            out_scale = 0
        elif rule is Scale.SHIFT_DOWN:
            out_scale = scale[secret[0]] - op.attrs["shift"]
        elif rule is Scale.SHIFT_UP:
            out_scale = scale[secret[0]] + op.attrs["shift"]
        elif rule is Scale.PRODUCT:  # x * y of two secrets: s_x + s_y, operands above f first brought to f
            if sum(scale[i] for i in secret) > smax:
                down = {i: rescale(i, f, op) for i in dict.fromkeys(secret) if scale[i] > f}  # x * x: one trunc
                op.inputs = [down.get(i, i) for i in op.inputs]
            out_scale = sum(scale[i] for i in op.inputs if not graph.values[i].is_const)
        elif rule is Scale.SPLINE:  # a spline's polynomial needs its input at scale min(f, 14) at most
            target = spline_input_scale(f)
            if scale[secret[0]] > target:  # one truncation per value, whatever number of splines read it
                if secret[0] not in spline_inputs:
                    spline_inputs[secret[0]] = rescale(secret[0], target, op)
                op.inputs = [spline_inputs[secret[0]]]
            out_scale = f
        else:
            src = ", ".join(op.origin) or "a pass"
            raise FsscError(f"{NAME}: no fixed-point rule for op kind {op.kind!r} (%{op.name}, from {src})")
        new_ops.append(op)
        for o in op.outputs:
            scale[o] = out_scale
    graph.ops = new_ops
    for name, s in scale.items():
        graph.values[name].scale = s
    graph.meta["frac_bits"] = f
    graph.meta["weight_bound_bits"] = ctx.weight_bound_bits  # public: see weight_bits
    return PassResult(graph, _planned_state(graph) != before)


def _planned_state(graph: Graph) -> tuple:
    """What planning sets: the ops (with their attributes), every scale, the plan's meta."""
    return (
        [(op.uid, op.kind, list(op.inputs), dict(op.attrs)) for op in graph.ops],
        {n: v.scale for n, v in graph.values.items()},
        (graph.meta.get("frac_bits"), graph.meta.get("weight_bound_bits")),
    )


def check(graph: Graph) -> str | None:
    """What ENSURES promises: every value an op reads or writes (constants aside) has a scale."""
    for op in graph.ops:
        for name in [*op.inputs, *op.outputs]:
            v = graph.values[name]
            if not v.is_const and v.scale is None:
                return f"%{name} ({op.kind} %{op.name}) has no scale"
    return None
