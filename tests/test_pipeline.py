"""The pass pipeline on ResNet-18, the pass manager and ``fssc compile``.

Model: ResNet-18 exported by ``models.export.export_model`` at 224x224, batch
2, two classes (random weights, BN calibrated), from conftest's session cache.
Gate counts do not depend on weights or calibration, only on the graph.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from fssc.compiler.backend.cost import cost_report
from fssc.compiler.compile import compile_graph
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.ir.graph import Value
from fssc.passes import (
    canonicalize,
    fold_batchnorm,
    lower_maxpool,
    mark_comparisons,
    plan_fixed_point,
    range_analysis,
    reorder_maxpool_relu,
)
from fssc.passes.base import (
    CANONICAL,
    COMPARISONS_MARKED,
    FIXED_POINT,
    NO_BATCHNORM,
    NO_SOFTMAX,
    PROPERTIES,
    RANGES,
    PassContext,
    PassResult,
)
from fssc.passes.manager import PIPELINE, check_order, contract, pass_names, run_pipeline
from fssc.runtime.images import synthetic_inputs
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from fssc.errors import FsscError, VerifyError

# ResNet-18 at 224x224, per image: gate counts of this pipeline (docs/cost-model.md, docs/protocol.md) and the
# comparisons of PySyft's FSS demo, the baseline
RELU_GATES = 1_705_984
RELU_GATES_WITHOUT_REORDER = 2_308_096
STEM_MAXPOOL_MAX_GATES = 1_210_000
ALL_COMPARISONS = 2_920_000
PYSYFT_COMPARISONS = 3_311_620


@pytest.fixture(scope="module")
def compiled(r18):
    return compile_graph(import_onnx(str(r18)), echo=lambda s: None)


def per_image(report, kind):
    return report.gates_by_kind().get(kind, 0) / report.batch


def fssc_cmd(*args) -> list[str]:
    exe = Path(sys.executable).with_name("fssc")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "fssc.cli", *args]


# --------------------------------------------------------------------------- ResNet-18 figures
@pytest.mark.slow
def test_no_batchnorm_remains(r18, compiled):
    imported = import_onnx(str(r18))
    assert sum(op.kind == "batchnorm" for op in imported.ops) == 20
    kinds = {op.kind for op in compiled.graph.ops}
    assert "batchnorm" not in kinds
    assert "affine" not in kinds  # every ResNet-18 BN follows a conv with one user: all fold


@pytest.mark.slow
def test_relu_gates_per_image(compiled):
    assert compiled.report.batch == 2
    assert per_image(compiled.report, "relu") == RELU_GATES


@pytest.mark.slow
def test_relu_gates_per_image_without_the_reorder_pass(r18):
    ctx = PassContext(calibration=synthetic_inputs((2, 3, 224, 224), 1, seed=1))  # counts need no calibration
    passes = [p for p in PIPELINE if p is not reorder_maxpool_relu]
    g, _ = run_pipeline(import_onnx(str(r18)), ctx, passes=passes, echo=lambda s: None)
    rep = cost_report(g)
    assert per_image(rep, "relu") == RELU_GATES_WITHOUT_REORDER
    # the stem's ReLU: 802,816 elements before the swap, 200,704 after it
    stem = [op for op in g.ops if op.kind == "relu" and any(o == "/relu/Relu" for o in op.origin)]
    assert [op.gate["per_image"] for op in stem] == [64 * 112 * 112]


@pytest.mark.slow
def test_stem_maxpool_and_reordered_relu(compiled):
    g = compiled.graph
    stem = [op for op in g.ops if "/maxpool/MaxPool" in op.origin]
    pools = [op for op in stem if op.kind == "maxpool"]
    assert len(pools) == 2  # lowered: a 1x3 and a 3x1 pass
    max_gates = sum(op.gate["per_image"] for op in pools)
    assert max_gates <= STEM_MAXPOOL_MAX_GATES
    # 112x112 -> 56x56, 3x3/2 pad 1 per channel: 6 gates per output less one per border window
    assert max_gates == 64 * (6 * 56 * 56 - 3 * 56) == 1_193_472
    relu = next(op for op in g.ops if op.kind == "relu" and "/relu/Relu" in op.origin)
    assert relu.gate["per_image"] == 64 * 56 * 56 == 200_704
    assert g.ops.index(relu) > max(g.ops.index(p) for p in pools)


@pytest.mark.slow
def test_all_comparison_gates_per_image(compiled):
    rep = compiled.report
    total = rep.total("gates") / rep.batch
    assert total == RELU_GATES + 64 * (6 * 56 * 56 - 3 * 56) == 2_899_456  # the ReLUs and the stem pool, no more
    assert total <= ALL_COMPARISONS < PYSYFT_COMPARISONS
    assert set(rep.gates_by_kind()) == {"relu", "max"}
    assert per_image(rep, "max") <= STEM_MAXPOOL_MAX_GATES  # the stem pool is the only max


@pytest.mark.slow
def test_every_pass_ran_verified_timed_and_changed_the_resnet(compiled):
    recs = compiled.records
    assert [r.name for r in recs] == ["import"] + pass_names()
    assert [r.index for r in recs] == list(range(len(recs)))
    assert all(r.modified for r in recs if r.name != "expand-softmax")  # ResNet-18 has no softmax to expand
    assert recs[-1].text == compiled.graph.text()  # the last record is the graph the compile returns
    rep = compiled.report.to_dict()["totals"]
    assert rep["key_bytes_p0"] > 0 and rep["key_bytes_p1"] > rep["key_bytes_p0"]
    assert rep["rounds"] < 100


# --------------------------------------------------------------------------- fssc compile CLI
@pytest.mark.slow
def test_dump_ir_is_byte_identical_across_runs_and_print_ir_after(r18, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [
        subprocess.Popen(
            fssc_cmd(
                "compile",
                str(r18),
                "-o",
                str(o),
                "--dump-ir",
                "--print-ir-after",
                "fold-batchnorm",
                "--json",
                str(o) + ".json",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for o in outs
    ]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err
        # printed exactly once, after the named pass: BN folded, nothing later (no scales yet)
        assert out.count("// ----- IR after") == 1 and "// ----- IR after fold-batchnorm -----" in out
        printed = out.split("// ----- IR after fold-batchnorm -----", 1)[1]
        assert f"graph {r18.stem} {{" in printed and "= batchnorm(" not in printed
        assert "{s=" not in printed.split("\n}\n", 1)[0]
    a, b = outs
    names = sorted(n for n in os.listdir(a / "ir") if n.endswith(".txt"))
    assert names == [f"{i:02d}-{n}.txt" for i, n in enumerate(["import"] + pass_names())]
    # every file is byte-identical except the pass timings the viewer shows (ir/timings.js)
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name != "timings.js")
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name != "timings.js")
    assert files_a == files_b and {"report.json", "report.txt", "ir/index.html"} <= set(files_a)
    assert (a / "ir" / "timings.js").exists() and (b / "ir" / "timings.js").exists()
    _match, mismatch, errors = filecmp.cmpfiles(a, b, files_a, shallow=False)
    assert (mismatch, errors) == ([], [])
    assert (
        Path(str(a) + ".json").read_bytes() == (a / "report.json").read_bytes() == Path(str(b) + ".json").read_bytes()
    )
    # the dumps are the pass manager's text form: the last one is the final IR, every gate marked
    final = (a / "ir" / names[-1]).read_text()
    sites = [ln for ln in final.splitlines() if any(f" = {k}(" in ln for k in ("relu", "maxpool", "argmax", "clip"))]
    assert len(sites) >= 17 + 2 and all(" gate{" in ln for ln in sites)


def tiny_model_file(tmp_path) -> Path:
    """conv -> relu -> flatten -> gemm: logits [2, 3]."""
    nodes = [
        oh.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c"], ["r"]),
        oh.make_node("Flatten", ["r"], ["f"]),
        oh.make_node("Gemm", ["f", "V"], ["y"]),
    ]
    rng = np.random.default_rng(0)
    graph = oh.make_graph(
        nodes,
        "tiny",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [
            nh.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "W"),
            nh.from_array((rng.standard_normal((256, 3)) * 0.1).astype(np.float32), "V"),
        ],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def test_print_ir_after_unknown_pass_is_a_clean_error(tmp_path):
    model = tiny_model_file(tmp_path)
    p = subprocess.run(
        fssc_cmd("compile", str(model), "-o", str(tmp_path / "prog"), "--print-ir-after", "nope"),
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("fssc: error:")]
    assert len(errors) == 1 and errors[0].startswith("fssc: error: --print-ir-after nope: no such pass")
    assert "fold-batchnorm" in errors[0]  # it lists the passes there are
    assert not (tmp_path / "prog" / "report.json").exists()


def test_compile_options_are_unique():
    """Each option string names one parameter (click warns on every run otherwise)."""
    import click

    from fssc.cli import cli

    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        assert cmd is not None, name
        flags = [f for prm in cmd.params for f in getattr(prm, "opts", []) + getattr(prm, "secondary_opts", [])]
        dup = sorted({f for f in flags if flags.count(f) > 1})
        assert not dup, f"fssc {name}: option(s) {dup} defined twice"


def test_print_ir_after_all_and_changed_flags(tmp_path):
    printed = []
    res = compile_graph(import_onnx(str(tiny_model_file(tmp_path))), print_all=True, echo=printed.append)
    assert [s.splitlines()[0] for s in printed] == [f"// ----- IR after {n} -----" for n in pass_names()]
    changed = {r.name: r.modified for r in res.records}
    # nothing to expand, fold, reorder, lower or scale in conv -> relu -> flatten -> gemm
    assert changed == {
        "import": True,
        "expand-softmax": False,
        "canonicalize": True,
        "fold-batchnorm": False,
        "reorder-maxpool-relu": False,
        "lower-maxpool": False,
        "fold-public-scaling": False,
        "plan-fixed-point": True,
        "range-analysis": True,
        "mark-comparisons": True,
    }
    # what a pass reports is what its IR text shows
    for prev, rec in zip(res.records, res.records[1:], strict=False):
        assert rec.modified == (rec.text != prev.text), rec.name


# --------------------------------------------------------------------------- pass contracts
def test_every_pass_declares_its_contract_and_the_pipeline_keeps_it():
    for p in PIPELINE:
        _, ens, inv = contract(p)
        assert all(isinstance(getattr(p, k), frozenset) for k in ("REQUIRES", "ENSURES", "INVALIDATES")), p.NAME
        assert ens and not (ens & inv), p.NAME
    check_order(PIPELINE)
    assert contract(range_analysis)[0] == {FIXED_POINT} and contract(mark_comparisons)[0] == {RANGES}


@pytest.mark.parametrize(
    "order,missing",
    [
        ([canonicalize, range_analysis, plan_fixed_point], "'range-analysis' requires fixed-point"),
        ([plan_fixed_point, mark_comparisons], "'mark-comparisons' requires ranges"),
        # a rewrite after the plan leaves values without a scale: the plan no longer holds
        ([plan_fixed_point, lower_maxpool, range_analysis], "'range-analysis' requires fixed-point"),
        ([plan_fixed_point, range_analysis, plan_fixed_point, mark_comparisons], "'mark-comparisons' requires ranges"),
    ],
    ids=["analysis-before-plan", "marks-without-ranges", "rewrite-after-plan", "replanned"],
)
def test_a_pipeline_in_the_wrong_order_is_refused_before_anything_runs(tmp_path, order, missing):
    g = import_onnx(str(tiny_model_file(tmp_path)))
    ran = []
    spy = types.SimpleNamespace(NAME="spy", run=lambda g, c: ran.append(1) or PassResult(g, False))
    with pytest.raises(FsscError) as e:
        run_pipeline(g, PassContext(), passes=[spy, *order], echo=lambda s: None)
    msg = str(e.value)
    assert msg.startswith(f"pass {missing}, which no earlier pass ensures") and "\n" not in msg
    assert not ran and g.properties == set()


def test_properties_are_recorded_and_travel_with_the_graph(tmp_path):
    ctx = PassContext()
    g, recs = run_pipeline(import_onnx(str(tiny_model_file(tmp_path))), ctx, echo=lambda s: None)
    assert recs[0].ensured == frozenset() and recs[-1].ensured == PROPERTIES == g.properties
    assert recs[1].ensured == {NO_SOFTMAX} and recs[2].ensured == {NO_SOFTMAX, CANONICAL}
    assert FIXED_POINT not in recs[6].ensured and FIXED_POINT in recs[7].ensured
    assert recs[8].ensured - recs[7].ensured == {RANGES}
    # the compiled graph may be marked again on its own: its ranges are known; nothing changes
    again, recs2 = run_pipeline(g, ctx, passes=[mark_comparisons], echo=lambda s: None)
    assert not recs2[-1].modified and again.text() == g.text()
    # a clone keeps them, a rewrite drops what rests on the plan
    assert g.clone().properties == PROPERTIES
    _, recs3 = run_pipeline(g, ctx, passes=[canonicalize], echo=lambda s: None)
    assert recs3[-1].ensured == PROPERTIES - {FIXED_POINT, RANGES, COMPARISONS_MARKED}


def test_a_pass_that_hides_a_modification_is_refused(tmp_path):
    def liar(g, ctx):
        g.ops[0].created_by = "liar"  # shows in the text form
        return PassResult(g, False)

    g = import_onnx(str(tiny_model_file(tmp_path)))
    with pytest.raises(FsscError, match=r"^pass 'liar' reported no modification but changed the IR$"):
        run_pipeline(g, PassContext(), passes=[types.SimpleNamespace(NAME="liar", run=liar)], echo=lambda s: None)
    with pytest.raises(FsscError, match=r"^pass 'odd' returned int, not a PassResult$"):
        run_pipeline(g, PassContext(), passes=[types.SimpleNamespace(NAME="odd", run=lambda g, c: 1)])
    with pytest.raises(FsscError, match=r"^pass 'typo': unknown property canonicl$"):
        run_pipeline(g, PassContext(), passes=[types.SimpleNamespace(NAME="typo", REQUIRES={"canonicl"})])


def test_a_pass_that_breaks_its_promise_is_refused():
    """ENSURES is checked, not taken on trust: a fold-batchnorm that folds nothing is refused by name."""
    from tiny_models import tiny_cnn

    g = import_onnx(tiny_cnn()[1], "tiny")
    assert any(op.kind == "batchnorm" for op in g.ops)
    idle = types.SimpleNamespace(
        NAME="fold-nothing", ENSURES={NO_BATCHNORM}, run=lambda g, c: PassResult(g, False), check=fold_batchnorm.check
    )
    with pytest.raises(FsscError, match=r"^pass 'fold-nothing' ensures no-batchnorm, but batchnorm %\S+ is left$"):
        run_pipeline(g, PassContext(), passes=[idle], echo=lambda s: None)
    # every real pass's predicate holds on what the pipeline makes
    out, _ = run_pipeline(g, PassContext(), echo=lambda s: None)
    for p in PIPELINE:
        assert getattr(p, "check", lambda g: None)(out) is None, p.NAME


# --------------------------------------------------------------------------- the verifier names the pass
def _dangling(g, ctx):
    g.ops[1].inputs[0] = "nowhere"
    return g


def _wrong_shape(g, ctx):
    g.values[g.ops[0].outputs[0]].shape = (2, 4, 7, 7)
    return g


def _defined_twice(g, ctx):
    op = g.ops[0]
    g.ops.append(g.make_op(op.kind, op.inputs, op.outputs, op.attrs, created_by="break"))
    return g


def _out_of_order(g, ctx):
    g.ops.reverse()
    return g


def _unknown_kind(g, ctx):
    g.ops[1].kind = "no-such-kind"
    return g


def _orphan_output(g, ctx):
    g.add_value(Value("stray", (2, 3)))
    g.outputs = ["stray"]
    return g


@pytest.mark.parametrize(
    "breaker,problem",
    [
        (_dangling, "dangling"),
        (_wrong_shape, "has shape"),
        (_defined_twice, "defined more than once"),
        (_out_of_order, "used before definition"),
        (_unknown_kind, "unknown op kind"),
        (_orphan_output, "never defined"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_a_broken_pass_is_named_by_the_verifier(tmp_path, breaker, problem):
    broken = types.SimpleNamespace(NAME=f"broken{breaker.__name__.replace('_', '-')}", run=breaker)
    g = import_onnx(str(tiny_model_file(tmp_path)))
    with pytest.raises(VerifyError) as e:
        run_pipeline(g, PassContext(), passes=[canonicalize, broken, fold_batchnorm], echo=lambda s: None)
    msg = str(e.value)
    assert f"after pass '{broken.NAME}'" in msg and problem in msg
    assert "canonicalize" not in msg and "fold-batchnorm" not in msg
    # the good passes alone verify fine, and the input graph was not touched by the broken one
    run_pipeline(g, PassContext(), passes=[canonicalize, fold_batchnorm], echo=lambda s: None)


@pytest.mark.slow
def test_a_broken_pass_on_the_resnet_is_named(compiled):
    def drop_an_op(g, ctx):
        del g.ops[3]  # something later reads its output: dangling
        return g

    broken = types.SimpleNamespace(NAME="drop-an-op", run=drop_an_op)
    with pytest.raises(VerifyError, match="after pass 'drop-an-op'"):
        run_pipeline(compiled.graph, PassContext(), passes=[broken], echo=lambda s: None)


def test_print_ir_after_unknown_name_in_the_api(tmp_path):
    g = import_onnx(str(tiny_model_file(tmp_path)))
    with pytest.raises(FsscError, match="no such pass"):
        run_pipeline(g, PassContext(), print_after=("fold-batchnorms",), echo=lambda s: None)


def test_calibrate_from_images_and_npy(tmp_path):
    """--calibrate DIR (images, preprocessed as the manifest says) or an .npy of inputs drives range analysis."""
    from fssc.compiler.demo import _write_images
    from tiny_models import tiny_cnn

    from fssc.errors import FsscError

    _, proto, _ = tiny_cnn(batch=2, size=12)  # the plumbing is the same for any model; this one compiles in 0.1 s
    images = tmp_path / "images"
    _write_images(str(images), 3, 12)  # 3 images -> 2 batches of 2 (the last padded)
    res = compile_graph(import_onnx(proto), calibrate=str(images), echo=lambda s: None)
    assert res.ctx.ranges is not None and res.ctx.ranges.calibration_batches == 2
    arr = tmp_path / "x.npy"
    np.save(arr, np.zeros((4, 3, 12, 12), np.float32))
    res0 = compile_graph(import_onnx(proto), calibrate=str(arr), echo=lambda s: None)
    assert res0.ctx.ranges is not None and res0.ctx.ranges.calibration_batches == 2
    # all-zero inputs still give positive bitwidths for every comparison
    assert all(op.gate["bits"] >= 2 for op in res0.graph.ops if op.gate)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FsscError, match="no images found"):
        compile_graph(import_onnx(proto), calibrate=str(empty), echo=lambda s: None)
