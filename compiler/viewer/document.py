"""The IR dump viewer: ``prog/ir/index.html``, one self-contained page.

``fssc compile --dump-ir`` calls :func:`write_viewer` with the pass manager's
records (one IR graph per pass, ``00-import`` first). This module turns them
into one JSON document and inlines it, with the page's CSS and JS
(``templates/viewer.css``, ``templates/viewer.js``), into
``templates/viewer.html.j2``. Everything the page shows is computed here, at
compile time, except what is cheap in the browser (edges, diffs, search):

* per pass: name, "IR changed?" flag, the text form (split so each op's line
  is known), a layered layout (:func:`layout`: networkx topological
  generations, columns by predecessor barycentre), and cost totals
  (:func:`pass_totals`);
* per op: kind, attributes, input and output values (shape, dtype, scale,
  bitwidth), provenance (ONNX nodes, creating pass), the gate (or, before
  mark-comparisons, the comparisons it will need, from
  :func:`fssc.compiler.backend.gates.gate_count`) and its cost
  (:func:`fssc.compiler.backend.cost.op_cost`). Ops identical in two passes are
  stored once; each pass lists indices into the op table;
* for the final pass: the lines of each role's generated program every op
  became (:func:`program_lines`, from the source maps code generation writes
  beside the programs).

The page is deterministic (the same input gives a byte-identical file). Pass
timings are not: they go to ``timings.js`` beside the page, which the page
loads with a ``<script>`` tag (that works from ``file://`` and from
``fssc view``) and shows when present.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from importlib import resources

import jinja2
import networkx as nx
from fssc.compiler.backend.cost import CostReport, OpCost, cost_report, op_cost
from fssc.compiler.backend.gates import gate_kind
from fssc.compiler.ir.graph import Graph, Op, Value, _fmt_attr, _fmt_type
from fssc.passes.mark_comparisons import plan_gate
from fssc.runtime.gates import HMul

from fssc import __version__
from fssc.errors import FsscError
from fssc.files import write_atomic

ROLES = ("party0", "party1", "dealer")
UNRANGED_BITS = 64  # a comparison before range analysis: the full ring
# layout grid (px): node box, horizontal and vertical pitch
NODE_W, NODE_H, COL_W, ROW_H, MARGIN = 184, 38, 212, 62, 40


# --------------------------------------------------------------------------- layout
def layout(graph: Graph) -> dict[int, tuple[int, int]]:
    """Op uid -> (x, y) of the node's centre, in px.

    Layers come from networkx's topological generations of the op graph (an
    op sits one layer below its deepest producer), then each op moves down
    to just above its first consumer (so a ResNet's downsample conv or an
    inserted rescale sits beside the op it feeds, not at the top). Within a
    layer each op asks for the mean column of its producers; ops are placed
    in that order, each in the nearest free column, so chains stay straight
    and side branches step aside.
    """
    g = nx.DiGraph()
    order = {op.uid: i for i, op in enumerate(graph.ops)}
    g.add_nodes_from(order)
    producer = {o: op.uid for op in graph.ops for o in op.outputs}
    for op in graph.ops:
        for i in op.inputs:
            if i in producer:
                g.add_edge(producer[i], op.uid)
    depth = {u: d for d, layer in enumerate(nx.topological_generations(g)) for u in layer}
    for u in sorted(depth, key=lambda u: (-depth[u], -order[u])):  # consumers first
        succ = [depth[s] for s in g.successors(u)]
        if succ:
            depth[u] = max(depth[u], min(succ) - 1)
    layers: dict[int, list[int]] = {}
    for u in sorted(depth, key=lambda u: order[u]):
        layers.setdefault(depth[u], []).append(u)
    col: dict[int, int] = {}
    pos: dict[int, tuple[int, int]] = {}
    for d in sorted(layers):
        layer = layers[d]
        want = {}
        for u in layer:
            preds = [col[p] for p in g.predecessors(u)]
            want[u] = sum(preds) / len(preds) if preds else 0.0
        taken: set[int] = set()
        for u in sorted(layer, key=lambda u: (want[u], order[u])):
            c = round(want[u])
            step = 0
            while c in taken:  # nearest free column, right first
                step += 1
                c = round(want[u]) + (step + 1) // 2 * (1 if step % 2 else -1)
            taken.add(c)
            col[u] = c
            pos[u] = (c, d)
    if not pos:
        return {}
    c0 = min(c for c, _ in pos.values())
    return {u: (MARGIN + NODE_W // 2 + (c - c0) * COL_W, MARGIN + NODE_H // 2 + d * ROW_H) for u, (c, d) in pos.items()}


# --------------------------------------------------------------------------- costs
def _planned_gate(op: Op, graph: Graph) -> dict | None:
    """The gate an op will need: its mark, or (before mark-comparisons) mark-comparisons' plan now."""
    if op.gate:
        return dict(op.gate)
    bits = op.bits
    gate = plan_gate(op, graph, bits or UNRANGED_BITS)
    if gate is not None:
        gate.update(estimated=True, ranged=bits is not None)
    return gate


def estimated_cost(op: Op, graph: Graph) -> tuple[OpCost, str]:
    """:func:`op_cost` of the op as it will run, and a note when that is an estimate.

    Before mark-comparisons a comparison op is costed with the gate it will
    get (bitwidth from range analysis once it ran, else the full 64-bit ring);
    a BatchNorm not yet folded is costed as the channel-wise affine op it
    would become.
    """
    note = ""
    probe = op
    if not op.gate and gate_kind(op):
        probe = Op(op.kind, op.inputs, op.outputs, op.attrs, op.origin, op.created_by, op.uid, _planned_gate(op, graph))
        bits = op.bits
        note = (
            f"estimate: not marked yet, m={bits} from range analysis"
            if bits is not None
            else f"estimate: not marked yet, m={UNRANGED_BITS} (no range analysis yet)"
        )
    elif op.kind == "batchnorm":
        probe = Op("affine", op.inputs, op.outputs, op.attrs, op.origin, op.created_by, op.uid)
        note = "estimate: costed as a channel-wise affine op (not folded)"
    try:
        return op_cost(probe, graph), note
    except FsscError as e:
        return OpCost(op.name, op.kind, tuple(graph.values[op.outputs[0]].shape)), f"not runnable: {e}"


def pass_totals(graph: Graph, costs: list[OpCost]) -> dict:
    """Cost totals of one pass (the compile report's totals, estimated before marking)."""
    base = cost_report(graph)  # input, setup and mask bytes; its per-op costs are replaced
    rep = CostReport(base.batch, costs, base.input_bytes, base.setup_bytes, base.masks_p0, base.n_inputs)
    t = rep.to_dict()["totals"]
    t["comparisons"] = t["gates"] - t["gates_by_kind"].get(HMul.kind, 0)  # products compare nothing
    t["marked"] = all(op.gate for op in graph.ops if gate_kind(op))
    return t


# --------------------------------------------------------------------------- op records
def _value(v: Value, digests: dict[int, str]) -> dict:
    d: dict[str, object] = {"n": v.name, "t": _fmt_type(v), "sh": list(v.shape), "dt": v.dtype}
    if v.scale is not None:
        d["s"] = v.scale
    if v.is_const:  # passes share constant arrays between clones: hash each once
        key = id(v.data)
        if key not in digests:
            digests[key] = v.digest()
        d["c"] = digests[key]
    return d


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    return _fmt_attr(x)


def op_record(op: Op, graph: Graph, line: str, digests: dict[int, str]) -> tuple[dict, OpCost]:
    """The page's record of one op (its text line, values, gate, cost, provenance) and its cost.

    ``digests``: constant hashes by array id, shared over one document's passes.
    """
    cost, note = estimated_cost(op, graph)
    gate = _planned_gate(op, graph)
    rec = {
        "uid": op.uid,
        "kind": op.kind,
        "name": op.name,
        "line": line,
        "attrs": {k: _fmt_attr(op.attrs[k]) for k in sorted(op.attrs)},
        "ins": [_value(graph.values[i], digests) for i in op.inputs],
        "outs": [_value(graph.values[o], digests) for o in op.outputs],
        "origin": list(op.origin),
        "by": op.created_by,
        "gate": _jsonable(gate),
        "marked": bool(op.gate),
        "cost": {k: getattr(cost, k) for k in ("key_p0", "key_p1", "rounds", "sent_p0", "sent_p1")},
    }
    if note:
        rec["note"] = note
    return rec, cost


def _split_text(graph: Graph) -> tuple[list[str], list[str], list[str]]:
    """The text form as (lines before the ops, one line per op, lines after)."""
    lines = graph.text().splitlines()
    n = len(graph.ops)
    tail = 2  # "  return ..." and "}"
    head = lines[: len(lines) - n - tail]
    body = lines[len(head) : len(head) + n]
    for op, ln in zip(graph.ops, body, strict=True):
        if not ln.startswith(f"  %{op.outputs[0]}:" if op.outputs else "  "):
            raise FsscError(f"viewer: text line of {op.kind} %{op.name} not where expected")
    return head, body, lines[len(head) + n :]


# --------------------------------------------------------------------------- generated code
def program_lines(prog_dir: str, graph: Graph) -> dict[int, dict[str, list[list]]]:
    """uid -> role -> [[line number, comment, code], ...] in the generated programs of ``graph``.

    Code generation writes ``<role>/sourcemap.json`` beside each program
    (:func:`fssc.compiler.backend.codegen.sourcemap`): for each op, the lines
    its statements became, each with the line of the statement's comment (none
    for the dealer's seed lines). The map names the program by its SHA-256; a
    program edited since refuses, as does a map naming an op the graph lacks.
    """
    uids = {op.uid for op in graph.ops}
    out: dict[int, dict[str, list[list]]] = {}
    for role in ROLES:
        path = os.path.join(prog_dir, role, "program.py")
        map_path = os.path.join(prog_dir, role, "sourcemap.json")
        if not os.path.exists(path) or not os.path.exists(map_path):
            continue
        with open(path, "rb") as fh:
            raw = fh.read()
        with open(map_path) as fh:
            smap = json.load(fh)
        if hashlib.sha256(raw).hexdigest() != smap.get("sha256"):
            raise FsscError(f"viewer: {path} is not the program {map_path} maps (edited since compile?)")
        lines = raw.decode().splitlines()
        for key, entries in smap["ops"].items():
            uid = int(key)
            if uid not in uids:
                raise FsscError(f"viewer: {map_path} maps op uid {uid}, which the final graph lacks")
            out.setdefault(uid, {})[role] = [
                [no, lines[cm - 1].strip()[2:] if cm else "", lines[no - 1].strip()] for no, cm in entries
            ]
    return out


# --------------------------------------------------------------------------- the document
def build_document(passes: Iterable, prog_dir: str | None = None, source: str = "") -> dict:
    """The JSON document the page renders (deterministic: no timings)."""
    passes = list(passes)
    table: list[dict] = []
    index: dict[str, int] = {}
    digests: dict[int, str] = {}
    out_passes = []
    for p in passes:
        g = p.graph
        if g is None:
            raise FsscError("viewer: the pass records hold no graphs (run the pipeline with keep_graphs=True)")
        head, body, tail = _split_text(g)
        pos = layout(g)
        refs, xy, costs = [], [], []
        for op, line in zip(g.ops, body, strict=True):
            rec, cost = op_record(op, g, line, digests)
            costs.append(cost)
            key = json.dumps(rec, sort_keys=True)
            if key not in index:
                index[key] = len(table)
                table.append(rec)
            refs.append(index[key])
            xy += list(pos[op.uid])
        width = max(xy[0::2], default=0) + NODE_W // 2 + MARGIN
        height = max(xy[1::2], default=0) + NODE_H // 2 + MARGIN
        out_passes.append(
            {
                "index": p.index,
                "name": p.name,
                "changed": bool(p.modified),
                "file": f"{p.index:02d}-{p.name}.txt",
                "ops": refs,
                "xy": xy,
                "size": [width, height],
                "head": head,
                "tail": tail,
                "inputs": list(g.inputs),
                "outputs": list(g.outputs),
                "totals": pass_totals(g, costs),
            }
        )
    final = passes[-1].graph if passes else None
    code = {}
    if prog_dir and final is not None:
        code = {str(u): v for u, v in sorted(program_lines(prog_dir, final).items())}
    return {
        "fssc": __version__,
        "graph": final.name if final is not None else "",
        "source": source,
        "batch": final.values[final.inputs[0]].shape[0] if final is not None and final.inputs else 1,
        "node": {"w": NODE_W, "h": NODE_H, "row": ROW_H},
        "ops": table,
        "passes": out_passes,
        "code": code,
    }


def _asset(name: str) -> str:
    return resources.files("fssc.compiler.viewer").joinpath("templates", name).read_text()


def _inline_json(doc: dict) -> str:
    """JSON safe inside a <script> element (no '<' at all, so no '</script>')."""
    s = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(doc: dict) -> str:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fssc.compiler.viewer", "templates"),
        autoescape=False,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    css, js = _asset("viewer.css"), _asset("viewer.js")
    for name, text in (("viewer.css", css), ("viewer.js", js)):
        if re.search(r"</(script|style)", text, re.I):
            raise FsscError(f"viewer: templates/{name} must not close its own <script>/<style> (it is inlined)")
    title = f"fssc IR: {doc['graph']}" + (f" ({doc['source']})" if doc["source"] else "")
    return env.get_template("viewer.html.j2").render(title=title, css=css, js=js, data=_inline_json(doc))


def timings_js(passes: Iterable) -> str:
    """The non-deterministic part: seconds per pass, as a script the page loads if present."""
    t = {str(p.index): round(float(p.seconds), 6) for p in passes}
    return "window.FSSC_TIMINGS = " + json.dumps(t, sort_keys=True) + ";\n"


def write_viewer(records, out_dir: str, source: str = "") -> str:
    """Write ``out_dir/ir/index.html`` (and ``timings.js``); returns the page's path.

    ``records``: the pass manager's :class:`PassRecord` list (kept graphs).
    ``out_dir``: the program directory; the generated programs in it, if
    written already, give each final op its code lines.
    """
    doc = build_document(records, out_dir, source)
    ir_dir = os.path.join(out_dir, "ir")
    os.makedirs(ir_dir, exist_ok=True)
    page = os.path.join(ir_dir, "index.html")
    write_atomic(page, render_page(doc))
    write_atomic(os.path.join(ir_dir, "timings.js"), timings_js(records))
    return page
