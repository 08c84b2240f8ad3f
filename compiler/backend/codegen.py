"""Code generation: the secure program's statements -> one Python program per role.

``prog/party0/program.py`` (data owner), ``prog/party1/program.py`` plus
``prog/party1/weights.bin`` (model owner), ``prog/dealer/program.py`` and
``prog/manifest.json``. The programs are straight-line calls into
:mod:`fssc.runtime.lib`, one statement per IR op, each under a comment with
its op, ONNX node(s) and pass. Weights live only in P1's weights file; P0's
and the dealer's programs carry shapes and public parameters only. Output is
deterministic: the same input compiles to byte-identical files.
"""

from __future__ import annotations

import json
import os

import jinja2
from fssc.compiler.backend.lower import PROTOCOL_VERSION, SecureProgram, Stmt
from fssc.runtime.geometry import POOL_PARAMS
from fssc.runtime.keys import KeyWriter

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


def _kw(params: dict, keys) -> str:
    return ", ".join(f"{k}={_lit(params[k])}" for k in keys)


def _fn_expr(p: dict) -> str:
    args = ", ".join(f"{k}={_lit(v)}" for k, v in p["fn_args"].items())
    return f"lib.{p['fn']}({args})"


def render_stmt(st: Stmt, role: str) -> list[str]:
    """Python lines for one statement in one role's program (with its comment)."""
    ctx = "D" if role == "dealer" else "P"
    T = _lit(st.tag)
    p = st.params
    a = st.args
    line: str
    if st.kind == "input":
        extra = f", X[{_lit(p['name'])}]" if role == "party0" else ""
        line = f"{st.out} = lib.input_wire({ctx}, {T}, {_lit(p['shape'])}{extra})"
    elif st.kind == "const":  # the model owner's constant operand of a local op, as a masked wire
        c = f", c=W[{T}]" if role == "party1" else ""
        line = f"{st.out} = lib.const({ctx}, {T}, shape={_lit(p['shape'])}{c})"
    elif st.kind == "linear":
        if role == "party0":
            line = f"{st.out} = lib.linear_p0(P, {T}, Z0.pop({T}))"
        elif role == "party1":
            w = f"W[{_lit(st.tag + '.w')}]"
            b = f"W[{_lit(st.tag + '.b')}]" if p["bias"] else "None"
            line = (
                f"{st.out} = lib.linear_p1(P, {T}, {a[0]}, {_fn_expr(p)}, {p['k']}, {w}, {b}, "
                f"w_bits={st.p1.get('w_bits', 64)})"
            )
        else:
            line = (
                f"{st.out} = lib.linear_dealer(D, {T}, {a[0]}, {_fn_expr(p)}, {p['k']}, "
                f"{_lit(p['w_shape'])}, {_lit(p['y_shape'])}, S[{T}], setup_seed)"
            )
    elif st.kind == "relu":
        line = f"{st.out} = lib.relu({ctx}, {T}, {a[0]}, m={p['m']}, trunc={p['trunc']})"
    elif st.kind == "trunc":
        line = f"{st.out} = lib.trunc({ctx}, {T}, {a[0]}, m={p['m']}, shift={p['shift']})"
    elif st.kind == "maxpool":
        line = f"{st.out} = lib.maxpool({ctx}, {T}, {a[0]}, {_kw(p, POOL_PARAMS + ('m', 'cmp_trunc'))})"
    elif st.kind == "clip":
        line = f"{st.out} = lib.clip({ctx}, {T}, {a[0]}, lo={p['lo']}, hi={p['hi']}, m={p['m']})"
    elif st.kind in ("argmax", "argmax2"):  # a tournament, or the 2-class label for P0 only
        line = f"{st.out} = lib.{st.kind}({ctx}, {T}, {a[0]}, {_kw(p, ('axis', 'keepdims', 'select_last', 'm'))})"
    elif st.kind == "local":
        kw = {k: v for k, v in p.items() if k != "fn"}
        args = ", ".join(a + [f"{k}={_lit(v)}" for k, v in kw.items()])
        line = f"{st.out} = lib.{p['fn']}({args})"
    elif st.kind == "output":
        lhs = f"out[{_lit(p['name'])}] = " if role == "party0" else ""
        line = f"{lhs}lib.output({ctx}, {T}, {a[0]})"
    else:  # pragma: no cover
        raise ValueError(st.kind)
    return [f"# {_comment_text(st.comment)}", line]


def _uses(st: Stmt, role: str) -> list[str]:
    """Variables a statement reads in one role's program (P0's linear layers read only Z0)."""
    if st.kind == "linear" and role == "party0":
        return []
    return list(st.args)


def _body(prog: SecureProgram, role: str, keep: set[str]) -> list[str]:
    """Statements in order, each followed by ``del`` of the variables it read for the last time,
    so a party holds only the activations still needed (not every layer's)."""
    last = {}
    for i, st in enumerate(prog.stmts):
        for v in _uses(st, role):
            last[v] = i
    body: list[str] = []
    for i, st in enumerate(prog.stmts):
        body += render_stmt(st, role)
        dead = sorted({v for v in _uses(st, role) if last[v] == i and v not in keep}, key=lambda v: int(v[1:]))
        if dead:
            body.append(f"del {', '.join(dead)}")
    return body


def _functions(prog: SecureProgram, role: str) -> list[dict]:
    labels = [o for o in prog.outputs if not o["masked"]]
    body = _body(prog, role, {o["var"] for o in labels})
    if role == "party0":
        off = ["Z0 = {}"]
        for st in prog.linears:
            p = st.params
            T = _lit(st.tag)
            off += [
                f"# {_comment_text(st.comment)}",
                f"Z0[{T}] = lib.linear_offline(P, {T}, {_fn_expr(p)}, {p['k']}, "
                f"{_lit(p['x_shape'])}, WH[{T}], {_lit(p['y_shape'])})",
            ]
        off.append("return Z0")
        body = ["out = {}"] + body + [f"out[{_lit(o['name'])}] = {o['var']}" for o in labels] + ["return out"]
        return [
            {
                "signature": "offline(P, WH)",
                "doc": "P0's halves z_0 of every linear layer, before the input exists (keys and W^ suffice).",
                "body": off,
            },
            {
                "signature": "online(P, X, Z0)",
                "doc": "The inference: X maps each input's name to its encoded batch (P0 holds every "
                "input); returns the outputs (ring elements at the manifest's scale, or labels).",
                "body": body,
            },
        ]
    if role == "party1":
        return [
            {
                "signature": "online(P, W)",
                "doc": "The inference on P1's side: W holds the encoded weights. Learns nothing.",
                "body": body,
            }
        ]
    seeds = [f"S[{_lit(st.tag)}] = D.linear_seeds({_lit(st.tag)})" for st in prog.linears]
    return [
        {
            "signature": "deal(D, setup_seed)",
            "doc": "One batch of keys: P0's linear seeds first, then every op in evaluation order.",
            "body": ["S = {}"] + seeds + body,
        }
    ]


def render(prog: SecureProgram, role: str, source: str) -> str:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fssc.compiler.backend", "templates"),
        keep_trailing_newline=True,
        autoescape=False,
        undefined=jinja2.StrictUndefined,
    )
    header = []
    if role in ("party0", "party1"):
        header.append("# weighted layers: tag -> weight shape (W^ = W + A is sent to P0 once per session)")
        header.append("LINEAR_WEIGHTS = " + json.dumps({st.tag: st.params["w_shape"] for st in prog.linears}))
    title, doc = ROLES[role]
    return env.get_template("program.py.j2").render(
        role=role,
        role_title=title,
        role_doc=doc,
        version=__version__,
        source=_doc_text(source),
        hash=prog.hash,
        header=header,
        functions=_functions(prog, role),
    )


def manifest(prog: SecureProgram, extra: dict) -> dict:
    return {
        "fssc_version": __version__,
        "protocol": PROTOCOL_VERSION,
        "program_hash": prog.hash,
        "name": prog.name,
        "ring_bits": 64,
        "frac_bits": prog.frac_bits,
        "inputs": prog.inputs,
        "outputs": prog.outputs,
        **extra,
    }


def write_program(prog: SecureProgram, out_dir: str, source: str, extra_manifest: dict) -> dict[str, str]:
    """Write the three programs, P1's weights and the manifest; returns role -> path."""
    sources = {role: render(prog, role, source) for role in ROLES}
    for role, src in sources.items():  # a program that does not parse is a compiler bug: never write it
        try:
            compile(src, f"{role}/program.py", "exec")
        except SyntaxError as e:
            raise FsscError(f"code generation produced invalid Python for {role} (line {e.lineno}): {e.msg}") from None
    paths = {}
    for role, src in sources.items():
        d = os.path.join(out_dir, role)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "program.py")
        write_atomic(path, src)
        paths[role] = path
    w = KeyWriter(os.path.join(out_dir, "party1", "weights.bin"), {"kind": "weights", "program": prog.hash})
    for name in sorted(prog.weights):
        w.put(name, prog.weights[name])
    w.close()
    write_atomic(
        os.path.join(out_dir, "manifest.json"),
        json.dumps(manifest(prog, extra_manifest), indent=1, sort_keys=True) + "\n",
    )
    return paths
