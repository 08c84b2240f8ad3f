"""The secure program: its statements, its public form (``manifest.json``), its hash, and its structural check.

Lowering (:mod:`fssc.compiler.backend.lower`) makes a :class:`SecureProgram`
from the compiled IR; code generation (:mod:`fssc.compiler.backend.codegen`)
renders it once per role. Everything the data owner's and the dealer's programs
are generated from is public: the statements (kind, variables, public
parameters, tag, and the comment naming the IR op, ONNX node and pass), the
inputs and outputs, and what the compiler records about the program (its
source file name, output mode, preprocessing, input guard and cost totals).
That public content is ``manifest.json`` (:meth:`SecureProgram.public`), and
the program hash is the hash of exactly that content (with the fssc version
that generated it), so ``fssc check`` and ``fssc run`` can regenerate a party's
program from the manifest alone and compare it byte for byte with the one the
model owner sent (:mod:`fssc.compiler.backend.trust`). The model owner's
weights, and what is derived from them (P1's operand widths), are never part of it.

This module, the code generator and the contract import nothing of the IR, the
passes, torch or onnx: the data owner's installation runs them
(tests/test_layering.py checks).
"""

from __future__ import annotations

import keyword
import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np
from fssc.compiler.backend.contract import bind_operands
from fssc.runtime import lib
from fssc.runtime.gates import STATEMENTS
from fssc.runtime.session import manifest_hash

from fssc import __version__
from fssc.errors import FsscError

PROTOCOL_VERSION = 1
RING_BITS = 64

# the statement kinds: the comparison gates' (STATEMENTS) and these
PLAIN_KINDS = ("input", "const", "linear", "local", "output")
# the keys of the public form that the program's own fields fill; the rest (source, preprocess, ...) is ``info``
CORE_KEYS = ("fssc_version", "protocol", "name", "ring_bits", "frac_bits", "inputs", "outputs", "stmts")


@dataclass
class Stmt:
    kind: str
    out: str | None
    args: list[str]
    params: dict
    tag: str
    comment: str
    p1: dict = field(default_factory=dict)  # P1-only parameters (derived from the weights): never public

    @property
    def label(self) -> str:
        """The op a statement came from, as its comment names it ("concat %h")."""
        return self.comment.split(" [")[0]

    def public(self) -> dict:
        d = asdict(self)
        d.pop("p1")
        return d


@dataclass
class SecureProgram:
    name: str
    stmts: list[Stmt]
    inputs: list[dict]
    outputs: list[dict]
    frac_bits: int
    weights: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    ir_shapes: dict[str, tuple] | None = field(repr=False, default_factory=dict)  # var -> its IR value's shape
    info: dict = field(default_factory=dict)  # public facts the compiler records (source, preprocess, ...)

    @property
    def linears(self) -> list[Stmt]:
        return [s for s in self.stmts if s.kind == "linear"]

    @property
    def source(self) -> str:
        """The model file the program was compiled from (its base name), as the programs' docstrings name it."""
        return str(self.info.get("source", self.name))

    def public(self) -> dict:
        """``manifest.json`` without its ``program_hash``: everything P0's and the dealer's programs are
        generated from, and nothing of the weights."""
        clash = sorted(set(self.info) & {*CORE_KEYS, "program_hash"})
        if clash:
            raise FsscError(f"program info may not redefine {', '.join(clash)}")
        return {
            "fssc_version": __version__,
            "protocol": PROTOCOL_VERSION,
            "name": self.name,
            "ring_bits": RING_BITS,
            "frac_bits": self.frac_bits,
            "inputs": self.inputs,
            "outputs": self.outputs,
            **self.info,
            "stmts": [s.public() for s in self.stmts],
        }

    @property
    def hash(self) -> str:
        return manifest_hash(self.public())

    def manifest(self) -> dict:
        return {**self.public(), "program_hash": self.hash}


# ------------------------------------------------------------ the public form, read back
_VAR = re.compile(r"v[0-9]+")
MAX_ELEMENTS = 1 << 31  # the largest tensor a statement may name (the check builds the linear layers' operands)


def _name(v) -> bool:
    return isinstance(v, str) and v.isidentifier() and not keyword.iskeyword(v) and not v.startswith("_")


def _json_data(v) -> bool:
    """Plain JSON data (what a public parameter may be): ``repr`` writes it as a Python literal, so no code can
    hide in it (finite floats only: ``repr`` of NaN is a name; dict keys are identifiers, as keyword names)."""
    if v is None or isinstance(v, bool | int | str):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(_json_data(x) for x in v)
    if isinstance(v, dict):
        return all(_name(k) and _json_data(x) for k, x in v.items())
    return False


def _shape(v) -> bool:
    return (
        isinstance(v, list)
        and all(type(d) is int and d >= 0 for d in v)
        and math.prod(v) <= MAX_ELEMENTS
        and len(v) <= 16
    )


def _stmt_from(d, i: int, where: str) -> Stmt:
    def bad(why: str) -> FsscError:
        return FsscError(f"{where}: statement {i}: {why}")

    if not isinstance(d, dict) or set(d) != {"kind", "out", "args", "params", "tag", "comment"}:
        raise bad("expected the keys kind, out, args, params, tag, comment")
    kind, out, args, params = d["kind"], d["out"], d["args"], d["params"]
    if kind not in PLAIN_KINDS and kind not in STATEMENTS:
        raise bad(f"unknown statement kind {kind!r}")
    if (out is None) != (kind == "output") or (out is not None and not (isinstance(out, str) and _VAR.fullmatch(out))):
        raise bad(f"{kind} defines {out!r}: expected a variable v<N>" + (" (none for an output)" if out else ""))
    if not isinstance(args, list) or not all(isinstance(a, str) and _VAR.fullmatch(a) for a in args):
        raise bad(f"operands {args!r}: expected a list of variables v<N>")
    if not isinstance(params, dict) or not all(_name(k) for k in params) or not _json_data(params):
        raise bad("public parameters must be plain data under identifier names")
    if not isinstance(d["tag"], str) or not isinstance(d["comment"], str):  # both written as data (repr, comment)
        raise bad("its tag and its comment must be strings")
    shapes = [params[k] for k in ("shape", "x_shape", "y_shape", "w_shape") if k in params]
    if not all(_shape(s) for s in shapes):
        raise bad(f"a shape that is not a list of at most 16 sizes of at most {MAX_ELEMENTS} elements in all")
    fns = {"linear": lib.BILINEAR_MAPS, "local": lib.LOCAL_FUNCTIONS}.get(kind)
    if fns is not None and params.get("fn") not in fns:
        raise bad(f"{kind} statement names {params.get('fn')!r}, not one of the runtime's {kind} functions")
    return Stmt(kind, out, list(args), dict(params), d["tag"], d["comment"])


def from_manifest(m: dict, where: str = "manifest.json") -> SecureProgram:
    """The program ``manifest.json`` describes, with no weights: what P0's and the dealer's programs are
    generated from. Refuses (one line naming ``where``) a manifest of another fssc version (its programs may be
    generated differently), one whose content does not hash to its ``program_hash``, and any statement that is
    not well formed: variables ``v<N>`` defined once and before use, unique tags, known statement kinds and
    runtime functions, public parameters as plain data, and every statement's shape re-inferred with the
    runtime's own functions (:func:`check_program`)."""
    if not isinstance(m, dict):
        raise FsscError(f"{where}: not an fssc manifest")
    if m.get("fssc_version") != __version__:
        raise FsscError(
            f"{where}: compiled by fssc {m.get('fssc_version')}, this installation is fssc {__version__}: "
            f"check it with the same fssc version"
        )
    missing = [k for k in (*CORE_KEYS, "program_hash") if k not in m]
    if missing:
        raise FsscError(f"{where}: lacks {', '.join(missing)} (not an fssc manifest, or from an older fssc)")
    public = {k: v for k, v in m.items() if k != "program_hash"}
    if manifest_hash(public) != m["program_hash"]:
        raise FsscError(f"{where}: its content does not hash to its program_hash {m['program_hash']} (edited?)")
    if m["protocol"] != PROTOCOL_VERSION or m["ring_bits"] != RING_BITS:
        raise FsscError(f"{where}: protocol {m['protocol']}, ring {m['ring_bits']} bits: not this fssc's")
    if not isinstance(m["stmts"], list) or not isinstance(m["name"], str) or type(m["frac_bits"]) is not int:
        raise FsscError(f"{where}: name, frac_bits or stmts of the wrong type")
    stmts = [_stmt_from(d, i, where) for i, d in enumerate(m["stmts"])]
    defined: set[str] = set()
    tags: set[str] = set()
    for i, st in enumerate(stmts):
        if st.out in defined:
            raise FsscError(f"{where}: statement {i} ({st.label}) defines {st.out} a second time")
        if st.tag in tags:
            raise FsscError(f"{where}: statement {i} ({st.label}) reuses the tag {st.tag!r}")
        tags.add(st.tag)
        if st.out is not None:
            defined.add(st.out)
    _check_records(m, stmts, defined, where)
    info = {k: v for k, v in public.items() if k not in CORE_KEYS}
    prog = SecureProgram(m["name"], stmts, m["inputs"], m["outputs"], m["frac_bits"], ir_shapes=None, info=info)
    try:
        check_program(prog)
    except FsscError as e:
        raise FsscError(f"{where}: {e}") from None
    if prog.hash != m["program_hash"]:  # read back, it must be the program the manifest describes
        raise FsscError(f"{where}: does not read back as the program it describes (a compiler bug)")
    return prog


def _check_records(m: dict, stmts: list[Stmt], defined: set[str], where: str) -> None:
    """The manifest's inputs and outputs, which the data owner's command line reads: each input is an input
    statement's (its name, variable and shape) at the program's scale f, and each output a variable the
    program defines, with its kind, scale and whether P0 unmasks it."""
    fields = {
        "inputs": {"name": str, "var": str, "shape": list, "scale": int},
        "outputs": {"name": str, "var": str, "shape": list, "scale": int, "kind": str, "masked": bool},
    }
    for key, spec in fields.items():
        recs = m[key]
        if not isinstance(recs, list) or not all(
            isinstance(r, dict) and set(r) == set(spec) and all(type(r[k]) is t for k, t in spec.items()) for r in recs
        ):
            raise FsscError(f"{where}: {key} must be records of {', '.join(spec)}")
    by_var = {st.out: st for st in stmts if st.kind == "input"}
    if [i["var"] for i in m["inputs"]] != list(by_var):
        raise FsscError(f"{where}: its inputs are not the program's input statements")
    for i in m["inputs"]:
        st = by_var[i["var"]]
        if i["name"] != st.params.get("name") or i["shape"] != st.params.get("shape") or i["scale"] != m["frac_bits"]:
            raise FsscError(
                f"{where}: input {i['name']!r} disagrees with its statement (name, shape) or is not at scale "
                f"frac_bits = {m['frac_bits']}"
            )
    outs = {st.params.get("name"): st.args for st in stmts if st.kind == "output"}
    for o in m["outputs"]:
        if o["var"] not in defined or o["kind"] not in ("labels", "logits") or not _shape(o["shape"]):
            raise FsscError(f"{where}: output {o['name']!r} is not a labels or logits output of the program")
        if o["masked"] != (o["name"] in outs) or (o["masked"] and outs[o["name"]] != [o["var"]]):
            raise FsscError(f"{where}: output {o['name']!r} disagrees with the program's output statements")


# ------------------------------------------------------------ the structural check
def _shape_of(st: Stmt, ins: list[np.ndarray]) -> tuple:
    """The statement's output shape by the runtime's own rules: the functions the generated programs call,
    run on zeros (the bilinear maps on zero floats; no protocol)."""
    p = st.params
    if st.kind in ("input", "const"):
        return tuple(p["shape"])
    if st.kind == "linear":
        fn = getattr(lib, p["fn"])(**p["fn_args"])
        if tuple(ins[0].shape) != tuple(p["x_shape"]):
            raise FsscError(f"its operand has shape {ins[0].shape}, the statement expects {tuple(p['x_shape'])}")
        x, w = np.zeros(p["x_shape"]), np.zeros(p["w_shape"])
        per_row = p["fn"] in ("conv", "channelwise")  # maps each batch row alike: one row, then N of them
        y = (x.shape[0], *fn(x[:1], w).shape[1:]) if per_row else fn(x, w).shape
        if tuple(y) != tuple(p["y_shape"]):
            raise FsscError(f"lib.{p['fn']} gives {tuple(y)}, the statement claims {tuple(p['y_shape'])}")
        return tuple(y)
    if st.kind in STATEMENTS:
        return STATEMENTS[st.kind].out_shape(*[i.shape for i in ins], **p)
    if st.kind == "local":
        kw = {k: v for k, v in p.items() if k != "fn"}
        return getattr(lib, p["fn"])(**bind_operands(p["fn"], kw, ins), **kw).shape
    raise FsscError(f"unknown statement kind {st.kind!r}")


def check_program(prog: SecureProgram) -> None:
    """Refuse a program that disagrees with the IR: every operand defined before use, secret wires only into
    gates and linear layers (a constant of the model owner's is a wire of its own, for local ops only), and
    every statement's output shape, re-inferred with the runtime's functions, equal to its IR value's (when the
    program comes from the IR; read back from a manifest, ``ir_shapes`` is None and the shapes need only be
    consistent with the runtime's functions)."""
    shapes: dict[str, np.ndarray] = {}  # var -> zeros of its shape (broadcast views: no memory)
    consts: set[str] = set()
    for st in prog.stmts:
        for a in st.args:
            if a not in shapes:
                raise FsscError(f"lowering: {st.label} reads {a} before any statement defines it")
        if st.kind in STATEMENTS or st.kind == "linear":
            want_args = len(getattr(STATEMENTS.get(st.kind), "operands", ("x",)))
            if len(st.args) != want_args:
                raise FsscError(
                    f"lowering: {st.label} ({st.kind}) takes {want_args} secret operand(s), got {len(st.args)}"
                )
            if any(a in consts for a in st.args):
                raise FsscError(
                    f"lowering: {st.label} ({st.kind}) cannot take the model owner's constant as its operand"
                )
        if st.kind == "output":
            continue
        try:
            shape = _shape_of(st, [shapes[a] for a in st.args])
        except FsscError as e:
            raise FsscError(f"lowering: {st.label} ({st.kind}): {e}") from None
        except (ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as e:
            raise FsscError(
                f"lowering: {st.label} ({st.kind}): the runtime cannot take its operands "
                f"{[tuple(shapes[a].shape) for a in st.args]}: {type(e).__name__}: {e}"
            ) from None
        if st.out is None:
            continue  # an output statement: it defines nothing
        if prog.ir_shapes is not None:
            want = prog.ir_shapes.get(st.out) if st.kind != "const" else tuple(st.params["shape"])
            if want is None or tuple(shape) != tuple(want):
                raise FsscError(f"lowering: {st.label} ({st.kind}) gives shape {tuple(shape)}, the IR says {want}")
        shapes[st.out] = np.broadcast_to(np.zeros((), dtype=np.uint64), shape)
        if st.kind == "const":
            consts.add(st.out)
