"""Run a compiled (planned and marked) IR graph under the protocol, in process.

There is one execution path: the graph is lowered (:mod:`fssc.compiler.lower`)
and rendered into the same three programs ``fssc compile`` writes
(:mod:`fssc.compiler.codegen`), which are executed here as modules. So the
simulator, the tests and the two processes over TCP all run the generated
code.

What each role holds:

* P0 (data owner): the graph without weights (``strip_weights``), its input,
  its keys, and W^ = W + A per weighted layer (``masked_weights``, sent by P1
  once per session). ``precompute_p0`` computes every linear layer's z_0
  before the input is known.
* P1 (model owner): the graph with weights, its keys, the setup seed for A.
* D: the graph without weights, the setup seed and fresh randomness.
"""

from __future__ import annotations

import types

import numpy as np

from fssc.compiler.codegen import render
from fssc.compiler.ir import Graph, Op
from fssc.compiler.lower import SecureProgram, encode_linear, is_weighted, lower

from . import lib
from .protocol import Dealer, Party

__all__ = [
    "deal",
    "run_party",
    "precompute_p0",
    "masked_weights",
    "strip_weights",
    "is_weighted",
    "weighted_ops",
    "encode_weights",
    "program_modules",
]


def _has_weights(graph: Graph) -> bool:
    return any(v.data is not None for v in graph.values.values() if v.is_const)


def program_modules(graph: Graph) -> tuple[SecureProgram, dict[str, types.ModuleType]]:
    """Lower the graph and load the generated programs as modules (party1 only with weights)."""
    prog = lower(graph, with_weights=_has_weights(graph))
    roles = ("party0", "party1", "dealer") if prog.weights or not prog.linears else ("party0", "dealer")
    mods = {}
    for role in roles:
        mod = types.ModuleType(f"fssc_program_{role}")
        mod.__file__ = f"<fssc {role} program>"
        exec(compile(render(prog, role, graph.name), mod.__file__, "exec"), mod.__dict__)  # noqa: S102
        mods[role] = mod
    return prog, mods


def deal(graph: Graph, D: Dealer, setup_seed: bytes) -> None:
    """The dealer's program on this graph: keys for one batch."""
    _, mods = program_modules(graph)
    mods["dealer"].deal(D, setup_seed)


def masked_weights(graph: Graph, setup_seed: bytes) -> dict[str, np.ndarray]:
    """P1's one-time setup message: W^ = W + A per weighted layer (tag -> array)."""
    prog = lower(graph)
    shapes = {st.tag: st.params["w_shape"] for st in prog.linears if st.params["w_shape"] is not None}
    return lib.masked_weights(prog.weights, setup_seed, shapes)


def precompute_p0(graph: Graph, P: Party, w_hat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """P0's offline halves z_0 of every linear layer."""
    _, mods = program_modules(graph)
    return mods["party0"].offline(P, w_hat)


def run_party(graph: Graph, P: Party, x: np.ndarray | None = None, w_hat=None, z0=None) -> list | None:
    """A party's program. P0 passes its encoded input and its z_0 halves and gets the outputs
    (ring elements, or labels) in graph order; P1 (``graph`` with weights) gets None."""
    prog, mods = program_modules(graph)
    if P.b == 1:
        mods["party1"].online(P, prog.weights)
        return None
    out = mods["party0"].online(P, x, z0)
    return [out[o["name"]] for o in prog.outputs]


def strip_weights(graph: Graph) -> Graph:
    """The graph P0 and D see: constants reduced to shape and dtype, no bytes."""
    g = graph.clone()
    for v in g.values.values():
        if v.is_const:
            v.data = None
            v.stripped = True
    return g


def weighted_ops(graph: Graph) -> list[Op]:
    return [op for op in graph.ops if is_weighted(op, graph)]


def encode_weights(op: Op, graph: Graph):
    """P1's ring encodings of a weighted op (W, bias)."""
    return encode_linear(op, graph)
