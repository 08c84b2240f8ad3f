"""No silent wrong answers: the input guard, --margin-bits / --bits full, --verify.

The scaled-input experiment at small size: ResNet-18 (2 classes, random BN-calibrated weights) at
32x32, batch 2, compiled with the default calibration. Inputs are drawn from the calibration
distribution (``synthetic_inputs``, another seed) and scaled by 4, a factor at which programs without
these checks gave wrong labels and exited 0. Oracles: onnxruntime, the manifest's recorded ranges, and
the fixed-point interpreter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fssc.compiler.backend.gates import bits_for, widest_bits
from fssc.compiler.compile import compile_graph, full_bits_report, input_guard
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.reference.crosscheck import VERIFY_SEED
from fssc.passes.base import DEFAULT_MARGIN_BITS
from fssc.passes.range_analysis import default_calibration
from fssc.runtime import lib, ring
from fssc.runtime.guard import out_of_range
from fssc.runtime.results import read_results
from parties import run_p0, start_p1, stop

from fssc import cli

SIZE, BATCH = 32, 2


@pytest.fixture(scope="module")
def model(export_resnet18) -> Path:
    return export_resnet18(SIZE, BATCH)


def inputs(scale: float, batches: int = 2) -> np.ndarray:
    """Images from the calibration distribution (not its batches), times ``scale``."""
    xs = default_calibration((BATCH, 3, SIZE, SIZE), batches, seed=VERIFY_SEED)
    return np.concatenate(xs) * np.float32(scale)


def _program(out: dict, name: str, model: Path, run_fssc, *options) -> None:
    """Compile ``model`` with ``options`` into out[name] = (program folder, keys folder with two batches)."""
    prog, keys = out["tmp"] / f"prog-{name}", out["tmp"] / f"keys-{name}"
    r = run_fssc("compile", model, "-o", prog, *options)
    assert r.returncode == 0, r.stderr
    r = run_fssc("deal", prog, "--batches", 2, "-o", keys)
    assert r.returncode == 0, r.stderr
    out[name] = (prog, keys)


@pytest.fixture(scope="module")
def flow(tmp_path_factory, model, run_fssc):
    """The default program, certificates, key batches, the x4 inputs (``full``: the --bits full program)."""
    tmp = tmp_path_factory.mktemp("accuracy")
    out = {"tmp": tmp, "certs": tmp / "certs"}
    assert run_fssc("certs", "-o", out["certs"]).returncode == 0
    _program(out, "default", model, run_fssc)
    x4 = inputs(4)
    np.save(tmp / "x4.npy", x4)
    out["x4"] = x4
    return out


@pytest.fixture(scope="module")
def full(flow, model, run_fssc):
    """``flow`` with the --bits full program revealing logits."""
    _program(flow, "full", model, run_fssc, "--bits", "full", "--output-mode", "logits")
    return flow


def _run_two_parties(flow, name: str, *p0_args, timeout: int = 300):
    """Both party programs as processes on one batch; returns the data owner's CompletedProcess."""
    prog, keys = flow[name]
    p1, port = start_p1(prog, keys, flow["certs"], flow["tmp"], timeout=timeout)
    try:
        return run_p0(prog, keys, flow["certs"], port, *p0_args, timeout=timeout)
    finally:
        stop(p1, 120)


def test_guard_refuses_inputs_four_times_the_calibrated_scale(flow):
    """The data owner's real program refuses x4 inputs in one line, exit 2, before it connects or uses keys."""
    prog, keys = flow["default"]
    man = json.loads((prog / "manifest.json").read_text())
    spec = man["input_guard"]["inputs"][0]
    s = spec["scale"]
    # nothing listens on the peer address: the guard must speak before any connection is tried
    r = run_p0(prog, keys, flow["certs"], 9, "--input", flow["tmp"] / "x4.npy")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("fssc party0: error: input %input: ")
    x4 = flow["x4"]
    assert f"[{x4.min():.4g}, {x4.max():.4g}]" in line, "the observed range"
    a = spec["allowed_max_abs"] / 2.0**s
    assert f"[{-a:.4g}, {a:.4g}]" in line, "the allowed range"
    for fix in ("--calibrate", "--margin-bits", "--bits full", "--allow-out-of-range"):
        assert fix in line
    assert r.stdout == ""
    assert not list((keys / "p0").glob("*.used")), "no key batch was used"
    # the allowed range is the calibrated one times the headroom the rule leaves, and x4 lies outside it
    cal = spec["calibrated_max_abs"] / 2.0**s
    assert a == cal * 2.0 ** max(0, man["input_guard"]["headroom_bits"] - 2)
    assert np.abs(x4).max() > a


@pytest.mark.slow
def test_allow_out_of_range_with_bits_full_matches_onnxruntime(full, model):
    """--bits full holds x4 inputs: the secure labels equal onnxruntime's and the logits stay within
    fixed-point error (at margin 2 the same inputs move them by tens: docs/accuracy.md)."""
    flow = full
    out = flow["tmp"] / "full.jsonl"
    r = _run_two_parties(flow, "full", "--input", flow["tmp"] / "x4.npy", "--allow-out-of-range", "--out", out)
    assert r.returncode == 0, r.stderr
    recs = read_results(str(out))
    x4 = flow["x4"]
    ref = np.concatenate([ort.InferenceSession(str(model)).run(None, {"input": x})[0] for x in np.split(x4, 2)])
    assert [rec["label"] for rec in recs] == ref.argmax(axis=1).tolist()
    logits = np.array([rec["logits"] for rec in recs])
    assert np.abs(logits - ref).max() < 0.1, "x4 logits (tens in magnitude) within fixed-point error"


def test_allow_out_of_range_runs_with_a_warning(flow):
    """The default program with --allow-out-of-range: it runs (exit 0) and says on stderr that it should not."""
    out = flow["tmp"] / "default.jsonl"
    r = _run_two_parties(flow, "default", "--input", flow["tmp"] / "x4.npy", "--allow-out-of-range", "--out", out)
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "input %input" in warn[0] and "--allow-out-of-range" in warn[0]
    assert len(read_results(str(out))) == len(flow["x4"])


def test_guard_accepts_the_calibration_distribution(flow):
    """Unseen inputs of the calibration's own range pass under the default margin (the default program's
    manifest, what the data owner's program checks); x4 does not."""
    guard = json.loads((flow["default"][0] / "manifest.json").read_text())
    s = guard["input_guard"]["inputs"][0]["scale"]
    x1 = inputs(1, batches=8)
    for i in range(len(x1)):
        assert out_of_range(guard, "input", ring.encode(x1[i : i + 1], s), ["x"]) is None, f"image {i}"
    assert out_of_range(guard, "input", ring.encode(x1 * 4, s), [str(i) for i in range(len(x1))]) is not None


def test_guard_boundary_is_inclusive_in_ring_units():
    spec = {"name": "x", "scale": 4, "calibrated_max_abs": 5 * 16, "allowed_max_abs": 10 * 16}
    guard = {"input_guard": {"headroom_bits": 3, "inputs": [spec]}}
    at = ring.encode(np.array([[10.0, -10.0]]), 4)
    assert out_of_range(guard, "x", at, ["a"]) is None
    over = ring.encode(np.array([[10.0 + 1 / 16, 0.0]]), 4)
    msg = out_of_range(guard, "x", over, ["a"])
    assert msg.startswith("input %x: a has values in [0, 10.06]") and "[-10, 10]" in msg
    assert out_of_range(guard, "y", over, ["a"]) is None, "an input the manifest does not list is not guarded"


# ------------------------------------------------------------------------ --margin-bits, --bits full
def test_bits_full_and_margins_price_and_plan_every_comparison(model):
    g = import_onnx(str(model))
    res = {k: compile_graph(g.clone(), echo=lambda s: None, margin_bits=k) for k in (2, 4)}
    full = compile_graph(g.clone(), echo=lambda s: None, bits="full")
    ranges = res[2].ctx.ranges.comparisons
    for op in full.graph.ops:
        if op.gate:
            shift = op.attrs.get("trunc") or op.attrs.get("shift") or 0
            assert op.gate["bits"] == widest_bits(op) == 64 - shift
    for op, op4 in zip(res[2].graph.ops, res[4].graph.ops, strict=True):
        if op.gate:
            assert op.gate["bits"] == min(widest_bits(op), bits_for(ranges[op.uid].magnitude) + 2)
            assert op4.gate["bits"] == min(widest_bits(op), op.gate["bits"] + 2)
    totals = [r.report.to_dict()["totals"] for r in (res[2], res[4], full)]
    assert totals[0]["key_bytes_p0"] < totals[1]["key_bytes_p0"] < totals[2]["key_bytes_p0"]
    # the report's "next to --bits full" figures are what compiling with --bits full gives
    assert full_bits_report(res[2]).to_dict()["totals"] == totals[2]
    # per comparison: the calibrated maximum and the headroom, in the report
    gated = [(op, c) for op, c in zip(res[4].graph.ops, res[4].report.ops, strict=True) if op.gate]
    assert gated and all(c.headroom == 4 for op, c in gated if c.bits < widest_bits(op))
    assert all(c.calibrated == ranges[op.uid].magnitude for op, c in gated)
    assert input_guard(res[4])["headroom_bits"] == 4 and input_guard(full)["headroom_bits"] > 20


@pytest.mark.slow  # a --bits full compile of ResNet-18
def test_compile_report_shows_headroom_and_bits_full_cost(tmp_path, run_fssc, model):
    r = run_fssc("compile", model, "-o", tmp_path / "p", "--margin-bits", 3)
    assert r.returncode == 0, r.stderr
    assert "calib max" in r.stdout and "headroom" in r.stdout
    assert "--margin-bits 3 (smallest headroom 3 bits" in r.stdout and "with --bits full" in r.stdout
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["margin_bits"] == 3 and rep["bits"] == "range"
    assert rep["totals_bits_full"]["key_bytes_p1"] > rep["totals"]["key_bytes_p1"]
    assert {o["headroom"] for o in rep["ops"] if o["gate"] and o["bits"] < 60} == {3}
    man = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert man["input_guard"]["margin_bits"] == 3 and "comparisons" not in man["input_guard"]
    r = run_fssc("compile", model, "-o", tmp_path / "q", "--bits", "full", "--margin-bits", 2)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--margin-bits" in r.stderr
    assert not (tmp_path / "q" / "manifest.json").exists()


def test_default_margin_is_the_documented_one():
    doc = (Path(__file__).parents[1] / "docs" / "accuracy.md").read_text()
    assert f"default is {DEFAULT_MARGIN_BITS} bits" in doc


# ------------------------------------------------------------------------ --verify
def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_verify_passes_on_a_correct_program(tmp_path, model, capsys):
    code, out, err = _cli(["compile", str(model), "-o", str(tmp_path / "p"), "--verify", "4"], capsys)
    assert code == 0, err
    assert "verify: 4 input(s)" in out
    for pair in ("onnxruntime vs fixed point", "onnxruntime vs secure", "fixed point vs secure"):
        line = next(ln for ln in out.splitlines() if pair in ln)
        assert "labels agree 4/4" in line
    assert "fixed point vs secure: max |logit diff| 0," in out
    assert "overflowing comparisons: 0" in out and "secure run == fixed-point interpreter: exact" in out
    assert (tmp_path / "p" / "manifest.json").exists()


def test_verify_fails_on_a_broken_gate_and_writes_nothing(tmp_path, model, capsys, monkeypatch):
    """One bit flipped in the ReLU gate's opened output (both parties): a miscompile --verify must catch."""
    relu = lib.relu

    def broken(ctx, tag, x, m, trunc=0):
        y = relu(ctx, tag, x, m, trunc)
        return y ^ np.uint64(1) if not isinstance(ctx, lib.Dealer) else y

    monkeypatch.setattr(lib, "relu", broken)
    code, out, err = _cli(["compile", str(model), "-o", str(tmp_path / "p"), "--verify", "2"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fssc: error: --verify: the secure run differs")
    assert "no comparison overflows: the generated program is wrong" in lines[0]
    assert "secure run == fixed-point interpreter: NO" in out
    assert not (tmp_path / "p" / "manifest.json").exists() and not (tmp_path / "p" / "party0").exists()


def test_verify_names_overflows_when_inputs_exceed_the_headroom(model):
    """The same check on x4 inputs at margin 2: the secure run leaves the interpreter, and the overflowing
    comparisons are counted and named."""
    from fssc.compiler.reference.crosscheck import cross_check

    res = compile_graph(import_onnx(str(model)), echo=lambda s: None, output_mode="labels", margin_bits=2)
    x = inputs(4, batches=1)
    result = cross_check(res.graph, str(model), [x])
    assert not result.exact and result.overflows
    ops = {op.name for op in res.graph.ops if op.gate}
    assert set(result.overflows) <= ops
    assert all(v.startswith("overflow at ") for v in result.overflows.values())


def test_guard_refuses_what_has_no_encoding():
    """inf, nan and values beyond the ring encode to int64's minimum, whose |.| wraps negative: the guard must
    still call them out of range, and the data owner refuses them whatever --allow-out-of-range says."""
    from fssc.runtime import ring
    from fssc.runtime.guard import out_of_range, unencodable

    manifest = {
        "input_guard": {
            "headroom_bits": 3,
            "inputs": [{"name": "x", "scale": 12, "allowed_max_abs": 6 << 12, "calibrated_max_abs": 3 << 12}],
        }
    }
    names = ["a", "b"]
    ok = np.full((2, 3), 5.0, np.float32)
    assert out_of_range(manifest, "x", ring.encode(ok, 12), names) is None
    assert unencodable(ok, 12, names) is None
    for bad in (10.0, 1e30, -1e30, np.inf, np.nan):
        x = ok.copy()
        x[1, 2] = bad
        with np.errstate(invalid="ignore", over="ignore"):
            enc = ring.encode(x, 12)
        assert out_of_range(manifest, "x", enc, names) is not None, bad
        if not np.isfinite(bad) or abs(bad) > 1e20:
            msg = unencodable(x, 12, names)
            assert msg is not None and msg.startswith("b "), (bad, msg)
