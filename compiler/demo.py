"""``fssc demo``: the whole job on loopback, behind ``make demo``.

export ResNet-18 -> compile (checked with ``--verify``: the generated programs,
simulated in process, against the fixed-point interpreter and onnxruntime) ->
certificates -> deal -> start the model owner
(party 1) and the data owner (party 0) as two processes on 127.0.0.1 -> the
data owner prints its labels. The demo then compares them with onnxruntime on
the same preprocessed images and prints a short report: labels, logits next to
onnxruntime's, per-phase times and bytes exchanged. It exits 0 only if the
labels agree.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from rich.console import Console
from rich.table import Table


def _write_images(folder: str, n: int, size: int) -> list[str]:
    """n deterministic RGB test images (PNG), a little larger than the model input."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    side = round(size * 256 / 224)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(n):
        r = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * (i + 1) + yy * 0.5))
        g = 0.5 + 0.5 * np.cos(2 * np.pi * (yy * (i + 2) - xx))
        b = np.clip(1.0 - np.hypot(xx - 0.3 * (i + 1) % 1, yy - 0.6), 0, 1)
        img = (np.stack([r, g, b], -1) * 255).astype(np.uint8)
        p = os.path.join(folder, f"image{i}.png")
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def run_demo(
    workdir: str,
    image_size: int = 224,
    batch: int = 2,
    num_classes: int = 2,
    weights: str | None = None,
    frac_bits: int = 12,
    keep_keys: bool = False,
) -> bool:
    """Run the demo in ``workdir``; True if the secure labels equal onnxruntime's. Its key folder
    (workdir/keys, GBs at 224x224) is removed at the end, whether the demo passed, failed or raised,
    unless ``keep_keys``; the last line says which."""
    con = Console(width=max(120, Console().width))
    fssc_dir = os.path.abspath(workdir)
    try:
        return _run(con, fssc_dir, image_size, batch, num_classes, weights, frac_bits)
    finally:
        con.print(dispose_keys(os.path.join(fssc_dir, "keys"), keep_keys), markup=False, highlight=False)


def dispose_keys(keys: str, keep: bool) -> str:
    """Remove the demo's key folder ``keys`` unless ``keep``; returns the line saying where the keys are
    or that they were removed."""
    if not os.path.exists(keys):
        return "keys: none were dealt"
    if keep:
        return f"keys: kept in {keys} (see `fssc keys status {keys}`)"
    shutil.rmtree(keys)
    return f"keys: removed {keys} (--keep-keys keeps them)"


def _run(
    con: Console, fssc_dir: str, image_size: int, batch: int, num_classes: int, weights: str | None, frac_bits: int
) -> bool:
    import onnxruntime as ort
    from fssc.compiler.backend.trust import deal
    from fssc.compiler.compile import compile_model
    from fssc.models.export import export_model
    from fssc.runtime.certs import make_certs
    from fssc.runtime.images import Preprocess, load_inputs
    from fssc.runtime.loopback import run_loopback
    from fssc.runtime.results import read_results

    for sub in ("prog", "keys", "images", "certs"):
        shutil.rmtree(os.path.join(fssc_dir, sub), ignore_errors=True)
    os.makedirs(fssc_dir, exist_ok=True)
    onnx_path = os.path.join(fssc_dir, "resnet18.onnx")
    prog, keys, certs = (os.path.join(fssc_dir, d) for d in ("prog", "keys", "certs"))
    times = {}

    con.rule("fssc demo: encrypted ResNet-18 inference, two parties on loopback")
    t = time.perf_counter()
    info = export_model("resnet18", onnx_path, num_classes, weights, image_size, batch)
    times["export"] = time.perf_counter() - t
    con.print(
        f"1. export   {info.nodes} ONNX nodes ({info.batchnorms} BatchNormalization), {num_classes} classes, "
        f"input [{batch},3,{image_size},{image_size}], weights: {info.weights}"
    )

    t = time.perf_counter()
    quiet = Console(quiet=True)
    res = compile_model(onnx_path, prog, frac_bits, output_mode="logits", console=quiet, verify=batch)
    times["compile"] = time.perf_counter() - t
    tot = res.report.to_dict()["totals"]
    assert res.program is not None  # compile_model generated the programs
    con.print(
        f"2. compile  {len(res.graph.ops)} IR ops after {len(res.records) - 1} passes; "
        f"{tot['gates_per_image']:,.0f} comparison gates per image; program {res.program.hash[:12]}; "
        f"checked with --verify {batch}:"
    )
    assert res.verification is not None  # compile_model ran --verify
    for line in res.verification.lines()[1:]:
        con.print(f"           {line.strip()}", markup=False, highlight=False)

    make_certs(certs)
    t = time.perf_counter()
    dealt = deal(prog, keys, 1)
    times["deal"] = time.perf_counter() - t
    _, k0, k1, _ = dealt[0]
    con.print(
        f"3. deal     keys for one batch: party 0 {k0 / 1e6:,.0f} MB, party 1 {k1 / 1e6:,.0f} MB "
        f"({k0 / batch / 1e6:,.0f} / {k1 / batch / 1e6:,.0f} MB per image); the dealer ran its own copy of "
        f"dealer/program.py, regenerated from manifest.json and compared with the received file"
    )

    images = os.path.join(fssc_dir, "images")
    _write_images(images, batch, image_size)
    out_json, stats_json = os.path.join(fssc_dir, "results.jsonl"), os.path.join(fssc_dir, "stats.json")
    if os.path.exists(out_json):
        os.remove(out_json)  # the previous demo's results: the data owner appends to its --out file
    run = run_loopback(prog, keys, certs, ["--images", images, "--out", out_json, "--stats", stats_json])
    times["two-party run"] = run.seconds
    if run.p0_rc != 0 or run.p1_rc != 0:
        con.print(f"[bold red]the two-party run failed[/] (data owner exit {run.p0_rc}, model owner exit {run.p1_rc}):")
        con.print(run.p0_out + run.p0_err + run.p1_out, markup=False, highlight=False)
        return False
    r0, p1_out = run.p0_out, run.p1_out
    con.print("4. run      fssc run --party 0 (its program checked against manifest.json, fssc's copy runs):")
    for line in r0.strip().splitlines():
        con.print(f"           {line}", markup=False, highlight=False)
    con.print(f"           model owner's output: {p1_out.strip().splitlines()[-1]}", markup=False, highlight=False)

    results = read_results(out_json)
    with open(stats_json) as fh:
        st = json.load(fh)
    x = load_inputs(images, Preprocess(size=image_size), (3, image_size, image_size))
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    t = time.perf_counter()
    ref = sess.run(None, {res.graph.inputs[0]: x})[0]
    times["onnxruntime (plaintext)"] = time.perf_counter() - t
    secure = np.array([r["logits"] for r in results])
    labels = np.array([r["label"] for r in results])
    tab = Table(title="secure result vs onnxruntime (plaintext)", title_justify="left")
    for col in ("image", "secure logits", "onnxruntime logits", "max |diff|", "secure label", "onnxruntime label"):
        tab.add_column(col)
    for i, r in enumerate(results):
        tab.add_row(
            os.path.basename(r["input"]),
            " ".join(f"{v:+.4f}" for v in secure[i]),
            " ".join(f"{v:+.4f}" for v in ref[i]),
            f"{np.abs(secure[i] - ref[i]).max():.4f}",
            str(labels[i]),
            str(int(ref[i].argmax())),
        )
    con.print(tab)
    tm = st["timings"]
    con.print(
        f"times: export {times['export']:.1f} s, compile {times['compile']:.1f} s, deal {times['deal']:.1f} s, "
        f"two-party run {times['two-party run']:.1f} s (P1's weights to P0 {tm.get('setup', 0):.1f} s, "
        f"P0 offline {tm.get('offline', 0):.1f} s, online {tm.get('online', 0):.1f} s); "
        f"onnxruntime {times['onnxruntime (plaintext)'] * 1e3:.0f} ms"
    )
    con.print(f"memory: peak RSS data owner {run.p0_max_rss_mb:,.0f} MB, model owner {run.p1_max_rss_mb:,.0f} MB")
    con.print(
        f"traffic: data owner sent {st['bytes_sent'] / 1e6:,.1f} MB, received {st['bytes_received'] / 1e6:,.1f} MB "
        f"(incl. the model owner's masked weights, {res.report.setup_bytes / 1e6:,.1f} MB, sent once per session); "
        f"{st['rounds']} rounds"
    )
    ok = bool((labels == ref.argmax(1)).all())
    close = float(np.abs(secure - ref).max())
    if ok:
        con.print(f"[bold green]OK[/]: the secure labels equal onnxruntime's (logits within {close:.4f})")
    else:
        con.print("[bold red]FAIL[/]: the secure labels differ from onnxruntime's")
    return ok
