"""``fssc compile --verify N``: the compiled program against onnxruntime and the fixed-point interpreter.

Three runs of the same inputs:

* **onnxruntime** on the ONNX model (float);
* the **fixed-point interpreter** (:func:`fssc.compiler.reference.interp.run_fixed`) on the compiled IR (floor
  truncation, as the secure gates truncate exactly);
* the **in-process two-party simulation** of the generated programs (:func:`secure_run`: the dealer's,
  P0's and P1's programs, rendered exactly as ``fssc compile`` writes them, run in one process).

The interpreter computes every comparison on the whole ring, so the secure run equals it bit for bit
unless a comparison overflows its bitwidth or the program is wrong: any difference is an error. The
overflowing comparisons (:func:`fssc.compiler.reference.interp.find_overflows`) are counted and named. In labels
mode the simulated program also reveals the logits to P0 (one extra output statement) so that the
exact comparison covers every gate, not only the label bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from fssc.compiler.backend.gates import bits_for, comparison_magnitude
from fssc.compiler.ir.graph import Graph
from fssc.compiler.reference.interp import Overflow, run_fixed
from fssc.runtime import ring

from fssc.errors import FsscError

VERIFY_SEED = 2  # inputs from a fixed seed: the calibration's distribution, not its batches (seed 1)


def secure_run(graph: Graph, x: np.ndarray) -> list[np.ndarray]:
    """P0's outputs (graph order: ring elements, or labels) of the generated programs run in one process.

    The one place --verify and ``fssc bench accuracy`` run the secure path: the simulator
    (:func:`fssc.compiler.reference.simulation.simulate`), which runs the programs exactly as
    ``fssc compile`` writes them.
    """
    from fssc.compiler.reference.simulation import simulate

    return simulate(graph, x, reference=False).outputs


def with_logits(graph: Graph) -> Graph:
    """The graph with the final argmax's input as an output too (labels mode), so the logits are compared."""
    producer = graph.producer()
    extra = []
    for o in graph.outputs:
        op = producer.get(o)
        if op is not None and op.kind == "argmax" and op.inputs[0] not in graph.outputs:
            extra.append(op.inputs[0])
    if not extra:
        return graph
    g = graph.clone()
    g.outputs = extra + list(graph.outputs)
    return g


def _logits_and_labels(graph: Graph, outs: list[np.ndarray]) -> tuple[np.ndarray | None, np.ndarray]:
    """(decoded logits or None, labels) from raw ring outputs in graph order."""
    logits, labels = None, None
    for name, v in zip(graph.outputs, outs, strict=True):
        val = graph.values[name]
        if val.dtype == "int64":
            labels = ring.signed(np.asarray(v)).reshape(-1) if labels is None else labels
        elif logits is None:
            logits = ring.decode(np.asarray(v), val.fixed_scale)
    if labels is None:
        if logits is None:
            raise FsscError(f"{graph.name}: the program has neither logits nor labels to compare")
        labels = logits.reshape(logits.shape[0], -1).argmax(axis=1)
    return logits, labels


@dataclass
class BatchRecord:
    """One batch through the three runs: logits (decoded; None without a float output) and labels."""

    ref_logits: np.ndarray | None
    ref_labels: np.ndarray
    fixed_logits: np.ndarray | None
    fixed_labels: np.ndarray
    secure_logits: np.ndarray | None
    secure_labels: np.ndarray
    mismatched: int  # ring values where the secure run and the interpreter differ
    slack: dict[str, int]  # comparison op -> planned bits - bits this batch needed (negative: overflow)


PAIRS = (("onnxruntime", "ref"), ("fixed point", "fixed"), ("secure", "secure"))


@dataclass
class PairStats:
    a: str
    b: str
    max_logit_diff: float | None
    agree: int
    total: int


def pair_stats(records: list[BatchRecord], keep: list[np.ndarray] | None = None) -> list[PairStats]:
    """Max |logit diff| and label agreement for each pair of runs, over the items ``keep`` selects."""
    out = []
    for i, j in ((0, 1), (0, 2), (1, 2)):
        (na, ka), (nb, kb) = PAIRS[i], PAIRS[j]
        diff, agree, total = None, 0, 0
        chosen_rows: list[np.ndarray | None] = list(keep) if keep else [None] * len(records)
        for r, chosen in zip(records, chosen_rows, strict=True):
            sel = np.ones(len(r.ref_labels), bool) if chosen is None else chosen
            if not sel.any():
                continue
            ya, yb = getattr(r, f"{ka}_logits"), getattr(r, f"{kb}_logits")
            if ya is not None and yb is not None:
                diff = max(diff or 0.0, float(np.abs(ya[sel] - yb[sel]).max()))
            agree += int((getattr(r, f"{ka}_labels")[sel] == getattr(r, f"{kb}_labels")[sel]).sum())
            total += int(sel.sum())
        out.append(PairStats(na, nb, diff, agree, total))
    return out


@dataclass
class VerifyResult:
    records: list[BatchRecord]
    overflows: dict[str, str] = field(default_factory=dict)  # op -> the worst overflow, described

    @property
    def inputs(self) -> int:
        return sum(len(r.ref_labels) for r in self.records)

    @property
    def mismatched_values(self) -> int:
        return sum(r.mismatched for r in self.records)

    @property
    def exact(self) -> bool:
        return self.mismatched_values == 0

    def lines(self) -> list[str]:
        out = [f"verify: {self.inputs} input(s) through onnxruntime, the fixed-point interpreter and the secure run"]
        for p in pair_stats(self.records):
            diff = "n/a" if p.max_logit_diff is None else f"{p.max_logit_diff:.4g}"
            out.append(f"  {p.a} vs {p.b}: max |logit diff| {diff}, labels agree {p.agree}/{p.total}")
        out.append(f"  overflowing comparisons: {len(self.overflows)}")
        out += [f"    {v}" for v in self.overflows.values()]
        out.append(
            "  secure run == fixed-point interpreter: "
            + ("exact" if self.exact else f"NO ({self.mismatched_values} output values differ)")
        )
        return out


def verify_inputs(res, count: int) -> list[np.ndarray]:
    """``count`` inputs in batches of the model's batch size: the calibration set (``--calibrate``),
    else inputs from a fixed seed (the default calibration's distribution, other batches)."""
    from fssc.passes.range_analysis import default_calibration

    graph = res.graph
    shape = tuple(graph.values[graph.inputs[0]].shape)
    n = -(-count // shape[0])
    data = res.ctx.calibration or default_calibration(shape, n, seed=VERIFY_SEED)
    if len(data) < n:
        raise FsscError(f"--verify {count}: the calibration set has {len(data) * shape[0]} inputs")
    return data[:n]


def comparison_slack(graph: Graph, x: np.ndarray) -> dict[str, tuple[int, int, Overflow]]:
    """Per comparison op: (planned bits - bits needed on x, needed bits, its overflow description)."""
    out: dict[str, tuple[int, int, Overflow]] = {}

    def observe(op, ins, _):
        if op.gate and op.gate.get("bits") is not None:
            need = bits_for(comparison_magnitude(op, graph, ins))
            have = op.gate["bits"]
            if op.name not in out or have - need < out[op.name][0]:
                out[op.name] = (have - need, need, Overflow(op.name, op.kind, op.gate["kind"], need, have))

    run_fixed(graph, x, observe=observe)
    return out


def logits_before_a_final_softmax(onnx_model) -> tuple[bytes | str, str | None]:
    """(the model, the name of the tensor onnxruntime should give as the logits). A final Softmax is dropped
    in labels mode (compile.add_label_output), so the compiled logits are its input: the model is returned
    with that input as an extra graph output, and its name; else the model as it was and None."""
    import onnx

    model = onnx.load(onnx_model) if isinstance(onnx_model, str) else onnx.load_from_string(onnx_model)
    if not model.graph.output:
        return onnx_model, None
    first = model.graph.output[0].name
    node = next((n for n in model.graph.node if first in n.output), None)
    if node is None or node.op_type != "Softmax":
        return onnx_model, None
    name = node.input[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString(), name


def cross_check(graph: Graph, onnx_model, batches: list[np.ndarray]) -> VerifyResult:
    """Run every batch through onnxruntime, the interpreter (floor truncation, as the secure gates) and the
    secure simulation; ``onnx_model`` is a path or a serialized model. If the model ends in a Softmax and the
    graph outputs labels (the softmax was dropped), onnxruntime's logits are the softmax's input; in logits
    mode the softmax is evaluated and its probabilities are compared."""
    import onnxruntime as ort

    onnx_model, pre_softmax = logits_before_a_final_softmax(onnx_model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    float_outs = [o.name for o in sess.get_outputs() if "float" in o.type]
    g = with_logits(graph)
    logit_name = next((o for o in g.outputs if g.values[o].dtype != "int64"), None)
    pick = logit_name if logit_name in float_outs else (float_outs[0] if float_outs else None)
    if pre_softmax and any(graph.values[o].dtype == "int64" for o in graph.outputs):
        pick = pre_softmax
    if pick is None:
        raise FsscError("--verify: the ONNX model has no float output to compare")
    records: list[BatchRecord] = []
    worst: dict[str, tuple[int, str]] = {}
    for x in batches:
        ref = sess.run([pick], {in_name: x})[0]
        ref = ref.reshape(ref.shape[0], -1)
        sec = secure_run(g, x)
        want = run_fixed(g, x, raw=True)
        mismatched = sum(int((np.asarray(a) != np.asarray(b)).sum()) for a, b in zip(sec, want, strict=True))
        y_fix, l_fix = _logits_and_labels(g, want)
        y_sec, l_sec = _logits_and_labels(g, sec)
        slack = comparison_slack(graph, x)
        for name, (s, need, ov) in slack.items():
            if s < 0 and (name not in worst or need > worst[name][0]):
                worst[name] = (need, str(ov))
        records.append(
            BatchRecord(
                ref,
                ref.argmax(axis=1),
                None if y_fix is None else y_fix.reshape(len(x), -1),
                l_fix,
                None if y_sec is None else y_sec.reshape(len(x), -1),
                l_sec,
                mismatched,
                {k: v[0] for k, v in slack.items()},
            )
        )
    return VerifyResult(records, {k: v[1] for k, v in worst.items()})
