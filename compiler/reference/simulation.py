"""The secure path in one process: a compiled graph's generated programs run by the dealer, P0 and P1.

One entry point, :func:`simulate`. The graph is lowered and rendered into
the three programs ``fssc compile`` writes; the dealer's program writes both
key streams to memory, then P0's and P1's programs run in two threads over an
in-memory channel (``fssc.runtime.simulate``), through the same per-batch
session code the networked parties use (``run_p0_batch``, ``run_p1_batch``:
every key record read, none left over). P0's and the dealer's programs are
rendered from the graph without weight bytes; P1 hands P0 its masked weights
W^ = W + A out of band (on the network they are the session's first message,
not part of a batch's traffic).

With ``reference=True`` the result also holds the fixed-point interpreter's
outputs on the same inputs (:func:`fssc.compiler.reference.interp.run_fixed`; the
secure gates truncate exactly, so nothing needs replaying): a correct program
equals them bit for bit, as long as no comparison leaves its bitwidth.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from fssc.compiler.backend.codegen import render
from fssc.compiler.backend.cost import cost_report
from fssc.compiler.backend.lower import lower
from fssc.compiler.backend.program import SecureProgram, from_manifest
from fssc.compiler.ir.graph import Graph
from fssc.compiler.reference.interp import bind_inputs, run_fixed
from fssc.runtime import dcf, ring, session
from fssc.runtime.channel import Channel
from fssc.runtime.simulate import deal_in_memory, run_parties

from fssc.errors import FsscError

ROLES = ("party0", "party1", "dealer")


@dataclass
class Simulation:
    """What one in-process secure run gave."""

    outputs: list[np.ndarray]  # P0's results in graph output order: ring elements (uint64) or labels (int64)
    reference: list[np.ndarray] | None  # the fixed-point interpreter, raw
    program: SecureProgram
    keys: tuple[bytes, bytes]  # P0's and P1's key streams for the batch
    channels: tuple[Channel, Channel]  # P0's and P1's ends (bytes sent, rounds, received messages if recorded)
    setup_bytes: int  # W^ = W + A, which P1 sends once per session (not part of a batch's traffic)
    deal_seconds: float
    online_seconds: float  # both parties: P0's offline halves and the online programs

    def decoded(self) -> list[np.ndarray]:
        """P0's outputs as reals (each at its scale); labels as they are."""
        outs = zip(self.outputs, self.program.outputs, strict=True)
        return [y if o["kind"] == "labels" else ring.decode(y, o["scale"]) for y, o in outs]

    def mismatches(self) -> list[str]:
        """One line per output that differs from the reference (empty: bit for bit equal)."""
        if self.reference is None:
            raise FsscError("simulate(..., reference=False) has no fixed-point reference to compare with")
        out = []
        for got, ref, o in zip(self.outputs, self.reference, self.program.outputs, strict=True):
            y, want = np.asarray(got), np.asarray(ref)
            if y.shape != want.shape:
                out.append(f"output %{o['name']}: shape {y.shape}, the fixed-point interpreter gives {want.shape}")
                continue
            bad = y != want
            if bad.any():
                diff = np.abs(ring.signed(y.astype(np.uint64) - want.astype(np.uint64)))[bad]
                out.append(
                    f"output %{o['name']}: {int(bad.sum())} of {y.size} elements differ from the fixed-point "
                    f"interpreter (max |difference| {int(diff.max())} units)"
                )
        return out


def strip_weights(graph: Graph) -> Graph:
    """The graph P0 and the dealer see: constants reduced to shape and dtype, no bytes."""
    g = graph.clone()
    for v in g.values.values():
        if v.is_const:
            v.data = None
            v.stripped = True
    return g


def simulate(
    graph: Graph,
    inputs,
    *,
    reference: bool = True,
    setup_seed: bytes | None = None,
    record: bool = False,
    timeout: float = 120.0,
) -> Simulation:
    """Deal one batch and run both parties' generated programs on ``inputs``.

    ``graph``: a compiled graph (planned and marked, with the model owner's
    constants). ``inputs``: the data owner's inputs as reals, an array for a
    graph with one input or a dict input name -> array (P0 holds every graph
    input); each is encoded at its input's scale. ``setup_seed``: the per-deal
    seed of the weight masks A (fresh from os.urandom by default). ``record``
    keeps every message each party receives (``channels[b].received``).
    """
    feeds = bind_inputs(graph, inputs)
    prog = lower(graph)
    public = lower(strip_weights(graph), with_weights=False)
    if public.hash != prog.hash:  # the programs of P0 and D must not depend on the weights' values
        raise FsscError(f"{graph.name}: the lowering without weights differs from the one with them")
    public = from_manifest(prog.manifest(), graph.name)  # as fssc run regenerates them: from the public form
    mods = {
        role: session.program_from_source(
            render(prog if role == "party1" else public, role), role, f"<fssc {role} program>"
        )
        for role in ROLES
    }
    X = {name: ring.encode(x, graph.values[name].fixed_scale) for name, x in feeds.items()}
    seed = setup_seed or os.urandom(16)
    # the dealer and both parties all run in this process: the compiled DCF walk if all three roles' work
    # pays for it (or FSSC_DCF_WALK names a walk); otherwise the process keeps the walk it has
    # (a hand-built graph whose gates were never counted by mark-comparisons is priced as no work)
    marked = all("count" in op.gate for op in graph.ops if op.gate)
    manifest = {"cost": cost_report(graph).to_dict()["totals"] if marked else {}}
    before = dcf.current_walk()
    want = dcf.choose_walk(sum(session.dcf_work(manifest, r) for r in ROLES))
    dcf.set_walk(want if dcf.explicit_walk() or want == dcf.COMPILED else before, dcf.explicit_walk())
    try:
        t0 = time.perf_counter()
        _, k0, k1 = deal_in_memory(lambda D: mods["dealer"].deal(D, seed), {"program": prog.hash, "batch": 0})
        t1 = time.perf_counter()
        W = prog.weights
        w_hat = session.masked_weights(mods["party1"], W, seed)
        out0, out1, c0, c1 = run_parties(
            lambda P: session.run_p0_batch(mods["party0"], P.chan, P.keys, w_hat, X),
            lambda P: session.run_p1_batch(mods["party1"], P.chan, P.keys, W),
            k0,
            k1,
            timeout=timeout,
            record=record,
        )
        t2 = time.perf_counter()
    finally:
        dcf.set_walk(before)
    if out1 is not None:
        raise FsscError("the model owner's program returned a result (it must learn nothing)")
    ref = run_fixed(graph, feeds, raw=True) if reference else None
    return Simulation(
        outputs=[out0[o["name"]] for o in prog.outputs],
        reference=ref,
        program=prog,
        keys=(k0, k1),
        channels=(c0, c1),
        setup_bytes=sum(a.nbytes for a in w_hat.values()),
        deal_seconds=t1 - t0,
        online_seconds=t2 - t1,
    )
