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
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from fssc.passes.base import PassContext

from .cost import CostReport, cost_report
from .errors import FsscError
from .files import write_atomic
from .ir import Graph, Value
from .onnx_import import import_onnx
from .pipeline import PassRecord, run_pipeline


@dataclass
class CompileResult:
    graph: Graph
    records: list[PassRecord]
    report: CostReport
    ctx: PassContext
    program: object = None  # the lowered SecureProgram, once code generation ran


def load_calibration(path: str, graph: Graph) -> list[np.ndarray]:
    from fssc.runtime.images import Preprocess, batches, load_inputs

    shape = graph.values[graph.inputs[0]].shape
    if len(shape) != 4:
        raise FsscError(f"--calibrate needs an image model input [N,C,H,W], got {shape}")
    x = load_inputs(path, Preprocess(size=shape[2]), shape[1:])
    return batches(x, shape[0])


def add_label_output(graph: Graph) -> Graph:
    """Output mode ``labels``: append ArgMax over the class axis to a logits output."""
    if len(graph.outputs) != 1:
        raise FsscError(f"--output-mode labels needs one output, the graph has {len(graph.outputs)}")
    o = graph.outputs[0]
    v = graph.values[o]
    if v.dtype == "int64":
        return graph
    if len(v.shape) != 2:
        raise FsscError(f"--output-mode labels: output %{o} has shape {v.shape}, expected [batch, classes]")
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
    weight_bound_bits: int = 4,
) -> CompileResult:
    """The middle of the compiler: passes, verifier, cost report (no files but the optional IR dumps).

    ``output_mode`` defaults to ``logits`` here (the graph as imported, for tests and tools);
    ``fssc compile`` and :func:`compile_model` default to ``labels``, what a data owner should get.
    """
    if not 4 <= frac_bits <= 24:
        raise FsscError(f"--frac-bits {frac_bits}: must be between 4 and 24")
    if output_mode == "labels":
        graph = add_label_output(graph)
    elif output_mode != "logits":
        raise FsscError(f"--output-mode {output_mode!r}: choose labels or logits")
    if not 0 <= weight_bound_bits <= 24:
        raise FsscError(f"--weight-bound-bits {weight_bound_bits}: must be between 0 and 24")
    ctx = PassContext(frac_bits=frac_bits, weight_bound_bits=weight_bound_bits)
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
    return CompileResult(g, records, cost_report(g), ctx)


def _mb(x: float) -> str:
    return f"{x / 1e6:,.2f}"


def report_table(res: CompileResult, title: str) -> Table:
    rep = res.report
    t = Table(title=title, title_justify="left")
    for col, just in (
        ("op", "left"),
        ("kind", "left"),
        ("output shape", "left"),
        ("gate", "left"),
        ("gates", "right"),
        ("m", "right"),
        ("key MB P0", "right"),
        ("key MB P1", "right"),
        ("rounds", "right"),
        ("sent MB P0", "right"),
        ("sent MB P1", "right"),
    ):
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
            _mb(o.key_p0),
            _mb(o.key_p1),
            str(o.rounds),
            _mb(o.sent_p0),
            _mb(o.sent_p1),
        )
    t.add_section()
    t.add_row(
        "total (batch)",
        "",
        "",
        "",
        f"{rep.total('gates'):,}",
        "",
        _mb(rep.total("key_p0")),
        _mb(rep.total("key_p1")),
        str(rep.rounds),
        _mb(rep.total("sent_p0") + rep.input_bytes),
        _mb(rep.total("sent_p1")),
    )
    t.add_row(
        "per image",
        "",
        "",
        "",
        f"{rep.per_image('gates'):,.0f}",
        "",
        _mb(rep.per_image("key_p0")),
        _mb(rep.per_image("key_p1")),
        "",
        _mb((rep.total("sent_p0") + rep.input_bytes) / rep.batch),
        _mb(rep.per_image("sent_p1")),
    )
    return t


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
    weight_bound_bits: int = 4,
) -> CompileResult:
    from fssc.runtime.images import Preprocess

    from .codegen import write_program
    from .lower import lower

    con = console or Console(width=max(160, Console().width))
    graph = import_onnx(model)
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
        weight_bound_bits=weight_bound_bits,
    )
    prog = lower(res.graph)
    in_shape = res.graph.values[res.graph.inputs[0]].shape
    extra = {
        "source": os.path.basename(model),
        "output_mode": output_mode,
        "preprocess": Preprocess(size=in_shape[-1]).to_dict() if len(in_shape) == 4 else {},
        "cost": res.report.to_dict()["totals"],
    }
    write_program(prog, out_dir, os.path.basename(model), extra)
    res.program = prog
    if dump_ir:
        from .viewer import write_viewer

        page = write_viewer(res.records, out_dir, os.path.basename(model))
    passes = Table(title="passes", title_justify="left")
    for col in ("#", "pass", "ms", "changed"):
        passes.add_column(col)
    for r in res.records[1:]:
        passes.add_row(str(r.index), r.name, f"{r.seconds * 1e3:.1f}", "yes" if r.changed else "[dim]no[/]")
    con.print(passes)
    by_kind = res.report.gates_by_kind()
    table = report_table(
        res,
        f"secure cost of {os.path.basename(model)} (batch {res.report.batch}, "
        f"f={frac_bits}; gates: " + ", ".join(f"{k} {v:,}" for k, v in by_kind.items()) + ")",
    )
    con.print(table)
    con.print(f"per-model setup: P1 sends its masked weights once, {_mb(res.report.setup_bytes)} MB")
    con.print(
        f"wrote {out_dir}/party0/program.py, party1/program.py + weights.bin, dealer/program.py, "
        f"manifest.json (program {prog.hash}, output: {output_mode})"
    )
    if dump_ir:
        con.print(f"IR dumps and viewer: {page} (fssc view {out_dir})", markup=False, highlight=False)
    data = res.report.to_dict()
    data["passes"] = [{"index": r.index, "name": r.name, "changed": r.changed} for r in res.records]
    data["frac_bits"] = frac_bits
    write_atomic(os.path.join(out_dir, "report.json"), json.dumps(data, indent=1, sort_keys=True) + "\n")
    text = io.StringIO()
    Console(file=text, width=160, no_color=True).print(table)
    write_atomic(os.path.join(out_dir, "report.txt"), text.getvalue())
    if json_path:
        write_atomic(json_path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return res
