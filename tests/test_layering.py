"""The runtime stands alone: layering that a test enforces.

runtime/ imports nothing of the compiler (fssc.compiler, fssc.passes,
fssc.models) and no module of the ``compiler`` extra (torch, onnx,
onnxruntime...), at any level, function-level imports included. The rest of
the dealer's and the parties' side (the package root's shared modules, the
runtime's half of the CLI) may use the code generator too (GENERATOR: the
program's public form, code generation, the runtime contract and the trust
check, which regenerate the data owner's and the dealer's programs from the
manifest), and the generator imports nothing else of the compiler. Their
third-party imports are the default dependencies in pyproject.toml. Read
statically from the source (AST), then checked for real: ``fssc certs``,
``fssc deal`` and both parties (``fssc run``) run in processes where importing
the rest of the compiler or its dependencies fails, and label like the
unblocked run.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from fssc.runtime.results import read_results
from parties import run_p0, start_p1
from tiny_models import compile_tiny

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMPILER_PACKAGES = ("fssc.compiler", "fssc.passes", "fssc.models", "fssc.benchmarks", "fssc.cli.compiler_commands")
# the code generator: what the data owner's and the dealer's installation runs of the compiler (with their packages)
GENERATOR = {
    "fssc.compiler": REPO / "compiler" / "__init__.py",
    "fssc.compiler.backend": REPO / "compiler" / "backend" / "__init__.py",
    **{
        f"fssc.compiler.backend.{m}": REPO / "compiler" / "backend" / f"{m}.py"
        for m in ("program", "codegen", "contract", "trust")
    },
}
FORBIDDEN_NAMED = ("torch", "onnx", "onnxruntime")  # named by the layering rule; the extra's others follow
DIST_MODULES = {"pillow": "PIL"}  # distribution name -> import name, where they differ


def _dist_name(requirement: str) -> str:
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert m, requirement
    return m.group(0).lower()


def _module_of(requirement: str) -> str:
    name = _dist_name(requirement)
    return DIST_MODULES.get(name, name.replace("-", "_"))


COMPILER_EXTRA = {_module_of(r) for r in PYPROJECT["project"]["optional-dependencies"]["compiler"]}
# runtime modules allowed an optional extra of their own (imported lazily: test_optional_extras_are_imported_lazily)
OPTIONAL_EXTRAS = {
    "fssc.runtime.cluster": {_module_of(r) for r in PYPROJECT["project"]["optional-dependencies"]["cluster"]},
}
DEFAULT_DEPENDENCIES = {_module_of(r) for r in PYPROJECT["project"]["dependencies"]}

# The runtime side: every module of runtime/, the shared modules at the package root, the runtime's commands.
RUNTIME_SIDE = {
    **{f"fssc.runtime.{p.stem}": p for p in sorted((REPO / "runtime").glob("*.py"))},
    "fssc": REPO / "fssc" / "__init__.py",
    "fssc.errors": REPO / "fssc" / "errors.py",
    "fssc.files": REPO / "fssc" / "files.py",
    "fssc.cli": REPO / "fssc" / "cli" / "__init__.py",
    "fssc.cli.__main__": REPO / "fssc" / "cli" / "__main__.py",
    "fssc.cli.runtime_commands": REPO / "fssc" / "cli" / "runtime_commands.py",
}


def _compiler_modules() -> list[str]:
    """Every module of the compiler's side but the generator (what a runtime-only process must not import)."""
    out = ["fssc.passes", "fssc.models", "fssc.benchmarks", "fssc.cli.compiler_commands"]
    for path in sorted((REPO / "compiler").rglob("*.py")):
        parts = path.relative_to(REPO / "compiler").with_suffix("").parts
        name = ".".join(("fssc.compiler", *parts[:-1], *([] if parts[-1] == "__init__" else parts[-1:])))
        if name not in GENERATOR:
            out.append(name)
    return out


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an import statement anywhere in ``source`` names (module-level, in functions, under if/try).

    ``from a.b import c`` names a.b and a.b.c (c may be a submodule); relative imports are resolved
    against ``module``."""
    out: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return out


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def forbidden_imports(source: str, module: str, is_package: bool = False, allowed=()) -> list[str]:
    """The modules ``source`` imports that the runtime side may not: the compiler's (but ``allowed``, exactly)
    and the compiler extra's."""
    bad = (*COMPILER_PACKAGES, *FORBIDDEN_NAMED, *sorted(COMPILER_EXTRA))
    names = imported_modules(source, module, is_package) - set(allowed)
    modules = set(_compiler_modules())  # ``from <allowed> import x``: x is a name in it unless it is a module
    names = {n for n in names if n in modules or n.rpartition(".")[0] not in allowed}
    return sorted(n for n in names if _within(n, bad))


def test_checker_sees_every_kind_of_import():
    """The checker can fail: it finds function-level, conditional, aliased and relative imports."""
    src = textwrap.dedent(
        """
        import numpy as np
        from fssc.runtime import ring
        def f():
            import torch.nn.functional as F
            try:
                from onnx import helper
            except ImportError:
                pass
            if F:
                from ..compiler.ir import ops
                from fssc import passes
        class C:
            def m(self):
                import onnxruntime
        """
    )
    assert forbidden_imports(src, "fssc.runtime.lib") == [
        "fssc.compiler.ir",
        "fssc.compiler.ir.ops",
        "fssc.passes",
        "onnx",
        "onnx.helper",
        "onnxruntime",
        "torch.nn.functional",
    ]
    assert forbidden_imports("import numpy\nfrom fssc.runtime import lib\n", "fssc.runtime.x") == []


def test_the_sides_are_the_pyproject_extras():
    """The compiler extra holds torch, onnx and onnxruntime, the default install none of the extra's
    modules, and the CLI's hint for a missing compiler module names the same set."""
    from fssc.cli import COMPILER_DEPENDENCIES

    assert set(FORBIDDEN_NAMED) <= COMPILER_EXTRA
    assert not COMPILER_EXTRA & DEFAULT_DEPENDENCIES
    assert COMPILER_DEPENDENCIES == COMPILER_EXTRA
    assert "fssc[compiler]" in PYPROJECT["project"]["optional-dependencies"]["test"]  # make test installs it


@pytest.mark.parametrize("module", sorted({**RUNTIME_SIDE, **GENERATOR}))
def test_runtime_side_imports_nothing_of_the_compiler(module):
    """runtime/ imports nothing of the compiler; the CLI's runtime half and the generator only the generator."""
    path = {**RUNTIME_SIDE, **GENERATOR}[module]
    allowed = () if module.startswith("fssc.runtime") else set(GENERATOR)
    bad = forbidden_imports(path.read_text(), module, path.name == "__init__.py", allowed)
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: the runtime must run without the compiler"


def test_the_generator_is_what_it_says():
    """The allowed list can fail: a generator module importing the IR is caught, the runtime may not import
    the generator."""
    src = "from fssc.compiler.backend.program import SecureProgram\nfrom fssc.compiler.ir import ops\n"
    src += "from fssc.compiler.backend import codegen, lower\n"
    assert forbidden_imports(src, "fssc.compiler.backend.trust", allowed=set(GENERATOR)) == [
        "fssc.compiler.backend.lower",
        "fssc.compiler.ir",
        "fssc.compiler.ir.ops",
    ]
    assert "fssc.compiler.backend.program" in forbidden_imports(src, "fssc.runtime.session")
    assert "fssc.compiler.backend.lower" in _compiler_modules() and "fssc.compiler.backend.codegen" not in (
        _compiler_modules()
    )


@pytest.mark.parametrize("module", sorted({**RUNTIME_SIDE, **GENERATOR}))
def test_runtime_side_needs_only_the_default_dependencies(module):
    """Its third-party imports are pyproject's [project] dependencies (the rest is the standard library and
    fssc itself), so `pip install fssc` runs it."""
    path = {**RUNTIME_SIDE, **GENERATOR}[module]
    names = imported_modules(path.read_text(), module, path.name == "__init__.py")
    third = {n.partition(".")[0] for n in names} - set(sys.stdlib_module_names) - {"fssc", "__future__"}
    allowed = DEFAULT_DEPENDENCIES | OPTIONAL_EXTRAS.get(module, set())
    assert third <= allowed, f"{path.relative_to(REPO)} imports {sorted(third - allowed)}"


def test_optional_extras_are_imported_lazily():
    """A module that may use an optional extra (Dask for `fssc deal --cluster`) imports it only inside a
    function, so importing the module (and the runtime) works without the extra."""
    for module, extra in OPTIONAL_EXTRAS.items():
        tree = ast.parse(RUNTIME_SIDE[module].read_text())
        top = imported_modules(
            ast.unparse([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]), module
        )
        assert not {n.partition(".")[0] for n in top} & extra, f"{module} imports {sorted(extra)} at its top level"


def test_compiler_commands_are_the_lazy_names():
    """fssc/cli/__init__.py lists the compiler's commands without importing them; the list is the module's."""
    from fssc.cli import COMPILER_COMMANDS
    from fssc.cli.compiler_commands import COMMANDS

    assert set(COMPILER_COMMANDS) == set(COMMANDS)


# ----------------------------------------------------------------- run with the compiler unimportable
BLOCKER = '''\
"""Test harness (tests/test_layering.py): importing a blocked module fails, and the attempt is logged."""
import importlib.abc
import os
import sys

_BLOCKED = tuple(os.environ["FSSC_TEST_BLOCK"].split(","))
_LOG = os.environ["FSSC_TEST_BLOCK_LOG"]


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in _BLOCKED):
            with open(_LOG, "a") as fh:
                fh.write(f"{os.getpid()} {name} {' '.join(sys.argv[:2])}\\n")
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Block())
'''


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
    """(environment in which the compiler and its dependencies cannot be imported, the attempts' log)."""
    d = tmp_path_factory.mktemp("block")
    (d / "sitecustomize.py").write_text(BLOCKER)
    log = d / "attempts.log"
    log.write_text("")
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(d), *filter(None, [os.environ.get("PYTHONPATH")])]),
        FSSC_TEST_BLOCK=",".join((*_compiler_modules(), *sorted(COMPILER_EXTRA))),
        FSSC_TEST_BLOCK_LOG=str(log),
    )
    return env, log


def test_block_works(blocked, tmp_path):
    env, log = blocked
    for mod in ("torch", "onnx", "onnxruntime", "fssc.compiler.ir.ops", "fssc.passes.base"):
        p = subprocess.run(
            [sys.executable, "-c", f"import {mod}"], check=False, env=env, capture_output=True, text=True, cwd=tmp_path
        )
        assert p.returncode == 1 and "blocked by the test" in p.stderr, (mod, p.stderr)
    assert len(log.read_text().splitlines()) == 5
    log.write_text("")
    free = subprocess.run(
        [sys.executable, "-c", "import torch, onnx"], check=False, capture_output=True, text=True, cwd=tmp_path
    )
    assert free.returncode == 0, free.stderr


def test_compiler_command_without_the_compiler_is_one_line(blocked, run_fssc, tmp_path):
    """On a runtime-only install (the compiler extra's modules missing), a compiler command says what to
    install, in one line."""
    env, log = blocked
    env = dict(env, FSSC_TEST_BLOCK=",".join(sorted(COMPILER_EXTRA)))
    (tmp_path / "m.onnx").write_bytes(b"")
    p = run_fssc("compile", tmp_path / "m.onnx", "-o", tmp_path / "prog", env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("fssc: error: this command needs the compiler (no module ") and p.stderr.count("\n") == 1
    assert "pip install 'fssc[compiler]'" in p.stderr
    assert log.read_text()  # the blocker was asked
    log.write_text("")


def _two_parties(prog: Path, keys: Path, certs: Path, x: Path, out: Path, env: dict) -> list[dict]:
    p1, port = start_p1(prog, keys, certs, out.parent, env=env)
    p0 = run_p0(prog, keys, certs, port, "--input", x, "--out", out, timeout=600, env=env)
    _, err1 = p1.communicate(timeout=120)
    assert p0.returncode == 0, p0.stderr
    assert p1.returncode == 0, err1
    return read_results(str(out))


def test_parties_and_dealer_run_without_the_compiler(blocked, run_fssc, tmp_path):
    """Compile (the tiny CNN: conv, BN, ReLU, MaxPool, Gemm) with the full install; then check, certs, deal
    and both parties where the compiler (but its code generator), torch, onnx and onnxruntime cannot be
    imported (and nothing even tries); the labels and logits equal the unblocked run's."""
    env, log = blocked
    prog, _ = compile_tiny(tmp_path, run_fssc)
    keys, certs, x = tmp_path / "keys", tmp_path / "certs", tmp_path / "x.npy"
    log.write_text("")
    checks = (["check", prog, "--party", "0"], ["check", prog, "--party", "dealer"])
    for args in (["deal", "--help"], *checks, ["certs", "-o", certs], ["deal", prog, "--batches", 2, "-o", keys]):
        r = run_fssc(*args, env=env, cwd=tmp_path)
        assert r.returncode == 0, (args, r.stderr)
    (tmp_path / "blocked").mkdir()
    (tmp_path / "free").mkdir()
    res_blocked = _two_parties(prog, keys, certs, x, tmp_path / "blocked" / "out.jsonl", env)
    assert log.read_text() == "", "a runtime process tried to import the compiler or its dependencies"
    res_free = _two_parties(prog, keys, certs, x, tmp_path / "free" / "out.jsonl", dict(os.environ))
    assert [r["batch"] for r in res_blocked] == [0, 0]
    assert [r["batch"] for r in res_free] == [1, 1]  # a fresh key batch: the same answers
    assert len(res_blocked) == 2
    for a, b in zip(res_blocked, res_free, strict=True):
        assert a["label"] == b["label"] and a["logits"] == b["logits"]
