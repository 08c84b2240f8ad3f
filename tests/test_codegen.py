"""Code generation: names from the model stay data, every call into the runtime is a keyword call checked
against the runtime's signature before anything is written, the runtime loads only programs with their role's
interface, and the source map beside each program gives each op its lines."""

from __future__ import annotations

import ast
import copy
import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from fssc.compiler.backend.codegen import render, write_program
from fssc.compiler.backend.lower import lower
from fssc.compiler.compile import compile_graph, compile_model
from fssc.compiler.frontend.onnx_import import import_onnx
from fssc.compiler.reference.simulation import simulate, strip_weights
from fssc.compiler.viewer.document import program_lines
from fssc.runtime import lib, session
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from fssc.errors import FsscError


def hostile_model(path: str) -> None:
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "W")
    nodes = [
        oh.make_node("MatMul", ['in"put', "W"], ["mm"], name='mm\nimport os\nos.system("exit 1")'),
        oh.make_node("Relu", ["mm"], ['out"\n'], name='r\\"""'),
    ]
    g = oh.make_graph(
        nodes,
        'g"""',
        [oh.make_tensor_value_info('in"put', TensorProto.FLOAT, [2, 4])],
        [oh.make_tensor_value_info('out"\n', TensorProto.FLOAT, [2, 2])],
        [w],
    )
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), path)


def test_hostile_names_stay_data(tmp_path):
    from rich.console import Console

    path = str(tmp_path / 'model"""x.onnx')
    hostile_model(path)
    compile_model(path, str(tmp_path / "prog"), output_mode="logits", console=Console(quiet=True))
    for role in ("party0", "party1", "dealer"):
        src = (tmp_path / "prog" / role / "program.py").read_text()
        compile(src, role, "exec")  # parses
        code = [line for line in src.splitlines() if not line.lstrip().startswith("#")]
        assert not any("os.system" in line or line.strip() == "import os" for line in code), role
    # and the program still runs securely with those names
    g = compile_graph(import_onnx(path), echo=lambda s: None, output_mode="logits").graph
    x = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
    (y,) = simulate(g, x).decoded()
    assert np.allclose(y, np.maximum(x @ np.ones((4, 2)), 0))


# --------------------------------------------------------------------------- the contract with the runtime
def kinds_model() -> onnx.ModelProto:
    """Every statement kind: input, a linear layer per role, relu, maxpool, clip, the model owner's constant
    (const + local add), concat, reshape, a standalone truncation, a 5-class argmax and a masked output."""
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "Wc"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "Bc"),
        numpy_helper.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "K"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        numpy_helper.from_array(np.array([0.5], np.float32), "half"),
        numpy_helper.from_array(rng.standard_normal((128, 5)).astype(np.float32) * 0.1, "Wf"),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "Wc", "Bc"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        oh.make_node("Relu", ["c"], ["r"], name="relu"),
        oh.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        oh.make_node("Clip", ["p", "lo", "hi"], ["cl"], name="clip"),
        oh.make_node("Add", ["cl", "K"], ["a"], name="addk"),
        oh.make_node("Mul", ["a", "half"], ["h"], name="half"),
        oh.make_node("Concat", ["h", "cl"], ["cc"], axis=1, name="cat"),
        oh.make_node("Flatten", ["cc"], ["f"], name="flat"),
        oh.make_node("MatMul", ["f", "Wf"], ["logits"], name="fc"),
        oh.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0, name="am"),
    ]
    g = oh.make_graph(
        nodes,
        "kinds",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [
            oh.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5]),
            oh.make_tensor_value_info("label", TensorProto.INT64, [2]),
        ],
        init,
    )
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def kinds():
    """The compiled graph, its secure program (with weights) and the same without weight bytes."""
    graph = compile_graph(import_onnx(kinds_model(), "kinds"), echo=lambda s: None).graph
    return graph, lower(graph), lower(strip_weights(graph), with_weights=False)


@pytest.fixture(scope="module")
def kinds_prog(kinds, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kinds") / "prog"
    kinds[1].info = {"source": "kinds.onnx"}
    write_program(kinds[1], str(out))
    return out


def lib_calls(src: str) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(ast.parse(src))
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "lib"
    ]


def test_every_call_into_the_runtime_is_by_keyword_and_fits_its_signature(kinds, kinds_prog):
    graph, prog, _ = kinds
    assert {st.kind for st in prog.stmts} >= {
        "input", "const", "linear", "relu", "trunc", "maxpool", "clip", "argmax", "local", "output"
    }  # fmt: skip
    called = set()
    for role in ("party0", "party1", "dealer"):
        calls = lib_calls((kinds_prog / role / "program.py").read_text())
        for c in calls:
            fn = c.func.attr  # type: ignore[attr-defined]
            called.add(fn)
            # the role context alone is positional, and only for the gate, I/O and linear functions
            assert all(isinstance(a, ast.Name) and a.id == ("D" if role == "dealer" else "P") for a in c.args), fn
            assert len(c.args) <= 1 and all(k.arg for k in c.keywords), fn
            inspect.signature(getattr(lib, fn)).bind(*c.args, **{k.arg: None for k in c.keywords if k.arg})
        concat = next(c for c in calls if c.func.attr == "concat")  # type: ignore[attr-defined]
        assert [k.arg for k in concat.keywords] == ["xs", "axis"] and isinstance(concat.keywords[0].value, ast.List)
    assert called >= {
        "input_wire", "const", "linear_p0", "linear_p1", "linear_dealer", "linear_offline", "relu", "trunc",
        "maxpool", "clip", "argmax", "add", "upscale", "concat", "reshape", "output", "conv", "matmul",
    }  # fmt: skip
    # and they run: the secure result is the fixed-point interpreter's, bit for bit
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    sim = simulate(graph, x)
    assert sim.mismatches() == []
    assert [tuple(y.shape) for y in sim.outputs] == [(2, 5), (2,)]


def _misspell(prog, kind: str, fn: str | None, edit):
    """A copy of ``prog`` whose first ``kind`` statement (with ``params['fn'] == fn`` for a local one) is edited."""
    bad = copy.deepcopy(prog)
    st = next(s for s in bad.stmts if s.kind == kind and (fn is None or s.params.get("fn") == fn))
    edit(st.params)
    return bad, st


def _rename(old: str, new: str):
    return lambda p: p.__setitem__(new, p.pop(old))


@pytest.mark.parametrize(
    "kind,fn,edit,why",
    [
        ("relu", None, _rename("m", "mbits"), "missing a required argument: 'm'"),
        ("clip", None, lambda p: p.pop("hi"), "missing a required argument: 'hi'"),
        ("maxpool", None, lambda p: p.update(window=2), "unexpected keyword argument 'window'"),
        ("local", "reshape", _rename("shape", "shap"), "lib.reshape takes the operand(s) x, shape"),
        ("local", "concat", _rename("axis", "dim"), "unexpected keyword argument 'dim'"),
        ("local", "add", lambda p: p.update(fn="plus"), "the runtime has no function lib.plus"),
        ("linear", None, lambda p: p["fn_args"].update(stride=[1, 1]), "lib.conv(strides, pads, dilations, group)"),
        ("trunc", None, lambda p: p.update(shift="17"), "lib.trunc: shift='17' is not int"),
        ("clip", None, lambda p: p.update(lo=0.5), "lib.clip: lo=0.5 is not int | None"),
    ],
)
def test_a_call_the_runtime_cannot_take_is_refused_and_nothing_is_written(kinds, tmp_path, kind, fn, edit, why):
    bad, st = _misspell(kinds[1], kind, fn, edit)
    out = tmp_path / "prog"
    with pytest.raises(FsscError) as e:
        write_program(bad, str(out))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("code generation: party")
    assert f"{kind} statement {st.tag} (" in msg and why in msg, msg
    assert not out.exists(), "nothing is written"
    # the in-process simulator renders through the same check
    with pytest.raises(FsscError, match="code generation"):
        render(bad, "dealer")


# --------------------------------------------------------------------------- the programs' interface
@pytest.mark.parametrize(
    "role,old,new,missing",
    [
        ("party1", "def online(P, W):", "def online(P, weights):", "online(P, W)"),
        ("party0", "def offline(P, WH):", "def offline_(P, WH):", "offline(P, WH)"),
        ("dealer", "\nPROGRAM_HASH = ", "\nPROGRAM_HASH_ = ", "PROGRAM_HASH (str)"),
        ("party0", "\nLINEAR_WEIGHTS = ", "\nLINEAR_WEIGHTS = None and ", "LINEAR_WEIGHTS (dict)"),
    ],
)
def test_a_program_without_its_interface_is_refused_on_load(kinds_prog, tmp_path, role, old, new, missing):
    prog = tmp_path / "prog"
    shutil.copytree(kinds_prog, prog)
    path = prog / role / "program.py"
    src = path.read_text()
    assert src.count(old) == 1
    path.write_text(src.replace(old, new))
    with pytest.raises(FsscError) as e:
        session.load_program(str(prog), role)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: not a {role} program: it lacks {missing}"), msg
    # a regenerated copy (fssc run, the in-process simulator) is loaded from its text with the same check
    with pytest.raises(FsscError, match=f"lacks {re.escape(missing)}"):
        session.program_from_source(path.read_text(), role, "<copy>")
    # the unedited program loads
    assert role == session.load_program(str(kinds_prog), role).ROLE


def test_a_program_of_another_role_or_unparsable_is_refused(kinds_prog, tmp_path):
    prog = tmp_path / "prog"
    shutil.copytree(kinds_prog, prog)
    (prog / "party1" / "program.py").write_text((prog / "party0" / "program.py").read_text())
    with pytest.raises(FsscError, match=r"party1/program.py: not a party1 program: it lacks online\(P, W\) "):
        session.load_program(str(prog), "party1")
    path = prog / "dealer" / "program.py"
    path.write_text(path.read_text().replace('ROLE = "dealer"', 'ROLE = "party1"'))
    with pytest.raises(FsscError, match=r"dealer/program.py: the 'party1' program, not the dealer one$"):
        session.load_program(str(prog), "dealer")
    path.write_text("def deal(D, setup_seed:\n")
    with pytest.raises(FsscError, match=r"dealer/program.py: not a Python program \(line 1: "):
        session.load_program(str(prog), "dealer")


def test_a_party_program_run_without_its_interface_says_so_in_one_line(kinds_prog, tmp_path):
    prog = tmp_path / "prog"
    shutil.copytree(kinds_prog, prog)
    path = prog / "party1" / "program.py"
    path.write_text(path.read_text().replace("def online(P, W):", "def online(P, W, extra):"))
    p = subprocess.run(
        [sys.executable, str(path), "--keys", str(tmp_path / "keys"), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert (
        p.stderr
        == f"fssc party1: error: {path}: not a party1 program: it lacks online(P, W) (recompile with fssc compile)\n"
    )


# --------------------------------------------------------------------------- the source map
def test_the_source_map_gives_each_op_its_lines_and_the_viewer_reads_it(kinds, kinds_prog):
    graph = kinds[0]
    got = program_lines(str(kinds_prog), graph)
    for role in ("party0", "party1", "dealer"):
        lines = (kinds_prog / role / "program.py").read_text().splitlines()
        smap = json.loads((kinds_prog / role / "sourcemap.json").read_text())
        assert smap["program_hash"] == kinds[1].hash
        # the oracle: every statement's comment names its op ("# kind %output [shape] ..."); the line under it
        # is the op's, and so is a line carrying only the op's own tag (the dealer's seed lines)
        want: dict[int, list[list]] = {}
        for i, ln in enumerate(lines):
            code = ln.strip()
            if not code or code.startswith(("#", "del ", "def ", '"""')):
                continue
            prev = lines[i - 1].strip()
            named = {  # "# kind %out [shape] ..." or, for a constant, "# constant %c [shape] of kind %out: ..."
                op.uid
                for op in graph.ops
                if prev.startswith(f"# {op.kind} %{op.outputs[0]} [") or f" of {op.kind} %{op.outputs[0]}: " in prev
            }
            if prev.startswith("# ") and len(named) == 1:
                want.setdefault(named.pop(), []).append([i + 1, i])
            else:
                tags = {op.uid for op in graph.ops if f"'op{op.uid}'" in code or f"'op{op.uid}." in code}
                if len(tags) == 1 and not code.startswith("LINEAR_WEIGHTS"):
                    want.setdefault(tags.pop(), []).append([i + 1, None])
        assert {int(u): v for u, v in smap["ops"].items()} == want, role
        assert set(want) == {op.uid for op in graph.ops}, "every op reaches every role's program"
        for uid, entries in want.items():
            assert got[uid][role] == [
                [no, lines[cm - 1].strip()[2:] if cm else "", lines[no - 1].strip()] for no, cm in entries
            ]


def test_the_viewer_refuses_a_program_edited_since_its_source_map(kinds, kinds_prog, tmp_path):
    prog = tmp_path / "prog"
    shutil.copytree(kinds_prog, prog)
    path = prog / "dealer" / "program.py"
    path.write_text("# edited\n" + path.read_text())
    with pytest.raises(FsscError, match=r"dealer/program.py is not the program .*sourcemap.json maps"):
        program_lines(str(prog), kinds[0])
    # no programs beside the dump: no code lines
    assert program_lines(str(tmp_path / "nothing"), kinds[0]) == {}
