"""Plaintext interpreters over the IR: the oracles for every pass and gate.

* :func:`run_float` evaluates the float (ONNX) semantics in float64.
* :func:`run_fixed` evaluates the fixed-point semantics the secure runtime has
  (each op kind's ``fixed`` in the registry, :mod:`fssc.compiler.ir.ops`):
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
from fssc.compiler.ir.ops import OPS
from fssc.runtime.ring import decode, encode

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
    env = {name: encode(x, g.values[name].fixed_scale) for name, x in bind_inputs(g, inputs).items()}
    for op in g.ops:
        d = OPS.get(op.kind)
        if d is None or d.fixed is None:
            raise FsscError(f"fixed-point interpreter: no semantics for op kind {op.kind!r} (%{op.name})")
        val = d.fixed(op, g, env)  # the registry entry's fixed-point semantics
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
