"""Each party's view is independent of the secrets.

For two different secrets (masks / DCF alphas, inputs, weights) we collect a
party's key records and the messages it receives over many gates and check,
for every bit position of a record, that

* the frequency of ones is within a binomial bound of 1/2 (per position, and
  as a chi-square over all positions), and
* the two secrets' frequency profiles agree (per position and chi-square).

Some bits are deterministic by design and are checked to be *equal* under
both secrets instead (they are the same whatever the secret, so they carry no
information): the DCF root seed's control bit t (= the party's index, as in
EzPC) and its two scratch bits (always 0), the unused tail of a DCF leaf
table smaller than 64 bits, and message framing (dtype, shape). Everything
else must look uniform.

Finally the protocol is run with numpy.random and Python's random made to
raise, and the runtime sources are checked not to import them at all.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fssc.compiler.ir import splines
from fssc.compiler.reference import simulation
from fssc.compiler.reference.simulation import simulate
from fssc.runtime import dcf, gates, ring
from fssc.runtime.channel import decode_array
from fssc.runtime.keys import KeyReader
from fssc.runtime.prg import Rng
from fssc.runtime.simulate import deal_in_memory, run_parties

U64 = np.uint64
Z = 6.0  # per-position bound in standard deviations (two-sided tail ~2e-9 per position)
N = 4096  # samples (gates / keys / elements) per secret
ALL_ONES = U64(0xFFFF_FFFF_FFFF_FFFF)


# ----------------------------------------------------------------- statistics
def bit_matrix(a: np.ndarray) -> np.ndarray:
    """(positions, samples) 0/1 matrix from an array whose LAST axis indexes samples.

    uint64 rows give 64 positions each (bit j of the word), uint8 rows 8.
    """
    a = np.ascontiguousarray(a)
    width = a.dtype.itemsize * 8
    rows = a.reshape(-1, a.shape[-1])
    shifts = np.arange(width, dtype=a.dtype)
    return ((rows[:, None, :] >> shifts[None, :, None]) & a.dtype.type(1)).reshape(-1, a.shape[-1]).astype(np.uint8)


def check_indistinguishable(bits_a: np.ndarray, bits_b: np.ndarray, what: str, fixed: dict[int, int] | None = None):
    """bits_*: (positions, samples) 0/1 for secret A and secret B.

    ``fixed`` maps the positions deterministic by design to their value; they
    must hold that value in every sample under both secrets. All others must
    be unbiased and agree between the secrets.
    """
    fixed = fixed or {}
    assert bits_a.shape == bits_b.shape
    pos, n = bits_a.shape
    for p, v in fixed.items():
        assert (bits_a[p] == v).all() and (bits_b[p] == v).all(), f"{what}: deterministic bit {p} is not {v}"
    free = np.array([p for p in range(pos) if p not in fixed], dtype=np.int64)
    fa, fb = bits_a[free].mean(axis=1), bits_b[free].mean(axis=1)
    const = free[(fa == 0) | (fa == 1) | (fb == 0) | (fb == 1)]
    assert const.size == 0, f"{what}: bits {const[:10].tolist()} are constant but not declared deterministic"
    # one position: |f - 1/2| <= Z * sd, sd = 1 / (2 sqrt n); two secrets: sd of fa - fb = 1 / sqrt(2n)
    za = np.abs(fa - 0.5) * 2 * np.sqrt(n)
    zb = np.abs(fb - 0.5) * 2 * np.sqrt(n)
    zd = np.abs(fa - fb) * np.sqrt(2 * n)
    for name, zz in (("secret A biased", za), ("secret B biased", zb), ("secrets differ", zd)):
        worst = int(np.argmax(zz))
        assert zz[worst] <= Z, (
            f"{what}: {name} at bit {free[worst]} ({zz[worst]:.1f} sd; fa={fa[worst]:.3f} fb={fb[worst]:.3f}, n={n})"
        )
        # all positions together: sum of squared z-scores ~ chi2(k); Laurent-Massart tail bound
        # P(chi2(k) >= k + 2 sqrt(k t) + 2 t) <= exp(-t), here t = Z^2 / 2 (the per-bit level)
        k, t = zz.size, Z * Z / 2
        assert (zz**2).sum() <= k + 2 * np.sqrt(k * t) + 2 * t, f"{what}: {name} over all {k} bits (chi-square)"


def records(key_bytes: bytes, party: int) -> dict[str, np.ndarray]:
    r = KeyReader(key_bytes, party=party)
    out = {}
    while not r.skip_to_end():
        tag, arr = r._next()
        out[tag] = np.array(arr)
    return out


def dcf_words(data: np.ndarray, n: int, party: int) -> np.ndarray:
    """One party's DCF keys as a (words, keys) matrix."""
    keys = dcf.DcfKeys(dcf.DcfParams(n, 0), party, np.ascontiguousarray(data))
    return keys.columns()


def dcf_fixed_bits(n: int, party: int) -> dict[int, int]:
    """Deterministic bits of a Z_2-payload DCF key, as positions in bit_matrix(words)."""
    p = dcf.DcfParams(n, 0)
    # root seed word 0: bit 0 is the control bit t = party, bits 1 and 2 are scratch (zero)
    fixed = {0: party, 1: 0, 2: 0}
    # leaf table: 2^nu bits in ceil(2^nu / 64) words; the unused tail of the last word is zero
    for j in range(p.leaf_entries, 64 * p.leaf_words):
        fixed[64 * p.leaf_row + j] = 0
    return fixed


def packed_bits(b: np.ndarray, count: int, positions: int = 1) -> np.ndarray:
    """``positions`` positions of ``count / positions`` samples each (packbits pads the last byte with
    zeros: dropped here); two positions for a truncating ReLU's d and carry bits."""
    return np.unpackbits(b, count=count, bitorder="little").reshape(positions, -1)


# ----------------------------------------------------------------- key material of comparison gates
def deal_gate(kind: str, r: np.ndarray, m: int, s: int):
    def fn(D):
        if kind == "relu":
            D.gate(gates.Relu, "g", r, m, s)
        elif kind == "max":
            rb = Rng().u64(r.shape)
            D.gate(gates.Max, "g", r + rb, rb, m, s)  # the comparison's mask r_a - r_b is the secret r
        else:
            D.gate(gates.ArgMax2, "g", r, m)

    _, k0, k1 = deal_in_memory(fn)
    return records(k0, 0), records(k1, 1)


SECRETS = {
    "zero": lambda n: np.zeros(n, U64),  # alpha = 0, rho_hi = 0
    "ones": lambda n: np.full(n, ALL_ONES),  # alpha = 2^(m-1) - 1, rho_hi = 1
    "uniform": lambda n: Rng().u64(n),
    "small": lambda n: Rng().u64(n, 5),  # small masks: alpha in [0, 32), rho_hi = 0
}


@pytest.mark.parametrize(
    "kind,m,s", [("relu", 20, 12), ("relu", 5, 0), ("relu", 9, 3), ("max", 16, 12), ("drelu", 31, 0)]
)
@pytest.mark.parametrize("sa,sb", [("zero", "ones"), ("small", "uniform")])
def test_gate_keys_indistinguishable(kind, m, s, sa, sb):
    ka = deal_gate(kind, SECRETS[sa](N), m, s)
    kb = deal_gate(kind, SECRETS[sb](N), m, s)
    for party in (0, 1):
        ra, rb = ka[party], kb[party]
        assert sorted(ra) == sorted(rb)
        assert ("g.cdcf" in ra) == (kind == "relu" and s > 0), "a truncating ReLU has the carry's DCF"
        for tag in ra:
            what = f"{kind} m={m} P{party} {tag} ({sa} vs {sb})"
            a, b = ra[tag], rb[tag]
            assert a.shape == b.shape and a.dtype == b.dtype, what
            if tag.endswith(".dcf"):  # per key: every bit of every word
                ba, bb = bit_matrix(dcf_words(a, m - 1, party)), bit_matrix(dcf_words(b, m - 1, party))
                check_indistinguishable(ba, bb, what, dcf_fixed_bits(m - 1, party))
            elif tag.endswith(".cdcf"):  # exact truncation: the carry's DCF over the s dropped bits
                assert kind == "relu" and s > 0, what
                ba, bb = bit_matrix(dcf_words(a, s, party)), bit_matrix(dcf_words(b, s, party))
                check_indistinguishable(ba, bb, what, dcf_fixed_bits(s, party))
            elif tag.endswith(".corr"):  # P1's share corrections: (rows, gates), one sample per gate
                if a.size:
                    check_indistinguishable(bit_matrix(a), bit_matrix(b), what)
            elif tag.endswith(".bits"):  # P1's bit corrections: one bit per gate (two with a carry: r_d, r_c)
                nb = 2 * N if kind == "relu" and s else N
                check_indistinguishable(packed_bits(a, nb, nb // N), packed_bits(b, nb, nb // N), what)
            elif tag.endswith(".seed"):  # P0's 16-byte seed: a single sample; checked over many calls below
                assert a.size == 16
            else:
                raise AssertionError(f"unexpected key record {tag}")


def test_p0_seeds_uniform():
    """P0's gate and linear-layer seeds over many calls (16 and 32 bytes each)."""

    def many(r_fill):
        def fn(D):
            for i in range(512):
                D.gate(gates.Relu, f"g{i}", r_fill(4), 12, 3)
                D.linear_seeds(f"l{i}")

        _, k0, _ = deal_in_memory(fn)
        rec = records(k0, 0)
        seeds = np.stack([rec[f"g{i}.seed"] for i in range(512)], axis=1)  # (16 bytes, calls)
        lin = np.stack([rec[f"l{i}.seeds"] for i in range(512)], axis=1)
        return np.concatenate([seeds, lin])

    a, b = many(SECRETS["zero"]), many(SECRETS["ones"])
    check_indistinguishable(bit_matrix(a), bit_matrix(b), "P0 seeds")


# ----------------------------------------------------------------- messages of a ReLU gate
def relu_views(x: np.ndarray, m: int, s: int):
    """Run one ReLU gate on secret x (uniform masks); returns what each party received."""
    r = Rng().u64(x.shape)
    _, k0, k1 = deal_in_memory(lambda D: D.gate(gates.Relu, "g", r, m, s))
    xhat = x + r
    _, _, c0, c1 = run_parties(
        lambda P: P.gate(gates.Relu, "g", xhat, m, s),
        lambda P: P.gate(gates.Relu, "g", xhat, m, s),
        k0,
        k1,
        record=True,
    )
    return c0.received, c1.received


@pytest.mark.parametrize("m,s", [(20, 12), (12, 0)])
def test_relu_messages_indistinguishable(m, s):
    """Inputs all negative vs all positive (d = 0 vs d = 1), with dropped bits 5 vs 2^s - 5 (carry
    c = 1 for few vs for most masks): every message either party receives, and the values it opens
    (d^ = d xor r_d, c^ = c xor r_c and y^), look the same."""
    lim = 1 << (m + s - 2)
    nb = 2 * N if s else N  # round 1 opens d^ and, when the gate truncates, c^
    views = [relu_views(ring.unsigned(np.full(N, v, dtype=np.int64)), m, s) for v in (-lim + 5, lim - 5)]
    for party in (0, 1):
        (ea, ya), (eb, yb) = views[0][party], views[1][party]
        (ea_o, ya_o), (eb_o, yb_o) = views[0][1 - party], views[1][1 - party]
        # framing (dtype code, rank, shape) is fixed by the public gate size
        assert ea[:10] == eb[:10] and ya[:10] == yb[:10]
        e_a, e_b = decode_array(ea), decode_array(eb)
        assert e_a.size == (nb + 7) // 8
        check_indistinguishable(packed_bits(e_a, nb, nb // N), packed_bits(e_b, nb, nb // N), f"P{party} round-1 bits")
        check_indistinguishable(bit_matrix(decode_array(ya)), bit_matrix(decode_array(yb)), f"P{party} round-2 words")
        # what both open: d^ = e_0 ^ e_1 (would be d itself, constant per secret, without r_d), c^, and y^
        dh_a = packed_bits(e_a ^ decode_array(ea_o), nb, nb // N)
        dh_b = packed_bits(e_b ^ decode_array(eb_o), nb, nb // N)
        check_indistinguishable(dh_a, dh_b, "opened d^ (and c^)")
        yh_a = decode_array(ya) + decode_array(ya_o)
        yh_b = decode_array(yb) + decode_array(yb_o)
        check_indistinguishable(bit_matrix(yh_a), bit_matrix(yh_b), "opened y^")


# ----------------------------------------------------------------- linear layer
def _gemm(p, q):
    return p @ q


def deal_linear(r_x: np.ndarray, a_mask: np.ndarray, y_shape):
    def fn(D):
        return D.linear("lin", _gemm, a_mask.shape[0], r_x, a_mask, y_shape, D.linear_seeds("lin"))

    r_y, k0, k1 = deal_in_memory(fn)
    return r_y, k0, k1


def test_linear_records_indistinguishable():
    """P1's [r_x]_1 and c_1 for input masks r_x = 0 vs r_x = all ones (P1 knows A and W)."""
    kdim, cols = 16, 4
    a_mask = Rng().u64((kdim, cols))
    shape = (N // kdim, kdim)
    y_shape = (N // kdim, cols)
    views = []
    for r_x in (np.zeros(shape, U64), np.full(shape, ALL_ONES)):
        _, _, k1 = deal_linear(r_x, a_mask, y_shape)
        views.append(records(k1, 1))
    for tag in ("lin.rx1", "lin.c1"):
        a, b = views[0][tag].reshape(-1), views[1][tag].reshape(-1)
        check_indistinguishable(bit_matrix(a[None, :]), bit_matrix(b[None, :]), f"P1 {tag}")


@pytest.mark.parametrize("secret", ["input", "weights"])
def test_linear_messages_indistinguishable(secret):
    """P1 receives z_0 (for two different inputs x); P0 receives z_1 (for two inputs, or two weight matrices)."""
    gen = np.random.default_rng(4)
    kdim, cols = 32, 8
    rows = N // cols
    w_small = ring.unsigned(gen.integers(-(1 << 14), 1 << 14, size=(kdim, cols)))
    views = []
    for v in range(2):
        x = np.zeros((rows, kdim), U64) if (secret == "weights" or v == 0) else np.full((rows, kdim), U64(1 << 40))
        w = w_small if (secret == "input" or v == 0) else ring.unsigned(np.full((kdim, cols), -(1 << 20)))
        a_mask = Rng().u64(w.shape)
        r_x = Rng().u64(x.shape)
        _r_y, k0, k1 = deal_linear(r_x, a_mask, (rows, cols))
        w_hat = w + a_mask

        def p0(P, x=x, w_hat=w_hat):
            return P.linear("lin", None, z0=P.linear_offline("lin", _gemm, kdim, x.shape, w_hat, (rows, cols)))

        def p1(P, x=x, r_x=r_x, w=w):
            return P.linear("lin", x + r_x, _gemm, kdim, w, None, 64)

        yhat, _, c0, c1 = run_parties(p0, p1, k0, k1, record=True)
        views.append((decode_array(c0.received[0]), decode_array(c1.received[0]), yhat))
    for i, what in ((0, "P0 receives z_1"), (1, "P1 receives z_0"), (2, "opened y^")):
        a, b = views[0][i].reshape(-1), views[1][i].reshape(-1)
        check_indistinguishable(bit_matrix(a[None, :]), bit_matrix(b[None, :]), f"{what} ({secret})")


def test_model_owner_constant_message_indistinguishable():
    """P0 receives c^ = c + r_c for a constant of the model owner's: for c = 0 and c = all ones alike."""
    views = []
    for c in (np.zeros((1, N), U64), np.full((1, N), ALL_ONES)):
        _, k0, k1 = deal_in_memory(lambda D: D.const("c", (1, N)))

        def p1(P, c=c):
            return P.const("c", c, (1, N))

        chat, _, _, _ = run_parties(lambda P: P.const("c", None, (1, N)), p1, k0, k1)
        views.append(chat)
    check_indistinguishable(bit_matrix(views[0]), bit_matrix(views[1]), "P0 receives c^")


def test_detector_catches_a_leak():
    """The statistic is not vacuous: constant, biased and secret-dependent records fail."""
    rng = Rng()
    uniform = rng.bits((1, N))
    with pytest.raises(AssertionError, match="constant"):  # e.g. d opened without r_d
        check_indistinguishable(np.zeros((1, N), np.uint8), np.ones((1, N), np.uint8), "d")
    biased = (rng.bits((1, N)) & rng.bits((1, N))).astype(np.uint8)  # P(1) = 1/4
    with pytest.raises(AssertionError, match="biased"):
        check_indistinguishable(biased, uniform, "biased")
    # a mild bias spread over many positions (about 2 sd each, almost always below the per-bit
    # bound): the chi-square over all positions catches it
    wide_a = rng.bits((256, N))
    wide_b = np.where(rng.u64((256, N)) < U64(int(0.515 * 2**64)), 1, 0).astype(np.uint8)
    with pytest.raises(AssertionError):
        check_indistinguishable(wide_a, wide_b, "diffuse")


# ----------------------------------------------------------------- no numpy.random, no random
RUNTIME = Path(dcf.__file__).parent


# every runtime module (the dealer's and the parties' paths) but images.py, which makes public synthetic
# calibration images, not key material. The in-process simulation (fssc.compiler.reference.simulation)
# drives the dealer too and is checked with them.
PROTOCOL_MODULES = sorted(p.stem for p in RUNTIME.glob("*.py") if p.stem not in ("__init__", "images"))


def test_protocol_modules_include_the_gates():
    assert {"gates", "protocol", "dcf", "prg", "lib", "session", "transport"} <= set(PROTOCOL_MODULES)


def test_runtime_sources_do_not_import_random():
    """Static check over the protocol's modules: no ``import random``, no numpy.random anywhere."""
    offenders = []
    for path in [RUNTIME / f"{m}.py" for m in PROTOCOL_MODULES] + [Path(simulation.__file__)]:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad = [
                    a.name
                    for a in node.names
                    if a.name in ("random", "numpy.random") or a.name.startswith("numpy.random.")
                ]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                bad = (
                    [mod]
                    if mod in ("random", "numpy.random")
                    or mod.startswith("numpy.random.")
                    or (mod == "numpy" and any(a.name == "random" for a in node.names))
                    else []
                )
            elif isinstance(node, ast.Attribute) and node.attr == "random":
                bad = (
                    [ast.unparse(node)] if isinstance(node.value, ast.Name) and node.value.id in ("np", "numpy") else []
                )
            else:
                bad = []
            offenders += [f"{path.name}:{node.lineno}: {b}" for b in bad]
    assert not offenders, offenders


@pytest.fixture
def forbid_random(monkeypatch):
    """``activate()`` makes every public callable of numpy.random (functions, default_rng, Generator,
    the bit generators, RandomState) and of Python's random module raise; ``calls`` records attempts
    (in case a caller swallows the exception). Undone at teardown."""
    import numpy.random.mtrand as mtrand

    calls: list[str] = []

    def forbidden(name):
        def boom(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called: fssc must draw randomness from os.urandom-seeded AES only")

        return boom

    def activate():
        for mod, label in ((np.random, "numpy.random"), (mtrand, "numpy.random.mtrand"), (random, "random")):
            for name in dir(mod):
                obj = getattr(mod, name)
                if name.startswith("_") or not callable(obj) or isinstance(obj, type(os)):
                    continue
                monkeypatch.setattr(mod, name, forbidden(f"{label}.{name}"))
        with pytest.raises(AssertionError):  # the patch is live
            np.random.default_rng(0)
        with pytest.raises(AssertionError):
            np.random.rand(3)
        with pytest.raises(AssertionError):
            random.getrandbits(8)
        calls.clear()

    return activate, calls


def _other_gates(ctx, v):
    """The gate classes the assertions below do not check by value, run for their randomness only."""
    window = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1], "ceil_mode": 0}
    return (
        ctx.gate(gates.Trunc, "e", v, 24, 5),
        gates.Clip.run(ctx, "f", v, lo=5, hi=100, m=24),
        gates.ArgMax.run(ctx, "g", v.reshape(100, 5), axis=1, keepdims=0, select_last=0, m=30),
        gates.MaxPool.run(ctx, "h", v.reshape(1, 5, 10, 10), m=30, **window),
        ctx.gate(gates.HMul, "i", v.reshape(100, 5), v[:5].copy()),
        ctx.gate(gates.Spline, "j", v, 24, _SPLINE),
        gates.LayerNorm.run(ctx, "k", v.reshape(50, 10), **_LAYERNORM),
    )


# a cubic spline with a linear tail: three pieces, two knots in range (one Z_2 DCF key per element, two fresh
# selection bits r_j and their words r_j r^i), so the dealer draws every kind of randomness the gate uses
_SPLINE = gates.SplineSpec((-100, 100), (0, 0, 0), ((0,) * 4, (1, 2, 3, 4), (0,) * 4), (0, 0, 1), 8, 40)


# a layer normalization over rows of 10 (input scale 15, |C x - sum x| < 2^29): every stage deals keys
_LAYERNORM = gates.LayerNorm.params(splines.layernorm_plan(10, 15, 30, 1e-5, 12))


def _every_gate():
    """A dealer and a party function that deal and run every gate class and a linear layer on 500 values from
    fresh masks; returns (dealer, party, (r, xhat, w))."""
    r, xhat, rb, bhat = (Rng().u64(500) for _ in range(4))
    a_mask, w = Rng().u64((500, 3)), ring.unsigned(np.full((500, 3), -7, dtype=np.int64))

    def dealer(D):
        seeds = D.linear_seeds("d")
        return (
            D.gate(gates.Relu, "a", r, 24, 12),
            D.gate(gates.Max, "b", r, rb, 30, 3),
            D.gate(gates.ArgMax2, "c", r, 40),
            D.linear("d", _gemm, 500, r[None], a_mask, (1, 3), seeds),
            *_other_gates(D, r),
        )

    def party(P):
        z0 = P.linear_offline("d", _gemm, 500, (1, 500), w + a_mask, (1, 3)) if P.b == 0 else None
        return (
            P.gate(gates.Relu, "a", xhat, 24, 12),
            P.gate(gates.Max, "b", xhat, bhat, 30, 3),
            P.gate(gates.ArgMax2, "c", xhat, 40),
            P.linear("d", xhat[None], _gemm, 500, w, None, 64, z0=z0),
            *_other_gates(P, xhat),
        )

    return dealer, party, (r, xhat, w)


def test_gates_without_numpy_or_python_random(forbid_random):
    """Every gate class (and DCFs and a linear layer) dealt and run with numpy.random and random raising."""
    assert {g.__name__ for g in gates.STATEMENTS.values()} <= {
        "Relu",
        "Max",
        "ArgMax2",
        "Trunc",
        "Clip",
        "ArgMax",
        "MaxPool",
        "HMul",
        "Spline",
        "LayerNorm",
    }
    activate, calls = forbid_random
    activate()
    # DCF keygen and evaluation
    alpha, xs = Rng().u64(1000, 20), Rng().u64(1000, 20)
    k0, k1 = dcf.keygen(alpha, 20)
    assert ((dcf.evaluate(0, k0, xs) ^ dcf.evaluate(1, k1, xs)) == (xs < alpha)).all()
    # comparison gates and a linear layer, dealt and run by the two parties
    dealer, party, (r, xhat, w) = _every_gate()
    (ro_a, _, _, ro_d, *_), k0, k1 = deal_in_memory(dealer)
    out0, out1, _, _ = run_parties(party, party, k0, k1)
    t = (((xhat - r) >> U64(12)) << U64(40)).view(np.int64) >> np.int64(40)  # floor(x / 2^12), 24-bit signed
    ok = (t > -(1 << 23)) & (t < (1 << 23) - 1)  # the gate's range (all but ~2^-22 of uniform x)
    assert ok.sum() > 490 and (out0[0] - ro_a == ring.unsigned(np.maximum(t, 0)))[ok].all()
    assert (out0[3] - ro_d == (xhat - r)[None] @ w).all()
    assert out1[2] is None
    assert not calls, calls


def test_whole_model_without_numpy_or_python_random(forbid_random):
    """A small compiled CNN (conv, batchnorm, ReLU, MaxPool, residual add, Gemm, ArgMax) is dealt and run
    with numpy.random and random raising. Compiling comes first: the exporter is not under test."""
    from fssc.compiler.reference.interp import run_fixed
    from tiny_models import tiny_cnn

    graph, _, x = tiny_cnn(batch=2, size=12)
    activate, calls = forbid_random
    activate()
    sim = simulate(graph, x)
    assert not calls, calls
    want = run_fixed(graph, x, raw=True)
    assert all((a == b).all() for a, b in zip(sim.outputs, want, strict=True))


# ----------------------------------------------------------------- no stale memory in keys or messages
def _garbage_empty(monkeypatch, byte: int) -> None:
    """Every np.empty / np.empty_like called from Python returns memory filled with ``byte`` (what reused heap
    memory holds is whatever was there: fssc/runtime/heap.py keeps freed blocks for reuse)."""
    empty, empty_like = np.empty, np.empty_like

    def fill(a):
        if a.size and (a.flags.c_contiguous or a.flags.f_contiguous):
            a.reshape(-1, order="A").view(np.uint8)[:] = byte  # a view of a contiguous array: fills it
        return a

    monkeypatch.setattr(np, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(np, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def _fixed_run(monkeypatch) -> list:
    """Keys and every received message of: every gate class; DCF keys and their shares under both walks with
    Z_2 and ring payloads (several blocks, evaluated on two threads); and a compiled CNN's deal and session under
    both walks. os.urandom is a fixed stream, so the same code gives the same bytes."""
    from tiny_models import tiny_cnn

    stream = itertools.count()
    monkeypatch.setattr(os, "urandom", lambda n: hashlib.shake_128(b"%d" % next(stream)).digest(n))
    dealer, party, _ = _every_gate()
    _, k0, k1 = deal_in_memory(dealer)
    _, _, c0, c1 = run_parties(party, party, k0, k1, record=True)
    out = [k0, k1, c0.received, c1.received]
    graph, _, x = tiny_cnn(batch=2, size=12)
    before = dcf.current_walk()
    try:
        for walk in (dcf.NUMPY, dcf.COMPILED):
            dcf.set_walk(walk)
            for n, k in [(9, 0), (37, 0), (20, 1), (33, 2)]:
                alpha = Rng().u64(dcf.BLOCK + 77, n)
                beta = Rng().bits(len(alpha)) if k == 0 else Rng().u64((len(alpha), k))
                keys = dcf.keygen(alpha, n, beta)
                xs = Rng().u64(len(alpha), n)
                out += [key.to_bytes() for key in keys]
                out += [dcf.evaluate(key.party, key, xs, threads=2).tobytes() for key in keys]
            monkeypatch.setenv(dcf.WALK_ENV, walk)
            sim = simulate(graph, x, record=True)
            out += [*sim.keys, sim.channels[0].received, sim.channels[1].received]
    finally:
        dcf.set_walk(before)
    return out


_FIXED_RUN = """
import hashlib, sys
sys.path.insert(0, sys.argv[2])
from _pytest.monkeypatch import MonkeyPatch
import test_security
from fssc.runtime.heap import keep_freed_memory
keep_freed_memory()
m = MonkeyPatch()
if int(sys.argv[1]):
    test_security._garbage_empty(m, int(sys.argv[1]))
for item in test_security._fixed_run(m):
    data = item if isinstance(item, bytes) else b"".join(item)  # a key stream, or the messages a party received
    print(hashlib.sha256(data).hexdigest(), len(item))
"""


def test_no_unwritten_memory_reaches_a_key_or_a_message():
    """Reused memory is not zeroed, so the dealer and the parties must fill every array they write to a key
    file or send. In fresh processes under the runtime's memory policy, run once plainly and twice with every
    np.empty pre-filled with garbage and glibc's allocations perturbed (MALLOC_PERTURB_: 0x5A, then 0xC3), the
    same fixed randomness gives the same key bytes and the same messages, byte for byte."""

    def run(byte: int) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_PERTURB_"}  # the plain run is plain
        if byte:
            env["MALLOC_PERTURB_"] = str(byte)
        cmd = [sys.executable, "-c", _FIXED_RUN, str(byte), str(Path(__file__).parent)]
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.splitlines()

    run(0)  # discarded: a cold numba cache writes its files under names from os.urandom, shifting the fixed stream
    want = run(0)
    assert len(want) > 20 and all(int(line.split()[1]) > 0 for line in want)  # keys and messages were recorded
    for byte in (0x5A, 0xC3):
        got = run(byte)
        bad = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
        assert not bad, f"items {bad} of the run differ with memory pre-filled with {byte:#x}"
