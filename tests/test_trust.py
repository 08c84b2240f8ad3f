"""The data owner and the dealer never run the model owner's code.

``fssc check`` regenerates P0's and the dealer's programs from ``manifest.json``
and compares them byte for byte with the received ones; ``fssc run --party 0``
and ``fssc deal`` run their own regenerated copy after the same check. Oracles:
the received files (an untouched compile passes, a second compile in another
folder is byte-identical), the exact edit a test makes (refused, naming its
line and statement), and side effects that must not happen (a listening socket
nobody connects to, a file a tampered program would write, key files).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fssc.compiler.backend import trust
from fssc.compiler.backend.codegen import render
from fssc.compiler.backend.program import from_manifest
from fssc.runtime import lib, session
from fssc.runtime.gates import STATEMENTS
from parties import party_cmd
from tiny_models import compile_tiny

from fssc.errors import FsscError


def _compile(folder: Path, run_fssc) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return compile_tiny(folder, run_fssc)[0]


@pytest.fixture(scope="module")
def progs(tmp_path_factory, run_fssc):
    """The same model compiled twice, in two folders (as on two machines)."""
    tmp = tmp_path_factory.mktemp("trust")
    return _compile(tmp / "a", run_fssc), _compile(tmp / "b", run_fssc)


@pytest.fixture
def prog(progs, tmp_path) -> Path:
    """A fresh copy of the compiled folder, for a test to tamper with."""
    shutil.copytree(progs[0], tmp_path / "prog")
    return tmp_path / "prog"


def _edit(path: Path, old: str, new: str) -> None:
    src = path.read_text()
    assert old in src, old
    path.write_text(src.replace(old, new, 1))


def _first_line(src: str, prefix: str) -> str:
    return next(line for line in src.splitlines() if line.strip().startswith(prefix))


# ---------------------------------------------------------------- untouched programs pass
@pytest.mark.parametrize("party", ["0", "dealer"])
def test_an_untouched_program_passes(progs, run_fssc, party):
    r = run_fssc("check", progs[0], "--party", party)
    assert r.returncode == 0, r.stderr
    role = trust.role_name(party)
    assert r.stdout.startswith(f"ok: {progs[0]}/{role}/program.py is the program fssc generates from"), r.stdout
    c = trust.check(str(progs[0]), role)
    assert c.text == (progs[0] / role / "program.py").read_text()


def test_programs_compiled_twice_are_identical_and_pass_in_either_folder(progs, tmp_path):
    """A compile on another machine (another folder) gives the same manifest and programs, so one folder's
    programs pass the check against the other's manifest."""
    a, b = progs
    for f in ("manifest.json", "party0/program.py", "dealer/program.py"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    for role in trust.CHECKED_ROLES:
        shutil.copy(b / role / "program.py", mixed / role / "program.py")
        assert trust.check(str(mixed), role).program_hash == trust.check(str(b), role).program_hash


def test_the_regenerated_program_is_what_runs(progs, monkeypatch):
    """The module fssc run executes is built from the regenerated text (its file name is the received one's,
    for messages); the received file itself is never read as a program."""

    def never(*a, **k):
        raise AssertionError("the received program was loaded")

    monkeypatch.setattr(session, "load_program", never)
    mod = trust.checked_program(str(progs[0]), "party0")
    assert mod.__file__ == f"{progs[0]}/party0/program.py" and mod.ROLE == "party0"
    m = json.loads((progs[0] / "manifest.json").read_text())
    assert m["program_hash"] == mod.PROGRAM_HASH


# ---------------------------------------------------------------- edited programs are refused
LEAK = "open({leak!r}, 'wb').write(X[next(iter(X))].tobytes())  # the data owner's input, to a file"


def _p0_against_a_listener(prog: Path, tmp_path: Path, *extra) -> tuple[subprocess.CompletedProcess, bool]:
    """Run the data owner (with real keys and certificates, so it would connect) against a listening socket
    that records connections; returns (the process, whether it connected)."""
    from fssc.runtime.certs import make_certs

    keys, certs, x = tmp_path / "keys", tmp_path / "certs", tmp_path / "x.npy"
    if not keys.exists():
        trust.deal(str(prog), str(keys), 1)
        make_certs(str(certs))
        np.save(x, np.zeros((2, 3, 12, 12), dtype=np.float32))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        cmd = party_cmd(prog, "party0", keys, certs, "--peer", f"127.0.0.1:{port}", "--input", x, "--timeout", 5)
        proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        server.settimeout(0.1)
        connected, deadline = False, time.monotonic() + 60
        while not connected and proc.poll() is None and time.monotonic() < deadline:
            try:
                server.accept()[0].close()
                connected = True
            except TimeoutError:
                pass
        try:  # a connection that came just as it exited
            server.accept()[0].close()
            connected = True
        except TimeoutError:
            pass
        out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), connected


@pytest.mark.parametrize("where", ["online", "top"])
def test_a_program_that_writes_the_input_to_a_file_is_refused_before_any_connection(prog, tmp_path, where):
    """An added statement that would leak the input: `fssc run --party 0` refuses it in one line, exit code 2,
    before it connects to the model owner, and the received file never ran. The same program with
    --skip-check does connect and does run (the oracle that the check is what stopped it)."""
    path = prog / "party0" / "program.py"
    leak, ran = tmp_path / "leak.bin", tmp_path / "ran"
    if where == "online":
        old = _first_line(path.read_text(), "out = {}")
        _edit(path, old, f"{old}\n    {LEAK.format(leak=str(leak))}")
    else:  # top-level code runs on import, before anything could check it
        _edit(path, "\nROLE = ", f"\nopen({str(ran)!r}, 'w').write('imported')\nROLE = ")
    p, connected = _p0_against_a_listener(prog, tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("fssc: error: refused: "), p.stderr
    assert f"{path} line " in p.stderr and "nothing was run" in p.stderr
    assert not connected and not leak.exists() and not ran.exists()
    p, connected = _p0_against_a_listener(prog, tmp_path, "--skip-check")
    assert connected and p.returncode != 0, p.stderr  # our listener is no model owner: the session fails
    assert ran.exists() if where == "top" else True


def test_skip_check_runs_the_received_file_as_it_is(prog, tmp_path, run_fssc):
    """--skip-check (development only) imports the received file: its top-level code runs, with a warning.
    The oracle that the check is what stops it in the test above."""
    ran = tmp_path / "ran"
    _edit(prog / "party0" / "program.py", "\nROLE = ", f"\nopen({str(ran)!r}, 'w').write('imported')\nROLE = ")
    r = run_fssc("run", prog, "--party", "0", "--skip-check", "--", "--help")
    assert r.returncode == 0, r.stderr
    assert ran.read_text() == "imported"
    assert "--skip-check: running" in r.stderr and "unchecked" in r.stderr
    assert "--peer" in r.stdout  # the data owner's own options


def test_a_changed_gate_width_is_refused_naming_the_statement(prog, run_fssc):
    path = prog / "party0" / "program.py"
    src = path.read_text()
    relu = next(s for s in src.splitlines() if "lib.relu(" in s)
    m = relu.split(", m=")[1].split(",")[0].split(")")[0]
    _edit(path, relu, relu.replace(f", m={m}", f", m={int(m) - 1}"))
    r = run_fssc("check", prog, "--party", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    lines = path.read_text().splitlines()
    no = lines.index(relu.replace(f", m={m}", f", m={int(m) - 1}")) + 1
    comment = lines[no - 2].strip()[2:]
    assert f"{path} line {no} differs, in the statement for `{comment}`" in r.stderr, r.stderr
    assert f"expected `{relu.strip()}`" in r.stderr and f"m={int(m) - 1}" in r.stderr


def test_an_appended_line_is_refused(prog, run_fssc):
    path = prog / "dealer" / "program.py"
    path.write_text(path.read_text() + "import os\n")
    r = run_fssc("check", prog, "--party", "dealer")
    assert r.returncode == 2 and "is extra (`import os`)" in r.stderr, r.stderr


def test_the_dealer_refuses_an_edited_dealer_program_and_writes_no_keys(prog, tmp_path, run_fssc):
    """A dealer program that would hand P0's masks to P1 (here: any edit) is refused by `fssc deal`."""
    path = prog / "dealer" / "program.py"
    st = next(s for s in path.read_text().splitlines() if "lib.relu(" in s)
    _edit(path, st, st + "  # edited")
    keys = tmp_path / "keys"
    r = run_fssc("deal", prog, "-o", keys)
    assert r.returncode == 2 and r.stderr.startswith("fssc: error: refused: "), r.stderr
    assert f"{path} line " in r.stderr
    assert not keys.exists() or not any(keys.rglob("*.key"))
    r = run_fssc("deal", prog, "-o", keys, "--skip-check")  # development: the received file, with a warning
    assert r.returncode == 0 and "--skip-check" in r.stderr, r.stderr


def test_the_model_owner_program_is_not_checked(progs):
    with pytest.raises(FsscError, match=r"^party1: only the data owner's and the dealer's programs are checked"):
        trust.check(str(progs[0]), "party1")


# ---------------------------------------------------------------- the manifest itself
def _rehash(m: dict) -> dict:
    m = {k: v for k, v in m.items() if k != "program_hash"}
    return {**m, "program_hash": session.manifest_hash(m)}


def test_an_edited_manifest_is_refused(prog, run_fssc):
    """Edited without its hash: refused on load. Edited and re-hashed: the programs no longer match it."""
    path = prog / "manifest.json"
    m = json.loads(path.read_text())
    relu = next(s for s in m["stmts"] if s["kind"] == "relu")
    relu["params"]["m"] -= 1
    path.write_text(json.dumps(m))
    r = run_fssc("check", prog, "--party", "0")
    assert r.returncode == 2 and "does not hash to its program_hash" in r.stderr, r.stderr
    path.write_text(json.dumps(_rehash(m)))
    r = run_fssc("check", prog, "--party", "0")
    assert r.returncode == 2 and "refused: " in r.stderr and "PROGRAM_HASH" not in r.stderr, r.stderr
    assert "differs" in r.stderr


def _stmt_edit(m: dict, kind: str, edit) -> dict:
    m = copy.deepcopy(m)
    edit(next(s for s in m["stmts"] if s["kind"] == kind))
    return _rehash(m)


@pytest.mark.parametrize(
    "kind,edit,why",
    [
        ("relu", lambda s: s.update(out="v1 = __import__('os').system('id'); v9"), "expected a variable v<N>"),
        ("relu", lambda s: s.update(args=["v0)\nimport os\n("]), "expected a list of variables v<N>"),
        ("relu", lambda s: s["params"].update({"m=1, x=os.system('id'), z": 1}), "plain data under identifier"),
        ("local", lambda s: s["params"].update(fn="expand"), "not one of the runtime's local functions"),
        ("linear", lambda s: s["params"].update(fn="masked_weights"), "not one of the runtime's linear functions"),
        ("relu", lambda s: s.update(kind="system"), "unknown statement kind 'system'"),
        ("relu", lambda s: s.update(tag="in.input"), "reuses the tag 'in.input'"),
        ("relu", lambda s: s["params"].update(m="19"), "lib.relu: m='19' is not int"),
    ],
)
def test_a_malformed_public_ir_is_refused_even_with_a_valid_hash(progs, kind, edit, why):
    """The manifest is the model owner's too: code generation writes only well-formed statements, so nothing
    in a manifest can become code (variables, parameter names, functions, kinds are checked)."""
    m = json.loads((progs[0] / "manifest.json").read_text())
    bad = _stmt_edit(m, kind, edit)
    with pytest.raises(FsscError) as e:
        render(from_manifest(bad, "m.json"), "party0")
    assert "\n" not in str(e.value) and why in str(e.value), str(e.value)


def _with(m: dict, **changes) -> dict:
    m = copy.deepcopy(m)
    for path, value in changes.items():
        *head, last = path.split("__")
        target = m
        for k in head:
            target = target[int(k)] if k.isdigit() else target[k]
        if value is KeyError:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return _rehash(m)


@pytest.mark.parametrize(
    "change,why",
    [
        ({"inputs__0__scale": 62}, "is not at scale frac_bits"),  # a refusal oracle on the data owner's values
        ({"inputs__0__shape": [2, 3, 12, 13]}, "disagrees with its statement"),
        ({"outputs__0__masked": KeyError}, "outputs must be records of"),
        ({"outputs__0__kind": "images"}, "is not a labels or logits output"),
        ({"outputs__0__var": "v0"}, "disagrees with the program's output statements"),
    ],
)
def test_inputs_and_outputs_must_be_the_programs(progs, change, why):
    m = json.loads((progs[0] / "manifest.json").read_text())
    with pytest.raises(FsscError) as e:
        from_manifest(_with(m, **change), "m.json")
    assert why in str(e.value), str(e.value)


def test_parameters_are_finite_data_under_identifier_names(progs):
    m = json.loads((progs[0] / "manifest.json").read_text())
    nan = _stmt_edit(m, "relu", lambda s: s["params"].update(m=float("nan")))
    nested = _stmt_edit(m, "linear", lambda s: s["params"]["fn_args"].update({"x=1)#": 1}))
    huge = _stmt_edit(m, "linear", lambda s: s["params"].update(x_shape=[1 << 20, 1 << 20, 4]))
    for bad in (nan, nested, huge):
        with pytest.raises(FsscError, match=r"plain data under identifier names|a shape that is not"):
            from_manifest(bad, "m.json")


def test_messages_from_a_hostile_manifest_stay_one_line(prog, run_fssc):
    """Names from the manifest cannot print lines of their own (or terminal escapes) in an error."""
    path = prog / "manifest.json"
    m = json.loads(path.read_text())
    m["program_hash"] = "x\nok: all good\x1b[2K"
    path.write_text(json.dumps(m))
    r = run_fssc("check", prog, "--party", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "\x1b" not in r.stderr, r.stderr
    assert r.stdout == ""


def test_line_endings_are_named(prog, run_fssc):
    path = prog / "party0" / "program.py"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    r = run_fssc("check", prog, "--party", "0")
    assert r.returncode == 2 and "differs only in its line endings (CRLF)" in r.stderr, r.stderr


def test_check_shows_what_acts_on_the_images_before_anything_is_sent(progs, run_fssc):
    r = run_fssc("check", progs[0], "--party", "0")
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == ["inputs", "preprocessing", "input guard"], r.stdout


def test_another_fssc_version_is_refused(progs):
    m = json.loads((progs[0] / "manifest.json").read_text())
    m["fssc_version"] = "0.0.1"
    with pytest.raises(FsscError, match=r"compiled by fssc 0\.0\.1, this installation is fssc "):
        from_manifest(_rehash(m))


def test_the_runtime_functions_a_statement_may_name_are_classified():
    """Every function lib defines is a bilinear map, a local function, a gate statement's, or one of the
    protocol's own (wires, linear layers, weight masks): a new one must be placed, or a received manifest
    could not name it (or could name something it should not)."""
    protocol = lib.PROTOCOL_FUNCTIONS | lib.SETUP_FUNCTIONS
    defined = {
        n for n, f in vars(lib).items() if inspect.isfunction(f) and f.__module__ == lib.__name__ and n[0] != "_"
    }
    assert not lib.BILINEAR_MAPS & lib.LOCAL_FUNCTIONS
    assert defined >= lib.BILINEAR_MAPS | lib.LOCAL_FUNCTIONS
    unplaced = defined - lib.BILINEAR_MAPS - lib.LOCAL_FUNCTIONS - set(STATEMENTS) - protocol
    assert not unplaced, f"lib functions in no list: {sorted(unplaced)}"


def test_old_manifests_are_refused_in_one_line(prog, run_fssc):
    path = prog / "manifest.json"
    m = json.loads(path.read_text())
    del m["stmts"]
    path.write_text(json.dumps(m))
    r = run_fssc("check", prog, "--party", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "program_hash" in r.stderr, r.stderr
    assert os.path.exists(prog / "party0" / "program.py")
