"""Tests for runtime/prg.py: the seeded AES-CTR stream and the fixed-key AES MMO PRG.

Oracles: AES from ``cryptography`` applied block by block (a second,
independent path to the same keystream / PRG values).
"""

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fssc.runtime import prg
from fssc.runtime.prg import MMO_KEY, Rng, expand, mmo
from hypothesis import given, settings
from hypothesis import strategies as st


def _aes_block(key: bytes, block: bytes) -> bytes:
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(block)


def test_keystream_is_aes_of_counter_blocks():
    seed = bytes(range(16))
    stream = Rng(seed).random_bytes(48)
    expected = b"".join(_aes_block(seed, i.to_bytes(16, "big")) for i in range(3))
    assert stream == expected


def test_nonce_sets_high_counter_half():
    seed = b"\x11" * 16
    stream = Rng(seed, nonce=5).random_bytes(16)
    assert stream == _aes_block(seed, (5 << 64).to_bytes(16, "big"))
    assert expand(seed, 4, nonce=1).tolist() != expand(seed, 4, nonce=2).tolist()


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.integers(0, 3 * (1 << 20) + 40))
def test_fill_matches_byte_stream(seed, nbytes):
    # crosses the 1 MiB chunk boundary and the tail path of Rng.fill
    nbytes -= nbytes % 8
    a = Rng(seed).u64(nbytes // 8)
    b = np.frombuffer(Rng(seed).random_bytes(nbytes), dtype="<u8")
    assert np.array_equal(a, b)


def test_stream_continues_across_calls():
    seed = os.urandom(16)
    r = Rng(seed)
    parts = np.concatenate([r.u64(3), r.u64((2, 5)).ravel(), r.u64(1)])
    assert np.array_equal(parts, expand(seed, 14))


def test_expand_deterministic_and_seed_sensitive():
    s = os.urandom(16)
    t = bytes([s[0] ^ 1]) + s[1:]
    assert np.array_equal(expand(s, (3, 4)), expand(s, (3, 4)))
    assert not np.array_equal(expand(s, 8), expand(t, 8))
    assert expand(s, (3, 4)).dtype == np.uint64


def test_unseeded_streams_differ():
    assert Rng().random_bytes(32) != Rng().random_bytes(32)


@pytest.mark.parametrize("nbits", [0, 1, 7, 19, 63, 64])
def test_u64_nbits_range(nbits):
    v = Rng().u64(4096, nbits)
    assert v.dtype == np.uint64
    if nbits < 64:
        assert int(v.max()) < (1 << nbits)
    if nbits >= 7:
        assert int(v.max()) >= (1 << (nbits - 1))  # top bit shows up in 4096 draws


def test_bits_are_bits_and_balanced():
    b = Rng().bits((100, 1000))
    assert b.shape == (100, 1000) and b.dtype == np.uint8
    assert set(np.unique(b).tolist()) <= {0, 1}
    # 1e5 fair coins: mean within 6 sigma
    assert abs(b.mean() - 0.5) < 6 * 0.5 / np.sqrt(b.size)


def test_seeds_shape():
    s = Rng().seeds(7)
    assert s.shape == (7, 2) and s.dtype == np.uint64
    assert len(Rng().seed_bytes()) == 16


def test_bad_seed_length():
    with pytest.raises(ValueError):
        Rng(b"short")


def test_mmo_matches_blockwise_aes():
    blocks = Rng().u64((5, 3, 2))
    out = mmo(blocks)
    assert out.shape == blocks.shape
    for blk, got in zip(blocks.reshape(-1, 2), out.reshape(-1, 2), strict=True):
        raw = blk.astype("<u8").tobytes()
        want = bytes(a ^ b for a, b in zip(_aes_block(MMO_KEY, raw), raw, strict=True))
        assert got.astype("<u8").tobytes() == want


def test_mmo_key_is_fixed_and_public():
    assert len(MMO_KEY) == 16
    z = np.zeros((1, 2), dtype=np.uint64)
    assert np.array_equal(mmo(z), mmo(z))


def test_mmo_rejects_bad_input():
    with pytest.raises(ValueError):
        mmo(np.zeros((4, 3), dtype=np.uint64))
    with pytest.raises(ValueError):
        mmo(np.zeros((4, 2), dtype=np.int64))


def test_mmo_is_thread_safe():
    from concurrent.futures import ThreadPoolExecutor

    blocks = Rng().u64((20000, 2))
    want = mmo(blocks)
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda _: mmo(blocks), range(8)))
    assert all(np.array_equal(o, want) for o in outs)


def test_module_never_touches_numpy_or_python_random():
    import inspect

    src = inspect.getsource(prg)
    assert "np.random" not in src and "import random" not in src


def test_mmo_with_reused_scratch():
    from fssc.runtime.prg import mmo_buffer

    scratch = mmo_buffer(64)
    blocks = Rng().u64((64, 2))
    assert np.array_equal(mmo(blocks, scratch), mmo(blocks))
    with pytest.raises(ValueError):
        mmo(Rng().u64((65, 2)), scratch)
