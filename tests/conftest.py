"""Shared fixtures: exported ResNet-18 models, onnxruntime sessions, the real CLI.

Exports are session-scoped and cached per arguments, so every test module can
ask for the model it needs without paying for the export twice:

* ``export_resnet18(image_size=64, batch=2, num_classes=2, weights=None)``
  returns the path of ``fssc export resnet18 ...`` output (random weights,
  BN calibrated, fixed seed) unless ``weights`` names a state dict.
* ``resnet18_onnx``: 2 classes, 64x64, batch 2 (cheap; for most tests).
* ``resnet18_224_onnx``: 2 classes, 224x224, batch 2 -- the demo model
  is about. It is written by the real CLI in a subprocess
  (``resnet18_224_cli`` keeps that run's result for the export test).
* ``ort_session(path)``: a cached onnxruntime CPU session.
* ``run_fssc(*args)``: the installed ``fssc`` console script in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# One BLAS thread per process (unless the caller set a count), before numpy or torch is imported: the suite
# runs the compiler in this process while the parties, the dealer and the CLI run as processes beside it on
# a small machine, and BLAS threads spin while they wait for work, so threads of several processes (or of
# this one while its children compute) contend for the same cores and float64 GEMMs then run several times
# slower than on one thread (fssc.runtime.loopback.party_env keeps the count set here). The ring's digit
# products are exact integer sums: no fixed-point result depends on it.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


FSSC = Path(sys.executable).with_name("fssc")  # the console script beside this interpreter


def fssc_command() -> list[str]:
    return [str(FSSC)] if FSSC.exists() else [sys.executable, "-m", "fssc.cli"]


def run_fssc_cli(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run the real CLI; returns the CompletedProcess (text mode, output captured)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        fssc_command() + [str(a) for a in args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def run_fssc():
    return run_fssc_cli


@pytest.fixture(scope="session")
def _export_cache() -> dict:
    return {}


@pytest.fixture(scope="session")
def export_resnet18(tmp_path_factory, _export_cache):
    """Factory: ``export_resnet18(image_size=64, batch=2, num_classes=2, weights=None) -> Path``."""
    from fssc.models.export import export_model

    def make(image_size: int = 64, batch: int = 2, num_classes: int | None = 2, weights=None) -> Path:
        key = (int(image_size), int(batch), num_classes, None if weights is None else str(weights))
        if key not in _export_cache:
            d = tmp_path_factory.mktemp(f"resnet18_{image_size}px_b{batch}")
            path = d / "resnet18.onnx"
            export_model("resnet18", str(path), num_classes, key[3], image_size, batch)
            _export_cache[key] = path
        return _export_cache[key]

    return make


@pytest.fixture(scope="session")
def resnet18_224_cli(tmp_path_factory, _export_cache):
    """``fssc export resnet18 -o r.onnx --num-classes 2 --image-size 224 --batch 2``, run once."""
    d = tmp_path_factory.mktemp("resnet18_cli_224")
    proc = run_fssc_cli(
        "export", "resnet18", "-o", "r.onnx", "--num-classes", 2, "--image-size", 224, "--batch", 2, cwd=d
    )
    path = d / "r.onnx"
    if proc.returncode == 0 and path.exists():
        _export_cache.setdefault((224, 2, 2, None), path)
    return proc, path


@pytest.fixture(scope="session")
def resnet18_224_onnx(resnet18_224_cli) -> Path:
    proc, path = resnet18_224_cli
    assert proc.returncode == 0, f"fssc export failed:\n{proc.stderr}"
    return path


@pytest.fixture(scope="session")
def resnet18_onnx(export_resnet18) -> Path:
    return export_resnet18(64, 2)


@pytest.fixture(scope="session")
def ort_session():
    """Factory: ``ort_session(path)`` -> cached onnxruntime.InferenceSession (CPU)."""
    import onnxruntime as ort

    cache = {}

    def make(path):
        key = str(path)
        if key not in cache:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            cache[key] = ort.InferenceSession(key, opts, providers=["CPUExecutionProvider"])
        return cache[key]

    return make


@pytest.fixture(scope="session")
def r18(export_resnet18) -> Path:
    """ResNet-18, 2 classes, 224x224, batch 2: the demo's model (shared by the pipeline and overflow tests)."""
    return export_resnet18(image_size=224, batch=2, num_classes=2)


@pytest.fixture(params=["numpy", "compiled"])
def walk(request):
    """A test under each of the DCF tree walks (``usefixtures("walk")``; ``fssc.runtime.dcf.set_walk``), the
    process's walk restored after."""
    from fssc.runtime import dcf

    before = dcf.current_walk()
    dcf.set_walk(request.param)
    yield request.param
    dcf.set_walk(before)


# The longest files of the fast suite first: `make test` hands whole files to two workers in collection order,
# and the alphabetical order put the longest one (test_zoo.py, about a minute) last, so one worker ran it alone
# while the other had finished. Only the order changes; every test still runs.
LONG_FILES = ("test_zoo.py", "test_accuracy.py", "test_e2e.py", "test_serve.py", "test_layering.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the rest keep their order
