"""Plaintext interpreters over the IR: the oracles for every pass and gate.

* :func:`run_float` evaluates the float (ONNX) semantics in float64.
* :func:`run_fixed` evaluates the fixed-point semantics the secure runtime has:
  ring Z_2^64, every value at its planned scale, constants encoded where they
  are used, truncation (floor) exactly where the plan puts it. If the graph has
  not been planned yet, it is planned on a copy with
  :mod:`fssc.passes.plan_fixed_point`.

Both return the graph outputs (floats; ``run_fixed`` decodes each output at its
scale) and can hand every intermediate value to an ``observe`` callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from fssc.compiler.ir.graph import Graph, Op
from fssc.compiler.ir.ops import OPS, batchnorm_affine, conv_float
from fssc.runtime import lib, ring
from fssc.runtime.geometry import windows
from fssc.runtime.ring import decode, encode, ring_bilinear, signed, unsigned

from fssc.errors import FsscError


def bind_inputs(graph: Graph, inputs) -> dict[str, np.ndarray]:
    if isinstance(inputs, np.ndarray):
        if len(graph.inputs) != 1:
            raise FsscError(f"graph has {len(graph.inputs)} inputs; pass a dict")
        inputs = {graph.inputs[0]: inputs}
    env = {}
    for name in graph.inputs:
        if name not in inputs:
            raise FsscError(f"missing input {name!r}")
        x = np.asarray(inputs[name])
        want = graph.values[name].shape
        if tuple(x.shape) != tuple(want):
            raise FsscError(f"input {name!r} has shape {tuple(x.shape)}, the graph expects {tuple(want)}")
        env[name] = x
    return env


def run_float(graph: Graph, inputs, observe: Callable[[str, np.ndarray], None] | None = None) -> list[np.ndarray]:
    env = {k: v.astype(np.float64) for k, v in bind_inputs(graph, inputs).items()}
    for name, v in graph.values.items():
        if v.is_const:
            env[name] = v.array.astype(np.float64) if v.array.dtype.kind == "f" else v.array
    for op in graph.ops:
        outs = OPS[op.kind].run(op.attrs, *[env[i] for i in op.inputs])
        for o, val in zip(op.outputs, outs, strict=True):
            env[o] = val
            if observe:
                observe(o, val)
    return [env[o] for o in graph.outputs]


# ------------------------------------------------------------ fixed point
class _Fixed:
    """Per-kind fixed-point semantics; ``self.scale[name]`` is a value's scale."""

    def __init__(self, graph: Graph):
        self.g = graph

    def sc(self, name: str) -> int:
        return self.g.values[name].fixed_scale

    def split(self, op: Op, env):
        """(secret input arrays, constant input arrays) in input order."""
        sec = [env[i] for i in op.inputs if not self.g.values[i].is_const]
        con = [self.g.values[i].array.astype(np.float64) for i in op.inputs if self.g.values[i].is_const]
        return sec, con

    # linear ops with the model owner's constants ------------------------
    def conv(self, op, env):
        x = env[op.inputs[0]]
        w = self.g.values[op.inputs[1]].array.astype(np.float64)
        ws = op.attrs["wscale"]
        k = int(np.prod(w.shape[1:]))  # reduction length per output
        y = ring_bilinear(lambda a, b: conv_float(op.attrs, a, b)[0], x, encode(w, ws), k)
        if len(op.inputs) > 2:
            b = self.g.values[op.inputs[2]].array.astype(np.float64)
            y = y + encode(b, self.sc(op.inputs[0]) + ws).reshape((1, -1) + (1,) * (x.ndim - 2))
        return y

    def gemm(self, op, env):
        a = op.attrs
        x = env[op.inputs[0]]
        x = x.T if a.get("transA", 0) else x
        w = self.g.values[op.inputs[1]].array.astype(np.float64)
        w = (w.T if a.get("transB", 0) else w) * a.get("alpha", 1.0)
        y = ring_bilinear(lambda p, q: p @ q, x, encode(w, a["wscale"]), w.shape[0])
        if len(op.inputs) > 2:
            c = self.g.values[op.inputs[2]].array.astype(np.float64) * a.get("beta", 1.0)
            y = y + encode(c, self.sc(op.inputs[0]) + a["wscale"])
        return y

    def matmul(self, op, env):
        ws = op.attrs["wscale"]
        a_name, b_name = op.inputs
        if self.g.values[b_name].is_const:
            w = self.g.values[b_name].array.astype(np.float64)
            k = w.shape[-2] if w.ndim > 1 else w.shape[0]  # x @ W reduces over W's second-to-last axis
            return ring_bilinear(np.matmul, env[a_name], encode(w, ws), k)
        w = self.g.values[a_name].array.astype(np.float64)
        return ring_bilinear(lambda p, q: np.matmul(q, p), env[b_name], encode(w, ws), w.shape[-1])

    def mul(self, op, env):
        (x,), (c,) = self.split(op, env)
        return ring.fixed_mul(x, encode(c, op.attrs["wscale"]))

    def _channel_affine(self, op, x, a, b):
        sh = (1, -1) + (1,) * (x.ndim - 2)
        ws = op.attrs["wscale"]
        return x * encode(a, ws).reshape(sh) + encode(b, self.sc(op.inputs[0]) + ws).reshape(sh)

    def batchnorm(self, op, env):
        (x,), params = self.split(op, env)
        return self._channel_affine(op, x, *batchnorm_affine(op.attrs, *params))

    def affine(self, op, env):
        (x,), (a, b) = self.split(op, env)
        return self._channel_affine(op, x, a, b)

    # pools are public and linear: the same functions the secure programs call
    def avgpool(self, op, env):
        a = op.attrs
        return lib.avgpool(
            env[op.inputs[0]],
            a["kernel_shape"],
            a["strides"],
            a["pads"],
            a["dilations"],
            a.get("ceil_mode", 0),
            a.get("count_include_pad", 0),
            a["wscale"],
        )

    def globalavgpool(self, op, env):
        return lib.globalavgpool(env[op.inputs[0]], op.attrs["wscale"])

    def sumpool(self, op, env):
        a = op.attrs
        return lib.sumpool(
            env[op.inputs[0]], a["kernel_shape"], a["strides"], a["pads"], a["dilations"], a.get("ceil_mode", 0)
        )

    def globalsumpool(self, op, env):
        return lib.globalsumpool(env[op.inputs[0]])

    # local ops --------------------------------------------------------
    def _const_at(self, op, env):
        """Inputs with constants encoded at the secret operand's scale."""
        s = next(self.sc(i) for i in op.inputs if not self.g.values[i].is_const)
        return [env[i] if not self.g.values[i].is_const else encode(self.g.values[i].data, s) for i in op.inputs]

    def add(self, op, env):
        a, b = self._const_at(op, env)
        return a + b

    def sub(self, op, env):
        a, b = self._const_at(op, env)
        return a - b

    def concat(self, op, env):
        return np.concatenate(self._const_at(op, env), axis=op.attrs["axis"])

    def relu(self, op, env):
        x = env[op.inputs[0]]
        return unsigned(np.maximum(signed(ring.trunc(x, op.attrs.get("trunc", 0))), 0))

    def clip(self, op, env):
        s = self.sc(op.inputs[0])
        x = signed(env[op.inputs[0]])
        lim = np.iinfo(np.int64)
        lo = max(float(lim.min), min(float(lim.max), op.attrs.get("min", -np.inf) * 2.0**s))
        hi = max(float(lim.min), min(float(lim.max), op.attrs.get("max", np.inf) * 2.0**s))
        lo = lim.min if lo <= lim.min else int(np.rint(lo))
        hi = lim.max if hi >= lim.max else int(np.rint(hi))
        return unsigned(np.clip(x, lo, hi))

    def maxpool(self, op, env):  # exact max; the secure gate tree gives the same values
        w, _, _, nd = windows(signed(env[op.inputs[0]]), op.attrs, np.iinfo(np.int64).min)
        return unsigned(w.max(axis=tuple(range(-nd, 0))))

    def argmax(self, op, env):
        return OPS["argmax"].run(op.attrs, signed(env[op.inputs[0]]))[0]

    def trunc(self, op, env):
        return ring.trunc(env[op.inputs[0]], op.attrs["shift"])

    def upscale(self, op, env):
        return ring.upscale(env[op.inputs[0]], op.attrs["shift"])

    def structural(self, op, env):  # pad, flatten, reshape: same on ring elements
        return OPS[op.kind].run(op.attrs, *[env[i] for i in op.inputs])[0]


def _ensure_planned(graph: Graph, frac_bits: int | None) -> Graph:
    names = list(graph.inputs) + [n for op in graph.ops for n in op.outputs]
    if all(graph.values[n].scale is not None for n in names) and (
        frac_bits is None or graph.meta.get("frac_bits") == frac_bits
    ):
        return graph
    from fssc.passes import plan_fixed_point
    from fssc.passes.base import PassContext

    return plan_fixed_point.run(graph.clone(), PassContext(frac_bits=12 if frac_bits is None else frac_bits)).graph


def run_fixed(
    graph: Graph,
    inputs,
    frac_bits: int | None = None,
    observe: Callable[[Op, list[np.ndarray], np.ndarray], None] | None = None,
    raw: bool = False,
) -> list[np.ndarray]:
    """Fixed-point evaluation. Returns decoded outputs (or ring elements with ``raw``).

    ``observe(op, input_values, output_value)`` sees every op (ring elements).
    Truncation is floor division, as in the secure gates (exact truncation):
    the secure result equals this bit for bit.
    """
    g = _ensure_planned(graph, frac_bits)
    sem = _Fixed(g)
    env = {name: encode(x, g.values[name].fixed_scale) for name, x in bind_inputs(g, inputs).items()}
    for op in g.ops:
        fn = getattr(sem, op.kind, None)
        if fn is None:
            if op.kind in ("pad", "flatten", "reshape"):
                fn = sem.structural
            else:
                raise FsscError(f"fixed-point interpreter: no semantics for op kind {op.kind!r} (%{op.name})")
        val = fn(op, env)
        env[op.outputs[0]] = val
        if observe:
            observe(op, [env[i] for i in op.inputs if i in env], val)
    if raw:
        return [env[o] for o in g.outputs]
    outs = []
    for o in g.outputs:
        v = g.values[o]
        outs.append(env[o] if v.dtype == "int64" else decode(env[o], v.fixed_scale))
    return outs


@dataclass
class Overflow:
    op: str
    kind: str
    gate: str
    needed_bits: int
    planned_bits: int

    def __str__(self) -> str:
        return (
            f"overflow at {self.kind} %{self.op}: its {self.gate} comparison needs {self.needed_bits} bits, "
            f"planned {self.planned_bits} (by {self.needed_bits - self.planned_bits} bits)"
        )


def find_overflows(graph: Graph, inputs) -> list[Overflow]:
    """Run the planned, marked IR and name every comparison whose input leaves its bitwidth."""
    from fssc.compiler.backend.gates import bits_for, comparison_magnitude

    worst: dict[int, Overflow] = {}

    def observe(op, ins, out):
        if not op.gate or op.gate.get("bits") is None:
            return
        need = bits_for(comparison_magnitude(op, graph, ins))
        if need > op.gate["bits"] and (op.uid not in worst or need > worst[op.uid].needed_bits):
            worst[op.uid] = Overflow(op.name, op.kind, op.gate["kind"], need, op.gate["bits"])

    run_fixed(graph, inputs, observe=observe)
    return list(worst.values())
