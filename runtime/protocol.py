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

Exact truncation by s >= 1 bits (ReLU with fused truncation, standalone
truncation): (u - rho) mod 2^m is floor(z / 2^s) + c with the carry
c = 1{z^ mod 2^s < r_z mod 2^s} of the dropped bits. A second, small DCF
over s bits (alpha = r_z mod 2^s, evaluated at the public z^ mod 2^s) gives
xor-shares of c; the parties open c^ = c ^ r_c in the same message as d^ and
subtract c inside the output's shares, so the result is floor(z / 2^s)
exactly, with no extra round (docs/protocol.md section 6).

P0's share of every arithmetic value and bit comes from a 16-byte seed per
gate call (``expand``); P1 receives the corrections (value - P0's share).
"""

from __future__ import annotations

import numpy as np
from fssc.runtime import dcf
from fssc.runtime.channel import Channel
from fssc.runtime.keys import KeyReader, KeyWriter
from fssc.runtime.prg import Rng, expand
from fssc.runtime.ring import ring_bilinear

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

    def _carry_dcf(self, tag: str, r: np.ndarray, s: int) -> np.ndarray:
        """DCF keys over s bits for the carry c = 1{z^ mod 2^s < r mod 2^s}; returns the bit mask r_c of c^."""
        k0, k1 = dcf.keygen(r & _mask(s), s, None, self.rng)
        self.w[0].put(tag + ".cdcf", k0.data)
        self.w[1].put(tag + ".cdcf", k1.data)
        return self.rng.bits(r.size).astype(U64)

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
    def _lift_gate(self, tag: str, r: np.ndarray, m: int, s: int, offset: int, rows) -> np.ndarray:
        """A comparison on ((r >> s) + offset) mod 2^m whose output is a fresh mask; with s > 0 also the carry DCF.
        ``rows(r_d, rho, rho_hi, r_out, r_c)`` lists the values the parties get shares of (r_c is None if s = 0)."""
        shape = r.shape
        r = r.reshape(-1)
        rho = (compare_input(r, s, m) + U64(offset)) & _mask(m)
        rho_hi = self._dcf(tag, rho, m)
        r_c = self._carry_dcf(tag, r, s) if s else None
        r_d = self.rng.bits(r.size).astype(U64)
        r_out = self.fresh(r.size)
        bits = rho_hi ^ r_d if r_c is None else np.concatenate([rho_hi ^ r_d, r_c])
        self._shares(tag, np.stack(rows(r_d, rho, rho_hi, r_out, r_c)), bits)
        return r_out.reshape(shape)

    def relu(self, tag: str, r: np.ndarray, m: int, trunc: int = 0) -> np.ndarray:
        """Mask of ReLU(floor(x / 2^trunc)); with trunc > 0 the DCF compares x'' - 1 (rho + 1), see Party.relu."""
        if not trunc:
            return self._lift_gate(tag, r, m, 0, 0, lambda d, rho, hi, out, c: [d, rho, d * rho, hi, d * hi, out])
        return self._lift_gate(
            tag, r, m, trunc, 1, lambda d, rho, hi, out, c: [d, rho, d * rho, hi, d * hi, out, c, d * c]
        )

    def trunc(self, tag: str, r: np.ndarray, m: int, shift: int) -> np.ndarray:
        """Mask of a standalone truncation: floor(x / 2^shift) lifted from m bits to the ring."""
        return self._lift_gate(
            tag, r, m, shift, 0, lambda d, rho, hi, out, c: [d, rho, hi, d * hi, out] + ([c] if shift else [])
        )

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
        """y = W * x + b: P0 has two seeds, P1 gets [r_x]_1 and c_1 (docs/protocol.md, section 3)."""
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
    def _shares(self, tag: str, rows: int, n: int, nbits: int):
        """Shares of ``rows`` words per element (n elements) and xor-shares of ``nbits`` bits."""
        if self.b == 0:
            seed = self.keys.get(tag + ".seed").tobytes()
            vals = expand(seed, (rows, n))
            bits = None
            if nbits:
                b0 = expand(seed, ((nbits + 63) // 64,), nonce=1).view(np.uint8)
                bits = np.unpackbits(b0, count=nbits, bitorder="little")
            return vals, bits
        vals = self.keys.get(tag + ".corr")
        if vals.shape != (rows, n):
            raise ValueError(f"{tag}: key shares have shape {vals.shape}, expected {(rows, n)}")
        bits = np.unpackbits(self.keys.get(tag + ".bits"), count=nbits, bitorder="little") if nbits else None
        return vals, bits

    def _dcf_share(self, tag: str, u: np.ndarray, m: int, record: str = ".dcf") -> np.ndarray:
        """Xor-share of 1{u mod 2^(m-1) < alpha} (the borrow; with record ".cdcf" and m = s + 1 the carry)."""
        self.chan.step = tag  # every comparison gate starts here: names the step in a receive error
        data = self.keys.get(tag + record)
        keys = dcf.DcfKeys(dcf.DcfParams(m - 1, 0), self.b, data)
        if len(keys) != u.size:
            raise ValueError(f"{tag}: {len(keys)} DCF keys for {u.size} comparisons")
        return dcf.evaluate(self.b, keys, u & _mask(m - 1))

    def _open_bits(self, e: np.ndarray) -> np.ndarray:
        peer = self.chan.exchange(np.packbits(e, bitorder="little"))
        return (e ^ np.unpackbits(peer, count=e.size, bitorder="little")).astype(U64)

    def _open(self, y: np.ndarray) -> np.ndarray:
        return y + self.chan.exchange(y)

    def _compare(self, tag: str, u: np.ndarray, m: int, rows: int, xhat: np.ndarray | None = None, s: int = 0):
        """Round 1: open d^ = d ^ r_d (and, with s > 0, c^ = c ^ r_c for the carry of x^'s low s bits).

        Returns (d^ as 0/1 uint64, share rows, u_hi, c^ as 0/1 uint64 or None).
        """
        n = u.size
        dshare = self._dcf_share(tag, u, m)
        cshare = self._dcf_share(tag, xhat, s + 1, ".cdcf") if s and xhat is not None else None
        vals, bits = self._shares(tag, rows, n, 2 * n if s else n)
        u_hi, _ = split_u(u, m)
        e = dshare ^ bits[:n]
        if self.b == 0:
            e ^= (ONE ^ u_hi).astype(np.uint8)
        if not s:
            return self._open_bits(e), vals, u_hi, None
        opened = self._open_bits(np.concatenate([e, cshare ^ bits[n:]]))
        return opened[:n], vals, u_hi, opened[n:]

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
        return self.chan.recv(shape, U64, step=tag).copy()

    def output(self, tag: str, yhat: np.ndarray) -> np.ndarray | None:
        """P0 unmasks; P1 learns nothing."""
        if self.b == 0:
            return yhat - self.keys.get(tag + ".rout")
        return None

    # -- comparison gates -------------------------------------------------
    def relu(self, tag: str, xhat: np.ndarray, m: int, trunc: int = 0) -> np.ndarray:
        """ReLU(floor(x / 2^trunc)) for an m-bit signed truncated value, exact in Z_2^64 (masked).

        Without truncation the DCF gives d = DReLU(x') and the output is d * x'.
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
        D, vals, u_hi, C = self._compare(tag, u, m, rows, flat, trunc)
        r_d, rho, rdrho, rho_hi, rdrhohi, r_out = vals[:6]
        t = ONE - (D << ONE)  # 1 - 2D
        y = t * (u * r_d - rdrho) - D * rho + _pow2(m) * (ONE - u_hi) * (D * rho_hi + t * rdrhohi) + r_out
        if self.b == 0:
            y += D * u
        if trunc:  # + g (1 - c) = g - g c, with g = D + t r_g and c = C + tc r_c
            r_c, rdrc = vals[6:8]
            tc = ONE - (C << ONE)
            one = ONE if self.b == 0 else U64(0)  # P0 holds the constants
            y += D * one + t * r_d - (D * C * one + D * tc * r_c + C * t * r_d + t * tc * rdrc)
        return self._open(y).reshape(shape)

    def trunc(self, tag: str, xhat: np.ndarray, m: int, shift: int) -> np.ndarray:
        """Standalone truncation: floor(x / 2^shift) as an m-bit signed value, lifted to Z_2^64 (masked).

        x'' = (u - rho) mod 2^m = u - rho + 2^m lt with lt = 1{u < rho}; reading it
        as signed subtracts 2^m (1 - d). With d = DReLU(x''):
        lt - 1 + d = (u_hi xor rho_hi) d - u_hi (1 - rho_hi), which is linear in
        D's shares of d, rho_hi d and rho_hi once d^ = d xor r_d is open. x'' is
        floor(x / 2^shift) + c; subtracting c = c^ + (1 - 2c^) r_c (c^ opened with d^)
        makes the result exact.
        """
        shape = xhat.shape
        flat = xhat.reshape(-1)
        u = compare_input(flat, shift, m)
        D, vals, u_hi, C = self._compare(tag, u, m, 6 if shift else 5, flat, shift)
        r_d, rho, rho_hi, rdrhohi, r_out = vals[:5]
        t = ONE - (D << ONE)  # 1 - 2D
        one = ONE if self.b == 0 else U64(0)  # P0 holds the constant 1
        d = D * one + t * r_d
        hd = D * rho_hi + t * rdrhohi  # shares of rho_hi * d
        k = (ONE - u_hi) * hd + u_hi * (d - hd - one + rho_hi)  # shares of lt - 1 + d
        y = u * one - rho + _pow2(m) * k + r_out
        if shift:
            y -= C * one + (ONE - (C << ONE)) * vals[5]
        return self._open(y).reshape(shape)

    def select(self, tag: str, zhat: list[np.ndarray], m: int, s: int = 0) -> list[np.ndarray]:
        """Open d * z_j + r_out_j with d = DReLU(z_0 >> s) (flat arrays)."""
        u = compare_input(zhat[0], s, m)
        D, vals, _, _ = self._compare(tag, u, m, 1 + 3 * len(zhat))
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
        _, bits = self._shares(tag, 0, u.size, u.size)
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
        xhat: np.ndarray | None,
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
            if z0 is None:
                raise ValueError(f"{tag}: the data owner's offline half z_0 is missing")
            return self._open(z0)
        if w is None:
            raise ValueError(f"{tag}: the model owner's weights are missing")
        rx1 = self.keys.get(tag + ".rx1")
        c1 = self.keys.get(tag + ".c1")
        xm = xhat - rx1
        z1 = ring_bilinear(fn, xm, w, k, 64, w_bits) + c1
        if bias is not None:
            z1 = z1 + bias
        return self._open(z1)
