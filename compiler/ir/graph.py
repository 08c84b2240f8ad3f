"""fssc's intermediate representation.

A :class:`Graph` is a list of :class:`Op` in topological order over named
:class:`Value` s. A value is a tensor with a static shape and a dtype; once
the fixed-point plan has run it also carries a ``scale`` (fractional bits).
Constants (weights) are values with ``data``; they belong to the model owner.

An op has a ``kind`` (see :mod:`fssc.compiler.ir.ops` for the table of kinds),
attributes, inputs, outputs and provenance: the ONNX node names it came from
(``origin``) and the pass that created it (``created_by``). ``uid`` is a stable
identity that survives passes which rewrite an op in place; the viewer and the
diff use it. A comparison op's bitwidth ``bits`` (set by range analysis) is
the op's, not its input value's: one value may feed several comparisons that
need different widths.

The graph keeps use lists: :meth:`Graph.uses` (which ops read a value, and at
which input, in program order), :meth:`Graph.users_of`, :meth:`Graph.producer_of`.
The edit helpers keep them up to date as they go
(:meth:`Graph.replace_all_uses_with`, :meth:`Graph.remove_op`,
:meth:`Graph.insert_op_before` / :meth:`Graph.insert_op_after`,
:meth:`Graph.set_inputs`, :meth:`Graph.set_outputs`, :meth:`Graph.swap_ops`);
any other edit, such as a direct assignment to ``op.inputs``, ``op.outputs``
or ``graph.ops`` or a change inside those lists (they report their edits),
makes the next query rebuild the index from the ops. So it is never stale.

The text form (:func:`Graph.text`) is deterministic: constants are elided to
shape and a short content hash.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fssc.errors import FsscError


@dataclass
class Value:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    data: np.ndarray | None = None  # constants only (model owner's)
    scale: int | None = None  # fixed-point fractional bits, once planned
    stripped: bool = False  # a constant whose bytes were removed (P0's and D's view)

    @property
    def is_const(self) -> bool:
        return self.data is not None or self.stripped

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def array(self) -> np.ndarray:
        """The constant's bytes; an error where there are none (not a constant, or stripped for P0 and D)."""
        if self.data is None:
            why = "its bytes were stripped (P0's and the dealer's view)" if self.stripped else "it is not a constant"
            raise FsscError(f"%{self.name}: constant data needed, but {why}")
        return self.data

    @property
    def fixed_scale(self) -> int:
        """The fixed-point scale; an error before plan-fixed-point has given one."""
        if self.scale is None:
            raise FsscError(f"%{self.name}: no fixed-point scale (plan-fixed-point has not run)")
        return self.scale

    def digest(self) -> str:
        """Short content hash of a constant (for the text form)."""
        if self.data is None:
            return "stripped"
        h = hashlib.sha256()
        arr = np.ascontiguousarray(self.data)
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
        return h.hexdigest()[:8]


_EDITS = [0]  # bumped by every edit of an op's inputs/outputs or a graph's op list: use indexes compare it


class _Tracked(list):
    """A list that counts its edits (an op's inputs and outputs, a graph's ops), so use lists are rebuilt."""


def _counting(name: str):
    base = getattr(list, name)

    def method(self, *args, **kwargs):
        _EDITS[0] += 1
        return base(self, *args, **kwargs)

    method.__name__ = name
    return method


for _name in (
    "__setitem__",
    "__delitem__",
    "__iadd__",
    "__imul__",
    "append",
    "extend",
    "insert",
    "pop",
    "remove",
    "clear",
    "sort",
    "reverse",
):
    setattr(_Tracked, _name, _counting(_name))


@dataclass
class Op:
    kind: str
    inputs: list[str]  # a tracked list (see _Tracked); assigning any list is fine
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    origin: tuple[str, ...] = ()  # ONNX node names
    created_by: str = "import"  # pass that created this op
    uid: int = -1
    gate: dict[str, Any] | None = None  # set by mark-comparisons: kind, count, bits
    bits: int | None = None  # comparison bitwidth m of this op's gate, set by range-analysis

    @property
    def name(self) -> str:
        return self.outputs[0] if self.outputs else f"op{self.uid}"

    @property
    def described(self) -> str:
        """For messages: ``%name`` and the ONNX node it came from, if any."""
        return f"%{self.name}" + (f" (ONNX node {self.origin[0]})" if self.origin else "")


def _tracked_field(attr: str) -> property:
    def get(self):
        return self.__dict__[attr]

    def put(self, value):
        if attr in self.__dict__:  # a new op is in no graph yet: no use index to invalidate
            _EDITS[0] += 1
        self.__dict__[attr] = _Tracked(value)

    return property(get, put)


# after @dataclass: the generated __init__, __eq__ and __repr__ go through these properties
Op.inputs = _tracked_field("_inputs")  # type: ignore[assignment]
Op.outputs = _tracked_field("_outputs")  # type: ignore[assignment]


def _fmt_attr(v: Any) -> str:
    if isinstance(v, float):
        return repr(float(v))
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_attr(x) for x in v) + "]"
    if isinstance(v, np.ndarray):
        return f"<{v.dtype}{list(v.shape)}>"
    return str(v)


def _fmt_type(v: Value) -> str:
    s = f"{v.dtype}[{','.join(str(d) for d in v.shape)}]"
    extra = []
    if v.scale is not None:
        extra.append(f"s={v.scale}")
    if extra:
        s += "{" + ",".join(extra) + "}"
    return s


class Graph:
    """Ops in topological order over named values."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self.values: dict[str, Value] = {}
        self._ops: list[Op] = _Tracked()  # see the ops property
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.meta: dict[str, Any] = {}
        self.properties: set[str] = set()  # what the passes run so far ensured (passes.base); not in the text
        self._next_uid = 0
        self._index_at = -1  # _EDITS when the use index below was built
        self._uses: dict[str, list[tuple[Op, int]]] = {}
        self._producers: dict[str, Op] = {}
        self._pos: dict[int, int] | None = None  # id(op) -> position, built when uses() needs an order

    @property
    def ops(self) -> list[Op]:
        """The ops in program order (a tracked list: edit it freely, the use lists follow)."""
        return self._ops

    @ops.setter
    def ops(self, ops: Iterable[Op]) -> None:
        _EDITS[0] += 1
        self._ops = _Tracked(ops)

    # --- construction -------------------------------------------------
    def add_value(self, v: Value) -> Value:
        if v.name in self.values:
            raise FsscError(f"IR: value {v.name!r} defined twice")
        self.values[v.name] = v
        return v

    def add_const(self, name: str, data: np.ndarray, dtype: str | None = None) -> Value:
        data = np.asarray(data)
        return self.add_value(Value(name, tuple(int(d) for d in data.shape), dtype or str(data.dtype), data=data))

    def fresh_name(self, base: str) -> str:
        if base not in self.values:
            return base
        i = 1
        while f"{base}.{i}" in self.values:
            i += 1
        return f"{base}.{i}"

    def new_uid(self) -> int:
        uid = self._next_uid
        self._next_uid += 1
        return uid

    def make_op(self, kind, inputs, outputs, attrs=None, origin=(), created_by="import", uid=None) -> Op:
        op = Op(
            kind,
            list(inputs),
            list(outputs),
            dict(attrs or {}),
            tuple(origin),
            created_by,
            self.new_uid() if uid is None else uid,
        )
        return op

    def clone(self) -> Graph:
        """Deep copy of structure; constant arrays are shared (treated immutably)."""
        g = Graph(self.name)
        g.values = {k: Value(v.name, v.shape, v.dtype, v.data, v.scale, v.stripped) for k, v in self.values.items()}
        g.ops = [copy.deepcopy(op) for op in self.ops]
        g.inputs = list(self.inputs)
        g.outputs = list(self.outputs)
        g.meta = copy.deepcopy(self.meta)
        g.properties = set(self.properties)
        g._next_uid = self._next_uid
        return g

    # --- use lists ----------------------------------------------------
    def _index(self) -> None:
        """Rebuild the use index if anything was edited since it was built (or kept up to date)."""
        if self._index_at == _EDITS[0]:
            return
        self._uses, self._producers, self._pos = {}, {}, None
        for op in self._ops:
            self._add_op(op)
        self._index_at = _EDITS[0]

    def _add_op(self, op: Op) -> None:
        for k, i in enumerate(op.inputs):
            self._uses.setdefault(i, []).append((op, k))
        for o in op.outputs:
            self._producers.setdefault(o, op)

    def _drop_reads(self, op: Op) -> None:
        for i in set(op.inputs):
            rest = [(o, k) for o, k in self._uses.get(i, ()) if o is not op]
            if rest:
                self._uses[i] = rest
            else:
                self._uses.pop(i, None)

    def _member(self, op: Op) -> bool:
        """``op`` is one of this graph's ops (checked through the index: the index must be fresh)."""
        return bool(op.outputs) and self._producers.get(op.outputs[0]) is op

    def uses(self, name: str) -> list[tuple[Op, int]]:
        """(op, input position) for every read of value ``name``, in program order."""
        self._index()
        found = self._uses.get(name, [])
        if len(found) > 1:
            if self._pos is None:
                self._pos = {id(op): k for k, op in enumerate(self._ops)}
            pos = self._pos
            found = sorted(found, key=lambda u: (pos[id(u[0])], u[1]))
        return list(found)

    def users_of(self, name: str) -> list[Op]:
        """The ops that read value ``name``, each once, in program order."""
        seen: list[Op] = []
        for op, _ in self.uses(name):
            if not any(op is s for s in seen):
                seen.append(op)
        return seen

    def n_users(self, name: str) -> int:
        """Reads of value ``name``, a graph output counting as one."""
        self._index()
        return len(self._uses.get(name, ())) + (1 if name in self.outputs else 0)

    def producer_of(self, name: str) -> Op | None:
        """The op that defines value ``name`` (None for inputs and constants)."""
        self._index()
        return self._producers.get(name)

    def producer(self) -> dict[str, Op]:
        """Value name -> the op defining it."""
        self._index()
        return dict(self._producers)

    # --- edits (they keep the use index up to date instead of rebuilding it) --------------
    def set_inputs(self, op: Op, names: Iterable[str]) -> None:
        """``op`` reads ``names`` from now on."""
        self._index()
        member = self._member(op)
        if member:
            self._drop_reads(op)
        op.inputs = list(names)
        if member:
            for k, i in enumerate(op.inputs):
                self._uses.setdefault(i, []).append((op, k))
            self._index_at = _EDITS[0]

    def _one_definer(self, op: Op, names: Iterable[str]) -> None:
        """Refuse a second definition: every value has one producer (the index keeps one per name)."""
        for o in names:
            other = self._producers.get(o)
            if other is not None and other is not op:
                raise FsscError(f"IR: %{o} is defined by {other.kind} %{other.name}; {op.kind} %{op.name} cannot too")

    def set_outputs(self, op: Op, names: Iterable[str]) -> None:
        """``op`` defines ``names`` from now on (the values must exist; no other op may define them)."""
        self._index()
        names = list(names)
        member = self._member(op)
        if member:
            self._one_definer(op, names)
            for o in op.outputs:
                if self._producers.get(o) is op:
                    del self._producers[o]
        op.outputs = names
        if member:
            for o in op.outputs:
                self._producers[o] = op
            self._index_at = _EDITS[0]

    def replace_all_uses_with(self, old: str, new: str) -> None:
        """Every read of value ``old`` (and a graph output named ``old``) reads ``new`` instead."""
        found = self.uses(old)
        for op, k in found:
            op.inputs[k] = new
        if found:
            self._uses.setdefault(new, []).extend(found)
            del self._uses[old]
            self._index_at = _EDITS[0]
        self.outputs = [new if o == old else o for o in self.outputs]

    replace_uses = replace_all_uses_with

    def index_of(self, op: Op) -> int:
        """Position of ``op`` (this very object) in program order."""
        self._index()
        if self._pos is not None and self._member(op):
            return self._pos[id(op)]
        for k, o in enumerate(self._ops):
            if o is op:
                return k
        raise FsscError(f"IR: {op.kind} %{op.name} is not in graph {self.name}")

    def remove_op(self, op: Op) -> None:
        """Take ``op`` out of the graph. An output of it that is still read must be defined by another op
        (replace its uses first, or move the output to the op that takes over); the others' values go."""
        k = self.index_of(op)
        own = [o for o in op.outputs if self._producers.get(o) is op]
        for o in own:
            if self.n_users(o):
                raise FsscError(f"IR: cannot remove {op.kind} %{op.name}: %{o} is still read")
        del self._ops[k]
        self._drop_reads(op)
        for o in own:
            del self._producers[o]
            self.values.pop(o, None)
        self._pos = None
        self._index_at = _EDITS[0]

    def insert_op_before(self, anchor: Op, *ops: Op) -> None:
        """Put ``ops`` (in this order) just before ``anchor``."""
        self._insert(self.index_of(anchor), ops)

    def insert_op_after(self, anchor: Op, *ops: Op) -> None:
        """Put ``ops`` (in this order) just after ``anchor``."""
        self._insert(self.index_of(anchor) + 1, ops)

    def swap_ops(self, a: Op, b: Op) -> None:
        """Exchange the positions of ops ``a`` and ``b`` (the caller keeps the order topological)."""
        i, j = self.index_of(a), self.index_of(b)
        self._ops[i], self._ops[j] = b, a
        if self._pos is not None:
            self._pos[id(a)], self._pos[id(b)] = j, i
        self._index_at = _EDITS[0]

    def _insert(self, k: int, ops: tuple[Op, ...]) -> None:
        new = [o for op in ops for o in op.outputs]
        if len(set(new)) != len(new):
            raise FsscError(f"IR: the inserted ops define {sorted(o for o in set(new) if new.count(o) > 1)} twice")
        for op in ops:
            self._one_definer(op, op.outputs)
        self._ops[k:k] = list(ops)
        for op in ops:
            self._add_op(op)
        self._pos = None
        self._index_at = _EDITS[0]

    def remove_unused(self) -> None:
        """Drop values nobody reads or defines (constants left over by rewrites)."""
        used = set(self.inputs) | set(self.outputs)
        for op in self.ops:
            used.update(op.inputs)
            used.update(op.outputs)
        for k in [k for k in self.values if k not in used]:
            del self.values[k]

    # --- text form ----------------------------------------------------
    def text(self) -> str:
        lines = [f"graph {self.name} {{"]
        lines += [f"  input %{name}: {_fmt_type(self.values[name])}" for name in self.inputs]
        consts = sorted({i for op in self.ops for i in op.inputs if self.values[i].is_const})
        for name in consts:
            v = self.values[name]
            lines.append(f"  const %{name}: {_fmt_type(v)} #{v.digest()}")
        for op in self.ops:
            outs = ", ".join(f"%{o}: {_fmt_type(self.values[o])}" for o in op.outputs)
            ins = ", ".join(f"%{i}" for i in op.inputs)
            attrs = ", ".join(f"{k}={_fmt_attr(op.attrs[k])}" for k in sorted(op.attrs))
            s = f"  {outs} = {op.kind}({ins})"
            if attrs:
                s += f" {{{attrs}}}"
            if op.bits is not None:
                s += f" m={op.bits}"
            if op.gate:
                s += " gate{" + ",".join(f"{k}={_fmt_attr(op.gate[k])}" for k in sorted(op.gate)) + "}"
            prov = ",".join(op.origin) if op.origin else "-"
            s += f"  # {prov} [{op.created_by}]"
            lines.append(s)
        lines.append("  return " + ", ".join(f"%{o}" for o in self.outputs))
        lines.append("}")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.text()


def topo_check(graph: Graph) -> Iterable[str]:
    """Yield problems with definitions and ordering (used by the verifier)."""
    defined = set(graph.inputs) | {k for k, v in graph.values.items() if v.is_const}
    for name in graph.inputs:
        if name not in graph.values:
            yield f"input %{name} has no value"
    seen_out: set[str] = set()
    for op in graph.ops:
        for i in op.inputs:
            if i not in graph.values:
                yield f"{op.kind} %{op.name}: input %{i} is not a value (dangling)"
            elif i not in defined:
                yield f"{op.kind} %{op.name}: input %{i} used before definition"
        for o in op.outputs:
            if o not in graph.values:
                yield f"{op.kind}: output %{o} has no value"
            if o in seen_out or o in graph.inputs or (o in graph.values and graph.values[o].is_const):
                yield f"{op.kind}: %{o} defined more than once"
            seen_out.add(o)
            defined.add(o)
    for o in graph.outputs:
        if o not in defined:
            yield f"graph output %{o} is never defined"
    for name in graph.values:
        if name not in defined:
            yield f"value %{name} is neither an input, a constant nor an op's output (orphan)"
