"""How ResNet-18's costs grow with batch and image size: one table.

    fssc bench scaling [--sizes 64,128,224] [--batches 1,2,8] [--workdir bench-scaling]

For every image size and batch: export and compile ResNet-18 (2 classes, logits), deal one key batch (one
worker, timed), run the two parties as two processes over TCP loopback with mutual TLS, and print the online
time (the data owner's, wall and CPU), its offline precompute (wall and CPU), the dealer's time and the key
bytes, each for the batch and per image (per-image costs should stay flat with batch), with rounds and the
parties' peak memory. A setting whose keys would not fit the free disk space is skipped with a line saying
so. Every key folder is deleted as soon as its run ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from fssc.benchmarks.bench_resnet import FSSC, _timed_child, export_and_compile


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise SystemExit(f"{what} {text!r}: a comma-separated list of integers") from None


def one(image_size: int, batch: int, workdir: str) -> dict:
    """One setting's figures, or {"skipped": reason}."""
    from fssc.compiler.demo import _write_images
    from fssc.runtime.certs import make_certs
    from fssc.runtime.loopback import run_loopback

    keys, certs = os.path.join(workdir, "keys"), os.path.join(workdir, "certs")
    shutil.rmtree(keys, ignore_errors=True)
    _, prog, res, _ = export_and_compile(workdir, image_size, batch, "logits")
    tot = res.report.to_dict()["totals"]
    need = batch * (tot["key_bytes_p0_per_image"] + tot["key_bytes_p1_per_image"])
    free = shutil.disk_usage(os.path.abspath(workdir)).free
    if need > 0.5 * free:
        return {"skipped": f"keys of about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free on disk"}
    make_certs(certs)
    images = os.path.join(workdir, "images")
    shutil.rmtree(images, ignore_errors=True)
    _write_images(images, batch, image_size)
    stats_json = os.path.join(workdir, "stats.json")
    try:
        rc, deal_s, deal_rss, out = _timed_child([FSSC, "deal", prog, "--batches", "1", "-o", keys])
        if rc:
            raise SystemExit(f"fssc deal failed ({image_size}x{image_size}, batch {batch}):\n{out}")
        k0 = os.path.getsize(os.path.join(keys, "p0", "batch0000.key"))
        k1 = os.path.getsize(os.path.join(keys, "p1", "batch0000.key"))
        lb = run_loopback(prog, keys, certs, ["--images", images, "--stats", stats_json])
        if lb.p0_rc or lb.p1_rc:
            raise SystemExit(f"two-party run failed ({image_size}x{image_size}, batch {batch}):\n{lb.p0_err}")
    finally:
        shutil.rmtree(keys, ignore_errors=True)
    with open(stats_json) as fh:
        st = json.load(fh)
    return {
        "online_s": st["timings"]["online"],
        "online_cpu_s": st["timings"]["online_cpu"],
        "offline_s": st["timings"]["offline"],
        "offline_cpu_s": st["timings"]["offline_cpu"],
        "deal_s": deal_s,
        "key_bytes_p0": k0,
        "key_bytes_p1": k1,
        "rounds": st["rounds"],
        "online_bytes_sent_p0": st["timings"]["online_sent"],
        "online_bytes_sent_p1": st["timings"]["online_received"],
        "rss_p0_mb": lb.p0_max_rss_mb,
        "rss_p1_mb": lb.p1_max_rss_mb,
        "rss_dealer_mb": deal_rss,
    }


def run(sizes=(64, 128, 224), batches=(1, 2, 8), workdir: str = "bench-scaling") -> dict:
    fig: dict = {"settings": []}
    print("ResNet-18 by image size and batch: two processes over TCP loopback (mutual TLS), one dealer worker")
    head = (
        f"  {'size':>4} {'batch':>5} {'online s':>9} {'/image':>7} {'CPU s':>6} {'offline s':>9} {'/image':>7} "
        f"{'CPU s':>6} {'dealer s':>9} {'/image':>7} {'key MB/image P0':>15} {'P1':>7} {'rounds':>6} {'RSS MB P0':>9} "
        f"{'P1':>6}"
    )
    print(head, flush=True)
    for size in sizes:
        for batch in batches:
            f = one(size, batch, os.path.join(workdir, f"s{size}-b{batch}"))
            fig["settings"].append({"image_size": size, "batch": batch, **f})
            if "skipped" in f:
                print(f"  {size:>4} {batch:>5}  skipped: {f['skipped']}", flush=True)
                continue
            print(
                f"  {size:>4} {batch:>5} {f['online_s']:>9.2f} {f['online_s'] / batch:>7.2f} {f['online_cpu_s']:>6.2f} "
                f"{f['offline_s']:>9.2f} {f['offline_s'] / batch:>7.2f} {f['offline_cpu_s']:>6.2f} "
                f"{f['deal_s']:>9.2f} {f['deal_s'] / batch:>7.2f} "
                f"{f['key_bytes_p0'] / batch / 1e6:>15.1f} {f['key_bytes_p1'] / batch / 1e6:>7.1f} "
                f"{f['rounds']:>6} {f['rss_p0_mb']:>9,.0f} {f['rss_p1_mb']:>6,.0f}",
                flush=True,
            )
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128,224")
    ap.add_argument("--batches", default="1,2,8")
    ap.add_argument("--workdir", default="bench-scaling")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    fig = run(_ints(a.sizes, "--sizes"), _ints(a.batches, "--batches"), a.workdir)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(fig, fh, indent=1)


if __name__ == "__main__":
    main()
