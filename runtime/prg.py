"""Pseudorandomness for fssc: a seeded AES-CTR stream and the fixed-key AES PRG.

Two jobs, both on AES-NI through OpenSSL (the ``cryptography`` package):

``Rng`` / ``expand``
    Every key, mask and seed fssc draws comes from AES-128 in CTR mode over an
    all-zero plaintext. The 16-byte AES key is the *seed*: ``os.urandom(16)``
    by default, or a seed handed over explicitly, so that two parties can
    expand the same 16 bytes into the same tensor (the dealer sends P0 a seed
    sigma, P0 computes ``expand(sigma, shape)``). The initial counter block is
    ``nonce`` in the high 64 bits and zero in the low 64 bits, so one seed can
    feed up to 2**64 independent streams of up to 2**68 bytes each.
    numpy.random and Python's ``random`` are never used.

``mmo``
    The length-doubling PRG inside the DCF tree (see ``dcf.py``): fixed-key
    AES in Matyas-Meyer-Oseas mode, ``G(s)_j = AES_k(s ^ j) ^ s ^ j``. The
    caller builds the inputs ``s ^ j`` for every key of a tree level in one
    contiguous buffer; ``mmo`` encrypts it with one OpenSSL ECB call and
    applies the feed-forward xor. The key ``MMO_KEY`` is public and fixed.

Blocks are numpy ``uint64`` arrays whose last axis has length 2: word 0 is
the low 64 bits of the 128-bit block (bytes 0-7, little-endian), word 1 the
high 64 bits. ``bytes(block)`` is exactly what AES sees.
"""

from __future__ import annotations

import hashlib
import os
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["MMO_KEY", "SEED_BYTES", "Rng", "aes_fixed", "expand", "mmo", "mmo_buffer"]

SEED_BYTES = 16
"""Length of an ``Rng`` seed (an AES-128 key)."""

MMO_KEY = hashlib.sha256(b"fssc/prg/fixed-key-aes-mmo/v1").digest()[:16]
"""Public fixed AES-128 key of the MMO PRG (nothing up the sleeve: a hash of a label)."""

_CHUNK = 1 << 20  # bytes of keystream produced per OpenSSL call
_AES_SLACK = 16  # cryptography's update_into wants len(out) >= len(in) + 15


class Rng:
    """A cryptographic random stream: AES-128-CTR keyed by a 16-byte seed.

    ``Rng()`` draws its seed from ``os.urandom``; ``Rng(seed)`` is
    deterministic (both ends of a seed hand-over get the same stream).
    The stream is consumed in order: each call returns fresh bytes.
    Not thread-safe; give each thread its own ``Rng``.
    """

    def __init__(self, seed: bytes | None = None, nonce: int = 0):
        if seed is None:
            seed = os.urandom(SEED_BYTES)
        seed = bytes(seed)
        if len(seed) != SEED_BYTES:
            raise ValueError(f"Rng seed must be {SEED_BYTES} bytes, got {len(seed)}")
        if not 0 <= nonce < 1 << 64:
            raise ValueError("Rng nonce must fit in 64 bits")
        counter0 = (nonce << 64).to_bytes(16, "big")
        self._enc = Cipher(algorithms.AES(seed), modes.CTR(counter0)).encryptor()
        self._zeros = np.zeros(_CHUNK, dtype=np.uint8)

    def fill(self, out: np.ndarray) -> np.ndarray:
        """Overwrite the bytes of the C-contiguous array ``out`` with keystream."""
        if not out.flags.c_contiguous:
            raise ValueError("Rng.fill needs a C-contiguous array")
        buf = out.reshape(-1).view(np.uint8)
        total = buf.size
        for off in range(0, total, _CHUNK):
            n = min(_CHUNK, total - off)
            if off + n + _AES_SLACK <= total:
                self._enc.update_into(self._zeros[:n].data, buf[off : off + n + _AES_SLACK].data)
            else:  # tail: go through a scratch buffer with the slack update_into needs
                tmp = np.empty(n + _AES_SLACK, dtype=np.uint8)
                self._enc.update_into(self._zeros[:n].data, tmp.data)
                buf[off : off + n] = tmp[:n]
        return out

    def random_bytes(self, n: int) -> bytes:
        """``n`` random bytes."""
        return self._enc.update(bytes(n))

    def u64(self, shape, nbits: int = 64) -> np.ndarray:
        """Uniform ``uint64`` array of ``shape``; with ``nbits`` < 64, uniform below 2**nbits."""
        out = self.fill(np.empty(shape, dtype=np.uint64))
        if nbits < 64:
            if nbits < 0:
                raise ValueError("nbits must be in 0..64")
            out &= np.uint64((1 << nbits) - 1)
        return out

    def bits(self, shape) -> np.ndarray:
        """Uniform bits as a ``uint8`` array of 0/1 values."""
        count = int(np.prod(shape, dtype=np.int64))
        packed = self.fill(np.empty((count + 7) // 8, dtype=np.uint8))
        return np.unpackbits(packed, count=count, bitorder="little").reshape(shape)

    def seeds(self, n: int) -> np.ndarray:
        """``n`` fresh 128-bit seeds as an ``(n, 2)`` ``uint64`` array (see ``seed_bytes``)."""
        return self.u64((n, 2))

    def seed_bytes(self) -> bytes:
        """One fresh 16-byte seed, e.g. for ``expand`` at another party."""
        return self.random_bytes(SEED_BYTES)


def expand(seed: bytes, shape, nbits: int = 64, nonce: int = 0) -> np.ndarray:
    """Deterministically expand a 16-byte seed into a uniform ``uint64`` tensor.

    ``expand(s, shape)`` equals ``Rng(s, nonce).u64(shape, nbits)``: the
    dealer and a party holding the same seed get the same tensor. Use distinct
    ``nonce`` values to derive several independent tensors from one seed.
    """
    return Rng(seed, nonce).u64(shape, nbits)


_local = threading.local()


def _ecb_encryptor():
    """A per-thread ECB context under the fixed MMO key (ECB is stateless)."""
    enc = getattr(_local, "mmo_enc", None)
    if enc is None:
        enc = _local.mmo_enc = Cipher(algorithms.AES(MMO_KEY), modes.ECB()).encryptor()
    return enc


def mmo_buffer(nblocks: int) -> np.ndarray:
    """A scratch buffer for ``mmo(blocks, scratch)`` of up to ``nblocks`` blocks."""
    return np.empty(16 * nblocks + _AES_SLACK, dtype=np.uint8)


def aes_fixed(blocks: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """``AES_k(b)`` under the fixed MMO key for every block, no feed-forward: a view into ``scratch`` (from
    ``mmo_buffer``) of ``blocks``' shape. For callers that fuse the feed-forward into their own pass
    (:mod:`fssc.runtime.kernels`); ``mmo`` is this plus the xor."""
    if blocks.dtype != np.uint64 or blocks.shape[-1] != 2 or not blocks.flags.c_contiguous:
        raise ValueError("AES blocks must be a C-contiguous uint64 array with last axis 2")
    nbytes = blocks.nbytes
    if scratch.dtype != np.uint8 or scratch.size < nbytes + _AES_SLACK:
        raise ValueError("AES scratch buffer too small (use mmo_buffer)")
    _ecb_encryptor().update_into(blocks.reshape(-1).view(np.uint8), scratch)
    return scratch[:nbytes].view(np.uint64).reshape(blocks.shape)


def mmo(blocks: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """Fixed-key AES in Matyas-Meyer-Oseas mode: ``AES_k(b) ^ b`` for every block.

    ``blocks`` is a C-contiguous ``uint64`` array with last axis 2 (any
    leading shape); the result has the same shape. The tweak ``j`` of
    ``G(s)_j = AES_k(s ^ j) ^ s ^ j`` is already xored into the input by the
    caller, so this function only does the one batched ECB call and the
    feed-forward. ``scratch`` (from ``mmo_buffer``) is memory reused across
    calls in hot loops; the result is then a view into it, valid until the
    scratch buffer's next use.
    """
    if scratch is None:
        scratch = mmo_buffer(blocks.size // 2)
    out = aes_fixed(blocks, scratch)
    out ^= blocks
    return out
