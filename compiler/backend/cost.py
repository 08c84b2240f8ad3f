"""Cost model: key bytes, rounds and bytes sent per op, before anything runs.

The formulas are docs/protocol.md section 8; docs/cost-model.md states each one
with the report's fields. A gate's costs are its runtime gate class's ``cost``
(:mod:`fssc.runtime.gates`, next to the code that writes the keys), which this
module reads; linear layers, the model owner's constants, inputs and outputs
are priced here. The key streams the dealer writes match the estimates up to
record headers (tests/test_passes.py checks this). The per-model setup (P1
sends W + A once per session, 8 bytes per weight) is reported separately; local
ops cost nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fssc.compiler.backend.gates import compare_shift, gate_class, headroom_bits, widest_bits
from fssc.compiler.backend.lower import is_weighted
from fssc.compiler.ir.graph import Graph, Op
from fssc.compiler.ir.ops import OPS, Scale
from fssc.runtime import dcf
from fssc.runtime.gates import SEED_BYTES, WORD, carry_bytes, dcf_bytes

# the key sizes' building blocks as the docs name them (dcf.nbytes_per_key, dcf_bytes, carry_bytes)
__all__ = ["SEED_BYTES", "WORD", "CostReport", "OpCost", "carry_bytes", "cost_report", "dcf", "dcf_bytes", "op_cost"]

if TYPE_CHECKING:
    from fssc.passes.base import Ranges


@dataclass
class OpCost:
    op: str
    kind: str
    shape: tuple
    gate: str = ""
    gates: int = 0  # whole batch
    bits: int = 0
    key_p0: float = 0.0  # bytes, whole batch
    key_p1: float = 0.0
    rounds: int = 0
    sent_p0: float = 0.0  # bytes P0 sends
    sent_p1: float = 0.0
    aes_p0: float = 0.0  # AES blocks of P0's online evaluation (runtime/gates.py GateCost)
    aes_p1: float = 0.0
    calibrated: int | None = None  # largest |value| the comparison saw on the calibration data (ring units)
    calibrated_scale: int | None = None  # the fixed-point scale of that value (after the gate's shift)
    headroom: int | None = None  # bits: inputs 2^headroom times the calibrated ones still fit

    def to_dict(self):
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def op_cost(op: Op, graph: Graph, bits: int | None = None) -> OpCost:
    """One op's cost; ``bits`` overrides the gate's comparison bitwidth (to price another setting)."""
    out = graph.values[op.outputs[0]]
    c = OpCost(op.name, op.kind, tuple(out.shape))
    g = op.gate
    if g:  # the runtime gate class prices its keys and messages
        c.gate, c.gates, c.bits = g["kind"], g["count"], bits or g["bits"]
        cls = gate_class(op, graph)
        sized = {}  # a gate priced by its operands' sizes too (hmul: its masks' shares)
        if getattr(cls, "sized", False):
            sized["sizes"] = tuple(graph.values[i].size for i in op.inputs if not graph.values[i].is_const)
        gc = cls.cost(g["count"], c.bits, compare_shift(op), g["depth"], **sized)
        c.key_p0, c.key_p1, c.rounds, c.sent_p0, c.sent_p1 = gc.key_p0, gc.key_p1, gc.rounds, gc.sent_p0, gc.sent_p1
        c.aes_p0, c.aes_p1 = gc.aes_p0, gc.aes_p1
        return c
    if is_weighted(op, graph):
        x = graph.values[next(i for i in op.inputs if not graph.values[i].is_const)]
        c.key_p0 = 2 * SEED_BYTES
        c.key_p1 = WORD * (x.size + out.size)
        c.rounds = 1
        c.sent_p0 = c.sent_p1 = WORD * out.size
        return c
    for i in op.inputs:  # constants of a local op: P1 sends each masked (lower's ``const`` statements)
        if graph.values[i].is_const:
            c.key_p1 += SEED_BYTES
            c.rounds += 1
            c.sent_p1 += WORD * graph.values[i].size
    return c


@dataclass
class CostReport:
    batch: int
    ops: list[OpCost]
    input_bytes: int
    setup_bytes: int  # masked weights P1 -> P0, once per session
    masks_p0: int = 0  # P0's input and output masks, in the clear in its key
    n_inputs: int = 1  # graph inputs: one message (round) each

    def total(self, field: str) -> float:
        """Sum over ops; the P0 key total includes ``masks_p0``."""
        return sum(getattr(o, field) for o in self.ops) + (self.masks_p0 if field == "key_p0" else 0)

    @property
    def rounds(self) -> int:
        return self.n_inputs + int(self.total("rounds"))  # + the input messages

    def per_image(self, field: str) -> float:
        return self.total(field) / self.batch

    def gates_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.ops:
            if o.gate:
                out[o.gate] = out.get(o.gate, 0) + o.gates
        return out

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "ops": [o.to_dict() for o in self.ops if o.gate or o.rounds],
            "totals": {
                "gates": self.total("gates"),
                "gates_per_image": self.per_image("gates"),
                "gates_by_kind": self.gates_by_kind(),
                "key_bytes_p0": self.total("key_p0"),
                "key_bytes_p1": self.total("key_p1"),
                "key_bytes_p0_per_image": self.per_image("key_p0"),
                "key_bytes_p1_per_image": self.per_image("key_p1"),
                "rounds": self.rounds,
                "aes_blocks_p0": self.total("aes_p0"),
                "aes_blocks_p1": self.total("aes_p1"),
                "sent_p0": self.total("sent_p0") + self.input_bytes,
                "sent_p1": self.total("sent_p1"),
                "setup_bytes": self.setup_bytes,
            },
        }


def _weight_size(op: Op, graph: Graph) -> int:
    """Elements of W in P1's setup message: a linear layer's first constant operand (conv's W, gemm's B,
    affine's scale, matmul's and mul's constant; ``Bilinear.w`` once lowered). Read directly, not through
    the lowering, so passes before canonicalize are priced too."""
    if not is_weighted(op, graph):
        return 0
    return next(graph.values[i].size for i in op.inputs if graph.values[i].is_const)


def cost_report(graph: Graph, ranges: Ranges | None = None, full_bits: bool = False) -> CostReport:
    """The report for a marked graph. ``ranges`` (range analysis's ``ctx.ranges``) adds each
    comparison's calibrated maximum and headroom; ``full_bits`` prices every comparison at 64 - shift
    bits (what ``fssc compile --bits full`` would cost)."""
    batch = graph.values[graph.inputs[0]].shape[0] if graph.inputs else 1
    ops = [op_cost(op, graph, widest_bits(op) if full_bits and op.gate else None) for op in graph.ops]
    for op, c in zip(graph.ops, ops, strict=True):
        r = ranges.comparisons.get(op.uid) if ranges else None
        if op.gate and r is not None:
            c.calibrated = r.magnitude
            c.calibrated_scale = (graph.values[op.inputs[0]].scale or 0) - compare_shift(op)
            if OPS[op.kind].scale is Scale.PRODUCT:  # a product's magnitude is at the product's scale
                c.calibrated_scale = graph.values[op.outputs[0]].scale
            c.headroom = headroom_bits(r.magnitude, c.bits)
    weights = sum(_weight_size(op, graph) for op in graph.ops)
    inp = sum(graph.values[i].size for i in graph.inputs) * WORD
    producer = graph.producer()

    def masked(o: str) -> bool:  # a 2-class argmax's label reaches P0 unmasked; every other output has r_out
        op = producer.get(o)
        return not (op is not None and op.gate and gate_class(op, graph).plain_output)

    outs = sum(graph.values[o].size for o in graph.outputs if masked(o)) * WORD
    return CostReport(batch, ops, inp, weights * WORD, masks_p0=inp + outs, n_inputs=len(graph.inputs))
