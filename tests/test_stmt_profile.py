"""FSSC_PROFILE (fssc.runtime.stmt_profile): each role's statements timed with their rounds and bytes; off,
lib's functions are the plain ones. Figures are checked for what they count, never for a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from fssc.runtime import lib
    from fssc.runtime.simulate import deal_in_memory, run_parties

    x = (np.arange(12, dtype=np.int64) - 6).reshape(2, 6).view(np.uint64)

    def program(ctx, x=None):
        v = lib.input_wire(ctx, tag="in", shape=[2, 6], x=x) if x is not None else lib.input_wire(ctx, "in", [2, 6])
        v = lib.add(a=v, b=v)
        v = lib.relu(ctx, tag="op1", x=v, m=8)
        return lib.output(ctx, tag="out", v=v)

    _, k0, k1 = deal_in_memory(program)
    y, _, c0, c1 = run_parties(lambda P: program(P, x), lambda P: program(P), k0, k1)
    print(repr(lib.relu.__wrapped__ is not None if hasattr(lib.relu, "__wrapped__") else None))
    print(y.view(np.int64).tolist(), c0.rounds, c0.bytes_sent, c1.bytes_sent)
    """
)


def _run(env: dict) -> list[str]:
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_profile_off_leaves_lib_alone():
    env = {k: v for k, v in os.environ.items() if k != "FSSC_PROFILE"}
    wrapped, result = _run(env)
    assert wrapped == "None"
    assert json.loads(result.split("]]")[0] + "]]") == np.maximum(2 * (np.arange(12) - 6), 0).reshape(2, 6).tolist()


def test_profile_on_counts_each_roles_statements(tmp_path):
    wrapped, result = _run({**os.environ, "FSSC_PROFILE": str(tmp_path)})
    assert wrapped == "True"
    rounds, sent0, sent1 = (int(v) for v in result.split("]]")[1].split())
    files = {name.split("-")[0]: json.loads((tmp_path / name).read_text()) for name in os.listdir(tmp_path)}
    assert sorted(files) == ["dealer", "party0", "party1"]
    for role, sent in (("party0", sent0), ("party1", sent1)):
        rows = {(r["fn"], r["tag"]): r for r in files[role]["statements"]}
        assert set(rows) == {("input_wire", "in"), ("add", ""), ("relu", "op1"), ("output", "out")}
        assert sum(r["rounds"] for r in rows.values()) == rounds == 3  # the input, then ReLU's two rounds
        assert rows[("relu", "op1")]["rounds"] == 2 and rows[("relu", "op1")]["calls"] == 1
        assert sum(r["sent"] for r in rows.values()) == sent
        assert all(
            r["phase"] == "online" and 0 <= r["wait_s"] <= r["wall_s"] and r["cpu_s"] >= 0 for r in rows.values()
        )
    dealt = {(r["fn"], r["tag"]): r for r in files["dealer"]["statements"]}
    assert dealt[("relu", "op1")]["key_bytes"] > 0 and dealt[("relu", "op1")]["phase"] == "deal"
