"""Tests for runtime/dcf.py: correctness against the plaintext comparison, key
layout and serialisation, randomness sources, and key pseudorandomness.

Oracle: numpy's ``x < alpha`` on the same uint64 values (``beta * 1{x < alpha}``).
The tests of Z_2-payload keys run under both tree walks (numpy's and the compiled one, ``dcf.set_walk``;
conftest's ``walk`` fixture), and ``test_the_walks_agree_bit_for_bit`` compares the two with each other.
"""

import hashlib
import math
import mmap
import random

import numpy as np
import pytest
from fssc.runtime import dcf
from fssc.runtime.dcf import BLOCK, DcfKeys, DcfParams, keygen, nbytes_per_key
from fssc.runtime.prg import Rng
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fssc.errors import FsscError

U64 = np.uint64


def _mask(n):
    return U64((1 << n) - 1) if n < 64 else U64(0xFFFF_FFFF_FFFF_FFFF)


def _check(n, k, alpha, x, rng, nu=-1, beta=None):
    """Generate keys for alpha, evaluate both parties at x, compare with the oracle."""
    alpha = np.asarray(alpha, dtype=U64)
    x = np.asarray(x, dtype=U64)
    if k and beta is None:
        beta = rng.u64((len(alpha), k))
    k0, k1 = keygen(alpha, n, beta, rng, nu)
    y0, y1 = dcf.evaluate(0, k0, x), dcf.evaluate(1, k1, x)
    less = x < alpha
    if k == 0:
        bits = np.ones(len(alpha), bool) if beta is None else np.asarray(beta, bool)
        assert y0.dtype == np.uint8 and y0.shape == (len(x),)
        np.testing.assert_array_equal(y0 ^ y1, (less & bits).astype(np.uint8))
    else:
        assert y0.dtype == U64 and y0.shape == (len(x), k)
        np.testing.assert_array_equal(y0 + y1, beta * less[:, None].astype(U64))
    return k0, k1


def _nus(n, k):
    return sorted({0, dcf.default_nu(n, k), min(n, DcfParams.max_nu(k))})


# --------------------------------------------------------------------------- exhaustive


@pytest.mark.usefixtures("walk")
@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("n", range(1, 9))
def test_exhaustive_small_widths(n, k):
    """Every alpha and every x for n <= 8, each early-termination depth."""
    rng = Rng()
    domain = np.arange(1 << n, dtype=U64)
    alpha, x = np.repeat(domain, 1 << n), np.tile(domain, 1 << n)
    for nu in _nus(n, k):
        _check(n, k, alpha, x, rng, nu)


@pytest.mark.usefixtures("walk")
@pytest.mark.parametrize("nu", [0, 3, 6])
def test_exhaustive_z2_with_beta_bits(nu):
    rng = Rng()
    n = 6
    domain = np.arange(1 << n, dtype=U64)
    alpha, x = np.repeat(domain, 1 << n), np.tile(domain, 1 << n)
    beta = rng.bits(len(alpha)).astype(bool)
    _check(n, 0, alpha, x, rng, nu, beta)


# --------------------------------------------------------------------------- randomized


def _points(n, count, rng):
    """alpha and x with the edges: 0, 1, 2^n - 1, 2^n - 2, 2^(n-1), and x near alpha."""
    m = _mask(n)
    alpha = rng.u64(count, n)
    edges = np.array([0, 1, int(m), int(m) - 1, 1 << (n - 1)], dtype=U64) & m
    alpha[: len(edges)] = edges
    x = rng.u64(count, n)
    near = count // 2
    x[:near] = (alpha[:near] + (rng.u64(near, 3) - U64(4))) & m  # alpha - 4 .. alpha + 3
    x[near : near + 4] = np.array([0, 1, int(m), int(m) - 1], dtype=U64) & m
    return alpha, x


@pytest.mark.usefixtures("walk")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 64),
    k=st.sampled_from([0, 1, 2, 3, 6]),
    nu_pick=st.integers(0, 7),
    seed=st.binary(min_size=16, max_size=16),
)
def test_randomized_wide(n, k, nu_pick, seed):
    rng = Rng(seed)
    nu = min(nu_pick, n, DcfParams.max_nu(k))
    alpha, x = _points(n, 600, rng)
    _check(n, k, alpha, x, rng, nu)


@pytest.mark.usefixtures("walk")
@pytest.mark.parametrize("k", [0, 1, 3])
def test_n64_extremes(k):
    rng = Rng()
    top = (1 << 64) - 1
    vals = [0, 1, 2, top, top - 1, top - 2, 1 << 63, (1 << 63) - 1]
    alpha = np.array([a for a in vals for _ in vals], dtype=U64)
    x = np.array([b for _ in vals for b in vals], dtype=U64)
    _check(64, k, alpha, x, rng)


@pytest.mark.usefixtures("walk")
def test_many_blocks_and_partial_last_block():
    rng = Rng()
    count = 2 * BLOCK + 3
    alpha, x = _points(20, count, rng)
    _check(20, 1, alpha, x, rng)
    _check(19, 0, alpha & U64((1 << 19) - 1), x & U64((1 << 19) - 1), rng)


@pytest.mark.usefixtures("walk")
def test_high_input_bits_are_ignored():
    rng = Rng()
    alpha, x = _points(12, 500, rng)
    k0, k1 = keygen(alpha, 12, None, rng)
    noisy = x | (rng.u64(500) << U64(12))
    np.testing.assert_array_equal(dcf.evaluate(0, k0, noisy) ^ dcf.evaluate(1, k1, noisy), (x < alpha).astype(np.uint8))


def test_empty_batch():
    k0, _k1 = keygen(np.zeros(0, dtype=U64), 16)
    assert len(k0) == 0 and dcf.evaluate(0, k0, np.zeros(0, dtype=U64)).shape == (0,)


# --------------------------------------------------------------------------- layout


def test_key_sizes():
    # Z_2: 16-byte seed + 16 bytes per level + 128-bit leaf table (nu = 7)
    assert nbytes_per_key(20, 0) == 16 + 13 * 16 + 16 == 240
    assert nbytes_per_key(32, 0) == 16 + 25 * 16 + 16 == 432
    # Z_2^64: 24 bytes per level + 4-entry leaf table (nu = 2)
    assert nbytes_per_key(20, 1) == 16 + 18 * 24 + 32 == 480
    assert nbytes_per_key(32, 1) == 16 + 30 * 24 + 32 == 768
    # (Z_2^64)^3: 40 bytes per level + 2-entry leaf table (nu = 1)
    assert nbytes_per_key(32, 3) == 16 + 31 * 40 + 48 == 1304
    # plain Fig. 1 tree, no early termination
    assert nbytes_per_key(32, 1, nu=0) == 16 + 32 * 24 + 8


@pytest.mark.usefixtures("walk")
@pytest.mark.parametrize("k", [0, 1, 3])
def test_serialisation_roundtrip(k, tmp_path):
    rng = Rng()
    n, count = 18, BLOCK + 10
    alpha, x = _points(n, count, rng)
    beta = None if k == 0 else rng.u64((count, k))
    k0, _k1 = keygen(alpha, n, beta, rng)
    assert len(k0.to_bytes()) == count * nbytes_per_key(n, k)
    # bytes round trip, zero-copy
    r0 = DcfKeys.from_buffer(k0.to_bytes(), n, k, party=0)
    np.testing.assert_array_equal(dcf.evaluate(0, r0, x), dcf.evaluate(0, k0, x))
    # keygen straight into a memory-mapped file, then map it read-only
    path = tmp_path / "p1.keys"
    out1 = np.memmap(path, dtype="<u8", mode="w+", shape=(count * DcfParams(n, k).words,))
    out0 = np.empty_like(out1)
    keygen(alpha, n, beta, Rng(b"\x01" * 16), out=(out0, out1))
    out1.flush()
    del out1
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        m1 = DcfKeys.from_buffer(buf, n, k, party=1)
        m0 = DcfKeys.from_buffer(out0, n, k, party=0)
        y = dcf.evaluate(0, m0, x), dcf.evaluate(1, m1, x)
        del m1
        buf.close()
    if k == 0:
        np.testing.assert_array_equal(y[0] ^ y[1], (x < alpha).astype(np.uint8))
    else:
        np.testing.assert_array_equal(y[0] + y[1], beta * (x < alpha)[:, None].astype(U64))


@pytest.mark.usefixtures("walk")
def test_slicing():
    rng = Rng()
    n, count = 16, 2 * BLOCK + 7
    alpha, x = _points(n, count, rng)
    k0, k1 = keygen(alpha, n, None, rng)
    aligned = k0[BLOCK:]
    assert np.shares_memory(aligned.data, k0.data) and len(aligned) == BLOCK + 7
    np.testing.assert_array_equal(dcf.evaluate(0, aligned, x[BLOCK:]), dcf.evaluate(0, k0, x)[BLOCK:])
    part0, part1 = k0[5 : BLOCK + 100], k1[5 : BLOCK + 100]  # not block aligned: repacked
    got = dcf.evaluate(0, part0, x[5 : BLOCK + 100]) ^ dcf.evaluate(1, part1, x[5 : BLOCK + 100])
    np.testing.assert_array_equal(got, (x < alpha)[5 : BLOCK + 100].astype(np.uint8))


def test_wrong_party_and_bad_inputs():
    rng = Rng()
    k0, _k1 = keygen(np.array([3, 4], dtype=U64), 8, None, rng)
    with pytest.raises(ValueError):
        dcf.evaluate(1, k0, np.array([1, 2], dtype=U64))
    swapped = DcfKeys(k0.params, 1, k0.data)  # mislabelled key file
    with pytest.raises(ValueError):
        dcf.evaluate(1, swapped, np.array([1, 2], dtype=U64))
    with pytest.raises(ValueError):
        dcf.evaluate(0, k0, np.array([1], dtype=U64))
    with pytest.raises(ValueError):
        keygen(np.array([256], dtype=U64), 8)
    with pytest.raises(ValueError):
        DcfParams(65)
    with pytest.raises(ValueError):
        DcfParams(8, 0, nu=8)
    with pytest.raises(ValueError):
        DcfKeys.from_buffer(b"\0" * 17, 8)


# --------------------------------------------------------------------------- randomness


def _raiser(*_a, **_k):
    raise AssertionError("numpy.random / random must not be used")


def test_no_numpy_random_or_python_random(monkeypatch):
    for name in dir(np.random):
        if not name.startswith("_") and callable(getattr(np.random, name)):
            monkeypatch.setattr(np.random, name, _raiser)
    for name in dir(random):
        if not name.startswith("_") and callable(getattr(random, name)):
            monkeypatch.setattr(random, name, _raiser)
    with pytest.raises(AssertionError):
        np.random.default_rng()  # the patch is live
    rng = Rng()
    alpha, x = _points(20, 3000, rng)
    for k in (0, 1, 3):
        _check(20, k, alpha, x, rng)
    k0, k1 = keygen(alpha, 20)  # rng=None: fresh os.urandom-seeded Rng
    assert np.array_equal(dcf.evaluate(0, k0, x) ^ dcf.evaluate(1, k1, x), (x < alpha).astype(np.uint8))


def _deterministic_bits(p: DcfParams, party: int):
    """{(word, bit): value} for the bits fixed by the layout, not by randomness."""
    fixed = {(0, 0): party, (0, 1): 0, (0, 2): 0}
    if p.k:  # ring payloads leave bit 1 of cw_lo (the Z_2 V_CW slot) at 0
        fixed.update({(p.level_row(i), 1): 0 for i in range(p.levels)})
    elif p.leaf_entries < 64:
        fixed.update({(p.leaf_row, j): 0 for j in range(p.leaf_entries, 64)})
    return fixed


def _bit_counts(keys: DcfKeys) -> np.ndarray:
    """(W, 64) count of ones per bit position over all keys."""
    m = keys.columns()
    return np.stack([((m >> U64(j)) & U64(1)).sum(axis=1).astype(np.int64) for j in range(64)], axis=1)


@pytest.mark.parametrize("k", [0, 1])
def test_key_bits_look_uniform_for_any_alpha(k):
    """Per-bit frequencies of party b's key words: binomial(N, 1/2) for every
    non-layout bit (seed, s_CW, t_CW^L, t_CW^L ^ t_CW^R, V_CW, leaf table), for
    two alphas with complementary bit patterns, and no difference between them."""
    n, count = 20, 20000
    rng = Rng()
    p = DcfParams(n, k)
    sigma = math.sqrt(count / 4)
    z_max = 6.0  # per-position two-sided p ~ 2e-9; a few thousand positions per run
    counts = {}
    for alpha_val in (0x55555, 0xAAAAA):
        alpha = np.full(count, alpha_val, dtype=U64)
        beta = None if k == 0 else np.full((count, 1), 12345, dtype=U64)
        keys = keygen(alpha, n, beta, rng)
        for b in (0, 1):
            c = _bit_counts(keys[b])
            fixed = _deterministic_bits(p, b)
            free = np.ones(c.shape, bool)
            for (w, j), val in fixed.items():
                assert c[w, j] == val * count, f"layout bit {(w, j)}"
                free[w, j] = False
            z = (c[free] - count / 2) / sigma
            assert np.abs(z).max() < z_max
            m = z.size
            assert abs((z**2).sum() - m) < z_max * math.sqrt(2 * m)  # chi-square, m dof
            counts[alpha_val, b] = (c, free)
    for b in (0, 1):
        (c1, free), (c2, _) = counts[0x55555, b], counts[0xAAAAA, b]
        d = (c1[free] - c2[free]) / math.sqrt(count / 2)
        assert np.abs(d).max() < z_max


@pytest.mark.usefixtures("walk")
def test_threaded_eval_matches():
    rng = Rng()
    alpha, x = _points(18, 3 * BLOCK + 11, rng)
    beta = rng.u64((len(alpha), 3))
    _k0, k1 = keygen(alpha, 18, beta, rng)
    np.testing.assert_array_equal(dcf.evaluate(1, k1, x, threads=2), dcf.evaluate(1, k1, x))


# --------------------------------------------------------------------------- pinned bytes

_PINNED = "374fdb1ad1320672e731a33a72af5db3656acf9daaaa3623a8c6d268ed82e4e9"
"""SHA-256 of the keys below, recorded with the block-at-a-time keygen that preceded the streaming one:
a speed change of keygen must leave it as it is (a new value means new key semantics or layout)."""


@pytest.mark.usefixtures("walk")
def test_keygen_bytes_are_pinned_for_a_fixed_prg_stream():
    r = Rng(b"\x05" * 16)
    h = hashlib.sha256()
    configs = [
        (1, 0, -1, 5),
        (8, 0, 0, 300),
        (20, 0, -1, 40000),
        (36, 0, -1, 16384),
        (64, 0, -1, 1000),
        (9, 0, 7, 33000),
        (17, 1, -1, 20000),
        (40, 2, -1, 17000),
        (64, 3, -1, 100),
        (12, 6, 1, 5000),
        (30, 1, 0, 16385),
        (5, 5, 0, 77),
    ]
    for n, k, nu, count in configs:
        alpha = r.u64(count, n)
        beta = None if k == 0 else r.u64((count, k))
        k0, k1 = keygen(alpha, n, beta, r, nu)
        h.update(k0.data.tobytes())
        h.update(k1.data.tobytes())
    beta = (r.u64(3000, 1) & U64(1)).astype(np.uint8)
    k0, k1 = keygen(r.u64(3000, 25), 25, beta, r)
    h.update(k0.data.tobytes())
    h.update(k1.data.tobytes())
    assert h.hexdigest() == _PINNED


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 21, 37, 63, 64])
def test_the_walks_agree_bit_for_bit(n, monkeypatch):
    """Keys from one fixed PRG stream and their shares, under each walk: equal bytes (the compiled walk's
    oracle is the numpy walk, and both are the plaintext's: ``_check``). Several blocks, the last partial, beta
    bits, and key words read-only as a mapped file gives them. A spy on the compiled level pass shows which
    walk ran."""
    from fssc.runtime import kernels

    ran = []
    real = kernels.bits_level
    monkeypatch.setattr(kernels, "bits_level", lambda *a: ran.append(1) or real(*a))
    count = 2 * BLOCK + 123
    alpha = Rng(b"a" * 16).u64(count, n)
    beta = Rng(b"b" * 16).bits(count)
    x = Rng(b"x" * 16).u64(count, n)
    x[:50] = alpha[:50]
    got = []
    before = dcf.current_walk()
    try:
        for w in (dcf.NUMPY, dcf.COMPILED):
            dcf.set_walk(w)
            ran.clear()
            keys = keygen(alpha, n, beta, Rng(b"k" * 16))
            ro = [DcfKeys.from_buffer(k.to_bytes(), n, 0, k.party) for k in keys]
            got.append(([k.to_bytes() for k in keys], [dcf.evaluate(k.party, k, x) for k in ro]))
            levels = DcfParams(n).levels
            assert len(ran) == (2 * (-(-count // BLOCK)) * levels if w == dcf.COMPILED else 0)
    finally:
        dcf.set_walk(before)
    (keys_a, shares_a), (keys_b, shares_b) = got
    assert keys_a == keys_b
    for a, b in zip(shares_a, shares_b, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(shares_a[0] ^ shares_a[1], ((x < alpha) & beta.astype(bool)).astype(np.uint8))


def test_a_compiled_walk_that_cannot_be_readied(monkeypatch):
    """numba missing or without a writable cache: one line; asked for explicitly it is an error, in auto mode
    the numpy walk runs instead and the caller hears why."""
    before = dcf.current_walk()
    dcf.set_walk(dcf.NUMPY)

    def broken():
        raise RuntimeError("cannot cache function 'bits_root': no locator available for file 'kernels.py'")

    monkeypatch.setattr(dcf, "_kernels", broken)
    try:
        with pytest.raises(FsscError, match=r"^the compiled DCF walk could not be readied \(RuntimeError: ") as e:
            dcf.set_walk(dcf.COMPILED)
        assert "NUMBA_CACHE_DIR" in str(e.value) and "\n" not in str(e.value)
        assert dcf.current_walk() == dcf.NUMPY
        heard: list[str] = []
        assert dcf.set_walk(dcf.COMPILED, strict=False, warn=heard.append) == dcf.NUMPY
        assert dcf.current_walk() == dcf.NUMPY
        assert len(heard) == 1 and heard[0].endswith("; using the numpy walk")
    finally:
        monkeypatch.undo()
        dcf.set_walk(before)


def test_walk_choice(monkeypatch):
    monkeypatch.delenv(dcf.WALK_ENV, raising=False)
    assert dcf.choose_walk(dcf.COMPILED_WALK_MIN_BLOCKS) == dcf.COMPILED
    assert dcf.choose_walk(dcf.COMPILED_WALK_MIN_BLOCKS - 1) == dcf.NUMPY


def test_walk_from_the_environment(monkeypatch):
    monkeypatch.setenv(dcf.WALK_ENV, "numpy")
    assert dcf.choose_walk(1e12) == dcf.NUMPY
    monkeypatch.setenv(dcf.WALK_ENV, "compiled")
    assert dcf.choose_walk(0) == dcf.COMPILED
    monkeypatch.setenv(dcf.WALK_ENV, "fast")
    with pytest.raises(FsscError, match=r"^FSSC_DCF_WALK=fast: expected auto, compiled or numpy$"):
        dcf.choose_walk(0)
