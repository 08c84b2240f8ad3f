"""The IR dump viewer: ``prog/ir/index.html`` and ``fssc view``.

Browser tests drive Debian's Chromium (``/usr/bin/chromium``, headless) with
Playwright for Python; without it they skip, saying so. Every page load is
guarded: each request the page makes is routed through a check that lets
``file://`` and ``http://127.0.0.1`` through and fails the test on anything
else, and a JavaScript error fails the test too. Screenshots go to
``test-artifacts/viewer/``.

Models: ResNet-18 exported at 64x64, batch 2 (conftest's cache), compiled by
the real CLI with ``--dump-ir``; a synthetic ResNet-like graph of 2,000+ ops
for the time budget. Oracles are independent of the page: the IR text dumps,
the generated programs and the ResNet-18 arithmetic below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import fssc_command
from fssc.passes.manager import pass_names
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "viewer"
LOAD_BUDGET_S = 2.0
MINUS = "\u2212"

# ResNet-18 at 64x64, batch 2: the stem ReLU runs on 64x32x32 before the reorder
# pass and on the pooled 64x16x16 after it.
STEM_RELU_BEFORE = 2 * 64 * 32 * 32
STEM_RELU_AFTER = 2 * 64 * 16 * 16


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def r18_prog(export_resnet18, tmp_path_factory, run_fssc) -> Path:
    model = export_resnet18(64, 2)
    out = tmp_path_factory.mktemp("viewer") / "prog"
    p = run_fssc("compile", model, "-o", out, "--dump-ir")
    assert p.returncode == 0, p.stderr
    assert "IR dumps and viewer:" in p.stdout
    return out


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (Debian's) with a fresh profile, through Playwright."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) "
            "to run the viewer's browser tests"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is needed for the browser tests")
    profile = tempfile.mkdtemp(prefix="fssc-chromium-")
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000},
        )
        yield ctx
        ctx.close()
    shutil.rmtree(profile, ignore_errors=True)


class Guard:
    """Requests a page made, the ones refused (not local), and JavaScript errors."""

    def __init__(self):
        self.requests: list[str] = []
        self.foreign: list[str] = []
        self.errors: list[str] = []

    def route(self, route):
        url = route.request.url
        self.requests.append(url)
        if re.match(r"^(file://|data:|about:|http://(127\.0\.0\.1|localhost)(:\d+)?/)", url):
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort()

    def check(self):
        assert self.foreign == [], f"the page tried to reach the network: {self.foreign}"
        assert self.errors == [], f"JavaScript errors: {self.errors}"


@pytest.fixture
def page(browser):
    guard = Guard()
    pg = browser.new_page()
    pg.route("**/*", guard.route)
    pg.on("pageerror", lambda e: guard.errors.append(str(e)))
    pg.on("console", lambda m: guard.errors.append(m.text) if m.type == "error" else None)
    pg.guard = guard
    yield pg
    pg.close()
    guard.check()


def open_page(pg, url: str) -> float:
    """Load the viewer; returns seconds from navigation to the first painted frame."""
    t0 = time.perf_counter()
    pg.goto(url)
    pg.wait_for_function("window.fsscReady !== undefined", timeout=15_000)
    return time.perf_counter() - t0


def search(pg, query: str) -> None:
    """Type a query and wait for its results (the list names the query it shows)."""
    pg.fill("#search", query)
    pg.wait_for_selector(f"#results[data-q={json.dumps(query.lower())}]:not([hidden])")


def shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / name))


def page_doc(prog: Path) -> dict:
    """The JSON document inlined in the page."""
    html = (prog / "ir" / "index.html").read_text()
    m = re.search(r'<script id="fssc-data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


# the page's rows: the imported graph, then one per pass of the pipeline (read, not restated)
STAGES = ["import", *pass_names()]


def dump_name(stage: str) -> str:
    """The text dump a stage writes: its index in STAGES and its name."""
    return f"{STAGES.index(stage):02d}-{stage}.txt"


def dump_line(prog: Path, dump: str, name: str) -> str:
    """The text-form line defining %name in the dump (the page's oracle)."""
    for ln in (prog / "ir" / dump).read_text().splitlines():
        if ln.startswith(f"  %{name}: "):
            return ln
    raise AssertionError(f"%{name} not in {dump}")


# --------------------------------------------------------------------------- the page file
def test_page_is_one_self_contained_file(r18_prog):
    ir = r18_prog / "ir"
    html = (ir / "index.html").read_text()
    names = sorted(os.listdir(ir))
    assert names[-2:] == ["index.html", "timings.js"] and names[0] == "00-import.txt"
    # inline CSS and JS: no stylesheet, image, font or frame; one script file: the timings beside it
    assert re.findall(r'\bsrc="([^"]*)"', html) == ["timings.js"]
    assert not re.search(r"<link\b|<iframe\b|<img\b|@import|url\(\s*['\"]?(https?:)?//", html, re.I)
    assert not re.search(r"https?://", html), "no URL at all in the page"
    assert "default-src 'none'" in html  # the CSP forbids fetches
    # the page's data is the pass manager's: every pass, in order, with its dump file
    doc = page_doc(r18_prog)
    assert [p["file"] for p in doc["passes"]] == [n for n in names if n.endswith(".txt")]
    # the final pass's cost totals are the compile report's
    report = json.loads((r18_prog / "report.json").read_text())["totals"]
    final = doc["passes"][-1]["totals"]
    for key in ("gates", "key_bytes_p0", "key_bytes_p1", "rounds", "sent_p0", "sent_p1"):
        assert final[key] == pytest.approx(report[key]), key
    assert final["marked"] and final["comparisons"] == report["gates"]
    # the page's text IR is the dump, line for line
    for p in doc["passes"]:
        text = "\n".join(p["head"] + [doc["ops"][i]["line"] for i in p["ops"]] + p["tail"]) + "\n"
        assert text == (ir / p["file"]).read_text()


def test_layout_flows_down_without_overlaps(r18_prog):
    doc = page_doc(r18_prog)
    for p in doc["passes"]:
        recs = [doc["ops"][i] for i in p["ops"]]
        xy = {r["uid"]: (p["xy"][2 * k], p["xy"][2 * k + 1]) for k, r in enumerate(recs)}
        assert len(set(xy.values())) == len(xy), f"{p['name']}: two ops share a slot"
        producer = {o["n"]: r["uid"] for r in recs for o in r["outs"]}
        for r in recs:
            for v in r["ins"]:
                if v["n"] in producer:
                    assert xy[producer[v["n"]]][1] < xy[r["uid"]][1], f"{p['name']}: edge into %{r['name']} goes up"
        w, h = p["size"]
        assert all(0 < x < w and 0 < y < h for x, y in xy.values())


def test_every_final_op_knows_its_generated_lines(r18_prog):
    doc = page_doc(r18_prog)
    final = [doc["ops"][i] for i in doc["passes"][-1]["ops"]]
    programs = {
        role: (r18_prog / role / "program.py").read_text().splitlines() for role in ("party0", "party1", "dealer")
    }
    maps = {role: json.loads((r18_prog / role / "sourcemap.json").read_text())["ops"] for role in programs}
    for r in final:
        code = doc["code"][str(r["uid"])]
        assert set(code) == set(programs), r["name"]
        for role, lines in code.items():
            # the page's lines are the source map's, each code line with its statement's comment line
            assert maps[role][str(r["uid"])] == [[no, no - 1 if comment else None] for no, comment, _ in lines]
            for no, comment, text in lines:
                assert programs[role][no - 1].strip() == text
                assert comment or f"'op{r['uid']}'" in text  # the comment names the op, else the tag does
                if comment:  # a statement's comment names the op (the dealer's seed lines have none)
                    assert programs[role][no - 2].strip() == f"# {comment}"
                    assert re.search(rf"%{re.escape(r['name'])}[ :]", comment), comment
    # and every op the source maps name is a final op
    assert {int(u) for m in maps.values() for u in m} == {r["uid"] for r in final}


def test_fssc_view_without_a_viewer_is_a_clean_error(tmp_path, run_fssc):
    p = run_fssc("view", tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("fssc: error:") and "--dump-ir" in p.stderr


# --------------------------------------------------------------------------- in the browser
def test_the_network_guard_works_and_the_page_cannot_fetch(page, r18_prog):
    # the guard: a page without the viewer's CSP asks for a remote image; the route refuses it
    page.set_content('<img src="http://fssc-test.invalid/x.png">')
    page.wait_for_timeout(200)
    assert page.guard.foreign == ["http://fssc-test.invalid/x.png"]
    page.guard.foreign.clear()
    page.guard.errors.clear()
    # the viewer's Content-Security-Policy refuses any fetch before it reaches the network
    open_page(page, (r18_prog / "ir" / "index.html").as_uri())
    refused = page.evaluate("fetch('http://fssc-test.invalid/').then(() => false, () => true)")
    assert refused and page.guard.foreign == []
    assert all("Content Security Policy" in e for e in page.guard.errors)
    page.guard.errors.clear()


def test_fold_batchnorm_diff_marks_the_20_batchnorms_removed(page, r18_prog):
    open_page(page, (r18_prog / "ir" / "index.html").as_uri())
    assert page.locator("#passes tr.pass").count() == len(STAGES)
    page.click("#mode-diff")
    page.click("#passes tr.pass[data-name=fold-batchnorm]")
    fold = STAGES.index("fold-batchnorm")
    assert page.input_value("#diff-a") == str(fold - 1) and page.input_value("#diff-b") == str(fold)
    assert page.inner_text("#n-removed") == "20 removed"
    removed = page.locator("#diff .removed-list li")
    assert removed.count() == 20
    assert page.locator("#diff .removed-list li[data-kind=batchnorm]").count() == 20
    assert page.inner_text("#n-added") == "0 added"
    # in the graph: the whole "before" pane, every BatchNormalization drawn as removed
    page.click(".pane.a .zoom button[data-z=fit]")
    assert page.locator(".pane.a .node.removed").count() == 20
    assert page.locator(".pane.a .node.removed[data-kind=batchnorm]").count() == 20
    assert page.locator(".pane.b .node[data-kind=batchnorm]").count() == 0
    # convs absorbed them: changed, matched by uid, and their provenance names both nodes
    conv = page.locator(".pane.b .node.changed[data-kind=conv]").first
    conv.click()
    origin = page.inner_text("#inspector")
    assert "changed" in origin and "/Conv" in origin and "BatchNormalization" in origin
    shot(page, "diff-fold-batchnorm.png")
    # a removed op from the list: shown in the "before" pane with its history
    page.click("#diff .removed-list li >> nth=0")
    assert page.locator(".pane.a .node.sel.removed[data-kind=batchnorm]").count() == 1
    assert "removed" in page.inner_text("#inspector")
    assert "does not reach the generated program (removed by fold-batchnorm)" in page.inner_text("#inspector")


def test_diff_matches_a_rebuilt_op_by_provenance(page, tmp_path):
    """A pass that rebuilds an op (new uid, same kind and ONNX node) shows it changed, not removed + added."""
    import types

    from fssc.compiler.frontend.onnx_import import import_onnx
    from fssc.compiler.viewer.document import write_viewer
    from fssc.passes import canonicalize
    from fssc.passes.base import PassContext
    from fssc.passes.manager import run_pipeline

    path = tmp_path / "tiny.onnx"
    synthetic_model(path, blocks=2, pool_every=100)

    def rebuild(g, ctx):
        i = next(k for k, op in enumerate(g.ops) if op.kind == "relu")
        old = g.ops[i]
        g.ops[i] = g.make_op("relu", old.inputs, old.outputs, old.attrs, origin=old.origin, created_by="rebuild")
        return g

    def drop_mul(g, ctx):  # and a plain removal next to it: x * s -> x
        mul = next(op for op in g.ops if op.kind == "mul")
        g.replace_uses(mul.outputs[0], mul.inputs[0])
        g.ops.remove(mul)
        g.remove_unused()
        return g

    passes = [canonicalize, types.SimpleNamespace(NAME="rebuild", run=lambda g, c: drop_mul(rebuild(g, c), c))]
    _, records = run_pipeline(
        import_onnx(str(path)), PassContext(), passes=passes, keep_graphs=True, echo=lambda s: None
    )
    old_uid = next(op.uid for op in records[1].graph.ops if op.kind == "relu")
    new_uid = next(op.uid for op in records[2].graph.ops if op.kind == "relu")
    assert old_uid != new_uid
    write_viewer(records, str(tmp_path / "prog"), "tiny.onnx")
    open_page(page, (tmp_path / "prog" / "ir" / "index.html").as_uri())
    page.click("#mode-diff")
    page.click("#passes tr.pass[data-name=rebuild]")
    assert page.inner_text("#n-removed") == "1 removed" and page.inner_text("#n-added") == "0 added"
    assert page.locator("#diff .removed-list li[data-kind=mul]").count() == 1
    assert page.locator(f"#diff .changed-list li[data-uid='{new_uid}']").count() == 1
    assert page.locator(f".pane.a .node.changed[data-uid='{old_uid}']").count() == 1
    # selecting it selects its partner in the other pane and shows the line before and after
    page.click(f".pane.b .node[data-uid='{new_uid}']")
    assert page.locator(f".pane.a .node.sel[data-uid='{old_uid}']").count() == 1
    assert "[rebuild]" in page.inner_text("#inspector .change")


def test_search_maxpool_and_the_inspector(page, r18_prog):
    open_page(page, (r18_prog / "ir" / "index.html").as_uri())
    search(page, "MaxPool")
    pools = page.locator("#results .r[data-kind=maxpool]")
    assert pools.count() == 2  # lowered into two separable pools
    assert page.locator(".pane .node.match").count() >= 2
    pools.first.click()
    uid = int(page.get_attribute(".pane .node.sel", "data-uid"))
    name = page.get_attribute("#inspector h3", "data-name")
    assert int(page.get_attribute("#inspector h3", "data-uid")) == uid
    # oracle: the final dump's text line for this op
    line = dump_line(r18_prog, dump_name(STAGES[-1]), name)
    shape = re.match(r"  %\S+: float32\[([\d,]+)\]", line).group(1).replace(",", "x")
    count = int(re.search(r"gate\{[^}]*count=(\d+)", line).group(1))
    bits = int(re.search(r"gate\{[^}]*bits=(\d+)", line).group(1))
    assert "kind=max" in line
    assert page.inner_text("#inspector .out-shape") == shape
    assert page.inner_text("#inspector .gate-kind") == "max"
    assert page.inner_text("#inspector .gate-count") == f"{count:,}"
    ins = page.inner_text("#inspector")
    assert f"m={bits}" in ins and "/maxpool/MaxPool" in ins and "lower-maxpool" in ins
    assert "key bytes" in ins and "P0 sends" in ins
    # the generated code it became, in each role's program
    for role in ("party0", "party1", "dealer"):
        block = page.inner_text(f"#inspector .code[data-role={role}]")
        no = int(re.search(r"^(\d+)\s+v\d+ = lib\.maxpool", block, re.M).group(1))
        assert f"'op{uid}'" in (r18_prog / role / "program.py").read_text().splitlines()[no - 1]
    # the text IR follows the selection ...
    sel = page.locator("#text .ln.sel")
    assert sel.count() == 1 and sel.inner_text().split(maxsplit=1)[1] == line.strip()
    shot(page, "search-maxpool.png")
    # ... and the graph follows the text
    relu_line = page.locator("#text .ln.op", has_text="= relu(").first
    relu_line.click()
    relu_uid = int(relu_line.get_attribute("data-uid"))
    assert int(page.get_attribute(".pane .node.sel", "data-uid")) == relu_uid
    assert page.inner_text("#inspector .gate-kind") == "relu"
    # search by shape and by gate kind
    search(page, "gate:argmax")
    assert page.locator("#results .r").count() == page.locator("#results .r[data-kind=argmax]").count() == 1
    search(page, "2x512x2x2 gate:relu")  # layer4's four ReLUs
    assert page.locator("#results .r").count() == page.locator("#results .r[data-kind=relu]").count() == 4


def test_reorder_pass_cost_delta_and_pass_list(page, r18_prog):
    open_page(page, (r18_prog / "ir" / "index.html").as_uri())
    rows = page.locator("#passes tr.pass")
    names = [rows.nth(i).get_attribute("data-name") for i in range(rows.count())]
    assert names == STAGES
    # per-pass timing from timings.js beside the page
    ms = page.inner_text("#passes tr.pass[data-name=range-analysis] td.ms")
    assert re.fullmatch(r"\d+\.\d", ms), ms
    # passes that changed nothing are greyed (fold-public-scaling has nothing to fold in ResNet-18? check the flag)
    doc = page_doc(r18_prog)
    for p in doc["passes"]:
        cls = rows.nth(p["index"]).get_attribute("class")
        assert ("same" in cls) == (not p["changed"])
    delta = f"{MINUS}{STEM_RELU_BEFORE - STEM_RELU_AFTER:,}"
    assert page.inner_text("#passes tr.pass[data-name=reorder-maxpool-relu] td.delta") == delta
    page.click("#passes tr.pass[data-name=reorder-maxpool-relu]")
    row = page.locator("#costs tr[data-row=comparisons]")
    assert row.locator("td.delta").inner_text() == delta
    assert "neg" in row.locator("td.delta").get_attribute("class")
    # the swap in the graph: the stem ReLU now runs on the pooled shape
    search(page, "/relu/Relu")
    page.click("#results .r[data-kind=relu]")
    assert page.inner_text("#inspector .out-shape") == "2x64x16x16"
    assert page.inner_text("#inspector .gate-count") == f"{STEM_RELU_AFTER:,}"
    shot(page, "reorder-cost-delta.png")


def test_the_page_alone_works_without_its_timings(page, r18_prog, tmp_path):
    """index.html copied anywhere on its own: everything but the pass times."""
    shutil.copy(r18_prog / "ir" / "index.html", tmp_path / "index.html")
    open_page(page, (tmp_path / "index.html").as_uri())
    page.guard.errors[:] = [e for e in page.guard.errors if "ERR_FILE_NOT_FOUND" not in e]  # timings.js
    assert page.inner_text("#passes tr.pass[data-name=range-analysis] td.ms") == "\u2013"
    assert "timings.js" in page.inner_text("#timing-hint")
    page.click("#mode-diff")
    page.click("#passes tr.pass[data-name=fold-batchnorm]")
    assert page.inner_text("#n-removed") == "20 removed"


def test_fssc_view_serves_it_locally(page, r18_prog):
    proc = subprocess.Popen(
        fssc_command() + ["view", str(r18_prog), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/index\.html)", line)
        assert m, f"no URL printed: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        url = m.group(1)
        open_page(page, url)
        assert page.locator("#passes tr.pass").count() == len(STAGES)
        assert re.fullmatch(r"\d+\.\d", page.inner_text("#passes tr.pass[data-name=fold-batchnorm] td.ms"))
        page.click("#mode-diff")
        page.click("#passes tr.pass[data-name=fold-batchnorm]")
        assert page.inner_text("#n-removed") == "20 removed"
        # the raw text dump beside the page is served too
        href = page.get_attribute("#raw", "href")
        assert href == dump_name("fold-batchnorm")
        assert page.request.get(url.replace("index.html", href)).text() == (r18_prog / "ir" / href).read_text()
        requested = page.guard.requests
        assert requested and all(u.startswith(url.rsplit("/", 1)[0]) for u in requested), requested
        shot(page, "fssc-view.png")
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


# --------------------------------------------------------------------------- 2,000 ops
def synthetic_model(path: Path, blocks: int, channels: int = 4, size: int = 8, pool_every: int = 20) -> None:
    """A ResNet-like stack: stem conv-BN-ReLU, then blocks x -> relu(x + s * relu(bn(conv(x)))), a MaxPool
    every ``pool_every`` blocks, global average pool and a 2-class Gemm."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def const(name, arr):
        inits.append(nh.from_array(np.asarray(arr, np.float32), name))
        return name

    def node(op, ins, name, **attrs):
        nodes.append(oh.make_node(op, ins, [name], name=name, **attrs))
        return name

    def conv_bn_relu(x, name):
        w = const(name + ".w", rng.normal(0, 0.2, (channels, channels, 3, 3)))
        bn = [
            const(f"{name}.bn.{k}", v)
            for k, v in (
                ("g", rng.uniform(0.5, 1.5, channels)),
                ("b", rng.normal(0, 0.1, channels)),
                ("m", rng.normal(0, 0.1, channels)),
                ("v", rng.uniform(0.5, 1.5, channels)),
            )
        ]
        y = node("Conv", [x, w], name + ".conv", pads=[1, 1, 1, 1])
        return node("Relu", [node("BatchNormalization", [y] + bn, name + ".bn")], name + ".relu")

    x = conv_bn_relu("x", "stem")
    for i in range(blocks):
        if i % pool_every == 0:
            x = node("MaxPool", [x], f"b{i}.pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
        y = conv_bn_relu(x, f"b{i}")
        y = node("Mul", [y, const(f"b{i}.s", rng.uniform(0.5, 1.0, (1, channels, 1, 1)))], f"b{i}.mul")
        x = node("Relu", [node("Add", [y, x], f"b{i}.add")], f"b{i}.out")
    x = node("Flatten", [node("GlobalAveragePool", [x], "gap")], "flat")
    node("Gemm", [x, const("fc.w", rng.normal(0, 0.3, (channels, 2)))], "logits")
    graph = oh.make_graph(
        nodes,
        "synthetic",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [oh.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
        inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def big_prog(tmp_path_factory) -> Path:
    """The synthetic graph compiled in-process: passes, programs and the viewer (one calibration batch)."""
    import torch
    from fssc.compiler.backend.codegen import write_program
    from fssc.compiler.backend.lower import lower
    from fssc.compiler.compile import add_label_output
    from fssc.compiler.frontend.onnx_import import import_onnx
    from fssc.compiler.viewer.document import write_viewer
    from fssc.passes.base import PassContext
    from fssc.passes.manager import run_pipeline

    d = tmp_path_factory.mktemp("viewer_big")
    synthetic_model(d / "synthetic.onnx", blocks=335)
    graph = add_label_output(import_onnx(str(d / "synthetic.onnx")))
    ctx = PassContext(calibration=[np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: torch's thread pool costs more than the convs
    try:
        final, records = run_pipeline(graph, ctx, keep_graphs=True, echo=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert len(final.ops) >= 2000
    prog = d / "prog"
    synth = lower(final)
    synth.info = {"source": "synthetic.onnx"}
    write_program(synth, str(prog))
    write_viewer(records, str(prog), "synthetic.onnx")
    return prog


@pytest.mark.slow
def test_2000_op_graph_loads_and_renders_within_budget(page, big_prog):
    doc = page_doc(big_prog)
    n_ops = len(doc["passes"][-1]["ops"])
    assert n_ops >= 2000
    seconds = open_page(page, (big_prog / "ir" / "index.html").as_uri())
    in_page_ms = page.evaluate("window.fsscReady")  # performance.now() at the first painted frame
    print(
        f"\n2,000-op viewer: {n_ops} ops in the shown pass, "
        f"{(big_prog / 'ir' / 'index.html').stat().st_size / 1e6:.1f} MB page, "
        f"goto -> first frame {seconds * 1e3:.0f} ms (in page: {in_page_ms:.0f} ms since navigation start)"
    )
    assert seconds < LOAD_BUDGET_S, f"{seconds:.2f} s to load and render {n_ops} ops"
    assert page.locator(".pane .node").count() > 10  # the visible region is drawn ...
    assert page.locator("#text .ln.op").count() == n_ops  # ... and the whole text
    shot(page, "synthetic-2000.png")
    # still usable: search, select far down the graph, fit, diff
    t0 = time.perf_counter()
    search(page, "b300.out")
    page.click("#results .r[data-kind=relu]")
    assert page.get_attribute("#inspector h3", "data-name") == "b300.out"
    assert page.locator(".pane .node.sel").count() == 1
    page.click(".pane .zoom button[data-z=fit]")
    page.click("#mode-diff")
    page.click("#passes tr.pass[data-name=fold-batchnorm]")
    assert page.inner_text("#n-removed") == f"{1 + 335} removed"
    assert time.perf_counter() - t0 < 3 * LOAD_BUDGET_S
