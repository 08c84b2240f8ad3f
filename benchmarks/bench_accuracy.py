"""Accuracy against headroom: what each comparison setting gets right, refuses and costs.

    fssc bench accuracy [--image-size 224] [--batch 2] [--batches 1] [--margins 2,3,4,6] [--no-two-process]

ResNet-18 (2 classes, random BN-calibrated weights, the default calibration)
compiled with ``--margin-bits K`` for each K and with ``--bits full``, in
labels mode (what a data owner gets). Inputs: ``--batches`` batches from the
calibration distribution (``synthetic_inputs``, another seed than the
calibration's) scaled by 1, 2, 4 and 8. For every setting and scale:

* the data owner's input guard (``runtime.guard.out_of_range`` with the
  manifest's ``input_guard``, what ``party0/program.py`` checks): how many
  images it refuses;
* the in-process two-party simulation of the generated programs
  (``compiler.crosscheck``): max |logit diff| and label agreement against
  onnxruntime over all images (guard off) and over the accepted ones (guard
  on), the number of overflowing comparisons, and whether the secure run
  equals the fixed-point interpreter;
* key bytes per image (both parties, the cost model);
* online time: one real two-process run (TCP loopback, mutual TLS) of the
  scale-1 batch per setting, unless ``--no-two-process``.

Also the smallest headroom an unscaled input leaves (planned bits minus the
bits it needed, over all comparisons): how much of the margin the
calibration's own distribution uses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

SCALES = (1, 2, 4, 8)


def _settings(margins, full: bool = True) -> list[tuple[str, dict]]:
    return [(f"margin {k}", {"margin_bits": k}) for k in margins] + ([("bits full", {"bits": "full"})] if full else [])


def _online(prog: str, workdir: str, x: np.ndarray) -> float:
    """One two-process run of batch x; the data owner's online seconds."""
    from fssc.compiler.backend.trust import deal
    from fssc.runtime.certs import make_certs
    from fssc.runtime.loopback import run_loopback

    certs, keys = os.path.join(workdir, "certs"), os.path.join(workdir, "keys")
    if not os.path.exists(os.path.join(certs, "ca.pem")):
        make_certs(certs)
    shutil.rmtree(keys, ignore_errors=True)
    npy, out = os.path.join(workdir, "x1.npy"), os.path.join(workdir, "stats.json")
    np.save(npy, x)
    try:
        deal(prog, keys, 1)
        run = run_loopback(prog, keys, certs, ["--input", npy, "--stats", out])
        if run.p0_rc or run.p1_rc:
            raise SystemExit(f"two-party run failed:\n{run.p0_out}{run.p0_err}{run.p1_out}")
        with open(out) as fh:
            return float(json.load(fh)["timings"]["online"])
    finally:
        shutil.rmtree(keys, ignore_errors=True)  # 224x224 keys are gigabytes


def run(
    image_size: int = 224,
    batch: int = 2,
    batches: int = 1,
    margins=(2, 3, 4, 6),
    workdir: str = "bench-accuracy",
    two_process: bool = True,
    echo=print,
    full: bool = True,
) -> dict:
    from fssc.compiler.compile import compile_model, input_guard
    from fssc.compiler.reference.crosscheck import VERIFY_SEED, cross_check, pair_stats
    from fssc.models.export import export_model
    from fssc.passes.range_analysis import default_calibration
    from fssc.runtime import ring
    from fssc.runtime.guard import out_of_range
    from rich.console import Console

    os.makedirs(workdir, exist_ok=True)
    onnx_path = os.path.join(workdir, "resnet18.onnx")
    export_model("resnet18", onnx_path, 2, None, image_size, batch)
    xs = default_calibration((batch, 3, image_size, image_size), batches, seed=VERIFY_SEED)
    rows, t_all = [], time.perf_counter()
    quiet = Console(quiet=True)
    for name, kw in _settings(margins, full):
        t = time.perf_counter()
        prog = os.path.join(workdir, name.replace(" ", "-"))
        res = compile_model(onnx_path, prog, console=quiet, **kw)
        guard = input_guard(res)
        scale = res.graph.values[res.graph.inputs[0]].fixed_scale
        key_mb = (res.report.per_image("key_p0") + res.report.per_image("key_p1")) / 1e6
        online = _online(prog, workdir, xs[0]) if two_process else None
        for k in SCALES:
            data = [x * np.float32(k) for x in xs]
            ver = cross_check(res.graph, onnx_path, data)
            accepted, ratio = [], []
            cal = guard["inputs"][0]["calibrated_max_abs"]
            for x in data:
                ok = np.ones(len(x), bool)
                for i in range(len(x)):  # the data owner's check, one image at a time
                    enc = ring.encode(x[i : i + 1], scale)
                    ok[i] = out_of_range({"input_guard": guard}, res.graph.inputs[0], enc, ["x"]) is None
                    ratio.append(float(np.abs(ring.signed(enc)).max()) / cal)
                accepted.append(ok)
            off = pair_stats(ver.records)[1]  # onnxruntime vs secure
            on = pair_stats(ver.records, accepted)[1]
            slack = min((min(r.slack.values()) for r in ver.records if r.slack), default=None)
            row = {
                "setting": name,
                "scale": k,
                "images": ver.inputs,
                "key_mb_per_image": key_mb,
                "refused": int(sum((~a).sum() for a in accepted)),
                "guard_off_max_diff": off.max_logit_diff,
                "guard_off_agree": off.agree,
                "guard_on_max_diff": on.max_logit_diff,
                "guard_on_agree": on.agree,
                "guard_on_total": on.total,
                "overflowing_comparisons": len(ver.overflows),
                "exact": ver.exact,
                "min_slack_bits": slack,
                "online_s": online if k == 1 else None,
                "guard_headroom_bits": guard["headroom_bits"],
                "input_over_calibrated": ratio,  # per image: max |x| / calibrated max |x|
                "secure_label_ok": [bool(v) for r in ver.records for v in r.secure_labels == r.ref_labels],
                "secure_max_diff": [
                    float(v)
                    for r in ver.records
                    if r.secure_logits is not None
                    for v in np.abs(r.secure_logits - r.ref_logits).max(axis=1)
                ],
                "slack_per_batch": [min(r.slack.values()) if r.slack else None for r in ver.records],
            }
            rows.append(row)
            echo(json.dumps(row))
        echo(f"# {name}: {time.perf_counter() - t:.0f} s")
    fig = {"image_size": image_size, "batch": batch, "batches": batches, "rows": rows}
    fig["seconds"] = time.perf_counter() - t_all
    echo("")
    for line in table(fig):
        echo(line)
    return fig


def table(fig: dict) -> list[str]:
    """The measurements as a Markdown table (docs/accuracy.md)."""

    def d(v):
        return "-" if v is None else f"{v:.3g}"

    out = [
        f"ResNet-18 {fig['image_size']}x{fig['image_size']}, batch {fig['batch']}, "
        f"{fig['batches'] * fig['batch']} images per scale",
        "",
        "| setting | key MB/image | scale | overflowing comparisons | slack at this scale (bits) "
        "| guard off: max abs logit diff | guard off: labels agree | guard on: refused "
        "| guard on: max abs logit diff | guard on: labels agree | secure == fixed point | online s (x1) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {r['setting']} | {r['key_mb_per_image']:,.1f} | x{r['scale']} | {r['overflowing_comparisons']} "
        f"| {r['min_slack_bits']} | {d(r['guard_off_max_diff'])} | {r['guard_off_agree']}/{r['images']} "
        f"| {r['refused']}/{r['images']} | {d(r['guard_on_max_diff'])} "
        f"| {r['guard_on_agree']}/{r['guard_on_total']} | {'yes' if r['exact'] else 'no'} "
        f"| {d(r['online_s'])} |"
        for r in fig["rows"]
    ]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--margins", default="2,3,4,6")
    ap.add_argument("--workdir", default="bench-accuracy")
    ap.add_argument("--no-two-process", action="store_true")
    ap.add_argument("--no-full", action="store_true", help="skip the --bits full setting")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args(argv)
    fig = run(
        a.image_size,
        a.batch,
        a.batches,
        [int(k) for k in a.margins.split(",")],
        a.workdir,
        not a.no_two_process,
        full=not a.no_full,
    )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(fig, fh, indent=1)


if __name__ == "__main__":
    main()
