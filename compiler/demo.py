"""``fssc demo``: the end-to-end run behind ``make demo``.

Today (foundation): export ResNet-18, import it into fssc's IR, run the float
and fixed-point interpreters on inputs from a fixed seed, and compare both
with onnxruntime. Later stages add compile, deal and the two-party run.
"""

from __future__ import annotations

import os
import time

import numpy as np
from rich.console import Console
from rich.table import Table

FLOAT_TOL = 1e-4
FIXED_TOL = 0.02


def run_demo(workdir: str, image_size: int = 224, batch: int = 2, num_classes: int = 2,
             weights: str | None = None, frac_bits: int = 12) -> bool:
    import onnxruntime as ort

    from fssc.models.export import export_model, synthetic_images

    from .interp import run_fixed, run_float
    from .onnx_import import import_onnx

    con = Console()
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "resnet18.onnx")
    times = {}

    t = time.perf_counter()
    info = export_model("resnet18", path, num_classes, weights, image_size, batch)
    times["export"] = time.perf_counter() - t
    con.print(f"[bold]export[/]  {path}: {info.nodes} ONNX nodes, {info.batchnorms} BatchNormalization, "
              f"weights: {info.weights}")

    t = time.perf_counter()
    g = import_onnx(path)
    times["import"] = time.perf_counter() - t
    con.print(f"[bold]import[/]  {len(g.ops)} IR ops, {sum(v.size for v in g.values.values() if v.is_const):,} "
              f"weights (model owner's)")

    x = synthetic_images(batch, image_size, seed=7).numpy().astype(np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    t = time.perf_counter()
    ref = sess.run(None, {g.inputs[0]: x})[0]
    times["onnxruntime"] = time.perf_counter() - t
    t = time.perf_counter()
    yf = run_float(g, x)[0]
    times["float interpreter"] = time.perf_counter() - t
    t = time.perf_counter()
    yq = run_fixed(g, x, frac_bits=frac_bits)[0]
    times[f"fixed-point interpreter (f={frac_bits})"] = time.perf_counter() - t

    err_f = float(np.abs(yf - ref).max())
    err_q = float(np.abs(yq - ref).max())
    lab_ref, lab_f, lab_q = ref.argmax(1), yf.argmax(1), yq.argmax(1)

    tab = Table(title=f"ResNet-18, batch {batch}, {image_size}x{image_size}, {num_classes} classes")
    tab.add_column("image")
    tab.add_column("onnxruntime logits")
    tab.add_column("float interp")
    tab.add_column("fixed-point")
    tab.add_column("labels (ort/float/fixed)")
    for i in range(batch):
        fmt = lambda v: " ".join(f"{a:+.4f}" for a in v)  # noqa: E731
        tab.add_row(str(i), fmt(ref[i]), fmt(yf[i]), fmt(yq[i]), f"{lab_ref[i]} / {lab_f[i]} / {lab_q[i]}")
    con.print(tab)
    con.print(f"max |float - ort| = {err_f:.2e} (tolerance {FLOAT_TOL:g}); "
              f"max |fixed - ort| = {err_q:.4f} (tolerance {FIXED_TOL:g})")
    con.print("times: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    ok = err_f <= FLOAT_TOL and err_q <= FIXED_TOL and (lab_ref == lab_f).all() and (lab_ref == lab_q).all()
    con.print("[bold green]OK[/]: labels agree with onnxruntime" if ok else "[bold red]FAIL[/]: results disagree")
    return bool(ok)
