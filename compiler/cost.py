"""Cost model: key bytes, rounds and bytes sent per op, before anything runs.

The formulas (also in docs/protocol.md, "Costs"; a benchmark checks them):

Comparison gates (two-round ReLU gate of DESIGN.md section 4, one DCF each).
For a gate of bitwidth m, the DCF takes the low m-1 bits with a Z_2 payload;
``dcf_bytes(m) = fssc.runtime.dcf.nbytes_per_key(m - 1, 0)``.

* key bytes, P0: dcf_bytes(m) + 1 (xor-share bit of rho_hi ^ r_d, one byte);
  P0's arithmetic shares come from a per-layer PRG seed (16 bytes per op).
* key bytes, P1: dcf_bytes(m) + 1 + 6 * 8 (arithmetic shares of rho, r_d,
  r_d*rho, rho_hi, rho_hi*r_d and the output mask r_out).
* rounds: 2 per gate layer (open d^ = d xor r_d: one bit each way; then open
  the masked output: 8 bytes each way). A MaxPool tree of depth D costs 2D.
* bytes sent per party per gate: 1/8 + 8.

ArgMax with 2 classes is one DReLU whose bit only P0 opens: 1 round, P1 sends
1/8 byte per row, P0 sends nothing; keys dcf_bytes(m) + 1 each (P0 also gets
r_d in the clear: 1 byte). With C > 2 classes it is C-1 max gates plus index
selection (costed as 2 max gates each).

Clip is two ReLU gates per element in parallel (lo + ReLU(x-lo) - ReLU(x-hi)).

Linear layers with the model owner's weights (conv, gemm, matmul) and other
linear ops with constants (mul, affine): P0's key is two 16-byte seeds per op;
P1's key is [r_x]_1 and c_1: 8 bytes per input and per output element. Online
P1 sends z_1 (8 bytes per output element), P0 sends z_0 (8 bytes per output
element, computable offline so it travels before the input is known): 1 round.
The per-model setup (P1 sends W + A once, 8 bytes per weight) is reported
separately.

The input costs one message from P0 (8 bytes per element, 1 round). Local ops
(add, sub, pad, reshape, concat, sum pools, upscale) cost nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fssc.runtime import dcf

from .ir import Graph, Op

SEED_BYTES = 16
WORD = 8
RELU_P1_SHARES = 6
RELU_ROUNDS = 2
RELU_SEND = 1 / 8 + WORD


def dcf_bytes(m: int) -> int:
    return dcf.nbytes_per_key(max(1, m - 1), 0)


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

    def to_dict(self):
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


LINEAR_WEIGHTED = {"conv", "gemm", "matmul"}
LINEAR_CONST = {"mul", "affine", "batchnorm", "avgpool", "globalavgpool"}


def op_cost(op: Op, graph: Graph) -> OpCost:
    out = graph.values[op.outputs[0]]
    c = OpCost(op.name, op.kind, tuple(out.shape))
    g = op.gate
    if g:
        c.gate, c.gates, c.bits = g["kind"], g["count"], g["bits"]
        kb = dcf_bytes(g["bits"])
        if g["kind"] == "argmax" and _classes(op, graph) == 2:
            c.key_p0 = c.key_p1 = g["count"] * (kb + 1)
            c.key_p0 += g["count"]  # r_d in the clear, for P0 to decode the label
            c.rounds = 1
            c.sent_p1 = g["count"] / 8
            return c
        n = g["count"] * (2 if g["kind"] == "argmax" else 1)
        c.key_p0 = n * (kb + 1) + SEED_BYTES
        c.key_p1 = n * (kb + 1 + RELU_P1_SHARES * WORD)
        c.rounds = RELU_ROUNDS * g["depth"]
        c.sent_p0 = c.sent_p1 = n * RELU_SEND
        return c
    if op.kind in LINEAR_WEIGHTED | LINEAR_CONST:
        x = graph.values[op.inputs[0]]
        c.key_p0 = 2 * SEED_BYTES
        c.key_p1 = WORD * (x.size + out.size)
        c.rounds = 1
        c.sent_p0 = c.sent_p1 = WORD * out.size
    return c


def _classes(op: Op, graph: Graph) -> int:
    x = graph.values[op.inputs[0]]
    return x.shape[op.attrs.get("axis", 0) % len(x.shape)]


@dataclass
class CostReport:
    batch: int
    ops: list[OpCost]
    input_bytes: int
    setup_bytes: int  # masked weights P1 -> P0, once per model

    def total(self, field: str) -> float:
        return sum(getattr(o, field) for o in self.ops)

    @property
    def rounds(self) -> int:
        return 1 + self.total("rounds")  # + the input message

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
                "gates": self.total("gates"), "gates_per_image": self.per_image("gates"),
                "gates_by_kind": self.gates_by_kind(),
                "key_bytes_p0": self.total("key_p0"), "key_bytes_p1": self.total("key_p1"),
                "key_bytes_p0_per_image": self.per_image("key_p0"),
                "key_bytes_p1_per_image": self.per_image("key_p1"),
                "rounds": self.rounds,
                "sent_p0": self.total("sent_p0") + self.input_bytes, "sent_p1": self.total("sent_p1"),
                "setup_bytes": self.setup_bytes,
            },
        }


def cost_report(graph: Graph) -> CostReport:
    batch = graph.values[graph.inputs[0]].shape[0] if graph.inputs else 1
    ops = [op_cost(op, graph) for op in graph.ops]
    weights = sum(graph.values[i].size for op in graph.ops if op.kind in LINEAR_WEIGHTED
                  for i in op.inputs[1:2] if graph.values[i].is_const)
    inp = sum(graph.values[i].size for i in graph.inputs) * WORD
    return CostReport(batch, ops, inp, weights * WORD)
