"""ResNet-18 end to end: the figures docs/protocol.md reports, in one run.

    fssc bench resnet [--image-size 224] [--batch 2] [--workdir bench-out] [--profile] [--rtt-ms 20]

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
size and checksums it (``checksum.checksum``), also measured in the run.

A network model: from the online phase's measured rounds and bytes, the online time at 1, 10 and 50 ms
round trip and 1 Gbit/s (``network_model``); and, on the two batches of the 2-worker deal, one more
session on loopback and then one through a delaying TCP proxy (``--rtt-ms``, default 20: 10 ms each way):
the proxied online time beside the model's estimate from the loopback session just before it (the two
back to back, so a shared machine's load moves both alike).

``--profile``: the dealer and both parties run with ``FSSC_PROFILE`` set
(:mod:`fssc.runtime.stmt_profile`), and the report adds time per gate kind and per layer (statement)
for each of them: wall time, its share of the role's total, the part spent blocked on the peer,
rounds and bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def _timed_child(cmd: list[str], env: dict | None = None) -> tuple[int, float, float, str]:
    """Run a command; exit code, seconds, peak RSS (MB, polled from /proc) and its output. ``env``: variables
    added to this process's environment for the child."""
    from fssc.runtime.loopback import wait_for

    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        full = {**os.environ, **env} if env else None
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=full)
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
    """The key files' checksum (``checksum.checksum``) in bytes/s over an in-memory buffer, 8 MB per update (as
    the key writer hashes)."""
    from fssc.runtime.checksum import checksum

    buf = memoryview(os.urandom(8 << 20))
    h = checksum()
    t = time.perf_counter()
    for _ in range(nbytes // len(buf)):
        h.update(buf)
    return (nbytes // len(buf)) * len(buf) / (time.perf_counter() - t)


class _NoDigest:
    def update(self, b) -> None:
        pass

    def digest(self) -> bytes:
        return b""


def write_rate(folder: str, nbytes: int) -> float:
    """Bytes/s writing a new file of ``nbytes`` in ``folder`` in 8 MB writes the way the dealer writes its key
    files (the key writer's thread, drop-behind, not fsync'd; without the checksum, which ``hash_rate``
    measures), then deleting it."""
    from fssc.runtime.keys import _BackgroundFile

    buf = memoryview(os.urandom(8 << 20))
    path = os.path.join(folder, "write-rate.tmp")
    t = time.perf_counter()
    out = _BackgroundFile(open(path, "wb"), _NoDigest())  # noqa: SIM115 - finish() closes it
    for _ in range(max(1, nbytes // len(buf))):
        out.hand_over(buf)  # never changed: the thread may hold it
    out.finish(lambda digest: digest)
    dt = time.perf_counter() - t
    os.remove(path)
    return max(1, nbytes // len(buf)) * len(buf) / dt


FSSC = os.path.join(os.path.dirname(sys.executable), "fssc")


def export_and_compile(workdir: str, image_size: int, batch: int, output_mode: str):
    """ResNet-18 (2 classes, random weights) exported and compiled in ``workdir``:
    (onnx path, program folder, the compile result, compile seconds)."""
    from fssc.compiler.compile import compile_model
    from fssc.models.export import export_model
    from rich.console import Console

    os.makedirs(workdir, exist_ok=True)
    onnx_path, prog = os.path.join(workdir, "resnet18.onnx"), os.path.join(workdir, "prog")
    export_model("resnet18", onnx_path, 2, None, image_size, batch)
    t = time.perf_counter()
    res = compile_model(onnx_path, prog, output_mode=output_mode, console=Console(quiet=True))
    return onnx_path, prog, res, time.perf_counter() - t


@contextlib.contextmanager
def _environ(env: dict | None):
    """``env`` added to os.environ for the block (the party processes a run starts inherit it)."""
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


RTTS_MS = (1, 10, 50)
GBIT = 1e9


def network_model(online_s: float, rounds: int, sent_p0: float, sent_p1: float, rtt_ms: float, bps: float) -> float:
    """Online time over a network of round trip ``rtt_ms`` and ``bps`` bits/s, from a loopback run's: the
    loopback online time (each party's computing and waiting for the other's), plus half a round trip per
    round (in a round both parties send at once, so each waits one one-way delay for the other's message),
    plus the bytes of the busier direction at ``bps`` (0: no bandwidth term)."""
    wire = max(sent_p0, sent_p1) * 8 / bps if bps else 0.0
    return online_s + rounds * rtt_ms / 2000 + wire


def _kind(fn: str) -> str:
    if fn == "linear_offline":
        return "linear (offline)"
    return "linear" if fn.startswith("linear_") else fn


def profile_figures(rows_by_role: dict[str, list[dict]]) -> dict:
    """The per-kind and per-layer tables from stmt_profile's rows (fssc.runtime.stmt_profile.load)."""
    kinds: dict[str, dict[str, dict]] = {}
    layers: dict[str, dict] = {}
    for role, rows in rows_by_role.items():
        main = [r for r in rows if r["phase"] != "offline"]
        total = sum(r["wall_s"] for r in main) or 1.0
        busy = sum(r["wall_s"] - r["wait_s"] for r in main) or 1.0
        per_kind = kinds.setdefault(role, {})
        for r in rows:
            k = per_kind.setdefault(_kind(r["fn"]), {})
            for f in ("calls", "wall_s", "cpu_s", "wait_s", "rounds", "sent", "received", "key_bytes"):
                k[f] = k.get(f, 0) + r[f]
            k["compute_s"] = k["wall_s"] - k["wait_s"]
            online = r["phase"] != "offline"
            k["share"] = k["wall_s"] / total if online else 0.0
            k["compute_share"] = k["compute_s"] / busy if online else 0.0
            name = r["tag"] or f"({r['fn']}, all)"
            lay = layers.setdefault(name, {"layer": name, "kind": _kind(r["fn"]) if r["tag"] else r["fn"]})
            if r["phase"] == "offline":
                lay["p0_offline_s"] = lay.get("p0_offline_s", 0) + r["wall_s"]
                continue
            d = lay.setdefault(role, dict.fromkeys(("wall_s", "cpu_s", "wait_s", "rounds", "sent", "key_bytes"), 0.0))
            for f in ("wall_s", "cpu_s", "wait_s", "rounds", "sent", "key_bytes"):
                d[f] += r[f]
            d["share"] = d["wall_s"] / total
    ordered = sorted(layers.values(), key=lambda lay: lay["layer"].startswith("("))  # local ops last
    return {"by_kind": kinds, "by_layer": ordered}


def print_profile(prof: dict) -> None:
    roles = [r for r in ("party0", "party1", "dealer") if r in prof["by_kind"]]
    names = {"party0": "data owner (P0)", "party1": "model owner (P1)", "dealer": "dealer"}
    print(
        "\nprofile: time per gate kind: wall s and its share of the role's online (dealer: deal) total, the part "
        "blocked on the peer, the rest (compute) and its share, the process's CPU seconds"
    )
    for role in roles:
        print(f"  {names[role]}")
        print(
            f"    {'kind':<18} {'calls':>6} {'wall s':>8} {'share':>6} {'blocked':>8} {'compute':>8} {'share':>6} "
            f"{'CPU s':>7} {'rounds':>6} {'MB sent':>8} {'MB recv':>8} {'key MB':>8}"
        )
        for kind, k in sorted(prof["by_kind"][role].items(), key=lambda kv: -kv[1]["wall_s"]):
            print(
                f"    {kind:<18} {k['calls']:>6.0f} {k['wall_s']:>8.3f} {100 * k['share']:>5.1f}% "
                f"{k['wait_s']:>8.3f} {k['compute_s']:>8.3f} {100 * k['compute_share']:>5.1f}% {k['cpu_s']:>7.3f} "
                f"{k['rounds']:>6.0f} "
                f"{k['sent'] / 1e6:>8.2f} {k['received'] / 1e6:>8.2f} {k['key_bytes'] / 1e6:>8.1f}"
            )
    print("\nprofile: time per layer (statement): wall s, its share of each role's total, CPU s; P0's blocked time")
    head = f"  {'layer':<22} {'kind':<10}"
    for role in roles:
        head += f" {role[:6] + ' s':>9} {'%':>5} {'CPU s':>6}"
    head += f" {'P0 blk s':>8} {'rounds':>6} {'MB P0>':>7} {'MB P1>':>7} {'key MB':>7}"
    print(head)
    for lay in prof["by_layer"]:
        if not any(r in lay for r in roles):
            continue
        line = f"  {lay['layer'][:22]:<22} {lay['kind'][:10]:<10}"
        for role in roles:
            d = lay.get(role)
            line += f" {d['wall_s']:>9.3f} {100 * d['share']:>4.1f}% {d['cpu_s']:>6.2f}" if d else f" {'':>22}"
        p0, p1, dl = lay.get("party0", {}), lay.get("party1", {}), lay.get("dealer", {})
        line += (
            f" {p0.get('wait_s', 0):>8.3f} {p0.get('rounds', 0):>6.0f} {p0.get('sent', 0) / 1e6:>7.2f}"
            f" {p1.get('sent', 0) / 1e6:>7.2f} {dl.get('key_bytes', 0) / 1e6:>7.1f}"
        )
        print(line)


def run(
    image_size: int = 224, batch: int = 2, workdir: str = "bench-out", profile: bool = False, rtt_ms: float = 20.0
) -> dict:
    import onnxruntime as ort
    from fssc.compiler.demo import _write_images
    from fssc.runtime.certs import make_certs
    from fssc.runtime.images import Preprocess, load_inputs
    from fssc.runtime.loopback import run_loopback
    from fssc.runtime.results import read_results
    from fssc.runtime.stmt_profile import ENV, load

    keys, certs = os.path.join(workdir, "keys"), os.path.join(workdir, "certs")
    shutil.rmtree(keys, ignore_errors=True)
    onnx_path, prog, res, compile_s = export_and_compile(workdir, image_size, batch, "logits")
    make_certs(certs)
    prof_dir = os.path.abspath(os.path.join(workdir, "profile"))
    shutil.rmtree(prof_dir, ignore_errors=True)
    penv = {ENV: prof_dir} if profile else None
    rc, deal_s, deal_rss, out = _timed_child([FSSC, "deal", prog, "--batches", "1", "-o", keys], penv)
    if rc:
        raise SystemExit(f"fssc deal failed:\n{out}")
    line = re.search(r"^batch 0: .*\(([0-9.]+) s\)$", out, re.M)  # the batch's own clock, without start-up
    if line is None:
        raise SystemExit(f"fssc deal printed no time for batch 0:\n{out}")
    k0 = os.path.getsize(os.path.join(keys, "p0", "batch0000.key"))
    k1 = os.path.getsize(os.path.join(keys, "p1", "batch0000.key"))
    w_rate = write_rate(workdir, k0 + k1)
    h_rate = hash_rate()
    images = os.path.join(workdir, "images")
    _write_images(images, batch, image_size)
    out_json, stats_json = os.path.join(workdir, "results.jsonl"), os.path.join(workdir, "stats.json")
    if os.path.exists(out_json):
        os.remove(out_json)  # an earlier run's results: the data owner appends to its --out file
    with _environ(penv):
        lb = run_loopback(prog, keys, certs, ["--images", images, "--out", out_json, "--stats", stats_json])
    if lb.p0_rc or lb.p1_rc:
        raise SystemExit(f"two-party run failed:\n{lb.p0_out}{lb.p0_err}{lb.p1_out}")
    with open(stats_json) as fh:
        st = json.load(fh)
    keys2 = os.path.join(workdir, "keys-2-workers")
    shutil.rmtree(keys2, ignore_errors=True)
    rc, deal2_s, _, out = _timed_child([FSSC, "deal", prog, "--batches", "2", "--workers", "2", "-o", keys2])
    if rc:
        shutil.rmtree(keys2, ignore_errors=True)
        raise SystemExit(f"fssc deal --workers 2 failed:\n{out}")
    st_ref = st_rtt = None
    if rtt_ms > 0:  # those two batches: one session on loopback, then one through the delaying proxy
        got = []
        for delay in (0.0, rtt_ms / 2000):
            path = os.path.join(workdir, f"stats-delay-{delay:g}.json")
            lb2 = run_loopback(prog, keys2, certs, ["--images", images, "--stats", path], delay_s=delay)
            if lb2.p0_rc or lb2.p1_rc:
                shutil.rmtree(keys2, ignore_errors=True)
                raise SystemExit(f"two-party run (delay {delay:g} s) failed:\n{lb2.p0_out}{lb2.p0_err}{lb2.p1_out}")
            with open(path) as fh:
                got.append(json.load(fh))
        st_ref, st_rtt = got
    shutil.rmtree(keys2, ignore_errors=True)  # two batches: GBs
    a_rate = aes_rate()
    x = load_inputs(images, Preprocess(size=image_size), (3, image_size, image_size))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"input": x})
    ts, cs = [], []
    for _ in range(10):
        t, c = time.perf_counter(), time.process_time()
        ref = sess.run(None, {"input": x})[0]
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
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
        "deal_batch_s": float(line.group(1)),
        "deal_2_workers_2_batches_s": deal2_s,
        "deal_2_workers_per_batch_s": deal2_s / 2,
        "deal_key_bytes": k0 + k1,
        "write_bytes_per_s": w_rate,
        "checksum_bytes_per_s": h_rate,
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
        "onnxruntime_cpu_ms": 1e3 * float(np.median(cs)),
        "online_cpu_p0_s": st["timings"]["online_cpu"],
        "offline_cpu_p0_s": st["timings"]["offline_cpu"],
        "max_logit_diff": float(np.abs(secure - ref).max()),
        "labels_agree": bool((secure.argmax(1) == ref.argmax(1)).all()),
        "gates_per_image": tot["gates_per_image"],
    }
    tm = st["timings"]
    fig.update(
        online_rounds=tm["online_rounds"],
        online_bytes_sent_p0=tm["online_sent"],
        online_bytes_sent_p1=tm["online_received"],
        online_blocked_p0_s=tm["online_wait"],
    )
    net = (fig["online_s"], tm["online_rounds"], tm["online_sent"], tm["online_received"])
    for r in RTTS_MS:
        fig[f"online_est_rtt_{r}ms_1gbit_s"] = network_model(*net, r, GBIT)
    if st_ref is not None and st_rtt is not None:
        ref = st_ref["timings"]
        fig["proxy_rtt_ms"] = rtt_ms
        fig["online_proxy_measured_s"] = st_rtt["timings"]["online"]
        fig["online_proxy_reference_s"] = ref["online"]
        fig["online_proxy_est_s"] = network_model(
            ref["online"], ref["online_rounds"], ref["online_sent"], ref["online_received"], rtt_ms, 0
        )
    fig["online_over_onnxruntime"] = fig["online_s"] / (fig["onnxruntime_ms"] / 1e3)
    fig["online_cpu_over_onnxruntime_cpu"] = fig["online_cpu_p0_s"] / (fig["onnxruntime_cpu_ms"] / 1e3)
    fig["offline_over_online"] = fig["offline_p0_s"] / fig["online_s"]
    fig["deal_over_online"] = fig["deal_s"] / fig["online_s"]
    fig["deal_batch_over_online"] = fig["deal_batch_s"] / fig["online_s"]
    if profile:
        prof_rows = load(prof_dir)
        fig["profile"] = profile_figures(prof_rows)
        fig["profile_rows"] = prof_rows
        fig["online_cpu_p1_s"] = sum(r["cpu_s"] for r in prof_rows.get("party1", []) if r["phase"] == "online")
        shutil.rmtree(prof_dir, ignore_errors=True)
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
        (
            "dealer, one batch (1 worker): the process / the batch in it",
            f"{fig['deal_s']:.2f} s / {fig['deal_batch_s']:.1f} s",
        ),
        (
            "dealer, 2 workers, 2 batches (per batch)",
            f"{fig['deal_2_workers_2_batches_s']:.2f} s ({fig['deal_2_workers_per_batch_s']:.2f} s)",
        ),
        (
            "  its I/O floor per batch: write + checksum of both key files",
            f"{fig['deal_io_floor_s']:.2f} s = {fig['deal_write_floor_s']:.2f} + {fig['deal_hash_floor_s']:.2f} s "
            f"({mb(fig['deal_key_bytes'])} at {fig['write_bytes_per_s'] / 1e9:.2f} GB/s written, "
            f"{fig['checksum_bytes_per_s'] / 1e9:.2f} GB/s hashed)",
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
    rows.append(
        (
            "online traffic: rounds, MB sent by data owner / model owner; data owner blocked on the peer",
            f"{fig['online_rounds']}, {mb(fig['online_bytes_sent_p0'])} / {mb(fig['online_bytes_sent_p1'])}; "
            f"{fig['online_blocked_p0_s']:.2f} s",
        )
    )
    rows += [
        (f"  online estimated at {r} ms round trip, 1 Gbit/s", f"{fig[f'online_est_rtt_{r}ms_1gbit_s']:.2f} s")
        for r in RTTS_MS
    ]
    if st_rtt is not None:
        rows.append(
            (
                f"  {rtt_ms:g} ms round trip (delaying proxy): measured / estimated (from loopback just before)",
                f"{fig['online_proxy_measured_s']:.2f} / {fig['online_proxy_est_s']:.2f} s "
                f"(loopback {fig['online_proxy_reference_s']:.2f} s)",
            )
        )
    p1_cpu = f" / {fig['online_cpu_p1_s']:.2f}" if "online_cpu_p1_s" in fig else ""
    rows += [
        (
            "CPU time (what other processes' load does not move): online P0" + (" / P1" if p1_cpu else ""),
            f"{fig['online_cpu_p0_s']:.2f}{p1_cpu} s; offline P0 {fig['offline_cpu_p0_s']:.2f} s; "
            f"onnxruntime {fig['onnxruntime_cpu_ms']:.1f} ms",
        ),
        (
            "online / onnxruntime, wall (CPU); offline / online",
            f"{fig['online_over_onnxruntime']:.0f}x ({fig['online_cpu_over_onnxruntime_cpu']:.0f}x); "
            f"{fig['offline_over_online']:.2f}",
        ),
        (
            "dealer / online: the process (the batch in it)",
            f"{fig['deal_over_online']:.1f}x ({fig['deal_batch_over_online']:.1f}x)",
        ),
    ]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")
    if profile:
        print_profile(fig["profile"])
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workdir", default="bench-out")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--profile", action="store_true", help="time per gate kind and per layer, each role")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="round trip of the proxied run (0: none)")
    a = ap.parse_args(argv)
    fig = run(a.image_size, a.batch, a.workdir, a.profile, a.rtt_ms)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(fig, fh, indent=1)


if __name__ == "__main__":
    main()
