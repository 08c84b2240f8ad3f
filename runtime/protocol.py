"""The two-party protocol on masked wires: the dealer's side and a party's side
of every gate.

Every secret wire w carries, online, the public masked value w^ = w + r_w
(mod 2^64); r_w is uniform and known only to the dealer D. The dealer runs
the program on masks (``Dealer``), the parties on masked values (``Party``),
op by op in the same order, so D writes each party's key records in exactly
the order the party reads them. docs/protocol.md derives each gate and its
costs; this module is the implementation.

Comparison core (one DCF per comparison, Boyle et al. 2021). For an m-bit
comparison on u = (z^ >> s) mod 2^m with mask rho = (r_z >> s) mod 2^m, split
u = u_hi 2^(m-1) + u_lo (same for rho). A DCF over m-1 bits with
alpha = rho_lo gives xor-shares of borrow = 1{u_lo < rho_lo}, and

    d = DReLU(z') = 1 ^ u_hi ^ rho_hi ^ borrow,   z' = (u - rho) mod 2^m signed.

The parties open d^ = d ^ r_d (one bit each way), then compute arithmetic
shares of the gate's output from D's shares of products of r_d with masks
and open the masked output (8 bytes each way): two rounds.

P0's share of every arithmetic value and bit comes from a 16-byte seed per
gate call (``expand``); P1 receives the corrections (value - P0's share).
"""

from __future__ import annotations

import numpy as np

from . import dcf
from .channel import Channel
from .keys import KeyReader, KeyWriter
from .prg import Rng, expand
from .ring import ring_bilinear

U64 = np.uint64
ONE = U64(1)


def _mask(bits: int) -> U64:
    return U64((1 << bits) - 1) if bits < 64 else U64(0xFFFF_FFFF_FFFF_FFFF)


def _pow2(bits: int) -> U64:
    return U64((1 << bits) % (1 << 64))


def split_u(u: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(hi bit, low m-1 bits) of m-bit values."""
    return (u >> U64(m - 1)) & ONE, u & _mask(m - 1)


def compare_input(zhat: np.ndarray, s: int, m: int) -> np.ndarray:
    """u = (z^ >> s) mod 2^m (logical shift of the ring element).

    Needs 2 <= m and m + s <= 64: with fewer than m bits above the shift, the
    wrap of z^ + r past 2^64 would no longer vanish mod 2^m.
    """
    if m < 2 or m + s > 64:
        raise ValueError(f"comparison on {m} bits after a shift by {s}: need 2 <= m and m + s <= 64")
    return (zhat >> U64(s)) & _mask(m) if s else zhat & _mask(m)


# ======================================================================= dealer
class Dealer:
    """Runs the program on masks and writes both parties' key records."""

    def __init__(self, w0: KeyWriter, w1: KeyWriter, rng: Rng | None = None):
        self.w = (w0, w1)
        self.rng = rng or Rng()

    # -- plumbing ---------------------------------------------------------
    def _shares(self, tag: str, vals: np.ndarray, bits: np.ndarray | None) -> None:
        """P0 gets a seed, P1 the corrections vals - expand(seed) (and bits ^ expand bits)."""
        seed = self.rng.seed_bytes()
        self.w[0].put(tag + ".seed", np.frombuffer(seed, dtype=np.uint8))
        self.w[1].put(tag + ".corr", vals - expand(seed, vals.shape))
        if bits is not None:
            b0 = expand(seed, ((bits.size + 63) // 64,), nonce=1).view(np.uint8)
            b0 = np.unpackbits(b0, count=bits.size, bitorder="little")
            self.w[1].put(tag + ".bits", np.packbits(bits.astype(np.uint8) ^ b0, bitorder="little"))

    def _dcf(self, tag: str, rho: np.ndarray, m: int) -> np.ndarray:
        """DCF keys for borrow = 1{u_lo < rho_lo}; returns rho_hi."""
        hi, lo = split_u(rho, m)
        k0, k1 = dcf.keygen(lo, m - 1, None, self.rng)
        self.w[0].put(tag + ".dcf", k0.data)
        self.w[1].put(tag + ".dcf", k1.data)
        return hi

    def fresh(self, shape) -> np.ndarray:
        return self.rng.u64(shape)

    # -- input / output ---------------------------------------------------
    def input(self, tag: str, shape) -> np.ndarray:
        """Mask for the data owner's input; P0 gets it in the clear."""
        r = self.fresh(shape)
        self.w[0].put(tag + ".rin", r)
        return r

    def output(self, tag: str, r: np.ndarray) -> None:
        """P0 gets the output mask in the clear (only P0 learns results)."""
        self.w[0].put(tag + ".rout", r)

    def const(self, tag: str, shape) -> np.ndarray:
        """Mask r_c of a constant of the model owner's: P1 gets a seed that expands to it, P0 nothing."""
        seed = self.rng.seed_bytes()
        self.w[1].put(tag + ".rc", np.frombuffer(seed, dtype=np.uint8))
        return expand(seed, shape)

    # -- comparison gates -------------------------------------------------
    def _lift_gate(self, tag: str, r: np.ndarray, m: int, s: int, rows) -> np.ndarray:
        """A comparison on (r >> s) mod 2^m whose output is a fresh mask; ``rows(r_d, rho, rho_hi, r_out)``
        lists the values the parties get shares of."""
        shape = r.shape
        r = r.reshape(-1)
        rho = compare_input(r, s, m)
        rho_hi = self._dcf(tag, rho, m)
        r_d = self.rng.bits(r.size).astype(U64)
        r_out = self.fresh(r.size)
        self._shares(tag, np.stack(rows(r_d, rho, rho_hi, r_out)), rho_hi ^ r_d)
        return r_out.reshape(shape)

    def relu(self, tag: str, r: np.ndarray, m: int, trunc: int = 0) -> np.ndarray:
        return self._lift_gate(tag, r, m, trunc, lambda d, rho, hi, out: [d, rho, d * rho, hi, d * hi, out])

    def trunc(self, tag: str, r: np.ndarray, m: int, shift: int) -> np.ndarray:
        """Mask of a standalone truncation: (x >> shift) lifted from m bits to the ring."""
        return self._lift_gate(tag, r, m, shift, lambda d, rho, hi, out: [d, rho, hi, d * hi, out])

    def select(self, tag: str, r_z: list[np.ndarray], m: int, s: int = 0) -> list[np.ndarray]:
        """Masks of d * z_j + r_out_j where d = DReLU(z_0 >> s) (z_j flat, same length)."""
        rho = compare_input(r_z[0], s, m)
        rho_hi = self._dcf(tag, rho, m)
        n = r_z[0].size
        r_d = self.rng.bits(n).astype(U64)
        outs = [self.fresh(n) for _ in r_z]
        rows = [r_d]
        for rz, ro in zip(r_z, outs, strict=True):
            rows += [rz, r_d * rz, ro]
        self._shares(tag, np.stack(rows), rho_hi ^ r_d)
        return outs

    def max(self, tag: str, ra: np.ndarray, rb: np.ndarray, m: int, s: int = 0) -> np.ndarray:
        """Mask of max(a, b) = b + d (a - b) (any shape; a and b alike)."""
        (w,) = self.select(tag, [(ra - rb).reshape(-1)], m, s)
        return rb + w.reshape(rb.shape)

    def drelu_to_p0(self, tag: str, r_z: np.ndarray, m: int) -> None:
        """DReLU(z) revealed to P0 only (the 2-class label)."""
        rho = compare_input(r_z.reshape(-1), 0, m)
        rho_hi = self._dcf(tag, rho, m)
        self._shares(tag, np.zeros((0, rho.size), U64), rho_hi)

    # -- linear layer with the model owner's weights ------------------------
    def linear_seeds(self, tag: str) -> bytes:
        """P0's two seeds for a linear layer, written ahead of everything else so
        P0 can compute its halves of all linear layers before the input exists."""
        seeds = self.rng.seed_bytes() + self.rng.seed_bytes()
        self.w[0].put(tag + ".seeds", np.frombuffer(seeds, dtype=np.uint8))
        return seeds

    def linear(self, tag: str, fn, k: int, r_x: np.ndarray, a_mask: np.ndarray, y_shape, seeds: bytes) -> np.ndarray:
        """y = W * x + b: P0 has two seeds, P1 gets [r_x]_1 and c_1 (DESIGN.md section 4)."""
        s_rx, s_c = seeds[:16], seeds[16:]
        rx0 = expand(s_rx, r_x.shape)
        r_y = self.fresh(y_shape)
        c0 = expand(s_c, y_shape)
        cross = ring_bilinear(fn, rx0, a_mask, k, 64, 64)  # A * [r_x]_0
        self.w[1].put(tag + ".rx1", r_x - rx0)
        self.w[1].put(tag + ".c1", cross + r_y - c0)
        return r_y


# ======================================================================= party
class Party:
    """One party's side: masked values in, masked values out."""

    def __init__(self, b: int, keys: KeyReader, chan: Channel):
        assert b in (0, 1)
        self.b = b
        self.keys = keys
        self.chan = chan

    # -- plumbing ---------------------------------------------------------
    def _shares(self, tag: str, rows: int, n: int, with_bits: bool):
        if self.b == 0:
            seed = self.keys.get(tag + ".seed").tobytes()
            vals = expand(seed, (rows, n))
            bits = None
            if with_bits:
                b0 = expand(seed, ((n + 63) // 64,), nonce=1).view(np.uint8)
                bits = np.unpackbits(b0, count=n, bitorder="little")
            return vals, bits
        vals = self.keys.get(tag + ".corr")
        if vals.shape != (rows, n):
            raise ValueError(f"{tag}: key shares have shape {vals.shape}, expected {(rows, n)}")
        bits = np.unpackbits(self.keys.get(tag + ".bits"), count=n, bitorder="little") if with_bits else None
        return vals, bits

    def _dcf_share(self, tag: str, u: np.ndarray, m: int) -> np.ndarray:
        self.chan.step = tag  # every comparison gate starts here: names the step in a receive error
        data = self.keys.get(tag + ".dcf")
        keys = dcf.DcfKeys(dcf.DcfParams(m - 1, 0), self.b, data)
        if len(keys) != u.size:
            raise ValueError(f"{tag}: {len(keys)} DCF keys for {u.size} comparisons")
        return dcf.evaluate(self.b, keys, u & _mask(m - 1))

    def _open_bits(self, e: np.ndarray) -> np.ndarray:
        peer = self.chan.exchange(np.packbits(e, bitorder="little"))
        return (e ^ np.unpackbits(peer, count=e.size, bitorder="little")).astype(U64)

    def _open(self, y: np.ndarray) -> np.ndarray:
        return y + self.chan.exchange(y)

    def _compare(self, tag: str, u: np.ndarray, m: int, rows: int):
        """Round 1: open d^ = d ^ r_d. Returns (d^ as 0/1 uint64, share rows, u_hi)."""
        dshare = self._dcf_share(tag, u, m)
        vals, bits = self._shares(tag, rows, u.size, True)
        u_hi, _ = split_u(u, m)
        e = dshare ^ bits
        if self.b == 0:
            e ^= (ONE ^ u_hi).astype(np.uint8)
        return self._open_bits(e), vals, u_hi

    # -- input / output ---------------------------------------------------
    def input(self, tag: str, x: np.ndarray | None, shape) -> np.ndarray:
        """P0 masks and sends its input; both then hold x^ = x + r_in."""
        self.chan.rounds += 1  # one message, P0 -> P1
        if self.b == 0:
            xhat = np.asarray(x, dtype=U64).reshape(shape) + self.keys.get(tag + ".rin")
            self.chan.send(xhat)
            return xhat
        return self.chan.recv(shape, U64, step=tag).copy()

    def const(self, tag: str, c: np.ndarray | None, shape) -> np.ndarray:
        """P1 masks and sends its constant; both then hold c^ = c + r_c. P0 sees a uniform tensor."""
        self.chan.rounds += 1  # one message, P1 -> P0
        if self.b == 1:
            chat = np.asarray(c, dtype=U64).reshape(shape) + expand(self.keys.get(tag + ".rc").tobytes(), shape)
            self.chan.send(chat)
            return chat
        return self.chan.recv().reshape(shape).copy()

    def output(self, tag: str, yhat: np.ndarray) -> np.ndarray | None:
        """P0 unmasks; P1 learns nothing."""
        if self.b == 0:
            return yhat - self.keys.get(tag + ".rout")
        return None

    # -- comparison gates -------------------------------------------------
    def relu(self, tag: str, xhat: np.ndarray, m: int, trunc: int = 0) -> np.ndarray:
        """ReLU((x >> trunc) mod 2^m as signed), exact in Z_2^64 (masked)."""
        shape = xhat.shape
        u = compare_input(xhat.reshape(-1), trunc, m)
        D, (r_d, rho, rdrho, rho_hi, rdrhohi, r_out), u_hi = self._compare(tag, u, m, 6)
        t = ONE - (D << ONE)  # 1 - 2D
        y = t * (u * r_d - rdrho) - D * rho + _pow2(m) * (ONE - u_hi) * (D * rho_hi + t * rdrhohi) + r_out
        if self.b == 0:
            y += D * u
        return self._open(y).reshape(shape)

    def trunc(self, tag: str, xhat: np.ndarray, m: int, shift: int) -> np.ndarray:
        """Standalone truncation: z' = (x >> shift) + carry as an m-bit signed value, in Z_2^64 (masked).

        (u - rho) mod 2^m = u - rho + 2^m lt with lt = 1{u < rho}; reading it as
        signed subtracts 2^m (1 - d). With d = DReLU(z'):
        lt - 1 + d = (u_hi xor rho_hi) d - u_hi (1 - rho_hi), which is linear in
        D's shares of d, rho_hi d and rho_hi once d^ = d xor r_d is open.
        """
        shape = xhat.shape
        u = compare_input(xhat.reshape(-1), shift, m)
        D, (r_d, rho, rho_hi, rdrhohi, r_out), u_hi = self._compare(tag, u, m, 5)
        t = ONE - (D << ONE)  # 1 - 2D
        one = ONE if self.b == 0 else U64(0)  # P0 holds the constant 1
        d = D * one + t * r_d
        hd = D * rho_hi + t * rdrhohi  # shares of rho_hi * d
        k = (ONE - u_hi) * hd + u_hi * (d - hd - one + rho_hi)  # shares of lt - 1 + d
        y = u * one - rho + _pow2(m) * k + r_out
        return self._open(y).reshape(shape)

    def select(self, tag: str, zhat: list[np.ndarray], m: int, s: int = 0) -> list[np.ndarray]:
        """Open d * z_j + r_out_j with d = DReLU(z_0 >> s) (flat arrays)."""
        u = compare_input(zhat[0], s, m)
        D, vals, _ = self._compare(tag, u, m, 1 + 3 * len(zhat))
        t = ONE - (D << ONE)
        r_d = vals[0]
        ys = []
        for j, z in enumerate(zhat):
            rz, rdrz, ro = vals[1 + 3 * j : 4 + 3 * j]
            y = t * (r_d * z - rdrz) - D * rz + ro
            if self.b == 0:
                y += D * z
            ys.append(y)
        opened = self._open(np.stack(ys))
        return list(opened)

    def max(self, tag: str, ahat: np.ndarray, bhat: np.ndarray, m: int, s: int = 0) -> np.ndarray:
        (w,) = self.select(tag, [(ahat - bhat).reshape(-1)], m, s)
        return bhat + w.reshape(bhat.shape)

    def drelu_to_p0(self, tag: str, zhat: np.ndarray, m: int) -> np.ndarray | None:
        """DReLU(z) as 0/1 for P0; P1 sends its share and learns nothing."""
        u = compare_input(zhat.reshape(-1), 0, m)
        dshare = self._dcf_share(tag, u, m)
        _, bits = self._shares(tag, 0, u.size, True)
        e = dshare ^ bits
        self.chan.rounds += 1  # one message, P1 -> P0
        if self.b == 1:
            self.chan.send(np.packbits(e, bitorder="little"))
            return None
        u_hi, _ = split_u(u, m)
        e ^= (ONE ^ u_hi).astype(np.uint8)
        peer = np.unpackbits(self.chan.recv(((u.size + 7) // 8,), np.uint8), count=u.size, bitorder="little")
        return (e ^ peer).astype(np.int64)

    # -- linear layer -------------------------------------------------------
    def linear_offline(self, tag: str, fn, k: int, x_shape, w_hat: np.ndarray, y_shape) -> np.ndarray:
        """P0's half z_0 = c_0 - W^ * [r_x]_0, computable before the input exists."""
        assert self.b == 0
        seeds = self.keys.get(tag + ".seeds").tobytes()
        rx0 = expand(seeds[:16], x_shape)
        c0 = expand(seeds[16:], y_shape)
        return c0 - ring_bilinear(fn, rx0, w_hat, k, 64, 64)

    def linear(
        self,
        tag: str,
        xhat: np.ndarray,
        fn=None,
        k: int = 0,
        w: np.ndarray | None = None,
        bias: np.ndarray | None = None,
        w_bits: int = 64,
        z0: np.ndarray | None = None,
        y_shape=None,
    ) -> np.ndarray:
        """y^ = z_0 + z_1: P1 computes z_1 = W * (x^ - [r_x]_1) + b + c_1 online; P0 brings z_0."""
        self.chan.step = tag
        if self.b == 0:
            return self._open(z0)
        rx1 = self.keys.get(tag + ".rx1")
        c1 = self.keys.get(tag + ".c1")
        xm = xhat - rx1
        z1 = ring_bilinear(fn, xm, w, k, 64, w_bits) + c1
        if bias is not None:
            z1 = z1 + bias
        return self._open(z1)
