"""Many batches back to back in one session: memory stays flat, and what one model-owner machine serves.

    fssc bench session [--batches 20] [--image-size 64] [--batch 2] [--workers 2] [--workdir bench-session]

Exports ResNet-18 (2 classes) at the image size, compiles it, deals ``--batches`` key batches
(``fssc deal --workers``, timed), writes ``batches x batch`` images, and runs both parties as processes
over TCP loopback with mutual TLS, one session labelling all images (one key batch per image batch). Each
party's process records its peak resident memory (VmHWM, /proc/self/status) and its current one after
every batch: the figures printed are the peak after the first batch and after the last, and their ratio
(the target: within 10 %). Also: the session's wall time, seconds per batch and images per second (one
session at a time; on this machine both parties share its cores), each party's CPU seconds per batch (what
a model-owner core can serve, with sessions from several data owners at once), and the dealer's seconds per
batch. Key batches are deleted as they are used; any left (a failed run) are
deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

_CHILD = "--party-child"  # this module run as one party's process, recording memory after each batch


def _memory_mb() -> tuple[float, float]:
    """(VmHWM, VmRSS) of this process in MB."""
    got = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM:", "VmRSS:")):
                got[line.split(":")[0]] = int(line.split()[1]) / 1024
    return got.get("VmHWM", 0.0), got.get("VmRSS", 0.0)


def _child(role: str, prog: str, rss_log: str, argv: list[str]) -> int:
    """One party's program as ``fssc run`` runs it (the data owner's regenerated and checked), with its batch
    function wrapped to append {"batch", "hwm_mb", "rss_mb", "t", "cpu_s"} to ``rss_log`` after each batch
    (``cpu_s``: the process's CPU time so far, all threads)."""
    from fssc.compiler.backend.trust import checked_program
    from fssc.runtime import data_owner, party_main
    from fssc.runtime import serve as service

    owner, name = (data_owner, "run_p0_batch") if role == "party0" else (service, "run_p1_batch")
    inner = getattr(owner, name)
    count = [0]

    def recorded(*args, **kwargs):
        out = inner(*args, **kwargs)
        count[0] += 1
        hwm, rss = _memory_mb()
        with open(rss_log, "a") as fh:
            rec = {"batch": count[0], "hwm_mb": hwm, "rss_mb": rss, "t": time.time(), "cpu_s": time.process_time()}
            fh.write(json.dumps(rec) + "\n")
        return out

    setattr(owner, name, recorded)
    return party_main.main(role, checked_program(prog, role), argv)


def _text(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _records(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run(
    batches: int = 20, image_size: int = 64, batch: int = 2, workers: int = 2, workdir: str = "bench-session"
) -> dict:
    from fssc.compiler.compile import compile_model
    from fssc.compiler.demo import _write_images
    from fssc.models.export import export_model
    from fssc.runtime.certs import make_certs
    from fssc.runtime.loopback import wait_for
    from rich.console import Console

    os.makedirs(workdir, exist_ok=True)
    onnx_path, prog, keys, certs, images = (
        os.path.join(workdir, n) for n in ("resnet18.onnx", "prog", "keys", "certs", "images")
    )
    for d in (keys, images):
        shutil.rmtree(d, ignore_errors=True)
    logs = {n: os.path.join(workdir, f"{n}.log") for n in ("p0", "p1")}
    rss = {n: os.path.join(workdir, f"{n}.rss.jsonl") for n in ("p0", "p1")}
    for p in (*rss.values(), os.path.join(workdir, "labels.jsonl"), os.path.join(workdir, "port")):
        if os.path.exists(p):
            os.remove(p)
    try:
        export_model("resnet18", onnx_path, 2, None, image_size, batch)
        compile_model(onnx_path, prog, output_mode="logits", console=Console(quiet=True))
        make_certs(certs)
        fssc = os.path.join(os.path.dirname(sys.executable), "fssc")
        t = time.perf_counter()
        deal = subprocess.run(
            [fssc, "deal", prog, "--batches", str(batches), "--workers", str(workers), "-o", keys],
            capture_output=True,
            text=True,
            check=False,
        )
        deal_s = time.perf_counter() - t
        if deal.returncode:
            raise SystemExit(f"fssc deal failed:\n{deal.stdout}{deal.stderr}")
        key_bytes = sum(
            os.path.getsize(os.path.join(keys, p, f)) for p in ("p0", "p1") for f in os.listdir(os.path.join(keys, p))
        )
        _write_images(images, batches * batch, image_size)
        me = [sys.executable, "-P", "-m", "fssc.benchmarks.bench_session", _CHILD]
        ready = os.path.join(workdir, "port")
        with open(logs["p1"], "w") as log1:
            p1 = subprocess.Popen(
                [*me, "party1", prog, rss["p1"], "--keys", os.path.join(keys, "p1"), "--certs", certs]
                + ["--listen", "127.0.0.1:0", "--ready-file", ready, "--connect-timeout", "600"],
                stdout=log1,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.time() + 300
            while not os.path.exists(ready):
                if p1.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the model owner did not start:\n{_text(logs['p1'])}")
                time.sleep(0.1)
            with open(ready) as fh:
                port = fh.read().strip()
            stats = os.path.join(workdir, "stats.json")
            t = time.perf_counter()
            with open(logs["p0"], "w") as log0:
                p0 = subprocess.Popen(
                    [*me, "party0", prog, rss["p0"], "--keys", os.path.join(keys, "p0"), "--certs", certs]
                    + ["--peer", f"127.0.0.1:{port}", "--images", images, "--stats", stats]
                    + ["--out", os.path.join(workdir, "labels.jsonl")],
                    stdout=log0,
                    stderr=subprocess.STDOUT,
                )
                rc0, _ = wait_for(p0, 7200)
            wall_s = time.perf_counter() - t
            rc1, _ = wait_for(p1, 300)
        finally:
            if p1.poll() is None:
                p1.kill()
        if rc0 or rc1:
            raise SystemExit(f"the session failed:\n{_text(logs['p0'])}\n{_text(logs['p1'])}")
        with open(stats) as fh:
            st = json.load(fh)
    finally:
        shutil.rmtree(keys, ignore_errors=True)  # GBs of one-time keys
    mem = {p: _records(rss[p]) for p in ("p0", "p1")}
    for p, recs in mem.items():
        if len(recs) != batches:
            raise SystemExit(f"{p}: {len(recs)} batch records, expected {batches}")
    fig = {
        "image_size": image_size,
        "batch": batch,
        "batches": batches,
        "deal_s": deal_s,
        "deal_workers": workers,
        "deal_s_per_batch": deal_s / batches,
        "key_bytes_per_batch": key_bytes / batches,
        "session_wall_s": wall_s,
        "session_s": st["total_s"],
        "s_per_batch": st["total_s"] / batches,
        "images_per_s": batches * batch / st["total_s"],
        "online_s": st["timings"]["online"],
        "offline_s": st["timings"]["offline"],
        "setup_s": st["timings"]["setup"],
    }
    for p in ("p0", "p1"):
        first, last = mem[p][0], mem[p][-1]
        fig[f"{p}_hwm_first_mb"] = first["hwm_mb"]
        fig[f"{p}_hwm_last_mb"] = last["hwm_mb"]
        fig[f"{p}_hwm_ratio"] = last["hwm_mb"] / first["hwm_mb"]
        fig[f"{p}_rss_first_mb"] = first["rss_mb"]
        fig[f"{p}_rss_last_mb"] = last["rss_mb"]
        if batches > 1:  # CPU seconds per batch after the first (the weights and the start-up are not in it)
            fig[f"{p}_cpu_s_per_batch"] = (last["cpu_s"] - first["cpu_s"]) / (batches - 1)
    print(
        f"ResNet-18, {image_size}x{image_size}, batch {batch}: {batches} batches back to back in one session, "
        f"two processes over TCP loopback (mutual TLS)"
    )
    pct = {p: f"{100 * (fig[f'{p}_hwm_ratio'] - 1):+.1f} %" for p in ("p0", "p1")}
    rows = [
        (
            f"peak RSS (VmHWM) after batch 1 / after batch {batches}, data owner",
            f"{fig['p0_hwm_first_mb']:,.0f} / {fig['p0_hwm_last_mb']:,.0f} MB ({pct['p0']})",
        ),
        (
            f"peak RSS (VmHWM) after batch 1 / after batch {batches}, model owner",
            f"{fig['p1_hwm_first_mb']:,.0f} / {fig['p1_hwm_last_mb']:,.0f} MB ({pct['p1']})",
        ),
        (
            "current RSS after batch 1 / last, data owner / model owner",
            f"{fig['p0_rss_first_mb']:,.0f} / {fig['p0_rss_last_mb']:,.0f} MB, "
            f"{fig['p1_rss_first_mb']:,.0f} / {fig['p1_rss_last_mb']:,.0f} MB",
        ),
        (
            "session (data owner: weights, offline, online per batch)",
            f"{fig['session_s']:.1f} s: setup {fig['setup_s']:.1f} s, offline {fig['offline_s']:.1f} s, "
            f"online {fig['online_s']:.1f} s",
        ),
        ("seconds per batch / images per second", f"{fig['s_per_batch']:.2f} s / {fig['images_per_s']:.2f}"),
    ]
    if batches > 1:
        rows.append(
            (
                "CPU seconds per batch (all threads), data owner / model owner",
                f"{fig['p0_cpu_s_per_batch']:.2f} / {fig['p1_cpu_s_per_batch']:.2f} s "
                f"({batch / fig['p1_cpu_s_per_batch']:.2f} images per model-owner CPU second)",
            )
        )
    rows += [
        (
            f"dealer, {batches} batches with {workers} worker(s) (per batch)",
            f"{fig['deal_s']:.1f} s ({fig['deal_s_per_batch']:.2f} s), {fig['key_bytes_per_batch'] / 1e6:,.0f} MB "
            "of keys per batch (both parties)",
        ),
    ]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")
    return fig


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_CHILD]:
        role, prog, rss_log, *rest = argv[1:]
        sys.exit(_child(role, prog, rss_log, rest))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default="bench-session")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args(argv)
    fig = run(a.batches, a.image_size, a.batch, a.workers, a.workdir)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(fig, fh, indent=1)


if __name__ == "__main__":
    main()
