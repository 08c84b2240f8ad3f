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
``Dealer.shares``/``Party.shares`` deal a whole array at once; ``share_rows``
streams a record a row at a time, one AES-CTR nonce per row (``share_row``).

The gates themselves (which values D shares, how a party combines them) are
one class each in :mod:`fssc.runtime.gates`; ``Dealer.gate`` and
``Party.gate`` pick the role's side of one. The key records' suffixes are
named here once (``DCF``, ``CARRY_DCF``, ``SEED``, ``CORR``, ``BITS``).
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

# key record suffixes of a gate call ``tag``
DCF = ".dcf"  # both parties: the comparison's DCF keys
CARRY_DCF = ".cdcf"  # both parties: the exact truncation's carry DCF keys
SEED = ".seed"  # P0: the seed of its shares
CORR = ".corr"  # P1: corrections of the share words
BITS = ".bits"  # P1: corrections of the shared bits


def mask_bits(bits: int) -> U64:
    return U64((1 << bits) - 1) if bits < 64 else U64(0xFFFF_FFFF_FFFF_FFFF)


def pow2(bits: int) -> U64:
    return U64((1 << bits) % (1 << 64))


def split_u(u: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(hi bit, low m-1 bits) of m-bit values."""
    return (u >> U64(m - 1)) & ONE, u & mask_bits(m - 1)


def compare_input(zhat: np.ndarray, s: int, m: int) -> np.ndarray:
    """u = (z^ >> s) mod 2^m (logical shift of the ring element).

    Needs 2 <= m and m + s <= 64: with fewer than m bits above the shift, the
    wrap of z^ + r past 2^64 would no longer vanish mod 2^m.
    """
    if m < 2 or m + s > 64:
        raise ValueError(f"comparison on {m} bits after a shift by {s}: need 2 <= m and m + s <= 64")
    return (zhat >> U64(s)) & mask_bits(m) if s else zhat & mask_bits(m)


def share_row(seed: bytes, i: int, n: int) -> np.ndarray:
    """P0's share of row i (n words) of a row-wise shared record (``Dealer.share_rows``): the AES-CTR stream
    of the seed under nonce i, one stream per row, so the dealer and P0 each make any row alone, a row at a
    time. (``Dealer.shares`` expands one stream, nonce 0, for its whole array and nonce 1 for its bits.)"""
    return expand(seed, (n,), nonce=i)


# ======================================================================= dealer
class Dealer:
    """Runs the program on masks and writes both parties' key records."""

    def __init__(self, w0: KeyWriter, w1: KeyWriter, rng: Rng | None = None):
        self.w = (w0, w1)
        self.rng = rng or Rng()

    # -- plumbing ---------------------------------------------------------
    def shares(self, tag: str, vals: np.ndarray, bits: np.ndarray | None) -> None:
        """P0 gets a seed, P1 the corrections vals - expand(seed) (and bits ^ expand bits)."""
        seed = self.rng.seed_bytes()
        self.w[0].put(tag + SEED, np.frombuffer(seed, dtype=np.uint8))
        self.w[1].put(tag + CORR, vals - expand(seed, vals.shape))
        if bits is not None:
            b0 = expand(seed, ((bits.size + 63) // 64,), nonce=1).view(np.uint8)
            b0 = np.unpackbits(b0, count=bits.size, bitorder="little")
            self.w[1].put(tag + BITS, np.packbits(bits.astype(np.uint8) ^ b0, bitorder="little"))

    def share_rows(self, tag: str, rows, count: int, n: int) -> None:
        """Shares of ``count`` rows of n words, streamed: P0 gets a seed, P1 the corrections
        row_i - share_row(seed, i, n) (record (count, n)), written as the iterable ``rows`` yields them (it
        may draw its randomness as it goes: the seed is drawn first), never the whole record at once."""
        seed = self.rng.seed_bytes()
        self.w[0].put(tag + SEED, np.frombuffer(seed, dtype=np.uint8))
        rec = self.w[1].record(tag + CORR, U64, (count, n))
        for i, v in enumerate(rows):
            rec.write(v - share_row(seed, i, n), owned=True)
        rec.close()  # raises unless exactly ``count`` rows were written

    def _put_dcf(self, tag: str, alpha: np.ndarray, n: int) -> None:
        """Both parties' Z_2 DCF keys for 1{x < alpha} over n bits, as record ``tag``: the bytes of
        ``dcf.keygen(alpha, n).data``, streamed block by block (never the whole batch in memory)."""
        params, blocks = dcf.keygen_blocks(alpha, n, None, self.rng)
        recs = [w.record(tag, np.uint64, (alpha.size * params.words,)) for w in self.w]
        for pair in blocks:
            for rec, block in zip(recs, pair, strict=True):
                rec.write(block, owned=True)  # each block is new: the writer keeps it instead of copying
        for rec in recs:
            rec.close()

    def dcf(self, tag: str, rho: np.ndarray, m: int) -> np.ndarray:
        """DCF keys for borrow = 1{u_lo < rho_lo}; returns rho_hi."""
        hi, lo = split_u(rho, m)
        self._put_dcf(tag + DCF, lo, m - 1)
        return hi

    def _carry_dcf(self, tag: str, r: np.ndarray, s: int) -> np.ndarray:
        """DCF keys over s bits for the carry c = 1{z^ mod 2^s < r mod 2^s}; returns the bit mask r_c of c^."""
        self._put_dcf(tag + CARRY_DCF, r & mask_bits(s), s)
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
    def lift_gate(self, tag: str, r: np.ndarray, m: int, s: int, offset: int, rows) -> np.ndarray:
        """A comparison on ((r >> s) + offset) mod 2^m whose output is a fresh mask; with s > 0 also the carry DCF.
        ``rows(r_d, rho, rho_hi, r_out, r_c)`` lists the values the parties get shares of (r_c is None if s = 0)."""
        shape = r.shape
        r = r.reshape(-1)
        rho = (compare_input(r, s, m) + U64(offset)) & mask_bits(m)
        rho_hi = self.dcf(tag, rho, m)
        r_c = self._carry_dcf(tag, r, s) if s else None
        r_d = self.rng.bits(r.size).astype(U64)
        r_out = self.fresh(r.size)
        bits = rho_hi ^ r_d if r_c is None else np.concatenate([rho_hi ^ r_d, r_c])
        self.shares(tag, np.stack(rows(r_d, rho, rho_hi, r_out, r_c)), bits)
        return r_out.reshape(shape)

    def gate(self, g, tag: str, *args, **kw):
        """The dealer's side of gate class ``g`` (:mod:`fssc.runtime.gates`): walks masks, writes keys."""
        return g.deal(self, tag, *args, **kw)

    @staticmethod
    def public(v: int) -> U64:
        """A public constant as the dealer sees it: masks of public values are 0."""
        return U64(0)

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
    def shares(self, tag: str, rows: int, n: int, nbits: int):
        """Shares of ``rows`` words per element (n elements) and xor-shares of ``nbits`` bits."""
        if self.b == 0:
            seed = self.keys.get(tag + SEED).tobytes()
            vals = expand(seed, (rows, n))
            bits = None
            if nbits:
                b0 = expand(seed, ((nbits + 63) // 64,), nonce=1).view(np.uint8)
                bits = np.unpackbits(b0, count=nbits, bitorder="little")
            return vals, bits
        vals = self.keys.get(tag + CORR)
        if vals.shape != (rows, n):
            raise ValueError(f"{tag}: key shares have shape {vals.shape}, expected {(rows, n)}")
        bits = np.unpackbits(self.keys.get(tag + BITS), count=nbits, bitorder="little") if nbits else None
        return vals, bits

    def share_rows(self, tag: str, rows: int, n: int):
        """This party's shares of a row-wise record (``Dealer.share_rows``), ``row(i)`` -> n words: P0
        expands row i from its seed when asked (``share_row``), P1 reads row i of its corrections record
        (memory-mapped)."""
        if self.b == 0:
            seed = self.keys.get(tag + SEED).tobytes()
            return lambda i: share_row(seed, i, n)
        vals = self.keys.get(tag + CORR)
        if vals.shape != (rows, n):
            raise ValueError(f"{tag}: key shares have shape {vals.shape}, expected {(rows, n)}")
        return lambda i: vals[i]

    def dcf_share(self, tag: str, u: np.ndarray, m: int, record: str = DCF) -> np.ndarray:
        """Xor-share of 1{u mod 2^(m-1) < alpha} (the borrow; with record CARRY_DCF and m = s + 1 the carry)."""
        self.chan.step = tag  # every comparison gate starts here: names the step in a receive error
        data = self.keys.get(tag + record)
        keys = dcf.DcfKeys(dcf.DcfParams(m - 1, 0), self.b, data)
        if len(keys) != u.size:
            raise ValueError(f"{tag}: {len(keys)} DCF keys for {u.size} comparisons")
        return dcf.evaluate(self.b, keys, u & mask_bits(m - 1))

    def _open_bits(self, e: np.ndarray) -> np.ndarray:
        peer = self.chan.exchange(np.packbits(e, bitorder="little"))
        return (e ^ np.unpackbits(peer, count=e.size, bitorder="little")).astype(U64)

    def open(self, y: np.ndarray) -> np.ndarray:
        return y + self.chan.exchange(y)

    def compare(self, tag: str, u: np.ndarray, m: int, rows: int, xhat: np.ndarray | None = None, s: int = 0):
        """Round 1: open d^ = d ^ r_d (and, with s > 0, c^ = c ^ r_c for the carry of x^'s low s bits).

        Returns (d^ as 0/1 uint64, share rows, u_hi, c^ as 0/1 uint64 or None).
        """
        n = u.size
        dshare = self.dcf_share(tag, u, m)
        cshare = self.dcf_share(tag, xhat, s + 1, CARRY_DCF) if s and xhat is not None else None
        vals, bits = self.shares(tag, rows, n, 2 * n if s else n)
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
    def gate(self, g, tag: str, *args, **kw):
        """This party's side of gate class ``g`` (:mod:`fssc.runtime.gates`): masked values in and out."""
        return g.evaluate(self, tag, *args, **kw)

    @staticmethod
    def public(v: int) -> U64:
        """A public constant as the parties see it: on masked values it moves the value."""
        return U64(v)

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
            return self.open(z0)
        if w is None:
            raise ValueError(f"{tag}: the model owner's weights are missing")
        rx1 = self.keys.get(tag + ".rx1")
        c1 = self.keys.get(tag + ".c1")
        xm = xhat - rx1
        z1 = ring_bilinear(fn, xm, w, k, 64, w_bits) + c1
        if bias is not None:
            z1 = z1 + bias
        return self.open(z1)
