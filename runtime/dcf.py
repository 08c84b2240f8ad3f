r"""Distributed comparison function (DCF), vectorised over many keys.

Construction: Boyle, Chandran, Gilboa, Gupta, Ishai, Kumaresan, Kumar,
"Function Secret Sharing for Mixed-Mode and Fixed-Point Secure Computation",
Eurocrypt 2021, Fig. 1, with the early-termination ("leaf table")
optimisation of Boyle-Gilboa-Ishai (CCS 2016). ``keygen(alpha, n, beta)``
gives keys k0, k1 with

    evaluate(0, k0, x) + evaluate(1, k1, x) = beta * 1{x < alpha}

for unsigned n-bit x and alpha, 1 <= n <= 64. Payload groups:

* ``k = 0``: Z_2. beta is a bit (default 1); the outputs are xor-shares,
  one ``uint8`` 0/1 per key.
* ``k = 1..6``: Z_{2^64}^k. beta is a k-vector of ``uint64``; outputs are
  additive shares mod 2^64 (``uint64`` wraparound), shape ``(N, k)``.

Every function works on N keys at once, block by block (``BLOCK`` keys);
the only Python loops run over tree levels and blocks, never over keys.

The tree
--------
A node's state is one 128-bit block ``sigma`` (two uint64 words, low word
first). Bit 0 is the control bit t; bits 1 and 2 are scratch (in the Z_2
payload bit 1 carries the level's output share); bits 3..127 are the
lambda = 125-bit seed s. The PRG is fixed-key AES in MMO mode (``prg.mmo``):
block j of G(s) is ``AES_k(s ^ j) ^ s ^ j``, where ``s = sigma & ~7`` and the
tweak j < 8 sits in the three cleared low bits. Expanding a node yields

* block 0 (side L) and block 1 (side R): the child's seed (bits 3..127) and
  control bit t (bit 0); for Z_2 also the output bit v (bit 1);
* blocks 2..k+1 (ring payload only): 2k words, v^L = words[0:k],
  v^R = words[k:2k] (v^L and v^R share a block when k is odd).

Gen walks alpha's bits MSB first, for levels i = 0 .. L-1 (L = n - nu).
With a = alpha_i, Keep = side a, Lose = side 1-a, t_b party b's control bit
and V the running sum of (party 0 - party 1) output shares on alpha's path:

    s_CW   = s_0^Lose ^ s_1^Lose
    t_CW^L = t_0^L ^ t_1^L ^ a ^ 1          t_CW^R = t_0^R ^ t_1^R ^ a
    V_CW   = (-1)^{t_1} (v_1^Lose - v_0^Lose - V + a*beta)
    V      = V - v_1^Keep + v_0^Keep + (-1)^{t_1} V_CW
    sigma_b = G(sigma_b)^Keep ^ t_b * CW^Keep          (seed and t together)

(in Z_2, "+", "-" and (-1)^t are all xor / identity). The last nu input bits
are not walked: the leaf node's seed is expanded into a table W_b of 2^nu
group elements (blocks j = 0, 1, ... of G), and

    CW_leaf[j] = (-1)^{t_1} (W_1[j] - W_0[j] - V + beta * 1{j < alpha mod 2^nu})

Eval(b, k, x) walks x's top L bits: at level i with c = x_i it expands only
side c's blocks, adds (-1)^b (v^c + t * V_CW) to its output and moves to
sigma = G(sigma)^c ^ t * CW^c; at the leaf it adds
(-1)^b (W[x mod 2^nu] + t * CW_leaf[x mod 2^nu]). Off alpha's path both
parties hold the same sigma, so their shares cancel; the level where x leaves
the path contributes a*beta = beta * 1{x < alpha}.

Key words and byte layout
-------------------------
One party's key is W = 2 + L*(2 + k) + leaf_words little-endian uint64
words, in this order::

    seed            2 words   sigma_b at the root (bit 0 = t = b, bits 1,2 = 0)
    level i = 0..L-1:
      cw_lo, cw_hi  2 words   s_CW, low bits: 0 = t_CW^L, 1 = V_CW (Z_2 only,
                              else 0), 2 = t_CW^L ^ t_CW^R
      V_CW          k words   (ring payloads only)
    leaf            Z_2: ceil(2^nu / 64) words, bit j = CW_leaf[j]
                    ring: 2^nu * k words, CW_leaf[j][m] at word j*k + m

The side-c correction is ``cw_lo ^ ((cw_lo >> 2) & c)`` (bit 0 becomes
t_CW^c), so a Z_2 key costs exactly 16 bytes per level.

A batch of N keys is one contiguous buffer of N*W words, stored in blocks of
``BLOCK`` consecutive keys (the last block may be shorter). Block g holds
keys [g*BLOCK, g*BLOCK + m) as a (W, m) word matrix: row r is word r of each
of its keys, so each tree level of a block is a few contiguous rows. This
"structure of arrays per block" layout is what makes the vectorised
keygen/eval fast, lets the dealer write blocks sequentially and lets a party
memory-map the file and read it front to back. ``DcfKeys.from_buffer`` wraps
such a buffer (bytes, mmap) without copying.

Default early termination (``default_nu``): Z_2 -> nu = 7 (a 128-bit table of
leaf bits, one AES block); Z_{2^64} -> nu = 2; Z_{2^64}^k, k >= 2 -> nu = 1.
These minimise key size for each payload. nu = 0 is the plain Fig. 1 tree.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from fssc.runtime.prg import Rng, aes_fixed, mmo, mmo_buffer

from fssc.errors import FsscError

__all__ = [
    "BLOCK",
    "LAYOUT_VERSION",
    "MAX_K",
    "DcfKeys",
    "DcfParams",
    "choose_walk",
    "current_walk",
    "default_nu",
    "eval_aes_blocks",
    "evaluate",
    "evaluate_points",
    "keygen",
    "keygen_blocks",
    "nbytes_per_key",
    "set_walk",
]

U64 = np.uint64
LAYOUT_VERSION = 1
"""Version of the key word layout below; bump it when the layout or BLOCK changes."""
BLOCK = 16384
"""Keys per storage block (part of the layout) and the vectorisation width."""
MAX_K = 6
"""Largest ring payload dimension: tweaks 0..7 cover sides L, R and k v-blocks."""

_ONE = U64(1)
_SEED_MASK = U64(~7 & 0xFFFF_FFFF_FFFF_FFFF)  # clears t and the two scratch bits
_ALL = U64(0xFFFF_FFFF_FFFF_FFFF)


# --------------------------------------------------------------------------- params


def default_nu(n: int, k: int) -> int:
    """Early-termination depth that minimises key size for payload ``k``."""
    return min(n, 7 if k == 0 else 2 if k == 1 else 1)


@dataclass(frozen=True)
class DcfParams:
    """Shape of a DCF key: input width ``n``, payload ``k`` (0 = Z_2), leaf depth ``nu``."""

    n: int
    k: int = 0
    nu: int = -1  # -1: the default for (n, k), resolved in __post_init__

    def __post_init__(self):
        if not 1 <= self.n <= 64:
            raise ValueError(f"DCF input width n must be in 1..64, got {self.n}")
        if not 0 <= self.k <= MAX_K:
            raise ValueError(f"DCF payload k must be 0 (Z_2) or 1..{MAX_K}, got {self.k}")
        if self.nu == -1:
            object.__setattr__(self, "nu", default_nu(self.n, self.k))
        if not 0 <= self.nu <= min(self.n, self.max_nu(self.k)):
            raise ValueError(f"nu={self.nu} out of range for n={self.n}, k={self.k}")

    @staticmethod
    def max_nu(k: int) -> int:
        """Deepest leaf table that fits in 8 MMO blocks (Z_2: one block, 128 leaves)."""
        if k == 0:
            return 7
        return max(j for j in range(8) if (k << j) <= 16)

    @property
    def levels(self) -> int:
        """Tree levels walked before the leaf table (L = n - nu)."""
        return self.n - self.nu

    @property
    def leaf_entries(self) -> int:
        return 1 << self.nu

    @property
    def leaf_words(self) -> int:
        """uint64 words of the final correction word."""
        if self.k == 0:
            return (self.leaf_entries + 63) // 64
        return self.leaf_entries * self.k

    @property
    def leaf_blocks(self) -> int:
        """MMO blocks expanded at the leaf."""
        return (self.leaf_words + 1) // 2

    @property
    def level_words(self) -> int:
        return 2 + self.k

    @property
    def words(self) -> int:
        """uint64 words per key (W)."""
        return 2 + self.levels * self.level_words + self.leaf_words

    @property
    def nbytes_per_key(self) -> int:
        return 8 * self.words

    def level_row(self, i: int) -> int:
        """Row of level i's cw_lo in a block matrix."""
        return 2 + i * self.level_words

    @property
    def leaf_row(self) -> int:
        return 2 + self.levels * self.level_words


def nbytes_per_key(n: int, k: int = 0, nu: int = -1) -> int:
    """Bytes of one party's key for an n-bit DCF with payload k (0 = Z_2)."""
    return DcfParams(n, k, nu).nbytes_per_key


def eval_aes_blocks(n: int, k: int = 0, nu: int = -1) -> int:
    """AES blocks (MMO) one party spends evaluating one key of an n-bit DCF with payload k: per tree
    level the side block (and, ring payloads, ceil(k/2) v-blocks), then the leaf blocks (``evaluate``)."""
    p = DcfParams(n, k, nu)
    return p.levels * (1 + (k + 1) // 2) + p.leaf_blocks


# --------------------------------------------------------------------------- keys


def _block_spans(count: int):
    """(start, stop) of each storage block of a batch of ``count`` keys."""
    return [(lo, min(lo + BLOCK, count)) for lo in range(0, count, BLOCK)]


@dataclass
class DcfKeys:
    """One party's keys for N comparisons, as a flat uint64 word buffer (see module doc)."""

    params: DcfParams
    party: int
    data: np.ndarray

    def __post_init__(self):
        if self.party not in (0, 1):
            raise ValueError("party must be 0 or 1")
        if self.data.dtype != np.dtype("<u8") or self.data.ndim != 1:
            raise ValueError("DcfKeys.data must be a 1-D little-endian uint64 array")
        if len(self.data) % self.params.words:
            raise ValueError("DcfKeys.data is not a whole number of keys")

    @classmethod
    def empty(cls, params: DcfParams, party: int, count: int) -> DcfKeys:
        return cls(params, party, np.empty(count * params.words, dtype="<u8"))

    @classmethod
    def from_buffer(cls, buf, n: int, k: int = 0, party: int = 0, nu: int = -1) -> DcfKeys:
        """Wrap a buffer of whole keys (bytes, bytearray, mmap, memoryview) without copying."""
        params = DcfParams(n, k, nu)
        size = memoryview(buf).nbytes
        if size % params.nbytes_per_key:
            raise ValueError(f"buffer of {size} bytes is not a whole number of {params.nbytes_per_key}-byte keys")
        return cls(params, party, np.frombuffer(buf, dtype="<u8"))

    def to_bytes(self) -> bytes:
        return self.data.tobytes()

    def __len__(self) -> int:
        return len(self.data) // self.params.words

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def blocks(self):
        """Yield (start, stop, matrix) per storage block; matrix is a (W, stop-start) view."""
        W = self.params.words
        for lo, hi in _block_spans(len(self)):
            yield lo, hi, self.data[lo * W : hi * W].reshape(W, hi - lo)

    def columns(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Keys [start, stop) as a (W, stop - start) word matrix (a copy)."""
        stop = len(self) if stop is None else stop
        out = np.empty((self.params.words, max(stop - start, 0)), dtype=U64)
        for lo, hi, m in self.blocks():
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                out[:, a - start : b - start] = m[:, a - lo : b - lo]
        return out

    @classmethod
    def from_columns(cls, params: DcfParams, party: int, mat: np.ndarray) -> DcfKeys:
        """Inverse of ``columns``: pack a (W, N) word matrix into the block layout."""
        keys = cls.empty(params, party, mat.shape[1])
        for lo, hi, m in keys.blocks():
            m[:] = mat[:, lo:hi]
        return keys

    def __getitem__(self, idx: slice) -> DcfKeys:
        """Keys [start:stop]. Zero-copy when start is a multiple of BLOCK and stop
        is a multiple of BLOCK or the end; otherwise the keys are repacked."""
        if not isinstance(idx, slice) or idx.step not in (None, 1):
            raise TypeError("DcfKeys supports contiguous slices only")
        start, stop, _ = idx.indices(len(self))
        stop = max(stop, start)
        W = self.params.words
        if start % BLOCK == 0 and (stop % BLOCK == 0 or stop == len(self)):
            return DcfKeys(self.params, self.party, self.data[start * W : stop * W])
        return DcfKeys.from_columns(self.params, self.party, self.columns(start, stop))


# --------------------------------------------------------------------------- helpers


def _bit(x: np.ndarray, pos: int) -> np.ndarray:
    """Bit ``pos`` of each uint64 in x, as 0/1 uint64."""
    return (x >> U64(pos)) & _ONE


def _cneg(v: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(-1)^t * v mod 2^64 given the mask m = -t (0 or all ones)."""
    return (v ^ m) - m


class _Expander:
    """The PRG G on a batch of node states, with scratch buffers reused across levels.

    ``expand(lo, hi, tweaks)`` returns blocks (len(tweaks), *lo.shape, 2) with
    block j = MMO(s ^ tweaks[j]), s = (lo & ~7, hi) the nodes' seeds; a tweak
    is an int or a per-node uint64 array, < 8. The result is a view into the
    scratch memory, valid until the next call.
    """

    def __init__(self, shape: tuple, max_tweaks: int):
        self.inp = np.empty((max_tweaks,) + shape + (2,), dtype=U64)
        self.raw = mmo_buffer(self.inp.size // 2)

    def __call__(self, lo: np.ndarray, hi: np.ndarray, tweaks) -> np.ndarray:
        inp = self.inp[: len(tweaks)]
        s = lo & _SEED_MASK
        for j, tw in enumerate(tweaks):
            np.bitwise_or(s, tw, out=inp[j, ..., 0])
            inp[j, ..., 1] = hi
        return mmo(inp, self.raw)


def _block_words(E: np.ndarray) -> np.ndarray:
    """MMO output (B, ..., 2) -> its 2B words as a (2B, ...) array, word 2j+w = E[j, ..., w]."""
    return np.moveaxis(E, -1, 1).reshape((2 * E.shape[0],) + E.shape[1:-1])


def _side_correction(cw_lo: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Low word of the side-c correction word: bit 0 becomes t_CW^c."""
    return cw_lo ^ ((cw_lo >> U64(2)) & c)


def _advance(g_lo, g_hi, cw_lo, cw_hi, c, mt):
    """Next state sigma = G(sigma)^c ^ t * CW^c, with mt = -t."""
    return g_lo ^ (_side_correction(cw_lo, c) & mt), g_hi ^ (cw_hi & mt)


def _less_mask(alpha_low: np.ndarray, entries: int) -> np.ndarray:
    """(entries, N) uint64 mask: all ones where j < alpha_low."""
    j = np.arange(entries, dtype=U64)
    return -(j[:, None] < alpha_low[None, :]).astype(U64)


def _bit_table_less(alpha_low: np.ndarray, words: int) -> np.ndarray:
    """(words, N) bit table with bits j < alpha_low set (alpha_low <= 64 * words)."""
    out = np.empty((words, len(alpha_low)), dtype=U64)
    for w in range(words):
        a = alpha_low.astype(np.int64) - 64 * w
        below = (_ONE << np.clip(a, 0, 63).astype(U64)) - _ONE
        out[w] = np.where(a >= 64, _ALL, np.where(a <= 0, U64(0), below))
    return out


# --------------------------------------------------------------------------- keygen


def _as_beta(beta, count: int):
    """Normalise beta: (k, array) with k = 0 -> (N,) 0/1 uint64; else (k, N) uint64."""
    if beta is None:
        return 0, np.ones(count, dtype=U64)
    beta = np.asarray(beta)
    if beta.dtype == np.bool_ or beta.dtype == np.uint8:
        if beta.shape != (count,):
            raise ValueError("Z_2 payload beta must have shape (N,)")
        return 0, beta.astype(U64) & _ONE
    beta = beta.astype(U64, copy=False)
    if beta.ndim == 1:
        beta = beta[:, None]
    if beta.ndim != 2 or beta.shape[0] != count:
        raise ValueError("ring payload beta must have shape (N,) or (N, k)")
    return beta.shape[1], np.ascontiguousarray(beta.T)


def keygen(
    alpha: np.ndarray,
    n: int,
    beta: np.ndarray | None = None,
    rng: Rng | None = None,
    nu: int = -1,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[DcfKeys, DcfKeys]:
    """Generate DCF keys for f(x) = beta * 1{x < alpha} over unsigned n-bit x.

    alpha: (N,) uint64, each < 2**n.
    beta:  None -> Z_2 payload with beta = 1 (xor-shared output bits);
           (N,) bool/uint8 -> Z_2 payload with those bits;
           (N,) or (N, k) uint64 -> payload in Z_{2^64}^k, k = 1..6.
    rng:   randomness source (default: a fresh os.urandom-seeded ``Rng``).
    nu:    early-termination depth (default ``default_nu(n, k)``).
    out:   optional pair of writable uint64 arrays of N*W words each (e.g.
           memory-mapped key files) to write party 0's and party 1's keys into.

    Returns (keys of party 0, keys of party 1). ``keygen_blocks`` makes the
    same keys block by block, for a caller that streams them to a file.
    """
    params, blocks = keygen_blocks(alpha, n, beta, rng, nu)
    count = np.asarray(alpha).size
    if out is None:
        keys = DcfKeys.empty(params, 0, count), DcfKeys.empty(params, 1, count)
    else:
        o0, o1 = (np.asarray(o).reshape(-1).view("<u8") for o in out)
        keys = DcfKeys(params, 0, o0), DcfKeys(params, 1, o1)
        if any(len(kk) != count for kk in keys):
            raise ValueError("keygen out buffers have the wrong size")
    for (_, _, m0), (_, _, m1), (s0, s1) in zip(keys[0].blocks(), keys[1].blocks(), blocks, strict=True):
        m0[:], m1[:] = s0, s1  # one sequential write per block and party
    return keys


def keygen_blocks(
    alpha: np.ndarray,
    n: int,
    beta: np.ndarray | None = None,
    rng: Rng | None = None,
    nu: int = -1,
) -> tuple[DcfParams, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """``keygen``'s keys one storage block at a time, for a caller that streams them to a file.

    Checks the arguments and returns (params, blocks). ``blocks`` yields, per storage
    block of ``BLOCK`` keys in order, party 0's and party 1's (W, m) word matrices,
    C-contiguous: their bytes in order are the bytes of ``keygen``'s ``DcfKeys.data``
    for the same randomness. Each block's arrays are new: the caller may keep them (e.g. a
    key writer that writes them to disk while the next block is made).
    """
    alpha = np.ascontiguousarray(alpha, dtype=U64).reshape(-1)
    count = len(alpha)
    k, beta = _as_beta(beta, count)
    params = DcfParams(n, k, nu)
    if n < 64 and count and int(alpha.max()) >> n:
        raise ValueError(f"alpha must be below 2**{n}")
    return params, _gen_blocks(params, alpha, beta, rng or Rng())


def _gen_blocks(p: DcfParams, alpha: np.ndarray, beta: np.ndarray, rng: Rng):
    W = p.words
    bits = _keygen_bits_block_compiled if _walk[0] == COMPILED else _keygen_bits_block_numpy
    gen = bits if p.k == 0 else _keygen_ring_block
    for lo, hi in _block_spans(len(alpha)):
        m0, m1 = np.empty((2, W, hi - lo), dtype=U64)  # fresh per block: the caller may keep them
        gen(p, alpha[lo:hi], beta[..., lo:hi], rng, m0, m1)
        yield m0, m1


def _root_state(rng: Rng, count: int, m0, m1):
    """Random root states (lo, hi), each (2 parties, N), t_b = b; stored as the seed rows."""
    lo, hi = rng.u64((2, 2, count))
    lo &= _SEED_MASK
    lo[1] |= _ONE
    m0[0], m0[1] = lo[0], hi[0]
    m1[0], m1[1] = lo[1], hi[1]
    return lo, hi


def _tree_cw(G_lo, G_hi, a, ma):
    """Seed/t correction word of one level, and each party's Keep child.

    G_lo, G_hi: the expanded side blocks, shape (2 sides, 2 parties, N).
    Returns cw_lo (V_CW bit still clear), cw_hi, keep_lo, keep_hi (2, N) and
    the parties' xor of each side's low word, x_lo (2 sides, N): its bit 1 is
    v_0 ^ v_1 for the Z_2 payload.
    """
    x_lo = G_lo[:, 0] ^ G_lo[:, 1]
    x_hi = G_hi[:, 0] ^ G_hi[:, 1]
    lose_lo = x_lo[1] ^ ((x_lo[0] ^ x_lo[1]) & ma)  # Lose = L where alpha_i = 1
    s_hi = x_hi[1] ^ ((x_hi[0] ^ x_hi[1]) & ma)
    tcw_l = (x_lo[0] & _ONE) ^ a ^ _ONE
    tcw_r = (x_lo[1] & _ONE) ^ a
    cw_lo = (lose_lo & _SEED_MASK) | tcw_l | ((tcw_l ^ tcw_r) << U64(2))
    keep_lo = G_lo[0] ^ ((G_lo[0] ^ G_lo[1]) & ma)  # Keep = R where alpha_i = 1
    keep_hi = G_hi[0] ^ ((G_hi[0] ^ G_hi[1]) & ma)
    return cw_lo, s_hi, keep_lo, keep_hi, x_lo


def _bits_leaf_table(p: DcfParams, W, alpha, beta, V, m0, m1) -> None:
    """Z_2 payload's leaf correction: W holds both parties' leaf blocks as words (words, 2 parties, N);
    CW_leaf = W_0 ^ W_1 ^ V ^ beta * 1{j < alpha mod 2^nu}, bit j of the table, in both keys."""
    W = W[: p.leaf_words]
    table = W[:, 0] ^ W[:, 1] ^ -V
    table ^= _bit_table_less(alpha & U64(p.leaf_entries - 1), p.leaf_words) & -beta
    if p.leaf_entries < 64:
        table &= U64((1 << p.leaf_entries) - 1)
    m0[p.leaf_row :] = m1[p.leaf_row :] = table


def _keygen_bits_block_compiled(p: DcfParams, alpha, beta, rng, m0, m1):
    """Z_2 payload, one block: v = bit 1 of the side block; V_CW goes to bit 1 of cw_lo.

    With D_s = v_0^s ^ v_1^s: V_CW = D_Lose ^ V ^ a*beta and the new V is
    D_L ^ D_R ^ a*beta (V ^ D_Keep ^ V_CW). Each level is one AES call over both sides of both parties'
    nodes and one compiled pass (``kernels.gen_bits_level``); the parties' rows are equal but for the root.
    """
    kernels = _kernels()
    lo, hi = _root_state(rng, len(alpha), m0, m1)
    V = np.zeros(len(alpha), dtype=U64)
    inp = np.empty((2, 2, len(alpha), 2), dtype=U64)
    raw = mmo_buffer(inp.size // 2)
    kernels.gen_inputs(lo, hi, inp)
    for i in range(p.levels):
        r = p.level_row(i)
        kernels.gen_bits_level(aes_fixed(inp, raw), inp, lo, hi, alpha, p.n - 1 - i, beta, V, m0[r], m0[r + 1])
        m1[r : r + 2] = m0[r : r + 2]
    _bits_leaf_table(p, _block_words(mmo(inp[:1], raw)), alpha, beta, V, m0, m1)  # side 0 = tweak 0


def _keygen_bits_block_numpy(p: DcfParams, alpha, beta, rng, m0, m1):
    """Z_2 payload, one block: v = bit 1 of the side block; V_CW goes to bit 1 of cw_lo.

    With D_s = v_0^s ^ v_1^s: V_CW = D_Lose ^ V ^ a*beta and the new V is
    D_L ^ D_R ^ a*beta (V ^ D_Keep ^ V_CW).
    """
    lo, hi = _root_state(rng, len(alpha), m0, m1)
    V = np.zeros(len(alpha), dtype=U64)
    expand = _Expander(lo.shape, 2)
    for i in range(p.levels):
        a = _bit(alpha, p.n - 1 - i)
        ma = -a
        G = expand(lo, hi, (0, 1))  # (2 sides, 2 parties, N, 2 words)
        cw_lo, cw_hi, keep_lo, keep_hi, x_lo = _tree_cw(G[..., 0], G[..., 1], a, ma)
        d_l, d_r = x_lo >> _ONE
        ab = a & beta
        v_cw = (d_r ^ ((d_l ^ d_r) & ma) ^ V ^ ab) & _ONE
        V = (d_l ^ d_r ^ ab) & _ONE
        cw_lo |= v_cw << _ONE
        r = p.level_row(i)
        m0[r], m0[r + 1] = cw_lo, cw_hi
        m1[r], m1[r + 1] = cw_lo, cw_hi
        lo, hi = _advance(keep_lo, keep_hi, cw_lo, cw_hi, a, -(lo & _ONE))
    _bits_leaf_table(p, _block_words(expand(lo, hi, (0,))), alpha, beta, V, m0, m1)


def _keygen_ring_block(p: DcfParams, alpha, beta, rng, m0, m1):
    """Z_{2^64}^k payload, one block: v^L, v^R come from k extra MMO blocks per node.

    With D_s = v_0^s - v_1^s (k-vectors): (-1)^{t_1} V_CW = a*beta - D_Lose - V
    and the new V is V + D_Keep + (-1)^{t_1} V_CW = D_Keep - D_Lose + a*beta.
    """
    k, count = p.k, len(alpha)
    lo, hi = _root_state(rng, count, m0, m1)
    V = np.zeros((k, count), dtype=U64)
    tweaks = tuple(range(2 + k))
    expand = _Expander(lo.shape, max(len(tweaks), p.leaf_blocks))
    D = np.empty((2 * k, count), dtype=U64)
    for i in range(p.levels):
        a = _bit(alpha, p.n - 1 - i)
        ma = -a
        G = expand(lo, hi, tweaks)  # (2 + k, 2 parties, N, 2 words)
        cw_lo, cw_hi, keep_lo, keep_hi, _ = _tree_cw(G[:2, ..., 0], G[:2, ..., 1], a, ma)
        for q in range(2 * k):  # word q of the v-expansion: v^L = words [0, k), v^R = [k, 2k)
            w = G[2 + q // 2, :, :, q % 2]
            np.subtract(w[0], w[1], out=D[q])
        d_l, d_r = D[:k], D[k:]
        d_lose = d_r + ((d_l - d_r) & ma)
        ab = beta & ma
        x = ab - d_lose - V  # (-1)^{t_1} V_CW
        V = d_l + d_r - d_lose - d_lose + ab
        v_cw = _cneg(x, -(lo[1] & _ONE))
        r = p.level_row(i)
        for m in (m0, m1):
            m[r], m[r + 1] = cw_lo, cw_hi
            m[r + 2 : r + 2 + k] = v_cw
        lo, hi = _advance(keep_lo, keep_hi, cw_lo, cw_hi, a, -(lo & _ONE))
    E = p.leaf_entries
    W = _block_words(expand(lo, hi, tuple(range(p.leaf_blocks))))[: p.leaf_words]
    W = W.reshape(E, k, 2, count)  # word j*k + m = W[j, m]
    less = _less_mask(alpha & U64(E - 1), E)[:, None, :]
    x = W[:, :, 1] - W[:, :, 0] - V + (beta & less)
    table = _cneg(x, -(lo[1] & _ONE))
    m0[p.leaf_row :] = m1[p.leaf_row :] = table.reshape(E * k, count)


# --------------------------------------------------------------------------- eval


WALK_ENV = "FSSC_DCF_WALK"
"""Environment variable that picks the tree walk: ``auto`` (the default), ``compiled`` or ``numpy``."""
NUMPY, COMPILED = "numpy", "compiled"
COMPILED_WALK_MIN_BLOCKS = 5e7
"""AES blocks of a process's DCF work (the compile report's figures) from which ``auto`` picks the compiled
walk. The compiled walk (numba, :mod:`fssc.runtime.kernels`) does a Z_2-payload tree level in one pass instead
of about 17 numpy passes, about 2.5x faster (some 10 ns less per key level), but readying it costs a process
about 0.85 s with numba's cache filled (its import and start-up): that pays from about 10^8 key levels, and
the report's blocks also count work the walk does not speed up (ring payloads, share expansion), so the
threshold sits at 5 x 10^7 blocks: ResNet-18 at 224x224 is above it, the tests' small programs below."""
_walk = [NUMPY]  # this process's walk; the compiled one only once set_walk readied it


def explicit_walk() -> bool:
    """Whether ``FSSC_DCF_WALK`` names a walk (``compiled`` or ``numpy``) rather than ``auto``."""
    return os.environ.get(WALK_ENV, "auto") != "auto"


def choose_walk(aes_blocks: float) -> str:
    """The walk for a process whose DCF work is about ``aes_blocks`` AES blocks (the compile report's
    figures), unless ``FSSC_DCF_WALK`` names one."""
    mode = os.environ.get(WALK_ENV, "auto")
    if mode not in ("auto", NUMPY, COMPILED):
        raise FsscError(f"{WALK_ENV}={mode}: expected auto, {COMPILED} or {NUMPY}")
    if mode != "auto":
        return mode
    return COMPILED if aes_blocks >= COMPILED_WALK_MIN_BLOCKS else NUMPY


def set_walk(walk: str, strict: bool = True, warn=None) -> str:
    """Use ``walk`` for this process's Z_2-payload DCFs from now on; returns the walk in use. The compiled
    walk is readied here (before any timed phase): its kernels are loaded and run once on writable and on
    read-only (mapped) key words. If that fails (numba missing, or no writable folder for its cache), a
    ``strict`` call raises one line; otherwise ``warn(line)`` hears of it (default: stderr) and the numpy walk
    is used. Both walks give the same keys and shares bit for bit (tests/test_dcf.py)."""
    if walk not in (NUMPY, COMPILED):
        raise ValueError(f"unknown DCF walk {walk!r}")
    if walk == COMPILED and _walk[0] != COMPILED:
        _walk[0] = COMPILED
        try:
            k0, k1 = keygen(np.array([5, 300], dtype=U64), 9)
            x = np.array([7, 3], dtype=U64)
            for k in (k0, k1):
                evaluate(k.party, k, x)
                evaluate(k.party, DcfKeys.from_buffer(k.to_bytes(), 9, 0, k.party), x)
        except Exception as e:
            _walk[0] = NUMPY
            why = (str(e).strip().splitlines() or [""])[0][:200]
            msg = (
                f"the compiled DCF walk could not be readied ({type(e).__name__}: {why}): numba needs a writable "
                f"cache folder (NUMBA_CACHE_DIR), or set {WALK_ENV}=numpy"
            )
            if strict:
                raise FsscError(msg) from None
            (warn or (lambda line: print(f"fssc: warning: {line}", file=sys.stderr, flush=True)))(
                msg + "; using the numpy walk"
            )
            return NUMPY
    _walk[0] = walk
    return walk


def current_walk() -> str:
    return _walk[0]


def _kernels():
    from fssc.runtime import kernels  # numba: imported when the compiled walk is chosen, not by every user

    return kernels


def _bits_eval():
    return _eval_bits_block_compiled if _walk[0] == COMPILED else _eval_bits_block_numpy


def evaluate(party: int, keys: DcfKeys, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """Evaluate party ``party``'s keys at public points x (one point per key).

    x: (N,) uint64; only its low n bits are used. Returns this party's shares
    of beta * 1{x < alpha}: Z_2 payload -> (N,) uint8 xor-shares (0/1);
    ring payload -> (N, k) uint64 additive shares mod 2^64.
    threads > 1 evaluates storage blocks in a thread pool (numpy and OpenSSL
    release the GIL, so this scales across cores).
    """
    if party != keys.party:
        raise ValueError(f"keys belong to party {keys.party}, not {party}")
    p = keys.params
    x = np.ascontiguousarray(x, dtype=U64).reshape(-1)
    if len(x) != len(keys):
        raise ValueError(f"{len(x)} inputs for {len(keys)} keys")
    if p.n < 64:
        x = x & U64((1 << p.n) - 1)
    out = np.empty(len(x), np.uint8) if p.k == 0 else np.empty((len(x), p.k), U64)
    block_eval = _bits_eval() if p.k == 0 else _eval_ring_block

    def run(block):
        lo, hi, m = block
        if np.any((m[0] & _ONE) != U64(party)):
            raise ValueError(f"key words are not party {party}'s")
        out[lo:hi] = block_eval(p, party, m, x[lo:hi])

    blocks = list(keys.blocks())
    if threads > 1 and len(blocks) > 1:
        with ThreadPoolExecutor(min(threads, len(blocks))) as pool:
            list(pool.map(run, blocks))
    else:
        for block in blocks:
            run(block)
    return out


def evaluate_points(party: int, keys: DcfKeys, xs: np.ndarray) -> np.ndarray:
    """Evaluate each of party ``party``'s keys at several public points: ``xs`` is (P, N), row j holding one
    point per key (taken mod 2^n, the keys' input bits). Returns this party's shares of
    beta * 1{xs[j, i] < alpha_i}: Z_2 payload -> (P, N) uint8 xor-shares; ring payload -> (P, N, k) uint64
    additive shares.

    Row j equals ``evaluate(party, keys, xs[j])`` bit for bit; the loop runs storage block by storage block
    (a block's key words are read once for its P points), in one thread, with temporaries of one block's
    evaluation and the (P, N) output. Evaluating a key at many points is local: the shares are a function of
    this party's key and public points, so they tell it nothing its key does not. What the parties open from
    them is the caller's to mask (the spline gate opens b_j xor r_j, a fresh r_j per knot: docs/protocol.md,
    "Spline gates"); the two parties' shares at several points together reveal alpha's position relative to
    every point, so they must never be opened unmasked.
    """
    if party != keys.party:
        raise ValueError(f"keys belong to party {keys.party}, not {party}")
    p = keys.params
    xs = np.asarray(xs, dtype=U64)
    if xs.ndim != 2 or xs.shape[1] != len(keys):
        raise ValueError(f"points of shape {xs.shape} for {len(keys)} keys: need (P, {len(keys)})")
    if p.n < 64:
        xs = xs & U64((1 << p.n) - 1)
    rows = xs.shape[0]
    out = np.empty((rows, len(keys)), np.uint8) if p.k == 0 else np.empty((rows, len(keys), p.k), U64)
    block_eval = _bits_eval() if p.k == 0 else _eval_ring_block
    for lo, hi, m in keys.blocks():
        if np.any((m[0] & _ONE) != U64(party)):
            raise ValueError(f"key words are not party {party}'s")
        for j in range(rows):
            out[j, lo:hi] = block_eval(p, party, m, np.ascontiguousarray(xs[j, lo:hi]))
    return out


def _eval_bits_block_compiled(p: DcfParams, party: int, m, x):
    """Z_2 payload: one MMO block per level; the output share accumulates in bit 1 of the xor of the
    nodes' low words. Each level is one AES call and one compiled pass (:mod:`fssc.runtime.kernels`)."""
    kernels = _kernels()
    if not x.flags.writeable:  # one machine-code variant for x (set_walk readied it): a read-only x would compile
        x = x.copy()
    count, L = len(x), p.levels
    t = np.empty(count, dtype=U64)
    acc = np.zeros(count, dtype=U64)
    inp = np.empty((count, 2), dtype=U64)
    raw = mmo_buffer(count)
    kernels.bits_root(m[0], m[1], x, p.n - 1 if L else kernels.NO_BIT, inp, t)
    for i in range(L):
        r = p.level_row(i)
        nxt = p.n - 2 - i if i + 1 < L else kernels.NO_BIT
        kernels.bits_level(aes_fixed(inp, raw), inp, t, m[r], m[r + 1], acc, x, nxt)
    out = np.empty(count, dtype=np.uint8)
    leaf = p.leaf_row
    kernels.bits_leaf(aes_fixed(inp, raw), inp, t, m[leaf], m[leaf + p.leaf_words - 1], acc, x, p.leaf_entries, out)
    return out


def _eval_bits_block_numpy(p: DcfParams, party: int, m, x):
    """Z_2 payload: one MMO block per level; the output share accumulates in bit 1."""
    lo, hi = m[0], m[1]
    acc = np.zeros(len(x), dtype=U64)
    expand = _Expander(lo.shape, 1)
    for i in range(p.levels):
        c = _bit(x, p.n - 1 - i)
        mt = -(lo & _ONE)
        G = expand(lo, hi, (c,))[0]
        r = p.level_row(i)
        lo, hi = _advance(G[:, 0], G[:, 1], m[r], m[r + 1], c, mt)
        acc ^= lo
    mt = -(lo & _ONE)
    W = _block_words(expand(lo, hi, (0,)))[: p.leaf_words]
    W ^= m[p.leaf_row :] & mt
    j = x & U64(p.leaf_entries - 1)
    word = W[0] if p.leaf_words == 1 else np.where(j >= U64(64), W[1], W[0])
    bit = (word >> (j & U64(63))) ^ (acc >> _ONE)
    return (bit & _ONE).astype(np.uint8)


def _eval_ring_block(p: DcfParams, party: int, m, x):
    """Z_{2^64}^k payload: side block + ceil(k/2) v-blocks per level."""
    k, count = p.k, len(x)
    lo, hi = m[0], m[1]
    acc = np.zeros((k, count), dtype=U64)
    half, odd, nb = k // 2, k & 1, (k + 1) // 2
    expand = _Expander(lo.shape, max(1 + nb, p.leaf_blocks))
    for i in range(p.levels):
        c = _bit(x, p.n - 1 - i)
        mt = -(lo & _ONE)
        # side c needs v-expansion words [c*k, c*k + k): blocks 2 + c*half + j
        first = 2 + c * U64(half) if half else U64(2)
        G = expand(lo, hi, (c,) + tuple(first + U64(j) for j in range(nb)))
        vw = _block_words(G[1:])  # (2 nb, N)
        v = vw[:k]
        if odd:  # side R's words start one word into the first block
            v = v ^ ((v ^ vw[1 : k + 1]) & -c)
        r = p.level_row(i)
        acc += v
        acc += m[r + 2 : r + 2 + k] & mt
        lo, hi = _advance(G[0, :, 0], G[0, :, 1], m[r], m[r + 1], c, mt)
    mt = -(lo & _ONE)
    W = _block_words(expand(lo, hi, tuple(range(p.leaf_blocks))))
    cols = np.arange(count)
    base = (x & U64(p.leaf_entries - 1)).astype(np.intp) * k
    table = m[p.leaf_row :]
    for comp in range(k):
        acc[comp] += W[base + comp, cols] + (table[base + comp, cols] & mt)
    if party:
        acc = -acc
    return acc.T
