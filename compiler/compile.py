"""``fssc compile``: ONNX -> IR -> passes -> lowering -> prog/.

prog/ holds ``party0/program.py``, ``party1/program.py`` + ``weights.bin``,
``dealer/program.py``, ``manifest.json``, ``report.txt``, ``report.json``
and, with ``--dump-ir``, ``ir/NN-pass.txt`` plus the viewer ``ir/index.html``
(and ``ir/timings.js``, the pass timings it shows: the one file that differs
between two runs).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from fssc.compiler.backend.cost import CostReport, cost_report
from fssc.compiler.backend.gates import headroom_bits
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.ir.graph import Graph, Value
from fssc.passes.base import DEFAULT_MARGIN_BITS, PassContext
from fssc.passes.manager import PassRecord, run_pipeline
from rich.console import Console, JustifyMethod
from rich.table import Table

from fssc.errors import FsscError
from fssc.files import write_atomic

if TYPE_CHECKING:
    from fssc.compiler.backend.lower import SecureProgram
    from fssc.compiler.reference.crosscheck import VerifyResult


MAX_MARGIN_BITS = 32
RING_INPUT_LIMIT = 1 << 62  # the input guard never allows more than this (ring units)
GUARD_SPARE_BITS = 2  # headroom bits the input guard keeps for unseen inputs and non-linear growth


@dataclass
class CompileResult:
    graph: Graph
    records: list[PassRecord]
    report: CostReport
    ctx: PassContext
    program: SecureProgram | None = None  # the lowered program, once code generation ran
    verification: VerifyResult | None = None  # the --verify result


def load_calibration(path: str, graph: Graph) -> list[np.ndarray]:
    from fssc.runtime.images import Preprocess, batches, load_inputs

    if len(graph.inputs) != 1:
        raise FsscError(
            f"--calibrate takes images for a model with one input; this one has {len(graph.inputs)} "
            f"({', '.join(graph.inputs)})"
        )
    shape = graph.values[graph.inputs[0]].shape
    if len(shape) != 4:
        raise FsscError(f"--calibrate needs an image model input [N,C,H,W], got {shape}")
    x = load_inputs(path, Preprocess(size=shape[2]), shape[1:])
    return batches(x, shape[0])


def add_label_output(graph: Graph) -> Graph:
    """Output mode ``labels``: a copy of the graph with ArgMax over the class axis appended to its logits
    output (the caller's graph is left as it was)."""
    if len(graph.outputs) != 1:
        raise FsscError(f"--output-mode labels needs one output, the graph has {len(graph.outputs)}")
    o = graph.outputs[0]
    v = graph.values[o]
    if v.dtype == "int64":
        return graph
    if len(v.shape) != 2:
        raise FsscError(f"--output-mode labels: output %{o} has shape {v.shape}, expected [batch, classes]")
    graph = graph.clone()
    graph = _drop_final_softmax(graph)
    o = graph.outputs[0]
    lab = graph.fresh_name("labels")
    graph.add_value(Value(lab, (v.shape[0],), "int64"))
    graph.ops.append(
        graph.make_op(
            "argmax",
            [o],
            [lab],
            {"axis": 1, "keepdims": 0, "select_last_index": 0},
            origin=("fssc:labels",),
            created_by="compile",
        )
    )
    graph.outputs = [lab]
    return graph


def _drop_final_softmax(graph: Graph) -> Graph:
    """Labels mode: a softmax producing the logits output is dropped when it normalizes each row (its axis is
    the class axis, or with opset < 13's flattening any axis): it is increasing in each logit and divides a
    row by one positive sum, so the argmax is unchanged. The graph is modified in place (a clone)."""
    o = graph.outputs[0]
    op = graph.producer().get(o)
    if op is None or op.kind != "softmax":
        return graph
    if not (op.attrs.get("coerce") or op.attrs["axis"] % 2 == 1):
        raise FsscError(f"--output-mode labels: softmax %{op.name} normalizes over the batch axis, not the classes")
    graph.outputs = [op.inputs[0]]
    graph.ops = [o for o in graph.ops if o is not op]
    graph.remove_unused()
    return graph


def compile_graph(
    graph: Graph,
    frac_bits: int = 12,
    calibrate: str | None = None,
    dump_dir: str | None = None,
    print_after=(),
    print_all=False,
    keep_graphs=False,
    echo=print,
    output_mode: str = "logits",
    margin_bits: int | None = None,
    bits: str = "range",
    weight_bound_bits: int = 4,
) -> CompileResult:
    """The middle of the compiler: passes, verifier, cost report (no files but the optional IR dumps).

    ``output_mode`` defaults to ``logits`` here (the graph as imported, for tests and tools);
    ``fssc compile`` and :func:`compile_model` default to ``labels``, what a data owner should get.
    ``bits``: ``range`` (comparison bitwidths from range analysis plus ``margin_bits``, default
    :data:`fssc.passes.base.DEFAULT_MARGIN_BITS`) or ``full`` (every comparison at 64 - shift bits).
    """
    if not 4 <= frac_bits <= 24:
        raise FsscError(f"--frac-bits {frac_bits}: must be between 4 and 24")
    if bits not in ("range", "full"):
        raise FsscError(f"--bits {bits!r}: choose range or full")
    if bits == "full" and margin_bits is not None:
        raise FsscError("--margin-bits does not apply with --bits full (every comparison is as wide as the ring holds)")
    margin_bits = DEFAULT_MARGIN_BITS if margin_bits is None else margin_bits
    if not 0 <= margin_bits <= MAX_MARGIN_BITS:
        raise FsscError(f"--margin-bits {margin_bits}: must be between 0 and {MAX_MARGIN_BITS}")
    if output_mode == "labels":
        graph = add_label_output(graph)
    elif output_mode != "logits":
        raise FsscError(f"--output-mode {output_mode!r}: choose labels or logits")
    if not 0 <= weight_bound_bits <= 24:
        raise FsscError(f"--weight-bound-bits {weight_bound_bits}: must be between 0 and 24")
    ctx = PassContext(
        frac_bits=frac_bits, margin_bits=margin_bits, full_bits=bits == "full", weight_bound_bits=weight_bound_bits
    )
    if calibrate:
        ctx.calibration = load_calibration(calibrate, graph)
    g, records = run_pipeline(
        graph,
        ctx,
        print_after=tuple(print_after),
        print_all=print_all,
        dump_dir=dump_dir,
        keep_graphs=keep_graphs,
        echo=echo,
    )
    return CompileResult(g, records, cost_report(g, ctx.ranges), ctx)


def input_guard(res: CompileResult) -> dict:
    """What the data owner's program checks before it sends anything (manifest.json ``input_guard``).

    The rule (measured in docs/accuracy.md): every comparison was given ``headroom_bits`` h over the
    largest magnitude it saw on the calibration data (m = bits(magnitude) + h). Unseen inputs of the
    calibration's own range use up to one of those bits (their activations reach past the calibrated
    maxima), and scaling an input by 2^j costs up to j + 1 bits, not j (folded biases make the network
    only roughly homogeneous). So the guard allows the input 2^(h - 2) times the calibrated range:
    allowed |x| <= calibrated max |x| * 2^max(0, h_min - 2), in ring units at the input's scale,
    capped at 2^62. Under ``--bits full`` h_min is large and the cap is what remains.
    """
    g, ranges = res.graph, (res.ctx.ranges.comparisons if res.ctx.ranges else {})
    comparisons = []
    for op in g.ops:
        if op.gate and op.uid in ranges:
            r = ranges[op.uid]
            comparisons.append(
                {
                    "op": op.name,
                    "gate": op.gate["kind"],
                    "bits": r.bits,
                    "headroom_bits": headroom_bits(r.magnitude, r.bits),
                }
            )
    h_min = min((c["headroom_bits"] for c in comparisons), default=None)
    inputs = []
    for name, cal in sorted((res.ctx.ranges.inputs if res.ctx.ranges else {}).items()):
        allowed = None if h_min is None else min(cal << max(0, h_min - GUARD_SPARE_BITS), RING_INPUT_LIMIT)
        inputs.append(
            {"name": name, "scale": g.values[name].scale, "calibrated_max_abs": cal, "allowed_max_abs": allowed}
        )
    return {
        "bits": "full" if res.ctx.full_bits else "range",
        "margin_bits": None if res.ctx.full_bits else res.ctx.margin_bits,
        "headroom_bits": h_min,
        "inputs": inputs,
    }  # per-comparison headroom stays in P1's report: under --bits full it would tell the calibrated ranges


def _mb(x: float) -> str:
    return f"{x / 1e6:,.2f}"


def _summary_row(label: str, gates: str, key_p0: float, key_p1: float, rounds: str) -> list[str]:
    """The cost table's summary columns up to the rounds (the per-op columns stay empty)."""
    return [label, "", "", "", gates, "", "", "", _mb(key_p0), _mb(key_p1), rounds]


def report_table(res: CompileResult, title: str) -> Table:
    rep = res.report
    t = Table(title=title, title_justify="left")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("op", "left"),
        ("kind", "left"),
        ("output shape", "left"),
        ("gate", "left"),
        ("gates", "right"),
        ("m", "right"),
        ("calib max", "right"),
        ("headroom", "right"),
        ("key MB P0", "right"),
        ("key MB P1", "right"),
        ("rounds", "right"),
        ("sent MB P0", "right"),
        ("sent MB P1", "right"),
    )
    for col, just in columns:
        t.add_column(col, justify=just)
    for o in rep.ops:
        if not (o.gate or o.rounds):
            continue
        t.add_row(
            o.op,
            o.kind,
            "x".join(map(str, o.shape)),
            o.gate or "-",
            f"{o.gates:,}" if o.gates else "",
            str(o.bits or ""),
            "" if o.calibrated is None else f"{o.calibrated / 2.0 ** (o.calibrated_scale or 0):.4g}",
            "" if o.headroom is None else str(o.headroom),
            _mb(o.key_p0),
            _mb(o.key_p1),
            str(o.rounds),
            _mb(o.sent_p0),
            _mb(o.sent_p1),
        )
    t.add_section()
    input_p0 = rep.total("sent_p0") + rep.input_bytes
    t.add_row(
        *_summary_row(
            "total (batch)", f"{rep.total('gates'):,}", rep.total("key_p0"), rep.total("key_p1"), str(rep.rounds)
        ),
        _mb(input_p0),
        _mb(rep.total("sent_p1")),
    )
    t.add_row(
        *_summary_row(
            "per image", f"{rep.per_image('gates'):,.0f}", rep.per_image("key_p0"), rep.per_image("key_p1"), ""
        ),
        _mb(input_p0 / rep.batch),
        _mb(rep.per_image("sent_p1")),
    )
    return t


def full_bits_report(res: CompileResult) -> CostReport:
    """The same graph priced at ``--bits full`` (every comparison at 64 - shift bits)."""
    return cost_report(res.graph, res.ctx.ranges, full_bits=True)


def setting_line(res: CompileResult) -> str:
    """One line: the comparison setting, its smallest headroom, and its key bytes next to ``--bits full``."""
    rep, full = res.report, full_bits_report(res)
    heads = [o.headroom for o in rep.ops if o.headroom is not None]
    setting = "--bits full" if res.ctx.full_bits else f"--margin-bits {res.ctx.margin_bits}"
    mine = rep.per_image("key_p0") + rep.per_image("key_p1")
    wide = full.per_image("key_p0") + full.per_image("key_p1")
    head = f"smallest headroom {min(heads)} bits over the calibration data" if heads else "no comparisons"
    return (
        f"comparisons: {setting} ({head}); key bytes per image, both parties: {_mb(mine)} MB; "
        f"with --bits full: {_mb(wide)} MB ({wide / mine:.2f}x)"
        if wide
        else f"comparisons: {setting} ({head})"
    )


def run_verify(res: CompileResult, model: str, count: int, out_dir: str, echo=print):
    """``--verify N``: N inputs through onnxruntime, the fixed-point interpreter and the in-process
    two-party run of the generated programs; an FsscError (one line) when the secure run and the
    interpreter disagree."""
    from fssc.compiler.reference.crosscheck import cross_check, verify_inputs

    if count < 1:
        raise FsscError(f"--verify {count}: give the number of inputs to check (at least 1)")
    result = cross_check(res.graph, model, verify_inputs(res, count))
    for line in result.lines():
        echo(line)
    if result.exact:
        return result
    n, k = result.inputs, result.mismatched_values
    if result.overflows:
        first = next(iter(result.overflows.values()))
        raise FsscError(
            f"--verify: the secure run differs from the fixed-point interpreter in {k} output values over {n} "
            f"inputs; {len(result.overflows)} comparisons overflow ({first}); recompile with more headroom "
            f"(--margin-bits K or --bits full) or --calibrate on data like these; nothing written to {out_dir}"
        )
    raise FsscError(
        f"--verify: the secure run differs from the fixed-point interpreter in {k} output values over {n} inputs "
        f"and no comparison overflows: the generated program is wrong (a compiler bug); nothing written to {out_dir}"
    )


def _check_out_dir(out_dir: str) -> None:
    """Refuse, before compiling, an output folder that cannot be made (a file on its path, no permission to
    write where it would go), without making it: a compile that fails leaves no folder behind."""
    if not out_dir:
        raise FsscError("the output directory is empty: give -o DIR")
    p = os.path.realpath(out_dir)  # '..' after a symlink as makedirs will take it
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise FsscError(f"{out_dir}: cannot create the output directory: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise FsscError(f"{out_dir}: cannot create the output directory: {p} is not writable")


def compile_model(
    model: str,
    out_dir: str,
    frac_bits: int = 12,
    calibrate: str | None = None,
    dump_ir: bool = False,
    print_after=(),
    print_all: bool = False,
    json_path: str | None = None,
    console: Console | None = None,
    output_mode: str = "labels",
    margin_bits: int | None = None,
    bits: str = "range",
    verify: int = 0,
    weight_bound_bits: int = 4,
    batch: int | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    verbose: bool = False,
) -> CompileResult:
    """``fssc compile``: compile, print the report, check with ``verify`` inputs (before anything is
    written: a program the check rejects is never written), write prog/. ``batch`` and ``input_shapes``
    pin the model's dynamic input dimensions (``--batch``, ``--input-shape``)."""
    from fssc.compiler.backend.codegen import write_program
    from fssc.compiler.backend.lower import lower
    from fssc.runtime.images import Preprocess

    con = console or Console(width=max(160, Console().width))
    _check_out_dir(out_dir)
    graph = import_onnx(model, batch=batch, input_shapes=input_shapes, verbose=verbose)
    if dump_ir:  # the IR dumps go there as the passes run; else nothing is made before the program is written
        os.makedirs(out_dir, exist_ok=True)
    echo = lambda s: con.print(s, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    res = compile_graph(
        graph,
        frac_bits,
        calibrate,
        os.path.join(out_dir, "ir") if dump_ir else None,
        print_after,
        print_all,
        keep_graphs=dump_ir,
        echo=echo,
        output_mode=output_mode,
        margin_bits=margin_bits,
        bits=bits,
        weight_bound_bits=weight_bound_bits,
    )
    prog = lower(res.graph)
    in_shape = res.graph.values[res.graph.inputs[0]].shape
    extra = {
        "source": os.path.basename(model),
        "output_mode": output_mode,
        "preprocess": Preprocess(size=in_shape[-1]).to_dict() if len(in_shape) == 4 else {},
        "cost": res.report.to_dict()["totals"],
        "input_guard": input_guard(res),
    }
    prog.info = extra  # public: part of the manifest and of the program hash
    res.program = prog
    passes = Table(title="passes", title_justify="left")
    for col in ("#", "pass", "ms", "changed"):
        passes.add_column(col)
    for r in res.records[1:]:
        passes.add_row(str(r.index), r.name, f"{r.seconds * 1e3:.1f}", "yes" if r.modified else "[dim]no[/]")
    con.print(passes)
    by_kind = res.report.gates_by_kind()
    table = report_table(
        res,
        f"secure cost of {os.path.basename(model)} (batch {res.report.batch}, "
        f"f={frac_bits}; gates: " + ", ".join(f"{k} {v:,}" for k, v in by_kind.items()) + ")",
    )
    con.print(table)
    echo(setting_line(res))
    con.print(f"setup: P1 sends its masked weights once per session, {_mb(res.report.setup_bytes)} MB")
    if verify:
        res.verification = run_verify(res, model, verify, out_dir, echo)
    write_program(prog, out_dir)
    if dump_ir:
        from fssc.compiler.viewer.document import write_viewer

        page = write_viewer(res.records, out_dir, os.path.basename(model))
    con.print(
        f"wrote {out_dir}/party0/program.py, party1/program.py + weights.bin, dealer/program.py, "
        f"manifest.json (program {prog.hash}, output: {output_mode})"
    )
    if dump_ir:
        con.print(f"IR dumps and viewer: {page} (fssc view {out_dir})", markup=False, highlight=False)
    data = res.report.to_dict()
    data["passes"] = [{"index": r.index, "name": r.name, "changed": r.modified} for r in res.records]
    data["frac_bits"] = frac_bits
    data["bits"] = bits
    data["margin_bits"] = res.ctx.margin_bits if bits == "range" else None
    data["totals_bits_full"] = full_bits_report(res).to_dict()["totals"]
    write_atomic(os.path.join(out_dir, "report.json"), json.dumps(data, indent=1, sort_keys=True) + "\n")
    text = io.StringIO()
    Console(file=text, width=160, no_color=True).print(table)
    write_atomic(os.path.join(out_dir, "report.txt"), text.getvalue())
    if json_path:
        write_atomic(json_path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return res
