"""The contract between code generation and the runtime: calls into :mod:`fssc.runtime.lib`.

A generated program calls the runtime as ``lib.fn(P, name=expr, ...)``: the
role's context (``P`` or ``D``) first, every other argument by keyword. A
:class:`Call` is one such call before it becomes text; :meth:`Call.check` binds
its keyword names (a placeholder per value) to the signature of the function
the runtime really has, so a program that would call the runtime wrongly is
refused at compile time instead of failing at a party.

Local statements (add, reshape, concat, pools...) carry their public
parameters in ``Stmt.params`` and their operands as variables;
:func:`bind_operands` names the operands by the runtime's signature, for
codegen and for lowering's shape check alike.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TypeVar

from fssc.runtime import lib

from fssc.errors import FsscError

T = TypeVar("T")
_VALUE = object()  # the placeholder bound for each argument


def signature(fn: str) -> inspect.Signature:
    """The signature of ``lib.fn`` (FsscError if the runtime has no such function)."""
    f = getattr(lib, fn, None) if not fn.startswith("_") else None
    if not callable(f):
        raise FsscError(f"the runtime has no function lib.{fn}")
    return inspect.signature(f)


def _plain(sig: inspect.Signature) -> str:
    """A signature without annotations, as an error message shows it: ``(ctx, tag, x, m, trunc=0)``."""
    E = inspect.Parameter.empty
    return str(sig.replace(parameters=[p.replace(annotation=E) for p in sig.parameters.values()], return_annotation=E))


def _takes_list(p: inspect.Parameter) -> bool:
    """A parameter annotated ``list[...]`` (concat's ``xs``): it takes all of a statement's operands."""
    return p.annotation is list or str(p.annotation).startswith("list")


def bind_operands(fn: str, params: dict, operands: list[T]) -> dict[str, T | list[T]]:
    """A local statement's operands by parameter name: the parameters of ``lib.fn`` that its public params do
    not name, in the signature's order; one annotated as a list takes every operand."""
    sig = signature(fn)
    free = [p for name, p in sig.parameters.items() if name not in params]
    if len(free) == 1 and _takes_list(free[0]):
        return {free[0].name: list(operands)}
    if len(free) != len(operands):
        names = ", ".join(p.name for p in free) or "none"
        raise FsscError(f"lib.{fn} takes the operand(s) {names}; the statement has {len(operands)}")
    return {p.name: v for p, v in zip(free, operands, strict=True)}


@dataclass(frozen=True)
class Lit:
    """A public parameter, written into the program with ``repr`` (names from the model stay data) and
    checked against its parameter's annotation when that is a plain type (``int``, ``str``, ``int | None``)."""

    value: object


PLAIN_TYPES: dict[str, type] = {
    "int": int,
    "str": str,
    "bool": bool,
    "bytes": bytes,
    "float": float,
    "None": type(None),
}


def _plain_types(annotation) -> tuple[type, ...] | None:
    """``int | None`` -> (int, NoneType); None for an annotation that is not a union of plain types."""
    parts = [t.strip() for t in str(annotation).split("|")]
    if annotation is inspect.Parameter.empty or not all(t in PLAIN_TYPES for t in parts):
        return None
    return tuple(PLAIN_TYPES[t] for t in parts)


def _render_value(v) -> str:
    if isinstance(v, Call):
        return v.render()
    if isinstance(v, Lit):
        return repr(v.value)
    if isinstance(v, list):  # a list of variables (concat's operands)
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


@dataclass(frozen=True)
class Call:
    """``lib.fn(ctx, name=value, ...)``: ``kwargs`` maps each parameter to a :class:`Lit`, a Python expression
    (a string: a variable, ``W['op4.w']``, ``Z0.pop('op4')``), a list of variables, or a nested Call."""

    fn: str
    kwargs: dict = field(default_factory=dict)
    ctx: str | None = None  # "P" or "D": the role context, passed first

    def render(self) -> str:
        """The call's text, its keyword arguments in the order of the runtime function's parameters (so the
        text does not depend on the order a statement's parameters were stored in)."""
        bad = [k for k in self.kwargs if not (isinstance(k, str) and k.isidentifier())]
        if bad:
            raise FsscError(f"lib.{self.fn}: argument names {bad!r} are not identifiers")
        order = {name: i for i, name in enumerate(signature(self.fn).parameters)}
        items = sorted(self.kwargs.items(), key=lambda kv: order.get(kv[0], len(order)))
        args = ([self.ctx] if self.ctx else []) + [f"{k}={_render_value(v)}" for k, v in items]
        return f"lib.{self.fn}({', '.join(args)})"

    def check(self) -> None:
        """Bind the call to ``lib.fn``'s signature (and each nested call to its own) and check each literal
        against its parameter's plain-type annotation; FsscError if it does not fit."""
        sig = signature(self.fn)
        try:
            sig.bind(*([_VALUE] if self.ctx else []), **dict.fromkeys(self.kwargs, _VALUE))
        except TypeError as e:
            raise FsscError(f"lib.{self.fn}{_plain(sig)} cannot take ({', '.join(self._names())}): {e}") from None
        for k, v in self.kwargs.items():
            if isinstance(v, Call):
                v.check()
            elif isinstance(v, Lit):
                ann = sig.parameters[k].annotation
                types = _plain_types(ann)
                if types is not None and not isinstance(v.value, types):
                    raise FsscError(f"lib.{self.fn}: {k}={v.value!r} is not {ann}")

    def _names(self) -> list[str]:
        return ([self.ctx] if self.ctx else []) + [f"{k}=" for k in self.kwargs]
