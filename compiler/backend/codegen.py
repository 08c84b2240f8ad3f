"""Code generation: the secure program's statements -> one Python program per role.

``prog/party0/program.py`` (data owner), ``prog/party1/program.py`` plus
``prog/party1/weights.bin`` (model owner), ``prog/dealer/program.py``, a
``sourcemap.json`` beside each program and ``prog/manifest.json``. The programs
are straight-line calls into :mod:`fssc.runtime.lib`, one statement per IR op,
each under a comment with its op, ONNX node(s) and pass. Every call passes the
role's context (``P`` or ``D``) first and everything else by keyword, and is
checked against the runtime's signature before anything is written
(:mod:`fssc.compiler.backend.contract`); each program's functions and
constants are the ones the runtime loads (:data:`fssc.runtime.session.PROGRAM_FUNCTIONS`).
The source map gives, per IR op, the lines of the program it became (the IR
viewer reads it). Weights live only in P1's weights file; P0's and the
dealer's programs carry shapes and public parameters only. Output is
deterministic: the same input compiles to byte-identical files.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from dataclasses import dataclass

import jinja2
from fssc.compiler.backend.contract import Call, Lit, bind_operands
from fssc.compiler.backend.program import SecureProgram, Stmt, from_manifest
from fssc.runtime.gates import STATEMENTS
from fssc.runtime.keys import KeyWriter
from fssc.runtime.session import PROGRAM_CONSTANTS, PROGRAM_FUNCTIONS

from fssc import __version__
from fssc.errors import FsscError
from fssc.files import write_atomic

ROLES = {
    "party0": ("party 0, the data owner", "It holds no weights: W^ = W + A arrives from the model owner, masked."),
    "party1": ("party 1, the model owner", "Its weights are in weights.bin beside it; it never sees a result."),
    "dealer": ("the dealer", "It walks the program on masks and writes both parties' keys, op by op."),
}


def _lit(v) -> str:
    """A Python literal for a public parameter (ints, lists, None, strings: names from the model are data,
    never code)."""
    return repr(v)


def _comment_text(s: str) -> str:
    """One comment line: model-supplied names cannot end the comment (no newlines or control characters)."""
    return "".join(c if c.isprintable() else "?" for c in s)


def _doc_text(s: str) -> str:
    """Text safe inside the programs' triple-quoted docstring."""
    return _comment_text(s).replace("\\", "/").replace('"', "'")


def _op_uid(tag: str) -> int | None:
    """The IR op a statement came from: lowering tags an op's statements ``gate_tag(op)`` = ``op{uid}``, with a
    suffix after a dot for its constants (``op7.c1``); inputs' and outputs' tags (``in.x``, ``out.y``) name no
    op."""
    head = tag.split(".", 1)[0]
    return int(head[2:]) if head.startswith("op") and head[2:].isdigit() else None


@dataclass
class _Block:
    """Lines of one function body: a statement (its comment, then its code) or plain code (``del``,
    ``return``); ``uid`` is the op the lines belong to, for the source map."""

    code: list[str]
    comment: str | None = None
    uid: int | None = None


def _bilinear(p: dict) -> Call:
    return Call(p["fn"], {k: Lit(v) for k, v in p["fn_args"].items()})


def _stmt_call(st: Stmt, role: str) -> tuple[str, Call]:
    """The left-hand side and the runtime call of one statement in one role's program."""
    ctx = "D" if role == "dealer" else "P"
    T = Lit(st.tag)
    p = st.params
    a = st.args
    out = f"{st.out} = "
    if st.kind == "input":
        x = {"x": f"X[{_lit(p['name'])}]"} if role == "party0" else {}
        return out, Call("input_wire", {"tag": T, "shape": Lit(p["shape"]), **x}, ctx)
    if st.kind == "const":  # the model owner's constant operand of a local op, as a masked wire
        c = {"c": f"W[{_lit(st.tag)}]"} if role == "party1" else {}
        return out, Call("const", {"tag": T, "shape": Lit(p["shape"]), **c}, ctx)
    if st.kind == "linear":
        if role == "party0":
            return out, Call("linear_p0", {"tag": T, "z0": f"Z0.pop({_lit(st.tag)})"}, ctx)
        if role == "party1":
            kw = {
                "tag": T,
                "x": a[0],
                "fn": _bilinear(p),
                "k": Lit(p["k"]),
                "w": f"W[{_lit(st.tag + '.w')}]",
                "b": f"W[{_lit(st.tag + '.b')}]" if p["bias"] else "None",
                "w_bits": Lit(st.p1.get("w_bits", 64)),
            }
            return out, Call("linear_p1", kw, ctx)
        kw = {
            "tag": T,
            "r_x": a[0],
            "fn": _bilinear(p),
            "k": Lit(p["k"]),
            "w_shape": Lit(p["w_shape"]),
            "y_shape": Lit(p["y_shape"]),
            "seeds": f"S[{_lit(st.tag)}]",
            "setup_seed": "setup_seed",
        }
        return out, Call("linear_dealer", kw, ctx)
    if st.kind in STATEMENTS:  # relu, trunc, maxpool, clip, argmax (a tournament), argmax2 (the label for P0 only)
        names = getattr(STATEMENTS[st.kind], "operands", ("x",))  # the gate's secret operands (hmul: x, y)
        if {"tag", *names} & p.keys():
            raise FsscError(f"a public parameter may not be named tag or {' or '.join(names)}: {sorted(p)}")
        ops = dict(zip(names, a, strict=True))
        return out, Call(st.kind, {"tag": T, **ops, **{k: Lit(v) for k, v in p.items()}}, ctx)
    if st.kind == "local":
        params = {k: v for k, v in p.items() if k != "fn"}
        kw = {**bind_operands(p["fn"], params, list(a)), **{k: Lit(v) for k, v in params.items()}}
        return out, Call(p["fn"], kw)
    if st.kind == "output":
        lhs = f"out[{_lit(p['name'])}] = " if role == "party0" else ""
        return lhs, Call("output", {"tag": T, "v": a[0]}, ctx)
    raise FsscError(f"unknown statement kind {st.kind!r}")


def _checked(where: str, make):
    """``make()``, its Call(s) checked against the runtime; FsscError naming ``where`` if they do not fit."""
    try:
        res = make()
        res[1].check()
    except FsscError as e:
        raise FsscError(f"code generation: {where}: {e}") from None
    return res


def _where(st: Stmt, role: str) -> str:
    return f"{role}'s {st.kind} statement {st.tag} ({st.label})"


def render_stmt(st: Stmt, role: str) -> list[str]:
    """Python lines for one statement in one role's program (its comment, then the checked call)."""
    lhs, call = _checked(_where(st, role), lambda: _stmt_call(st, role))
    return [f"# {_comment_text(st.comment)}", lhs + call.render()]


def _uses(st: Stmt, role: str) -> list[str]:
    """Variables a statement reads in one role's program (P0's linear layers read only Z0)."""
    if st.kind == "linear" and role == "party0":
        return []
    return list(st.args)


def _body(prog: SecureProgram, role: str, keep: set[str]) -> list[_Block]:
    """Statements in order, each followed by ``del`` of the variables it read for the last time,
    so a party holds only the activations still needed (not every layer's)."""
    last = {}
    for i, st in enumerate(prog.stmts):
        for v in _uses(st, role):
            last[v] = i
    body: list[_Block] = []
    for i, st in enumerate(prog.stmts):
        comment, code = render_stmt(st, role)
        body.append(_Block([code], comment[2:], _op_uid(st.tag)))
        dead = sorted({v for v in _uses(st, role) if last[v] == i and v not in keep}, key=lambda v: int(v[1:]))
        if dead:
            body.append(_Block([f"del {', '.join(dead)}"]))
    return body


def _offline(st: Stmt) -> tuple[str, Call]:
    p = st.params
    kw = {
        "tag": Lit(st.tag),
        "fn": _bilinear(p),
        "k": Lit(p["k"]),
        "x_shape": Lit(p["x_shape"]),
        "w_hat": f"WH[{_lit(st.tag)}]",
        "y_shape": Lit(p["y_shape"]),
    }
    return f"Z0[{_lit(st.tag)}] = ", Call("linear_offline", kw, "P")


def _functions(prog: SecureProgram, role: str) -> dict[str, list[_Block]]:
    """Function name -> body, for the functions the runtime calls in a role's program
    (:data:`fssc.runtime.session.PROGRAM_FUNCTIONS` gives their parameters)."""
    labels = [o for o in prog.outputs if not o["masked"]]
    body = _body(prog, role, {o["var"] for o in labels})
    if role == "party0":
        off = [_Block(["Z0 = {}"])]
        for st in prog.linears:
            lhs, call = _checked(f"{_where(st, role)}, offline half", lambda st=st: _offline(st))
            off.append(_Block([lhs + call.render()], _comment_text(st.comment), _op_uid(st.tag)))
        off.append(_Block(["return Z0"]))
        outs = [f"out[{_lit(o['name'])}] = {o['var']}" for o in labels]
        return {"offline": off, "online": [_Block(["out = {}"]), *body, _Block([*outs, "return out"])]}
    if role == "party1":
        return {"online": body}
    seeds = [
        _Block([f"S[{_lit(st.tag)}] = D.linear_seeds({_lit(st.tag)})"], None, _op_uid(st.tag)) for st in prog.linears
    ]
    return {"deal": [_Block(["S = {}"]), *seeds, *body]}


DOCS = {
    ("party0", "offline"): "P0's halves z_0 of every linear layer, before the input exists (keys and W^ suffice).",
    ("party0", "online"): "The inference: X maps each input's name to its encoded batch (P0 holds every "
    "input); returns the outputs (ring elements at the manifest's scale, or labels).",
    ("party1", "online"): "The inference on P1's side: W holds the encoded weights. Learns nothing.",
    ("dealer", "deal"): "One batch of keys: P0's linear seeds first, then every op in evaluation order.",
}


@dataclass
class Rendered:
    """One role's program: its text, and the source map op uid -> [[line, comment line or None], ...] (1-based
    line numbers of the op's code lines, each with the line of the statement's comment)."""

    text: str
    lines: dict[int, list[list[int | None]]]


def _flat(blocks: list[_Block]) -> list[str]:
    out: list[str] = []
    for b in blocks:
        out += ([f"# {b.comment}"] if b.comment is not None else []) + b.code
    return out


def _check_interface(src: str, role: str) -> None:
    """The program defines what the runtime loads (:func:`fssc.runtime.session.check_interface`), read from its
    syntax tree: each constant assigned at the top level, each function with its parameters."""
    tree = ast.parse(src)
    names = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    funcs = {n.name: tuple(a.arg for a in n.args.args) for n in tree.body if isinstance(n, ast.FunctionDef)}
    missing = [c for c in PROGRAM_CONSTANTS[role] if c not in names]
    missing += [f"{f}({', '.join(ps)})" for f, ps in PROGRAM_FUNCTIONS[role].items() if funcs.get(f) != ps]
    if missing:
        raise FsscError(f"code generation: the {role} program would lack {', '.join(missing)}")


def render_program(prog: SecureProgram, role: str) -> Rendered:
    """One role's program, every runtime call checked against :mod:`fssc.runtime.lib`, with its source map.
    P0's and the dealer's programs depend on the program's public form only (``prog.public()``)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fssc.compiler.backend", "templates"),
        keep_trailing_newline=True,
        autoescape=False,
        undefined=jinja2.StrictUndefined,
    )
    header = []
    if role in ("party0", "party1"):
        header.append("# weighted layers: tag -> weight shape (W^ = W + A is sent to P0 once per session)")
        header.append("LINEAR_WEIGHTS = " + repr({st.tag: st.params["w_shape"] for st in prog.linears}))
    title, doc = ROLES[role]
    bodies = _functions(prog, role)
    functions = [
        {"signature": f"{name}({', '.join(PROGRAM_FUNCTIONS[role][name])})", "doc": DOCS[role, name], "body": _flat(b)}
        for name, b in bodies.items()
    ]
    text = env.get_template("program.py.j2").render(
        role=role,
        role_title=title,
        role_doc=doc,
        version=__version__,
        source=_doc_text(prog.source),
        hash=prog.hash,
        header=header,
        functions=functions,
    )
    lines = text.splitlines()
    smap: dict[int, list[list[int | None]]] = {}
    for fn, blocks in zip(functions, bodies.values(), strict=True):
        no = lines.index(f"def {fn['signature']}:") + 3  # 1-based: the def, its one-line docstring, then the body
        for b in blocks:
            comment = None
            if b.comment is not None:
                comment, no = no, no + 1
            for code in b.code:
                if lines[no - 1] != f"    {code}":  # the template moved the body: a compiler bug
                    raise FsscError(f"code generation: the {role} program's line {no} is not where its map says")
                if b.uid is not None:
                    smap.setdefault(b.uid, []).append([no, comment])
                no += 1
    return Rendered(text, smap)


def render(prog: SecureProgram, role: str) -> str:
    """One role's program (see :func:`render_program`)."""
    return render_program(prog, role).text


def sourcemap(prog: SecureProgram, role: str, r: Rendered) -> dict:
    """``<role>/sourcemap.json``: which lines of ``<role>/program.py`` each IR op became. Beside each role's
    program, so a party's folder maps only its own program; ``sha256`` is the program's, whose lines it maps."""
    return {
        "program": "program.py",
        "program_hash": prog.hash,
        "sha256": hashlib.sha256(r.text.encode()).hexdigest(),
        "ops": {str(uid): r.lines[uid] for uid in sorted(r.lines)},
    }


@dataclass
class Written:
    """What :func:`write_program` wrote: role -> program path, and role -> its source map."""

    paths: dict[str, str]
    sourcemaps: dict[str, dict]


def write_program(prog: SecureProgram, out_dir: str) -> Written:
    """Write the three programs with their source maps, P1's weights and the manifest (the program's public
    form, :meth:`SecureProgram.manifest`: what ``fssc check`` regenerates P0's and the dealer's programs from).

    Every program is rendered, its runtime calls checked, parsed and its interface checked before any file
    is written: a program that would call the runtime wrongly is never written."""
    rendered = {role: render_program(prog, role) for role in ROLES}
    # P0's and the dealer's programs must be what fssc check and fssc run regenerate from the manifest as
    # written: read it back and generate them again from that alone
    public = from_manifest(json.loads(json.dumps(prog.manifest())), f"{prog.name}'s manifest")
    for role in ("party0", "dealer"):
        if render_program(public, role).text != rendered[role].text:
            raise FsscError(f"code generation: the {role} program differs when generated from the manifest")
    for role, r in rendered.items():  # a program that does not parse is a compiler bug: never write it
        try:
            compile(r.text, f"{role}/program.py", "exec")
        except SyntaxError as e:
            raise FsscError(f"code generation produced invalid Python for {role} (line {e.lineno}): {e.msg}") from None
        _check_interface(r.text, role)
    paths, maps = {}, {}
    for role, r in rendered.items():
        d = os.path.join(out_dir, role)
        os.makedirs(d, exist_ok=True)
        paths[role] = os.path.join(d, "program.py")
        maps[role] = sourcemap(prog, role, r)
        write_atomic(paths[role], r.text)
        write_atomic(os.path.join(d, "sourcemap.json"), json.dumps(maps[role], separators=(",", ":")) + "\n")
    w = KeyWriter(  # a .part a killed compile left is overwritten (one compile writes one folder)
        os.path.join(out_dir, "party1", "weights.bin"), {"kind": "weights", "program": prog.hash}, exclusive=False
    )
    for name in sorted(prog.weights):
        w.put(name, prog.weights[name])
    w.close()
    write_atomic(
        os.path.join(out_dir, "manifest.json"),
        json.dumps(prog.manifest(), indent=1, sort_keys=True) + "\n",
    )
    return Written(paths, maps)
