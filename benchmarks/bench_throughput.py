"""Bulk labelling with all three roles on this one machine: images per hour.

    fssc bench throughput [--images 20] [--image-size 64] [--batch 2] [--workers 1] [--workdir bench-throughput]

Exports and compiles ResNet-18 (2 classes, labels output) for batches of ``--batch``, deals the key batches
for all the images ahead of time (``fssc deal --batches B --workers W``, timed), then runs the model owner
and the data owner as two processes over TCP loopback with mutual TLS, labelling every image in one session
(the masked weights once, then one key batch per image batch). Prints images per hour of the two-party
session (keys dealt ahead), the dealer's time separately (per image and as images per hour of dealing), and
both together as if dealing and labelling ran one after the other on this machine. The key folder is
deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil

from fssc.benchmarks.bench_resnet import FSSC, _timed_child, export_and_compile


def run(
    images: int = 20, image_size: int = 64, batch: int = 2, workers: int = 1, workdir: str = "bench-throughput"
) -> dict:
    from fssc.compiler.demo import _write_images
    from fssc.runtime.certs import make_certs
    from fssc.runtime.loopback import run_loopback
    from fssc.runtime.results import read_results

    if images < 1 or batch < 1:
        raise SystemExit("--images and --batch must be at least 1")
    keys, certs = os.path.join(workdir, "keys"), os.path.join(workdir, "certs")
    shutil.rmtree(keys, ignore_errors=True)
    _, prog, res, _ = export_and_compile(workdir, image_size, batch, "labels")
    batches = math.ceil(images / batch)
    tot = res.report.to_dict()["totals"]
    need = batches * batch * (tot["key_bytes_p0_per_image"] + tot["key_bytes_p1_per_image"])
    free = shutil.disk_usage(os.path.abspath(workdir)).free
    if need > 0.9 * free:
        raise SystemExit(
            f"{batches} key batches need about {need / 1e9:.1f} GB, {workdir} has {free / 1e9:.1f} GB free: "
            "fewer --images or a smaller --image-size"
        )
    make_certs(certs)
    folder = os.path.join(workdir, "images")
    shutil.rmtree(folder, ignore_errors=True)
    _write_images(folder, images, image_size)
    out_json, stats_json = os.path.join(workdir, "results.jsonl"), os.path.join(workdir, "stats.json")
    if os.path.exists(out_json):
        os.remove(out_json)
    try:
        cmd = [FSSC, "deal", prog, "--batches", str(batches), "--workers", str(workers), "-o", keys]
        rc, deal_s, deal_rss, out = _timed_child(cmd)
        if rc:
            raise SystemExit(f"fssc deal failed:\n{out}")
        key_bytes = sum(
            os.path.getsize(os.path.join(keys, p, f)) for p in ("p0", "p1") for f in os.listdir(os.path.join(keys, p))
        )
        lb = run_loopback(prog, keys, certs, ["--images", folder, "--out", out_json, "--stats", stats_json])
        if lb.p0_rc or lb.p1_rc:
            raise SystemExit(f"two-party run failed:\n{lb.p0_out}{lb.p0_err}{lb.p1_out}")
    finally:
        shutil.rmtree(keys, ignore_errors=True)
    with open(stats_json) as fh:
        st = json.load(fh)
    labelled = len(read_results(out_json))
    if labelled != images:
        raise SystemExit(f"the data owner labelled {labelled} of {images} images")
    fig = {
        "images": images,
        "image_size": image_size,
        "batch": batch,
        "batches": batches,
        "deal_workers": workers,
        "deal_s": deal_s,
        "deal_s_per_image": deal_s / images,
        "deal_images_per_hour": 3600 * images / deal_s,
        "key_bytes": key_bytes,
        "rss_dealer_mb": deal_rss,
        "session_s": lb.seconds,
        "setup_s": st["timings"]["setup"],
        "offline_s": st["timings"]["offline"],
        "online_s": st["timings"]["online"],
        "keys_wait_s": st["timings"]["keys"],
        "images_per_hour": 3600 * images / lb.seconds,
        "images_per_hour_with_dealing": 3600 * images / (lb.seconds + deal_s),
        "bytes_sent_p0": st["bytes_sent"],
        "bytes_sent_p1": st["bytes_received"],
        "rounds": st["rounds"],
        "rss_p0_mb": lb.p0_max_rss_mb,
        "rss_p1_mb": lb.p1_max_rss_mb,
    }
    print(
        f"ResNet-18, {image_size}x{image_size}, {images} images in batches of {batch}, dealer and both parties on "
        "this machine (TCP loopback, mutual TLS)"
    )
    rows = [
        (
            f"dealer, ahead of time: {batches} batches, {workers} worker(s)",
            f"{deal_s:.1f} s ({deal_s / images:.2f} s per image, {fig['deal_images_per_hour']:,.0f} images/hour), "
            f"{key_bytes / 1e9:.2f} GB of keys",
        ),
        (
            "two-party session, wall (connect, weights, every batch)",
            f"{lb.seconds:.1f} s = setup {fig['setup_s']:.1f} + offline {fig['offline_s']:.1f} + online "
            f"{fig['online_s']:.1f} + waiting for its key files {fig['keys_wait_s']:.1f} s + the rest",
        ),
        ("images per hour, keys dealt ahead", f"{fig['images_per_hour']:,.0f}"),
        ("images per hour, dealing then labelling on this machine", f"{fig['images_per_hour_with_dealing']:,.0f}"),
        (
            "peak RSS, data owner / model owner / dealer",
            f"{lb.p0_max_rss_mb:,.0f} / {lb.p1_max_rss_mb:,.0f} / {deal_rss:,.0f} MB",
        ),
        (
            "rounds, MB sent data owner / model owner",
            f"{st['rounds']}, {st['bytes_sent'] / 1e6:,.1f} / {st['bytes_received'] / 1e6:,.1f}",
        ),
    ]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--workdir", default="bench-throughput")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    fig = run(a.images, a.image_size, a.batch, a.workers, a.workdir)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(fig, fh, indent=1)


if __name__ == "__main__":
    main()
