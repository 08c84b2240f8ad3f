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
========== ============ ===============================================
"""

from __future__ import annotations

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
        """x'' = (u - rho) mod 2^m = u - rho + 2^m lt with lt = 1{u < rho}; reading it
        as signed subtracts 2^m (1 - d). With d = DReLU(x''):
        lt - 1 + d = (u_hi xor rho_hi) d - u_hi (1 - rho_hi), which is linear in
        D's shares of d, rho_hi d and rho_hi once d^ = d xor r_d is open. x'' is
        floor(x / 2^shift) + c; subtracting c = c^ + (1 - 2c^) r_c (c^ opened with d^)
        makes the result exact.
        """
        shape = xhat.shape
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
        return P.open(y).reshape(shape)


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
