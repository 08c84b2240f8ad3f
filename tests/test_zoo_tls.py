"""Three zoo families end to end as two processes over mutual TLS on loopback.

mobilenet_v3_small (HardSwish, HardSigmoid, squeeze-excitation), efficientnet_b0 (Sigmoid, SiLU) and
convnext_tiny (LayerNormalization, GELU, MatMul) take the path a user takes: ``fssc export``'s file
(:func:`test_zoo._export`, the zoo matrix's fssc leg) at the smallest size each architecture takes
(``SMALLEST``: 8, 8 and 32), batch 2; ``fssc compile --output-mode logits`` with the family's fractional and
weight bits from ``test_zoo.ZOO``; ``fssc certs``; ``fssc deal`` (one key batch on disk); the model
owner's program listening on 127.0.0.1 and the data owner's connecting, both through ``fssc run`` with
the test images as ``--input x.npy``. The data owner's results file must hold the fixed-point
interpreter's logits bit for bit, and agree with onnxruntime by the zoo matrix's rule
(:func:`test_zoo.check_against_onnxruntime`: logits within 0.02 x the logit scale, labels equal on the
rows whose top-two margin is at least that); the model owner prints no result.

Slow: each family takes tens of seconds (export, two compiles, a deal, the session).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.reference.interp import run_fixed
from fssc.models.export import synthetic_images
from fssc.runtime.loopback import party_env
from fssc.runtime.results import read_results
from parties import run_p0, start_p1, stop
from test_export_families import SMALLEST
from test_zoo import (
    BATCH,
    INPUT_SEED,
    ZOO,
    _export,
    _one_torch_thread,  # noqa: F401 (test_zoo's autouse fixture: torch on one thread here too)
    _ort,
    check_against_onnxruntime,
)

FAMILIES = ("convnext_tiny", "efficientnet_b0", "mobilenet_v3_small")


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_zoo_family_over_tls_tracks_onnxruntime(name, run_fssc, tmp_path):
    try:
        _run_over_tls(name, run_fssc, tmp_path)
    finally:  # the key batch is up to 1 GB (convnext_tiny: 416 MB for P0, 520 MB for P1)
        shutil.rmtree(tmp_path, ignore_errors=True)


def _run_over_tls(name: str, run_fssc, tmp_path) -> None:
    family, size = ZOO[name], SMALLEST[name]
    onnx_path = tmp_path / f"{name}.onnx"
    _export(name, "fssc", str(onnx_path), size)
    prog, certs, keys = tmp_path / "prog", tmp_path / "certs", tmp_path / "keys"
    bits = ["--frac-bits", family.frac_bits, "--weight-bound-bits", family.weight_bound_bits]
    r = run_fssc("compile", onnx_path, "-o", prog, "--output-mode", "logits", *bits, timeout=600)
    assert r.returncode == 0, r.stderr
    r = run_fssc("certs", "-o", certs)
    assert r.returncode == 0, r.stderr
    r = run_fssc("deal", prog, "--batches", 1, "-o", keys, timeout=600)
    assert r.returncode == 0, r.stderr

    x = synthetic_images(BATCH, size, seed=INPUT_SEED).numpy()
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.jsonl"
    env = party_env()
    p1, port = start_p1(prog, keys, certs, tmp_path, env=env)
    try:
        r0 = run_p0(prog, keys, certs, port, "--input", tmp_path / "x.npy", "--out", out, "--output", "logits", env=env)
    finally:
        out1, err1 = stop(p1, 120)
    assert r0.returncode == 0, r0.stderr
    assert p1.returncode == 0, err1
    assert "label" not in out1 and "logits" not in out1, "the model owner prints nothing about results"

    res = read_results(str(out))
    assert [r["input"] for r in res] == [f"{tmp_path / 'x.npy'}[{i}]" for i in range(BATCH)]
    secure = np.array([r["logits"] for r in res])
    assert [r["label"] for r in res] == list(secure.argmax(1))
    fixed = run_fixed(
        compile_graph(
            import_onnx(str(onnx_path), name),
            frac_bits=family.frac_bits,
            echo=lambda s: None,
            output_mode="logits",
            weight_bound_bits=family.weight_bound_bits,
        ).graph,
        x,
    )[0]
    assert (secure == fixed).all(), f"the secure run is {np.abs(secure - fixed).max()} off the interpreter"
    summary = check_against_onnxruntime(secure, _ort(str(onnx_path), x))
    print(f"\n{name} {size}x{size} over TLS: {summary}")
