"""The comparison gates, one class per gate kind.

Each class owns everything about its gate: the dealer's side (``deal``, on
masks), a party's side (``evaluate``, on masked values), the names of the key
records and of the per-level gate calls it uses, the shape of its output, and
what its keys and messages cost (``cost``: the formulas of docs/cost-model.md,
which the compiler's cost model reads from here). ``run(ctx, ...)`` is what the
generated programs reach through :mod:`fssc.runtime.lib`: the role's context
(a ``Dealer`` or a ``Party``) picks ``deal`` or ``evaluate`` (``ctx.gate``), so
the dealer's program mirrors the parties' statement by statement.

The comparison core, the share plumbing and the key layout are in
:mod:`fssc.runtime.protocol` (docs/protocol.md derives every gate); the gates
here only combine them, on whole arrays (no per-element Python).

Gate kinds and their statements:

========== ============ ===============================================
class      statement    gate
========== ============ ===============================================
Relu       ``relu``     ReLU, optionally with exact fused truncation
Trunc      ``trunc``    standalone exact truncation lifted to the ring
MaxPool    ``maxpool``  a tree of max gates per window, one call a level
Clip       ``clip``     two ReLUs (against min and max) in one call
ArgMax     ``argmax``   a tournament of selections carrying the index
ArgMax2    ``argmax2``  one DReLU per row whose bit only P0 opens
Spline     ``spline``   a public piecewise polynomial (sigmoid, tanh, SiLU, GELU...)
========== ============ ===============================================

``LayerNorm`` (statement ``layernorm``) is a composite of these (truncations, products, a spline) and of
``Octave``, the normalisation by the leading base-4 digit behind its inverse square root (``RSqrt``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from fssc.runtime import dcf
from fssc.runtime.geometry import pool_attrs
from fssc.runtime.pooling import max_tree
from fssc.runtime.protocol import (
    BITS,
    CARRY_DCF,
    CORR,
    DCF,
    ONE,
    SEED,
    U64,
    compare_input,
    mask_bits,
    pow2,
    split_u,
)

SEED_BYTES = 16  # P0's seed per gate call (its shares of every word and bit)
WORD = 8


def dcf_bytes(m: int) -> int:
    """Key bytes per comparison and party of an m-bit comparison's DCF (m - 1 bits, Z_2 payload)."""
    return dcf.nbytes_per_key(max(1, m - 1), 0)


def carry_bytes(s: int) -> int:
    """Key bytes per element and party of the exact truncation's carry DCF (s bits, Z_2 payload)."""
    return dcf.nbytes_per_key(s, 0) if s else 0


def dcf_eval_blocks(m: int, s: int = 0) -> int:
    """AES blocks one party's online evaluation of one m-bit comparison costs: its DCF's, and with exact
    truncation by s bits the carry DCF's."""
    return dcf.eval_aes_blocks(max(1, m - 1), 0) + (dcf.eval_aes_blocks(s, 0) if s else 0)


def share_blocks(n: int, words: int, bits: int) -> float:
    """AES (CTR) blocks P0 spends expanding its shares of ``words`` words per comparison and ``bits`` bits."""
    return n * words / 2 + bits / 128


@dataclass
class GateCost:
    """Bytes of each party's key, rounds, and bytes each party sends, for n comparisons of one statement."""

    key_p0: float = 0.0
    key_p1: float = 0.0
    rounds: int = 0
    sent_p0: float = 0.0
    sent_p1: float = 0.0
    aes_p0: float = 0.0  # AES blocks of the party's online evaluation: DCFs (MMO) and, P0, its shares (CTR)
    aes_p1: float = 0.0


def level_tag(tag: str, level: int) -> str:
    """Name of one tree level's gate call (its key records): ``{tag}.L{level}``."""
    return f"{tag}.L{level}"


class Gate:
    """A gate kind. Subclasses set ``stmt`` (the statement kind and lib function), ``kind`` (the gate
    kind the compiler's plan and cost report name) and implement deal, evaluate, out_shape and cost."""

    stmt: ClassVar[str]
    kind: ClassVar[str]
    plain_output: ClassVar[bool] = False  # the result reaches P0 unmasked (no output statement)

    # the signatures differ per gate (``*args: Any`` lets each class name its own parameters)
    @classmethod
    def run(cls, *args: Any, **params: Any) -> Any:
        """The statement ``run(ctx, tag, x, **params)``: ``ctx.gate`` calls ``deal`` for the dealer,
        ``evaluate`` for a party."""
        ctx, tag, *rest = args
        return ctx.gate(cls, tag, *rest, **params)

    @staticmethod
    def deal(*args: Any, **params: Any) -> Any:
        """``deal(D, tag, masks, **params)``: the dealer's side, on masks; writes both parties' key records."""
        raise NotImplementedError

    @staticmethod
    def evaluate(*args: Any, **params: Any) -> Any:
        """``evaluate(P, tag, masked values, **params)``: a party's side, on masked values."""
        raise NotImplementedError

    @staticmethod
    def out_shape(*args: Any, **params: Any) -> tuple:
        """``out_shape(x_shape, **params)``: the statement's output shape."""
        return tuple(args[0])

    @classmethod
    def records(cls, tag: str, party: int, shift: int = 0) -> list[str]:
        """Key records one gate call writes for ``party``, in order (a tree writes these per level tag)."""
        carry = [tag + CARRY_DCF] if shift and getattr(cls, "carry_words", 0) else []  # exact truncation only
        return [tag + DCF, *carry, tag + SEED] if party == 0 else [tag + DCF, *carry, tag + CORR, tag + BITS]

    @classmethod
    def cost(cls, n: int, m: int, shift: int = 0, depth: int = 1) -> GateCost:
        raise NotImplementedError


class _Lift(Gate):
    """Gates of the common two-round shape: open d^ (and c^), then open the masked output.

    n comparisons in ``calls`` gate calls: P0 holds n DCF keys and a seed per call; P1 n DCF keys and
    ``share_words`` correction words and a correction bit per comparison; with exact truncation by s bits
    each comparison adds the carry's DCF to both keys, and ``carry_words`` words and one bit to P1's."""

    share_words: ClassVar[int]
    carry_words: ClassVar[int] = 0  # exact truncation (s > 0): r_c, r_d*r_c (ReLU); r_c (standalone truncation)

    @classmethod
    def cost(cls, n: int, m: int, shift: int = 0, depth: int = 1) -> GateCost:
        kb = dcf_bytes(m)
        calls = cls.calls(depth)
        c = GateCost(
            key_p0=n * kb + SEED_BYTES * calls,
            key_p1=n * (kb + cls.share_words * WORD) + n / 8,
            rounds=2 * depth,
            sent_p0=n * (1 / 8 + WORD),
            sent_p1=n * (1 / 8 + WORD),
        )
        carry = shift if cls.carry_words else 0
        if carry:  # exact truncation: the carry's DCF, its mask bit, its words, c^ in round 1
            c.key_p0 += n * carry_bytes(shift)
            c.key_p1 += n * (carry_bytes(shift) + cls.carry_words * WORD) + n / 8
            c.sent_p0 += n / 8
            c.sent_p1 += n / 8
        c.aes_p1 = n * dcf_eval_blocks(m, carry)
        words = cls.share_words + (cls.carry_words if carry else 0)
        c.aes_p0 = c.aes_p1 + share_blocks(n, words, 2 * n if carry else n)
        return c

    @staticmethod
    def calls(depth: int) -> int:
        return 1


class Relu(_Lift):
    """ReLU(floor(x / 2^trunc)) on an m-bit signed value, exact in Z_2^64 (masked)."""

    stmt = "relu"
    kind = "relu"
    share_words = 6  # r_d, rho, r_d*rho, rho_hi, r_d*rho_hi, r_out
    carry_words = 2

    @staticmethod
    def deal(D, tag: str, r: np.ndarray, m: int, trunc: int = 0) -> np.ndarray:
        """Mask of ReLU(floor(x / 2^trunc)); with trunc > 0 the DCF compares x'' - 1 (rho + 1), see evaluate."""
        if not trunc:
            return D.lift_gate(tag, r, m, 0, 0, lambda d, rho, hi, out, c: [d, rho, d * rho, hi, d * hi, out])
        return D.lift_gate(tag, r, m, trunc, 1, lambda d, rho, hi, out, c: [d, rho, d * rho, hi, d * hi, out, c, d * c])

    @staticmethod
    def evaluate(P, tag: str, xhat: np.ndarray, m: int, trunc: int = 0) -> np.ndarray:
        """Without truncation the DCF gives d = DReLU(x') and the output is d * x'.

        With trunc = s > 0, x'' = (u - rho) mod 2^m (signed) is floor(x / 2^s) + c
        with the carry c; the DCF compares x'' - 1 (mask rho + 1), so its bit is
        g = 1{x'' >= 1}, and ReLU(x'' - c) = g (x'' - c) = g (x'' - 1) + g (1 - c):
        the first term is the plain ReLU formula on mask rho + 1, the second is
        linear in D's shares of r_g, r_c and r_g r_c once g^ and c^ are open.
        """
        shape = xhat.shape
        flat = xhat.reshape(-1)
        u = compare_input(flat, trunc, m)
        rows = 8 if trunc else 6
        D, vals, u_hi, C = P.compare(tag, u, m, rows, flat, trunc)
        r_d, rho, rdrho, rho_hi, rdrhohi, r_out = vals[:6]
        t = ONE - (D << ONE)  # 1 - 2D
        y = t * (u * r_d - rdrho) - D * rho + pow2(m) * (ONE - u_hi) * (D * rho_hi + t * rdrhohi) + r_out
        if P.b == 0:
            y += D * u
        if trunc:  # + g (1 - c) = g - g c, with g = D + t r_g and c = C + tc r_c
            r_c, rdrc = vals[6:8]
            tc = ONE - (C << ONE)
            one = ONE if P.b == 0 else U64(0)  # P0 holds the constants
            y += D * one + t * r_d - (D * C * one + D * tc * r_c + C * t * r_d + t * tc * rdrc)
        return P.open(y).reshape(shape)


class Trunc(_Lift):
    """A truncation no comparison gate absorbs: floor(x / 2^shift) as an m-bit signed value lifted to the ring."""

    stmt = "trunc"
    kind = "trunc"
    share_words = 5  # r_d, rho, rho_hi, r_d*rho_hi, r_out
    carry_words = 1

    @staticmethod
    def deal(D, tag: str, r: np.ndarray, m: int, shift: int) -> np.ndarray:
        return D.lift_gate(
            tag, r, m, shift, 0, lambda d, rho, hi, out, c: [d, rho, hi, d * hi, out] + ([c] if shift else [])
        )

    @staticmethod
    def evaluate(P, tag: str, xhat: np.ndarray, m: int, shift: int) -> np.ndarray:
        return P.open(Trunc.shares(P, tag, xhat, m, shift)).reshape(xhat.shape)

    @staticmethod
    def shares(P, tag: str, xhat: np.ndarray, m: int, shift: int) -> np.ndarray:
        """This party's additive share of floor(x / 2^shift) + r_out (flat), after round 1 (d^, c^).

        x'' = (u - rho) mod 2^m = u - rho + 2^m lt with lt = 1{u < rho}; reading it
        as signed subtracts 2^m (1 - d). With d = DReLU(x''):
        lt - 1 + d = (u_hi xor rho_hi) d - u_hi (1 - rho_hi), which is linear in
        D's shares of d, rho_hi d and rho_hi once d^ = d xor r_d is open. x'' is
        floor(x / 2^shift) + c; subtracting c = c^ + (1 - 2c^) r_c (c^ opened with d^)
        makes the result exact.
        """
        flat = xhat.reshape(-1)
        u = compare_input(flat, shift, m)
        D, vals, u_hi, C = P.compare(tag, u, m, 6 if shift else 5, flat, shift)
        r_d, rho, rho_hi, rdrhohi, r_out = vals[:5]
        t = ONE - (D << ONE)  # 1 - 2D
        one = ONE if P.b == 0 else U64(0)  # P0 holds the constant 1
        d = D * one + t * r_d
        hd = D * rho_hi + t * rdrhohi  # shares of rho_hi * d
        k = (ONE - u_hi) * hd + u_hi * (d - hd - one + rho_hi)  # shares of lt - 1 + d
        y = u * one - rho + pow2(m) * k + r_out
        if shift:
            y -= C * one + (ONE - (C << ONE)) * vals[5]
        return y


class Select(_Lift):
    """d * z_j + r_out_j for j = 0.. with d = DReLU(z_0 >> s), on flat arrays of one length: the core of
    max gates and of the ArgMax tournament (not a statement of its own)."""

    stmt = "select"
    kind = "select"
    share_words = 4  # per selected operand: r_z, r_d*r_z, r_out, plus r_d once

    @staticmethod
    def deal(D, tag: str, r_z: list[np.ndarray], m: int, s: int = 0) -> list[np.ndarray]:
        rho = compare_input(r_z[0], s, m)
        rho_hi = D.dcf(tag, rho, m)
        n = r_z[0].size
        r_d = D.rng.bits(n).astype(U64)
        outs = [D.fresh(n) for _ in r_z]
        rows = [r_d]
        for rz, ro in zip(r_z, outs, strict=True):
            rows += [rz, r_d * rz, ro]
        D.shares(tag, np.stack(rows), rho_hi ^ r_d)
        return outs

    @staticmethod
    def evaluate(P, tag: str, zhat: list[np.ndarray], m: int, s: int = 0) -> list[np.ndarray]:
        u = compare_input(zhat[0], s, m)
        D, vals, _, _ = P.compare(tag, u, m, 1 + 3 * len(zhat))
        t = ONE - (D << ONE)
        r_d = vals[0]
        ys = []
        for j, z in enumerate(zhat):
            rz, rdrz, ro = vals[1 + 3 * j : 4 + 3 * j]
            y = t * (r_d * z - rdrz) - D * rz + ro
            if P.b == 0:
                y += D * z
            ys.append(y)
        opened = P.open(np.stack(ys))
        return list(opened)


class Max(Select):
    """max(a, b) = b + DReLU(a - b) (a - b) on any shape (a and b alike): one selection of a - b."""

    stmt = "max"
    kind = "max"

    @staticmethod
    def deal(D, tag: str, ra: np.ndarray, rb: np.ndarray, m: int, s: int = 0) -> np.ndarray:  # type: ignore[override]
        (w,) = Select.deal(D, tag, [(ra - rb).reshape(-1)], m, s)
        return rb + w.reshape(rb.shape)

    @staticmethod
    def evaluate(P, tag: str, ahat: np.ndarray, bhat: np.ndarray, m: int, s: int = 0) -> np.ndarray:  # type: ignore[override]
        (w,) = Select.evaluate(P, tag, [(ahat - bhat).reshape(-1)], m, s)
        return bhat + w.reshape(bhat.shape)


class MaxPool(Max):
    """A MaxPool: a tree of max gates over each window, padding skipped, one gate call per tree level
    (``level_tag``), so a pool of depth D costs D seeds and 2D rounds."""

    stmt = "maxpool"
    kind = "max"

    @classmethod
    def run(cls, ctx, tag: str, x, **params):
        m = params.pop("m")
        return max_tree(x, pool_attrs(**params), lambda level, a, b: ctx.gate(Max, level_tag(tag, level), a, b, m))

    @staticmethod
    def out_shape(shape: tuple, **params) -> tuple:
        p = {k: v for k, v in params.items() if k != "m"}
        return max_tree(np.zeros(shape), pool_attrs(**p), lambda level, a, b: a).shape

    @staticmethod
    def calls(depth: int) -> int:
        return depth


class Clip(_Lift):
    """clip(x) = lo + ReLU(x - lo) - ReLU(x - hi), both comparisons in one ReLU call (n = 2 x elements;
    one bound: n = elements). lo and hi are public ring encodings: ``ctx.public`` makes them vanish on the
    dealer's masks."""

    stmt = "clip"
    kind = "clip"
    share_words = Relu.share_words

    @classmethod
    def run(cls, ctx, tag: str, x, lo: int | None = None, hi: int | None = None, m: int = 64):
        shape = x.shape
        flat = x.reshape(-1)
        n = flat.size
        c = ctx.public
        if lo is not None and hi is not None:
            y = ctx.gate(Relu, tag, np.concatenate([flat - c(lo), flat - c(hi)]), m, 0)
            out = c(lo) + y[:n] - y[n:]
        elif lo is not None:
            out = c(lo) + ctx.gate(Relu, tag, flat - c(lo), m, 0)
        else:
            out = c(hi) - ctx.gate(Relu, tag, c(hi) - flat, m, 0)
        return out.reshape(shape)


def _argmax_shape(shape: tuple, axis: int, keepdims: int, **_) -> tuple:
    return np.zeros(shape).argmax(axis=axis, keepdims=bool(keepdims)).shape


class ArgMax(Gate):
    """ArgMax over C > 2 classes: a tournament of selections that carries the index along.

    Each level pairs columns (0,1), (2,3), ...; one selection per pair compares a - b (a wins ties: the
    first maximum, as numpy) or b - a with ``select_last`` (the last maximum), and returns both the winning
    value and its index. Indices start as public constants (mask 0) and end as a masked wire;
    D = ceil(log2 C) levels (``level_tag``), two rounds each. n = rows x (C - 1) selections: P0 holds n DCF
    keys and a seed per level, P1 n DCF keys and 7 words (r_d; r_z, r_d*r_z, r_out for value and index)
    and a bit per selection; each party sends a bit and two words per selection."""

    stmt = "argmax"
    kind = "argmax"
    share_words = 7

    @classmethod
    def run(cls, ctx, tag: str, x, axis: int = 0, keepdims: int = 1, select_last: int = 0, m: int = 64):
        moved = np.moveaxis(x, axis, -1)
        rest = moved.shape[:-1]
        vals = [np.ascontiguousarray(moved[..., j]).reshape(-1) for j in range(moved.shape[-1])]
        idx = [np.full(vals[0].shape, ctx.public(j), dtype=U64) for j in range(len(vals))]
        level = 0
        while len(vals) > 1:
            pairs = len(vals) // 2
            a = np.concatenate(vals[0 : 2 * pairs : 2])
            b = np.concatenate(vals[1 : 2 * pairs : 2])
            ia = np.concatenate(idx[0 : 2 * pairs : 2])
            ib = np.concatenate(idx[1 : 2 * pairs : 2])
            if select_last:  # b wins unless a > b
                w, wi = ctx.gate(Select, level_tag(tag, level), [b - a, ib - ia], m, 0)
                v, i = a + w, ia + wi
            else:  # a wins unless b > a
                w, wi = ctx.gate(Select, level_tag(tag, level), [a - b, ia - ib], m, 0)
                v, i = b + w, ib + wi
            n = vals[0].size
            nv = [v[k * n : (k + 1) * n] for k in range(pairs)]
            ni = [i[k * n : (k + 1) * n] for k in range(pairs)]
            if len(vals) % 2:
                nv.append(vals[-1])
                ni.append(idx[-1])
            vals, idx = nv, ni
            level += 1
        lab = idx[0].reshape(rest)
        return np.expand_dims(lab, axis) if keepdims else lab

    out_shape = staticmethod(_argmax_shape)

    @classmethod
    def cost(cls, n: int, m: int, shift: int = 0, depth: int = 1) -> GateCost:
        kb = dcf_bytes(m)
        sent = n * (1 / 8 + 2 * WORD)
        aes = n * dcf_eval_blocks(m)
        return GateCost(
            n * kb + SEED_BYTES * depth,
            n * (kb + cls.share_words * WORD) + n / 8,
            2 * depth,
            sent,
            sent,
            aes + share_blocks(n, cls.share_words, n),
            aes,
        )


class ArgMax2(Gate):
    """The label of a 2-class ArgMax, revealed to P0 only: one DReLU per row, whose bit P1 sends to P0.

    argmax = 1 iff x1 > x0, i.e. 1 - DReLU(x0 - x1) (ties pick class 0); with ``select_last`` a tie picks
    class 1: argmax = DReLU(x1 - x0). P0 holds n DCF keys and a seed, P1 n DCF keys and a correction bit
    per row; one round, P1 sends n/8 bytes."""

    stmt = "argmax2"
    kind = "argmax"
    plain_output = True

    @classmethod
    def run(cls, ctx, tag: str, x, axis: int = 0, keepdims: int = 1, select_last: int = 0, m: int = 64):
        moved = np.moveaxis(x, axis, -1)
        rest = moved.shape[:-1]
        flat = moved.reshape(-1, 2)
        z = flat[:, 1] - flat[:, 0] if select_last else flat[:, 0] - flat[:, 1]
        d = ctx.gate(ArgMax2, tag, z, m)
        if d is None:  # the dealer, and P1: no result
            return None
        lab = (d if select_last else 1 - d).reshape(rest)
        return np.expand_dims(lab, axis) if keepdims else lab

    @staticmethod
    def deal(D, tag: str, r_z: np.ndarray, m: int) -> None:
        """DReLU(z) revealed to P0 only: D's shares hold no words, only the bit masks."""
        rho = compare_input(r_z.reshape(-1), 0, m)
        rho_hi = D.dcf(tag, rho, m)
        D.shares(tag, np.zeros((0, rho.size), U64), rho_hi)

    @staticmethod
    def evaluate(P, tag: str, zhat: np.ndarray, m: int) -> np.ndarray | None:
        """DReLU(z) as 0/1 for P0; P1 sends its share and learns nothing."""
        u = compare_input(zhat.reshape(-1), 0, m)
        dshare = P.dcf_share(tag, u, m)
        _, bits = P.shares(tag, 0, u.size, u.size)
        e = dshare ^ bits
        P.chan.rounds += 1  # one message, P1 -> P0
        if P.b == 1:
            P.chan.send(np.packbits(e, bitorder="little"))
            return None
        u_hi, _ = split_u(u, m)
        e ^= (ONE ^ u_hi).astype(np.uint8)
        peer = np.unpackbits(P.chan.recv(((u.size + 7) // 8,), np.uint8), count=u.size, bitorder="little")
        return (e ^ peer).astype(np.int64)

    out_shape = staticmethod(_argmax_shape)

    @classmethod
    def cost(cls, n: int, m: int, shift: int = 0, depth: int = 1) -> GateCost:
        kb = dcf_bytes(m)
        aes = n * dcf_eval_blocks(m)
        return GateCost(
            key_p0=n * kb + SEED_BYTES,
            key_p1=n * kb + n / 8,
            rounds=1,
            sent_p1=n / 8,
            aes_p0=aes + share_blocks(n, 0, n),
            aes_p1=aes,
        )


# the statements' gates, by statement kind (lowering, code generation and lib read this)
STATEMENTS: dict[str, type[Gate]] = {g.stmt: g for g in (Relu, Trunc, MaxPool, Clip, ArgMax, ArgMax2)}


# ----------------------------------------------------------------------------- secret x secret product
def _bcast(*shapes: tuple) -> tuple:
    return tuple(np.broadcast_shapes(*[tuple(s) for s in shapes]))


class HMul(Gate):
    """z = x * y of two secret wires (numpy broadcasting), exact in Z_2^64: one round, no comparison.

    With x^ = x + r_x and y^ = y + r_y public, x * y = x^ y^ - x^ r_y - r_x y^ + r_x r_y, which is linear in
    D's shares of r_x, r_y and r_x r_y once x^ and y^ are known; each party adds its share of a fresh output
    mask r_z and they open z^ = z + r_z (docs/protocol.md, "Secret x secret product"). D deals one
    row of words per call: [r_x] (|x| words), [r_y] (|y|), [r_x r_y] (|z|), [r_z] (|z|); P0 gets them as a
    seed, P1 as corrections. The product is at scale s_x + s_y; plan-fixed-point truncates it later
    where a gate can (as a linear layer's output)."""

    stmt = "hmul"
    kind = "hmul"
    operands: ClassVar[tuple[str, ...]] = ("x", "y")  # the statement's secret operands, in order
    sized: ClassVar[bool] = True  # ``cost`` takes the operands' element counts
    ring_wide: ClassVar[bool] = True  # compares nothing: range analysis gives it the ring's width (64)

    @staticmethod
    def deal(D, tag: str, rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
        shape = _bcast(rx.shape, ry.shape)
        rz = D.fresh(shape)
        rxy = np.broadcast_to(rx * ry, shape)
        row = np.concatenate([rx.reshape(-1), ry.reshape(-1), rxy.reshape(-1), rz.reshape(-1)])
        D.shares(tag, row.reshape(1, -1), None)
        return rz

    @staticmethod
    def evaluate(P, tag: str, xhat: np.ndarray, yhat: np.ndarray) -> np.ndarray:
        shape = _bcast(xhat.shape, yhat.shape)
        nx, ny, nz = xhat.size, yhat.size, int(np.prod(shape, dtype=np.int64))
        P.chan.step = tag  # names the step in a receive error
        (row,), _ = P.shares(tag, 1, nx + ny + 2 * nz, 0)
        rx = row[:nx].reshape(xhat.shape)
        ry = row[nx : nx + ny].reshape(yhat.shape)
        rxy = row[nx + ny : nx + ny + nz].reshape(shape)
        rz = row[nx + ny + nz :].reshape(shape)
        z = rxy + rz - xhat * ry - rx * yhat
        if P.b == 0:  # P0 holds the public term
            z = z + xhat * yhat
        return P.open(np.ascontiguousarray(np.broadcast_to(z, shape)))

    @staticmethod
    def out_shape(*args: Any, **params: Any) -> tuple:
        return _bcast(*args)

    @classmethod
    def records(cls, tag: str, party: int, shift: int = 0) -> list[str]:
        return [tag + SEED] if party == 0 else [tag + CORR]

    @classmethod
    def cost(cls, n: int, m: int, shift: int = 0, depth: int = 1, sizes: tuple[int, ...] = ()) -> GateCost:
        """n = |z| products from operands of ``sizes`` = (|x|, |y|) elements (both |z| if not given):
        P0 one seed, P1 8 (|x| + |y| + 2 |z|) bytes; one round; each party sends 8 |z| bytes."""
        nx, ny = sizes or (n, n)
        cost = GateCost(SEED_BYTES, WORD * (nx + ny + 2 * n), 1, WORD * n, WORD * n)
        cost.aes_p0 = share_blocks(nx + ny + 2 * n, 1, 0)  # P0 expands its one row of shares; no DCF
        return cost


STATEMENTS[HMul.stmt] = HMul


# ------------------------------------------------------------------ spline gates
@dataclass(frozen=True)
class SplineSpec:
    """A public piecewise polynomial on an integer input x (the wire's ring value at scale s_in).

    Piece i covers [knots[i-1], knots[i]) (the first and last are unbounded) and computes

        y = floor(Y_i(x) / 2^shift) + lin[i] x,   Y_i(x) = sum_j coeffs[i][j] (x - centers[i])^j

    exactly in Z_2^64 (``coeffs`` hold integers at a high scale; their polynomial is truncated by ``shift``
    bits to the output scale, the exact truncation running on ``out_bits`` bits; ``lin`` carries the linear
    tails, already at the output scale). The compiler fits it (fssc.compiler.ir.splines); the runtime
    only evaluates it."""

    knots: tuple[int, ...]
    centers: tuple[int, ...]
    coeffs: tuple[tuple[int, ...], ...]
    lin: tuple[int, ...]
    shift: int
    out_bits: int

    @property
    def degree(self) -> int:
        return len(self.coeffs[0]) - 1

    @property
    def powers(self) -> int:
        """p: the powers r, r^2 .. r^p of the input's mask the parties hold shares of (the degree; at least 1,
        for the linear part)."""
        return max(self.degree, 1)

    def active(self, m: int) -> tuple[int, int]:
        """(first, last) piece meeting the m-bit signed range [-2^(m-1), 2^(m-1)): the knots between them
        are the comparisons the gate makes; pieces outside the range are never selected."""
        lo, hi = -(1 << (m - 1)), 1 << (m - 1)
        first = sum(1 for q in self.knots if q <= lo)
        last = sum(1 for q in self.knots if q < hi)
        return first, last

    def rows(self, m: int) -> int:
        """Share words per element the dealer deals for an m-bit input: r^1 .. r^p, r_Y, and per knot in range
        r_j r^0 .. r_j r^p (``Spline``)."""
        first, last = self.active(m)
        return self.powers + 1 + (last - first) * (self.powers + 1)

    def in_x(self, i: int) -> tuple[tuple[int, ...], int]:
        """Piece i as public integers mod 2^64: (A_0 .. A_p) with Y_i(x) = sum_l A_l x^l (the centred
        polynomial expanded; exact mod 2^64), and its slope lin[i]."""
        d, p, mc = self.degree, self.powers, -self.centers[i]
        a = [sum(self.coeffs[i][j] * math.comb(j, k) * mc ** (j - k) for j in range(k, d + 1)) for k in range(d + 1)]
        return tuple(v % (1 << 64) for v in a + [0] * (p - d)), self.lin[i] % (1 << 64)

    @staticmethod
    def of(params: dict) -> SplineSpec:
        return SplineSpec(
            tuple(params["knots"]),
            tuple(params["centers"]),
            tuple(tuple(c) for c in params["coeffs"]),
            tuple(params["lin"]),
            params["shift"],
            params["out_bits"],
        )


def _u64(v: int) -> U64:
    """A (signed or big) Python integer as a uint64 scalar (array arithmetic wraps silently)."""
    return U64(v % (1 << 64))


def _unshift(c: list, X: list[np.ndarray]) -> list[np.ndarray]:
    """Weights w_0 .. w_p with sum_l c_l (x^ - r)^l = sum_i w_i r^i, for X[k] = x^^k (public):
    w_i = (-1)^i sum_{l >= i} C(l, i) c_l X[l - i]. ``c`` holds p + 1 coefficients (arrays or scalars that
    broadcast against X's)."""
    p = len(c) - 1
    return [sum(X[j - i] * c[j] * _u64((-1) ** i * math.comb(j, i)) for j in range(i, p + 1)) for i in range(p + 1)]


def _pack_rows(rows) -> np.ndarray:
    """``np.packbits(np.concatenate(rows), bitorder="little")`` for an iterable of 0/1 uint8 rows, a row at a
    time: never more than one row's bits unpacked."""
    out, carry = [], np.zeros(0, np.uint8)
    for row in rows:
        bits = np.concatenate([carry, row])
        full = bits.size - bits.size % 8
        out.append(np.packbits(bits[:full], bitorder="little"))
        carry = bits[full:]
    out.append(np.packbits(carry, bitorder="little"))
    return np.concatenate(out)


def _row_bits(packed: np.ndarray, j: int, n: int) -> np.ndarray:
    """Row j (bits j n .. j n + n - 1, 0/1 uint8) of rows of n bits packed little-endian (``_pack_rows``)."""
    lo = j * n
    return np.unpackbits(packed[lo // 8 : (lo + n + 7) // 8], bitorder="little")[lo % 8 : lo % 8 + n]


class Spline(Gate):
    """A piecewise polynomial (:class:`SplineSpec`) of a masked wire: sigmoid, tanh, SiLU, GELU, erf,
    HardSigmoid and HardSwish are each one. docs/protocol.md, "Spline gates", derives it.

    With K knots q_1 < .. < q_K inside the m-bit range and b_j = 1{x < q_j}, the selected piece is
    Y(x) = Y_K(x) + sum_j b_j (Y_(j-1) - Y_j)(x) (pieces numbered within the range), likewise its slope.

    **Selection bits** (round 1). x' = x + 2^(m-1) in [0, 2^m), u' = x^ + 2^(m-1) mod 2^m = x' + rho mod 2^m
    (rho = r mod 2^m) is public; with F(v) = 1{v < rho} and q' = q + 2^(m-1) in (0, 2^m),

        1{x' < q'} = 1{u' < q'} xor F((u' - q') mod 2^m) xor F(u'),

    so ONE DCF key per element (alpha = rho, Z_2 payload, m bits), evaluated at u' and at u' - q'_j, gives
    xor-shares of every b_j. The parties open b^_j = b_j xor r_j (one message of K bits per element each way;
    r_j fresh uniform bits of the dealer's, whose xor-shares are the low bits of their word shares).

    **The polynomial** (round 2), x = x^ - r: each party holds shares of r^i (i = 1..p) and, per knot, of
    r_j r^i (i = 0..p); then x^l = (x^ - r)^l and b_j x^l = b^_j x^l + (1 - 2 b^_j) r_j x^l are linear in
    them once x^ and b^ are public, so each party has its share of Y and opens Y^ = Y + r_Y. An exact
    truncation (:class:`Trunc`, rounds 3 and 4) brings Y to the output scale; the linear part, selected the
    same way, is added to its output shares before they are opened.

    The dealer's words depend on r and the r_j only, never on the coefficients or on x; they stream to P1
    a row (one word per element) at a time, and the DCF keys block by block (``Dealer._put_dcf``), so a
    large layer never has its keys in memory at once. A party likewise evaluates a few knots per pass over
    its DCF keys and reads one knot's opened bits at a time (they stay packed: K n / 8 bytes), so its
    temporaries are a few rows of n words, not K.

    ``cost`` needs the spec: ``Spline.bind(spec)`` is the class of one spline (the registry's gate spec
    returns it); the statement's parameters carry the same spec to the programs."""

    stmt = "spline"
    kind = "spline"
    spec: ClassVar[SplineSpec | None] = None

    @classmethod
    def bind(cls, spec: SplineSpec) -> type[Spline]:
        return _bound_spline(spec)

    @classmethod
    def run(cls, ctx, tag: str, x, **params):
        return ctx.gate(Spline, tag, x, params.pop("m"), SplineSpec.of(params))

    @staticmethod
    def trunc_tag(tag: str) -> str:
        """The gate call of the output's exact truncation."""
        return tag + ".trunc"

    @staticmethod
    def out_shape(shape: tuple, **params) -> tuple:
        return tuple(shape)

    @staticmethod
    def deal(D, tag: str, r: np.ndarray, m: int, spec: SplineSpec) -> np.ndarray:
        """Both parties' DCF keys for 1{v < r mod 2^m} (if a knot is in range), P0 a seed and P1, row by row,
        r^1 .. r^p, r_Y and per knot r_j, r_j r .. r_j r^p minus P0's shares; then the truncation's keys."""
        shape = r.shape
        r = r.reshape(-1)
        n = r.size
        first, last = spec.active(m)
        if last > first:
            D._put_dcf(tag + DCF, r & mask_bits(m), m)
        powers = [r]
        for _ in range(spec.powers - 1):
            powers.append(powers[-1] * r)
        r_y = D.fresh(n)

        def rows():  # r^1 .. r^p, r_Y, then per knot r_j (drawn as its rows are written), r_j r .. r_j r^p
            yield from (*powers, r_y)
            for _ in range(last - first):
                r_j = D.rng.bits(n).astype(U64)
                yield r_j
                yield from (r_j * pw for pw in powers)

        D.share_rows(tag, rows(), spec.rows(m), n)
        r_out = Trunc.deal(D, Spline.trunc_tag(tag), r_y, spec.out_bits, spec.shift)
        return r_out.reshape(shape)

    @staticmethod
    def evaluate(P, tag: str, xhat: np.ndarray, m: int, spec: SplineSpec) -> np.ndarray:
        shape = xhat.shape
        flat = xhat.reshape(-1)
        n, p = flat.size, spec.powers
        first, last = spec.active(m)
        k = last - first
        P.chan.step = tag
        keys = dcf.DcfKeys(dcf.DcfParams(m, 0), P.b, P.keys.get(tag + DCF)) if k else None  # records in order
        row = P.share_rows(tag, spec.rows(m), n)

        def rjr(j: int, i: int) -> np.ndarray:  # shares of r_j r^i (a row, made or mapped when needed)
            return row(p + 1 + j * (p + 1) + i)

        bh = np.zeros(0, np.uint8)  # the opened b^_j, packed: K rows of n bits (``_row_bits``)
        if keys is not None:
            if len(keys) != n:
                raise ValueError(f"{tag}: {len(keys)} DCF keys for {n} elements")
            half = 1 << (m - 1)
            u = (flat + U64(half)) & mask_bits(m)
            q = [U64(v + half) for v in spec.knots[first:last]]
            mine = _pack_rows(Spline._selection_shares(P, keys, u, q, rjr))
            bh = mine ^ P.chan.exchange(mine)  # round 1: b^_j
        pieces = [spec.in_x(i) for i in range(first, last + 1)]
        A = np.array([a for a, _ in pieces], dtype=U64)  # (k + 1, p + 1)
        lin = np.array([s for _, s in pieces], dtype=U64)
        dA, dlin = A[:-1] - A[1:], lin[:-1] - lin[1:]  # per knot: the step from piece j to piece j - 1
        G, Gl = [np.full(n, a, dtype=U64) for a in A[-1]], np.full(n, lin[-1], dtype=U64)
        for j in range(k):  # the public part: sum_j b^_j (step_j)
            b_j = _row_bits(bh, j, n).astype(U64)
            G = [g + b_j * dA[j, i] for i, g in enumerate(G)]
            Gl = Gl + b_j * dlin[j]
        one = ONE if P.b == 0 else U64(0)  # P0 holds the constants
        R = [np.full(n, one, dtype=U64), *(row(i) for i in range(p))]  # shares of r^0 .. r^p
        X = [np.ones_like(flat)]
        for _ in range(p):
            X.append(X[-1] * flat)
        y = row(p) + sum(w * s for w, s in zip(_unshift(G, X), R, strict=True))  # r_Y + ...
        out_lin = Gl * (X[1] * R[0] - R[1])  # shares of (selected slope at b^) x
        for j in range(k):  # + (1 - 2 b^_j) r_j (step_j)(x), in the shares of r_j r^i; one knot at a time
            t = ONE - (_row_bits(bh, j, n).astype(U64) << ONE)
            s_j = [rjr(j, i) for i in range(p + 1)]
            y += t * sum(w * s for w, s in zip(_unshift(list(dA[j]), X), s_j, strict=True))
            out_lin += t * dlin[j] * (X[1] * s_j[0] - s_j[1])
        yhat = P.open(y)  # round 2 (round 1 without knots in range): Y^ = Y + r_Y
        out = Trunc.shares(P, Spline.trunc_tag(tag), yhat, spec.out_bits, spec.shift)  # d^, c^
        return P.open(out + out_lin).reshape(shape)

    @staticmethod
    def _selection_shares(P, keys: dcf.DcfKeys, u: np.ndarray, q: list, rjr):
        """This party's xor-shares of b^_j = b_j xor r_j, a knot at a time (0/1 uint8 rows of n): the DCF key
        evaluated at u' and at u' - q'_j (``dcf.evaluate_points``, a few knots per pass over the keys, so
        its temporaries are a few rows, never K)."""
        m = keys.params.n
        f0 = None
        for lo in range(0, len(q), Spline.KNOTS_PER_PASS):
            qs = q[lo : lo + Spline.KNOTS_PER_PASS]
            pts = [(u - v) & mask_bits(m) for v in qs]
            F = dcf.evaluate_points(P.b, keys, np.stack(pts if f0 is not None else [u, *pts]))
            if f0 is None:
                f0, F = F[0], F[1:]
            for j, (v, f) in enumerate(zip(qs, F, strict=True), start=lo):
                e = f ^ f0  # shares of b_j xor 1{u' < q'_j}
                if P.b == 0:
                    e ^= (u < v).astype(np.uint8)
                yield e ^ (rjr(j, 0) & ONE).astype(np.uint8)  # + r_j: the low bit of a word share is a xor-share

    KNOTS_PER_PASS: ClassVar[int] = 4  # knots evaluated per pass over the DCF keys (a few rows of n at a time)

    @classmethod
    def records(cls, tag: str, party: int, shift: int = 0, m: int = 64) -> list[str]:
        assert cls.spec is not None, "Spline.bind(spec) first"
        first, last = cls.spec.active(m)
        own = ([tag + DCF] if last > first else []) + [tag + SEED if party == 0 else tag + CORR]
        return own + Trunc.records(Spline.trunc_tag(tag), party, cls.spec.shift)

    @classmethod
    def cost(cls, n: int, m: int, shift: int = 0, depth: int = 1) -> GateCost:
        """Per element, with K knots in the m-bit range: one m-bit DCF key (Z_2 payload) to each party if
        K > 0, evaluated at K + 1 points; P1 also rows(m) = p + 1 + K (p + 1) words; P0 one seed. One round
        opens the K masked bits (K/8 bytes each way; none if K = 0), one opens Y^ (8 bytes each way); the
        exact truncation of Y adds its own keys and its two rounds."""
        spec = cls.spec
        assert spec is not None, "Spline.bind(spec) first"
        first, last = spec.active(m)
        k = last - first
        keys = n * dcf.nbytes_per_key(m, 0) if k else 0
        aes = n * (k + 1) * dcf.eval_aes_blocks(m, 0) if k else 0
        rows = spec.rows(m)
        t = Trunc.cost(n, spec.out_bits, spec.shift)
        bits = math.ceil(n * k / 8)
        return GateCost(
            key_p0=keys + SEED_BYTES + t.key_p0,
            key_p1=keys + n * rows * WORD + t.key_p1,
            rounds=(1 if k else 0) + 1 + t.rounds,
            sent_p0=bits + n * WORD + t.sent_p0,
            sent_p1=bits + n * WORD + t.sent_p1,
            aes_p0=aes + share_blocks(n, rows + k, 0) + t.aes_p0,  # P0 expands each r_j row twice
            aes_p1=aes + t.aes_p1,
        )


@functools.lru_cache(maxsize=256)
def _bound_spline(spec: SplineSpec) -> type[Spline]:
    return type("Spline", (Spline,), {"spec": spec, "__doc__": Spline.__doc__})


STATEMENTS[Spline.stmt] = Spline


# ------------------------------------------------------------------ inverse square root, layer normalization
def _select_keys(D, tag: str, r: np.ndarray, nb: int, knots: tuple[int, ...], vecs: list[np.ndarray]) -> np.ndarray:
    """The dealer's side of a piecewise-constant vector selection over an unsigned nb-bit input x (mask r):
    piece j covers [knots[j-1], knots[j]) (0 < knots[0] < ... < 2^nb; the first piece starts at 0, the last
    ends at 2^nb) and has the per-element vector vecs[j] (words, n). Writes the DCF keys (one per knot and one
    at rho = r mod 2^nb, payload in Z_2^64^words) and returns the constant the parties must be given shares of.

    With u = x^ mod 2^nb = x + rho mod 2^nb, for 0 <= x < 2^nb and 0 < q < 2^nb,
    1{x < q} = 1{u < (rho + q) mod 2^nb} - 1{u < rho} + 1{rho + q >= 2^nb} (docs/protocol.md, "Spline gates",
    the same identity on the unsigned range), so c(x) = c_last + sum_j 1{x < q_j} (c_(j-1) - c_j) is the
    DCFs' sum plus that constant."""
    const = vecs[-1].copy()
    if not knots:
        return const
    rho = r & mask_bits(nb)
    alphas, betas = [], []
    for j, q in enumerate(knots):
        delta = vecs[j] - vecs[j + 1]
        t = (rho + U64(q)) & mask_bits(nb)
        const += delta * (t < rho).astype(U64)  # rho + q wrapped past 2^nb
        alphas.append(t)
        betas.append(delta)
    alphas.append(rho)
    betas.append(vecs[-1] - vecs[0])
    k0, k1 = dcf.keygen(np.concatenate(alphas), nb, np.concatenate(betas, axis=1).T, D.rng)
    D.w[0].put(tag + DCF, k0.data)
    D.w[1].put(tag + DCF, k1.data)
    return const


def _select_eval(P, tag: str, xhat: np.ndarray, nb: int, calls: int, words: int) -> np.ndarray | None:
    """A party's share of the selected vector's DCF part, (words, n), or None without knots."""
    if calls <= 1:
        return None
    n = xhat.size
    keys = dcf.DcfKeys(dcf.DcfParams(nb, words), P.b, P.keys.get(tag + DCF))
    if len(keys) != calls * n:
        raise ValueError(f"{tag}: {len(keys)} DCF keys for {calls} x {n} comparisons")
    u = xhat & mask_bits(nb)
    return dcf.evaluate(P.b, keys, np.tile(u, calls)).reshape(calls, n, words).sum(axis=0, dtype=U64).T


class Octave(Gate):
    """Normalisation by the leading base-4 digit, on a masked wire x with 4^lo <= x < 2^nb (public lo, nb):
    for x in [4^i, 4^(i+1)) (i = lo.. the last power of 4 below 2^nb) it opens

        u^ = x 4^(top - i) + r_u   (so 4^top <= u < 4^(top + 1): x's mantissa, exact in the ring)
        q^ = 2^(top - i) + r_q     (1/sqrt(x) = 2^(top - i) 2^(-top) / sqrt(u / 4^top) ... up to 4^top)

    One DCF per power of 4 inside the range and one at rho select the piece's vector (c0, c1, c2) =
    (-4^(top - i) r, 4^(top - i), 2^(top - i)) over the nb-bit input (``_select_keys``); each party's share of
    u is c0 + c1 x^, of q is c2, and one round opens both with the fresh masks r_u, r_q. top >= the last
    piece's i, and 2 top + 2 <= 63 (u stays below 2^63)."""

    stmt = "octave"  # a stage of ``RSqrt``, not a statement of its own
    kind = "octave"
    words = 3

    @staticmethod
    def knots(nb: int, lo: int) -> tuple[int, ...]:
        """The powers of 4 strictly above 4^lo and below 2^nb: the pieces' starts after the first."""
        return tuple(4**i for i in range(lo + 1, (nb + 1) // 2 + 1) if 4**i < (1 << nb))

    @staticmethod
    def deal(D, tag: str, r: np.ndarray, nb: int, lo: int, top: int) -> tuple[np.ndarray, np.ndarray]:
        shape = r.shape
        r = r.reshape(-1)
        knots = Octave.knots(nb, lo)
        if 2 * top + 2 > 63 or lo + len(knots) > top or nb > 63:
            raise ValueError(f"{tag}: octave gate with nb={nb}, lo={lo}, top={top} does not fit the ring")
        vecs = []
        for i in range(lo, lo + len(knots) + 1):
            c1, c2 = U64(1 << (2 * (top - i))), U64(1 << (top - i))
            vecs.append(np.stack([np.zeros_like(r) - c1 * r, np.full_like(r, c1), np.full_like(r, c2)]))
        const = _select_keys(D, tag, r, nb, knots, vecs)
        r_u, r_q = D.fresh(r.size), D.fresh(r.size)
        D.shares(tag, np.concatenate([const, r_u[None], r_q[None]]), None)
        return r_u.reshape(shape), r_q.reshape(shape)

    @staticmethod
    def evaluate(P, tag: str, xhat: np.ndarray, nb: int, lo: int, top: int) -> tuple[np.ndarray, np.ndarray]:
        shape = xhat.shape
        flat = xhat.reshape(-1)
        n = flat.size
        P.chan.step = tag
        calls = len(Octave.knots(nb, lo)) + 1
        got = _select_eval(P, tag, flat, nb, calls, Octave.words)
        vals, _ = P.shares(tag, Octave.words + 2, n, 0)
        coef = vals[: Octave.words].copy()
        if got is not None:
            coef += got
        u = coef[0] + coef[1] * flat + vals[3]
        q = coef[2] + vals[4]
        opened = P.open(np.stack([u, q]))
        return opened[0].reshape(shape), opened[1].reshape(shape)

    @classmethod
    def records(cls, tag: str, party: int, shift: int = 0, nb: int = 64, lo: int = 0) -> list[str]:
        own = [tag + DCF] if cls.knots(nb, lo) else []
        return own + [tag + SEED if party == 0 else tag + CORR]

    @classmethod
    def cost(cls, n: int, m: int, shift: int = 0, depth: int = 1, lo: int = 0) -> GateCost:
        """n rows over m = nb bits: (K + 1) DCF keys with a 3-word payload each (K powers of 4 in range, none
        if K = 0) for both; P1 also 5 words of shares; one round, 16 bytes each way per row."""
        k = len(cls.knots(m, lo))
        calls = k + 1 if k else 0
        keys = n * calls * dcf.nbytes_per_key(m, cls.words)
        aes = n * calls * dcf.eval_aes_blocks(m, cls.words)
        return GateCost(
            key_p0=keys + SEED_BYTES,
            key_p1=keys + n * (cls.words + 2) * WORD,
            rounds=1,
            sent_p0=2 * n * WORD,
            sent_p1=2 * n * WORD,
            aes_p0=aes + share_blocks(n, cls.words + 2, 0),
            aes_p1=aes,
        )


@dataclass(frozen=True)
class RSqrtPlan:
    """The public parameters of an inverse square root R = 2^(top + s_h) sqrt(C) / sqrt(x) (approximately) of
    an integer 4^lo <= x < 2^nb: the octave gate's (nb, lo, top), the mantissa's bits L (u >> (2 top - L) in
    [2^L, 2^(L+2))) and the spline ``h`` of sqrt(C / v) on v = mantissa / 2^L, output at scale s_h."""

    nb: int
    lo: int
    top: int
    L: int
    h: SplineSpec

    @property
    def mantissa_bits(self) -> int:
        """Bits of the mantissa's comparison (its truncation and the spline): [2^L, 2^(L+2)), signed."""
        return self.L + 3


class RSqrt:
    """The inverse square root of a masked non-negative integer x (4^lo <= x < 2^nb) as FSS gates, with a
    relative error that does not depend on x's magnitude (docs/protocol.md, "Layer normalization"):

    1. ``Octave``: the leading base-4 digit i of x selects u = x 4^(top - i) in [4^top, 4^(top+1)) and
       q = 2^(top - i), both opened masked (1 round);
    2. ``Trunc``: the mantissa v = floor(u / 2^(2 top - L)) in [2^L, 2^(L+2)) (exact, 2 rounds);
    3. ``Spline``: h = sqrt(C / (v / 2^L)) at scale s_h, a public piecewise polynomial (3 rounds);
    4. ``HMul``: R = q h (1 round).

    Then R = 2^(top + s_h) sqrt(C / x) up to the mantissa's truncation (relative 2^-(L+1)) and the spline's
    error; a product d R drops top + s_h bits to come back to d's scale."""

    @staticmethod
    def tags(tag: str) -> tuple[str, str, str, str]:
        return tag + ".oct", tag + ".man", tag + ".h", tag + ".qh"

    @staticmethod
    def run(ctx, tag: str, x: np.ndarray, plan: RSqrtPlan) -> np.ndarray:
        t_oct, t_man, t_h, t_qh = RSqrt.tags(tag)
        u, q = ctx.gate(Octave, t_oct, x, plan.nb, plan.lo, plan.top)
        v = ctx.gate(Trunc, t_man, u, plan.mantissa_bits, 2 * plan.top - plan.L)
        h = ctx.gate(Spline, t_h, v, plan.mantissa_bits, plan.h)
        return ctx.gate(HMul, t_qh, q, h)

    @staticmethod
    def cost(n: int, plan: RSqrtPlan) -> list[GateCost]:
        """The four stages' costs for n values."""
        mb = plan.mantissa_bits
        return [
            Octave.cost(n, plan.nb, 0, 1, lo=plan.lo),
            Trunc.cost(n, mb, 2 * plan.top - plan.L),
            Spline.bind(plan.h).cost(n, mb),
            HMul.cost(n, 64, sizes=(n, n)),
        ]


def _sum_costs(costs: list[GateCost]) -> GateCost:
    out = GateCost()
    for c in costs:
        for k in vars(out):
            setattr(out, k, getattr(out, k) + getattr(c, k))
    return out


@dataclass(frozen=True)
class LayerNormPlan:
    """The public parameters of a layer normalization over the last axis (``LayerNorm``): the centred sum
    D = C x - sum(x)'s truncation for the variance (d_bits bits after d_shift) and the ``extra`` bits the
    numerator keeps beyond it, the variance's offset eps (an integer, the epsilon at the truncated D's scale),
    the inverse square root's plan, and the output's truncation (y_bits, y_shift)."""

    d_bits: int
    d_shift: int
    extra: int
    eps: int
    rsqrt: RSqrtPlan
    y_bits: int
    y_shift: int


class LayerNorm(Gate):
    """(x - mean) / sqrt(var + eps) over the last axis of a masked wire x (C elements per row), without the
    affine part (the model owner's gamma and beta follow as a linear layer and a constant):

    * D = C x - sum(x) on masked values (local: exact, linear), the centred values times C;
    * D_n = floor(D / 2^(d_shift - extra)) (``Trunc``, exact; skipped if extra = d_shift), the numerator;
    * D_t = floor(D_n / 2^extra) (``Trunc``; skipped if extra = 0), |D_t| < 2^(d_bits - 1), for the variance;
    * S = sum(D_t * D_t) + eps (``HMul``, then a local sum; eps public), C^3 var at D_t's scale, exact;
    * R = ``RSqrt`` of S, per row;
    * y = floor((D_n * R + 2^(y_shift - 1)) / 2^y_shift) (``HMul`` broadcast over the row, then ``Trunc``).

    docs/protocol.md, "Layer normalization", derives it and states its error bound."""

    stmt = "layernorm"
    kind = "layernorm"
    plan: ClassVar[LayerNormPlan | None] = None

    @classmethod
    def bind(cls, plan: LayerNormPlan, row_length: int) -> type[LayerNorm]:
        """The class of one layer normalization (its plan, C elements per row): what ``cost`` prices."""
        return _bound_layernorm(plan, row_length)

    @staticmethod
    def params(plan: LayerNormPlan) -> dict:
        """The statement's parameters (lib.layernorm's keywords) of a plan; ``of`` reads them back."""
        rs, h = plan.rsqrt, plan.rsqrt.h
        return {
            "d_bits": plan.d_bits,
            "d_shift": plan.d_shift,
            "extra": plan.extra,
            "eps": plan.eps,
            "s_bits": rs.nb,
            "lo": rs.lo,
            "top": rs.top,
            "L": rs.L,
            "knots": list(h.knots),
            "centers": list(h.centers),
            "coeffs": [list(c) for c in h.coeffs],
            "lin": list(h.lin),
            "shift": h.shift,
            "out_bits": h.out_bits,
            "y_bits": plan.y_bits,
            "y_shift": plan.y_shift,
        }

    @staticmethod
    def of(params: dict) -> LayerNormPlan:
        """The plan from the statement's parameters (lib.layernorm's keywords)."""
        p = dict(params)
        h = SplineSpec.of(p)
        rs = RSqrtPlan(p["s_bits"], p["lo"], p["top"], p["L"], h)
        return LayerNormPlan(p["d_bits"], p["d_shift"], p["extra"], p["eps"], rs, p["y_bits"], p["y_shift"])

    @staticmethod
    def tags(tag: str) -> tuple[str, str, str, str, str, str]:
        return tag + ".d", tag + ".v", tag + ".sq", tag + ".rs", tag + ".y", tag + ".out"

    @classmethod
    def run(cls, ctx, tag: str, x, **params):
        plan = LayerNorm.of(params)
        t_d, t_v, t_sq, t_rs, t_y, t_out = LayerNorm.tags(tag)
        c = x.shape[-1]
        d = x * U64(c) - x.sum(axis=-1, keepdims=True, dtype=U64)
        if plan.d_shift > plan.extra:
            d = ctx.gate(Trunc, t_d, d, plan.d_bits + plan.extra, plan.d_shift - plan.extra)
        dt = ctx.gate(Trunc, t_v, d, plan.d_bits, plan.extra) if plan.extra else d
        s = ctx.gate(HMul, t_sq, dt, dt).sum(axis=-1, keepdims=True, dtype=U64) + ctx.public(plan.eps)
        r = RSqrt.run(ctx, t_rs, s.reshape(-1), plan.rsqrt).reshape(s.shape)
        y = ctx.gate(HMul, t_y, d, r) + ctx.public(1 << (plan.y_shift - 1) if plan.y_shift else 0)  # rounds
        return ctx.gate(Trunc, t_out, y, plan.y_bits, plan.y_shift)

    @staticmethod
    def out_shape(shape: tuple, **params) -> tuple:
        return tuple(shape)

    @classmethod
    def cost(cls, n: int, m: int, shift: int = 0, depth: int = 1, sizes: tuple[int, ...] = ()) -> GateCost:
        """n elements in n / C rows (C: the bound class's ``row_length``): the sum of its stages' costs
        (docs/protocol.md, "Layer normalization"); ``m`` is the plan's (it was derived from it)."""
        plan = cls.plan
        assert plan is not None, "LayerNorm.bind(plan) first"
        rows = n // cls.row_length
        parts = (
            [Trunc.cost(n, plan.d_bits + plan.extra, plan.d_shift - plan.extra)] if plan.d_shift > plan.extra else []
        )
        parts += [Trunc.cost(n, plan.d_bits, plan.extra)] if plan.extra else []
        parts += [HMul.cost(n, 64, sizes=(n, n))]
        parts += RSqrt.cost(rows, plan.rsqrt)
        parts += [HMul.cost(n, 64, sizes=(n, rows)), Trunc.cost(n, plan.y_bits, plan.y_shift)]
        return _sum_costs(parts)

    row_length: ClassVar[int] = 1


@functools.lru_cache(maxsize=256)
def _bound_layernorm(plan: LayerNormPlan, row_length: int) -> type[LayerNorm]:
    return type("LayerNorm", (LayerNorm,), {"plan": plan, "row_length": row_length, "__doc__": LayerNorm.__doc__})


STATEMENTS[LayerNorm.stmt] = LayerNorm
