"""Compiled inner loops of the DCF tree walk (numba), one pass over a block's keys per tree level.

The DCF code in :mod:`fssc.runtime.dcf` walks a storage block of keys level by level: build the AES
inputs of the level, encrypt them with one OpenSSL call (fixed-key AES, :func:`fssc.runtime.prg.aes_fixed`),
then apply the MMO feed-forward, the correction words and the control bits. In numpy each of those steps is
a separate pass over the block (about 17 per level); the kernels here fuse the steps between two AES calls
into one loop that reads each key word once. The algebra is the module doc of ``dcf.py``; these loops only
evaluate it. AES itself stays in OpenSSL (AES-NI).

Every kernel is compiled once per machine and argument types (``cache=True``: the machine code is kept in
``__pycache__`` beside this file, or in numba's user cache or ``NUMBA_CACHE_DIR`` where that folder is
read-only; with no writable folder readying fails and ``dcf.set_walk`` says so) and releases the GIL. All
arithmetic is on uint64: a constant is a module-level ``np.uint64`` (numba would promote a mixed
uint64/int64 expression to float).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_U = np.uint64
_Z = _U(0)
_ONE = _U(1)
_TWO = _U(2)
_SEED_MASK = _U(~7 & 0xFFFF_FFFF_FFFF_FFFF)  # dcf._SEED_MASK: clears t and the two scratch bits
NO_BIT = 64  # next_shift meaning "no input bit": the leaf's expansion (tweak 0)


@njit(cache=True, nogil=True)
def bits_root(lo, hi, x, shift, inp, t):  # pragma: no cover - compiled
    """The walk's start from the root words: control bits t_j = bit 0 of lo_j, and the first AES inputs
    inp[j] = (lo_j with t and the scratch bits cleared | bit ``shift`` of x_j, hi_j) (NO_BIT: tweak 0)."""
    for j in range(lo.shape[0]):
        t[j] = lo[j] & _ONE
        c = _Z if shift == NO_BIT else (x[j] >> _U(shift)) & _ONE
        inp[j, 0] = (lo[j] & _SEED_MASK) | c
        inp[j, 1] = hi[j]


@njit(cache=True, nogil=True)
def bits_level(raw, inp, t, cw_lo, cw_hi, acc, x, next_shift):  # pragma: no cover - compiled
    """One tree level of Z_2-payload evaluation for a block, in place.

    The node state is inp (its seed with the input bit c of this level as the tweak, and its high word)
    and t (its control bit); raw is AES of inp. The node moves to sigma = G(sigma)^c ^ t * CW^c
    (G = raw ^ inp, the MMO output), ``acc`` xors in the new low word, t takes its bit 0, and inp is
    overwritten with the next level's inputs (bit ``next_shift`` of x; NO_BIT: the leaf's, tweak 0).
    Indexing the (N, 2) pairs through flat views lets LLVM vectorise the loop.
    """
    r = raw.reshape(-1)
    q = inp.reshape(-1)
    for j in range(t.shape[0]):
        i0 = q[2 * j]
        mt = _Z - t[j]
        cw = cw_lo[j]
        side = cw ^ ((cw >> _TWO) & (i0 & _ONE))  # bit 0 becomes t_CW^c
        nlo = (r[2 * j] ^ i0) ^ (side & mt)
        q[2 * j + 1] = (r[2 * j + 1] ^ q[2 * j + 1]) ^ (cw_hi[j] & mt)
        t[j] = nlo & _ONE
        acc[j] ^= nlo
        c = _Z if next_shift == NO_BIT else (x[j] >> _U(next_shift)) & _ONE
        q[2 * j] = (nlo & _SEED_MASK) | c


@njit(cache=True, nogil=True)
def bits_leaf(raw, inp, t, leaf_lo, leaf_hi, acc, x, entries, out):  # pragma: no cover - compiled
    """The leaf of Z_2-payload evaluation: the leaf block G = raw ^ inp (128 table bits, word 0 then 1),
    corrected by t * CW_leaf, gives the bit at index x mod ``entries``; out_j = that bit ^ bit 1 of acc_j.
    ``leaf_hi`` is the second table word (``leaf_lo`` again for tables of at most 64 entries)."""
    last = _U(entries - 1)
    for j in range(t.shape[0]):
        mt = _Z - t[j]
        idx = x[j] & last
        h = 1 if idx >= _U(64) else 0  # the table's second word holds entries 64..127
        w = raw[j, h] ^ inp[j, h] ^ ((leaf_hi[j] if h else leaf_lo[j]) & mt)
        out[j] = np.uint8(((w >> (idx & _U(63))) ^ (acc[j] >> _ONE)) & _ONE)


@njit(cache=True, nogil=True)
def gen_inputs(lo, hi, inp):  # pragma: no cover - compiled
    """Key generation's AES inputs from both parties' node states lo, hi (2 parties, N):
    inp[s, b, j] = (lo[b, j] with t and the scratch bits cleared | s, hi[b, j]) for sides s = 0, 1."""
    for b in range(2):
        for j in range(lo.shape[1]):
            seed = lo[b, j] & _SEED_MASK
            inp[0, b, j, 0] = seed
            inp[1, b, j, 0] = seed | _ONE
            inp[0, b, j, 1] = hi[b, j]
            inp[1, b, j, 1] = hi[b, j]


@njit(cache=True, nogil=True)
def gen_bits_level(raw, inp, lo, hi, alpha, shift, beta, V, cw_lo_row, cw_hi_row):  # pragma: no cover - compiled
    """One tree level of Z_2-payload key generation for a block, in place (``dcf._keygen_bits_block_numpy`` in numpy).

    raw is AES of inp (2 sides, 2 parties, N, 2) built from the parties' nodes on alpha's path (lo, hi);
    with a = bit ``shift`` of alpha: the level's correction word (s_CW, t_CW^L, t_CW^R, V_CW in bit 1)
    goes to the two rows, V becomes D_L ^ D_R ^ a*beta, each party's node moves to its Keep child
    corrected by t * CW^a, and inp is rebuilt for the next level (``gen_inputs``).
    """
    for j in range(lo.shape[1]):
        a = (alpha[j] >> _U(shift)) & _ONE
        ma = _Z - a
        gl00 = raw[0, 0, j, 0] ^ inp[0, 0, j, 0]  # side L, party 0
        gl01 = raw[0, 1, j, 0] ^ inp[0, 1, j, 0]
        gl10 = raw[1, 0, j, 0] ^ inp[1, 0, j, 0]  # side R
        gl11 = raw[1, 1, j, 0] ^ inp[1, 1, j, 0]
        gh00 = raw[0, 0, j, 1] ^ inp[0, 0, j, 1]
        gh01 = raw[0, 1, j, 1] ^ inp[0, 1, j, 1]
        gh10 = raw[1, 0, j, 1] ^ inp[1, 0, j, 1]
        gh11 = raw[1, 1, j, 1] ^ inp[1, 1, j, 1]
        x_lo0 = gl00 ^ gl01
        x_lo1 = gl10 ^ gl11
        lose_lo = x_lo1 ^ ((x_lo0 ^ x_lo1) & ma)  # Lose = L where a = 1
        x_hi0 = gh00 ^ gh01
        x_hi1 = gh10 ^ gh11
        s_hi = x_hi1 ^ ((x_hi0 ^ x_hi1) & ma)
        tcw_l = (x_lo0 & _ONE) ^ a ^ _ONE
        tcw_r = (x_lo1 & _ONE) ^ a
        d_l = x_lo0 >> _ONE
        d_r = x_lo1 >> _ONE
        ab = a & beta[j]
        v_cw = (d_r ^ ((d_l ^ d_r) & ma) ^ V[j] ^ ab) & _ONE
        V[j] = (d_l ^ d_r ^ ab) & _ONE
        cw = (lose_lo & _SEED_MASK) | tcw_l | ((tcw_l ^ tcw_r) << _TWO) | (v_cw << _ONE)
        cw_lo_row[j] = cw
        cw_hi_row[j] = s_hi
        side = cw ^ ((cw >> _TWO) & a)  # bit 0 becomes t_CW^a
        for b in range(2):
            mt = _Z - (lo[b, j] & _ONE)
            g0l = gl00 if b == 0 else gl01
            g1l = gl10 if b == 0 else gl11
            g0h = gh00 if b == 0 else gh01
            g1h = gh10 if b == 0 else gh11
            nlo = (g0l ^ ((g0l ^ g1l) & ma)) ^ (side & mt)  # Keep = R where a = 1
            nhi = (g0h ^ ((g0h ^ g1h) & ma)) ^ (s_hi & mt)
            lo[b, j] = nlo
            hi[b, j] = nhi
            seed = nlo & _SEED_MASK
            inp[0, b, j, 0] = seed
            inp[1, b, j, 0] = seed | _ONE
            inp[0, b, j, 1] = nhi
            inp[1, b, j, 1] = nhi
