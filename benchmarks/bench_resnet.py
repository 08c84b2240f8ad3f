"""ResNet-18 end to end: the figures docs/protocol.md reports, in one run.

    fssc bench resnet [--image-size 224] [--batch 2] [--workdir bench-out]

Exports ResNet-18 (2 classes), compiles it, deals one key batch (a separate
process, timed, with its peak memory), runs the model owner and the data owner
as two processes over TCP loopback with mutual TLS, deals two more batches with
``fssc deal --workers 2`` (timed, then deleted), and prints: online and offline
time, dealer time with 1 and 2 workers, key bytes per party per image (measured
and the cost model's estimate), bytes sent, rounds, peak RSS per process, and
onnxruntime's plaintext time on the same machine in the same run.

Beside the online time, its AES floor: the AES blocks each party's online phase
needs (the cost model's ``aes_blocks_p0/p1``) over this machine's one-core
AES-ECB rate, measured in the run. Beside the dealer, its I/O floor: the key
bytes of a batch over the rates at which this machine writes a file of that
size and hashes it (SHA-256, the key files' checksum), also measured in the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def _timed_child(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run a command; exit code, seconds, peak RSS (MB, polled from /proc) and its output."""
    from fssc.runtime.loopback import wait_for

    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        rc, rss = wait_for(proc, 3600)
        log.seek(0)
        return rc, time.perf_counter() - t, rss, log.read()


def aes_rate(seconds: float = 0.5) -> float:
    """One core's fixed-key AES-ECB rate (blocks/s) through the runtime's own MMO call, 1 MB per call."""
    from fssc.runtime.prg import mmo, mmo_buffer

    blocks = np.arange(1 << 17, dtype=np.uint64).reshape(-1, 2)  # 65536 blocks, 1 MB
    scratch = mmo_buffer(len(blocks))
    done, t = 0, time.perf_counter()
    while (dt := time.perf_counter() - t) < seconds:
        mmo(blocks, scratch)
        done += len(blocks)
    return done / dt


def hash_rate(nbytes: int = 1 << 29) -> float:
    """SHA-256 bytes/s over an in-memory buffer, 8 MB per update (as the key writer hashes)."""
    buf = memoryview(os.urandom(8 << 20))
    h = hashlib.sha256()
    t = time.perf_counter()
    for _ in range(nbytes // len(buf)):
        h.update(buf)
    return (nbytes // len(buf)) * len(buf) / (time.perf_counter() - t)


def write_rate(folder: str, nbytes: int) -> float:
    """Bytes/s writing a new file of ``nbytes`` in ``folder`` in 8 MB writes, not fsync'd (as the dealer
    writes its key files), then deleting it."""
    buf = memoryview(os.urandom(8 << 20))
    path = os.path.join(folder, "write-rate.tmp")
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        for _ in range(max(1, nbytes // len(buf))):
            fh.write(buf)
    dt = time.perf_counter() - t
    os.remove(path)
    return max(1, nbytes // len(buf)) * len(buf) / dt


def run(image_size: int = 224, batch: int = 2, workdir: str = "bench-out") -> dict:
    import onnxruntime as ort
    from fssc.compiler.compile import compile_model
    from fssc.compiler.demo import _write_images
    from fssc.models.export import export_model
    from fssc.runtime.certs import make_certs
    from fssc.runtime.images import Preprocess, load_inputs
    from fssc.runtime.loopback import run_loopback
    from fssc.runtime.results import read_results
    from rich.console import Console

    os.makedirs(workdir, exist_ok=True)
    onnx_path, prog, keys, certs = (os.path.join(workdir, n) for n in ("resnet18.onnx", "prog", "keys", "certs"))
    shutil.rmtree(keys, ignore_errors=True)
    export_model("resnet18", onnx_path, 2, None, image_size, batch)
    t = time.perf_counter()
    res = compile_model(onnx_path, prog, output_mode="logits", console=Console(quiet=True))
    compile_s = time.perf_counter() - t
    make_certs(certs)
    fssc = os.path.join(os.path.dirname(sys.executable), "fssc")
    rc, deal_s, deal_rss, out = _timed_child([fssc, "deal", prog, "--batches", "1", "-o", keys])
    if rc:
        raise SystemExit(f"fssc deal failed:\n{out}")
    k0 = os.path.getsize(os.path.join(keys, "p0", "batch0000.key"))
    k1 = os.path.getsize(os.path.join(keys, "p1", "batch0000.key"))
    w_rate = write_rate(workdir, k0 + k1)
    h_rate = hash_rate()
    images = os.path.join(workdir, "images")
    _write_images(images, batch, image_size)
    out_json, stats_json = os.path.join(workdir, "results.jsonl"), os.path.join(workdir, "stats.json")
    if os.path.exists(out_json):
        os.remove(out_json)  # an earlier run's results: the data owner appends to its --out file
    lb = run_loopback(prog, keys, certs, ["--images", images, "--out", out_json, "--stats", stats_json])
    if lb.p0_rc or lb.p1_rc:
        raise SystemExit(f"two-party run failed:\n{lb.p0_out}{lb.p0_err}{lb.p1_out}")
    with open(stats_json) as fh:
        st = json.load(fh)
    keys2 = os.path.join(workdir, "keys-2-workers")
    shutil.rmtree(keys2, ignore_errors=True)
    rc, deal2_s, _, out = _timed_child([fssc, "deal", prog, "--batches", "2", "--workers", "2", "-o", keys2])
    shutil.rmtree(keys2, ignore_errors=True)  # two batches: GBs
    if rc:
        raise SystemExit(f"fssc deal --workers 2 failed:\n{out}")
    a_rate = aes_rate()
    x = load_inputs(images, Preprocess(size=image_size), (3, image_size, image_size))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"input": x})
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        ref = sess.run(None, {"input": x})[0]
        ts.append(time.perf_counter() - t)
    secure = np.array([r["logits"] for r in read_results(out_json)])
    tot = res.report.to_dict()["totals"]
    fig = {
        "image_size": image_size,
        "batch": batch,
        "online_s": st["timings"]["online"],
        "aes_blocks_p0": tot["aes_blocks_p0"],
        "aes_blocks_p1": tot["aes_blocks_p1"],
        "aes_blocks_per_s": a_rate,
        "online_aes_floor_p0_s": tot["aes_blocks_p0"] / a_rate,
        "online_aes_floor_p1_s": tot["aes_blocks_p1"] / a_rate,
        "offline_p0_s": st["timings"]["offline"],
        "weights_setup_s": st["timings"]["setup"],
        "two_party_wall_s": lb.seconds,
        "deal_s": deal_s,
        "deal_2_workers_2_batches_s": deal2_s,
        "deal_2_workers_per_batch_s": deal2_s / 2,
        "deal_key_bytes": k0 + k1,
        "write_bytes_per_s": w_rate,
        "sha256_bytes_per_s": h_rate,
        "deal_write_floor_s": (k0 + k1) / w_rate,
        "deal_hash_floor_s": (k0 + k1) / h_rate,
        "deal_io_floor_s": (k0 + k1) / w_rate + (k0 + k1) / h_rate,
        "compile_s": compile_s,
        "key_bytes_p0_per_image": k0 / batch,
        "key_bytes_p1_per_image": k1 / batch,
        "key_bytes_p0_per_image_est": tot["key_bytes_p0_per_image"],
        "key_bytes_p1_per_image_est": tot["key_bytes_p1_per_image"],
        "bytes_sent_p0": st["bytes_sent"],
        "bytes_sent_p1": st["bytes_received"],
        "weights_setup_bytes": res.report.setup_bytes,
        "rounds": st["rounds"],
        "rounds_est": tot["rounds"],
        "rss_p0_mb": lb.p0_max_rss_mb,
        "rss_p1_mb": lb.p1_max_rss_mb,
        "rss_dealer_mb": deal_rss,
        "onnxruntime_ms": 1e3 * float(np.median(ts)),
        "max_logit_diff": float(np.abs(secure - ref).max()),
        "labels_agree": bool((secure.argmax(1) == ref.argmax(1)).all()),
        "gates_per_image": tot["gates_per_image"],
    }
    mb = lambda b: f"{b / 1e6:,.1f} MB"  # noqa: E731
    print(f"ResNet-18, {image_size}x{image_size}, batch {batch}, two processes over TCP loopback (mutual TLS)")
    rows = [
        ("online (data owner's wall time, input to labels)", f"{fig['online_s']:.2f} s"),
        (
            "  its AES floor, P0 / P1 (cost model's AES blocks / one core's AES-ECB rate)",
            f"{fig['online_aes_floor_p0_s']:.2f} / {fig['online_aes_floor_p1_s']:.2f} s "
            f"({fig['aes_blocks_p0'] / 1e6:,.0f}M / {fig['aes_blocks_p1'] / 1e6:,.0f}M blocks "
            f"at {fig['aes_blocks_per_s'] / 1e6:,.0f}M blocks/s)",
        ),
        ("offline, data owner (its halves of the linear layers)", f"{fig['offline_p0_s']:.2f} s"),
        (
            "model owner's masked weights to data owner (once per session)",
            f"{fig['weights_setup_s']:.2f} s, {mb(fig['weights_setup_bytes'])}",
        ),
        ("two-party session, wall", f"{fig['two_party_wall_s']:.2f} s"),
        ("dealer, one batch (1 worker)", f"{fig['deal_s']:.2f} s"),
        (
            "dealer, 2 workers, 2 batches (per batch)",
            f"{fig['deal_2_workers_2_batches_s']:.2f} s ({fig['deal_2_workers_per_batch_s']:.2f} s)",
        ),
        (
            "  its I/O floor per batch: write + SHA-256 of both key files",
            f"{fig['deal_io_floor_s']:.2f} s = {fig['deal_write_floor_s']:.2f} + {fig['deal_hash_floor_s']:.2f} s "
            f"({mb(fig['deal_key_bytes'])} at {fig['write_bytes_per_s'] / 1e9:.2f} GB/s written, "
            f"{fig['sha256_bytes_per_s'] / 1e9:.2f} GB/s hashed)",
        ),
        ("compile", f"{fig['compile_s']:.2f} s"),
        ("comparison gates per image", f"{fig['gates_per_image']:,.0f}"),
        (
            "key bytes per image, party 0 (measured / estimated)",
            f"{mb(fig['key_bytes_p0_per_image'])} / {mb(fig['key_bytes_p0_per_image_est'])}",
        ),
        (
            "key bytes per image, party 1 (measured / estimated)",
            f"{mb(fig['key_bytes_p1_per_image'])} / {mb(fig['key_bytes_p1_per_image_est'])}",
        ),
        (
            "bytes sent, data owner / model owner (incl. weight setup)",
            f"{mb(fig['bytes_sent_p0'])} / {mb(fig['bytes_sent_p1'])}",
        ),
        ("rounds (measured / estimated)", f"{fig['rounds']} / {fig['rounds_est']}"),
        (
            "peak RSS, data owner / model owner / dealer",
            f"{fig['rss_p0_mb']:,.0f} / {fig['rss_p1_mb']:,.0f} / {fig['rss_dealer_mb']:,.0f} MB",
        ),
        ("onnxruntime plaintext, same batch (2 threads, median of 10)", f"{fig['onnxruntime_ms']:.1f} ms"),
        (
            "secure vs onnxruntime: max |logit diff|, labels agree",
            f"{fig['max_logit_diff']:.4f}, {'yes' if fig['labels_agree'] else 'NO'}",
        ),
    ]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workdir", default="bench-out")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args(argv)
    fig = run(a.image_size, a.batch, a.workdir)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(fig, fh, indent=1)


if __name__ == "__main__":
    main()
