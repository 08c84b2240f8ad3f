/* fssc IR viewer. The document (passes, op records, layout, costs, code lines) is
 * computed at compile time by fssc.compiler.viewer and inlined as JSON; this script
 * only renders it: the pass list, the graph (SVG, only the visible region), the
 * diff between two passes (matched by op uid, then by provenance), the inspector,
 * search and the text IR. No network: everything is in this file (pass timings
 * come from timings.js beside it, when present). */
"use strict";

const DOC = JSON.parse(document.getElementById("fssc-data").textContent);
const TIMINGS = window.FSSC_TIMINGS || null;
const OPS = DOC.ops;
const PASSES = DOC.passes;
const NODE = DOC.node;
const LOD_TEXT = 0.45;          // below this zoom, nodes are drawn without text
const MAX_LIST = 400;           // longest list rendered in the diff summary and search results

// ------------------------------------------------------------------ helpers
const $ = (id) => document.getElementById(id);
const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);
const NF = new Intl.NumberFormat("en-US");
const fmtInt = (n) => NF.format(Math.round(n));
const MINUS = "\u2212";

function fmtBytes(b) {
  const a = Math.abs(b);
  if (a >= 1e9) return (b / 1e9).toFixed(2) + " GB";
  if (a >= 1e6) return (b / 1e6).toFixed(2) + " MB";
  if (a >= 1e3) return (b / 1e3).toFixed(1) + " kB";
  return fmtInt(b) + " B";
}
function compact(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 1 : 2) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(n >= 1e5 ? 0 : 1) + "k";
  return NF.format(n);
}
function signed(d, fmt) {
  if (!d) return "0";
  return (d < 0 ? MINUS : "+") + fmt(Math.abs(d));
}
function deltaCell(d, fmt) {
  const cls = d < 0 ? "neg" : d > 0 ? "pos" : "";
  return `<td class="num delta ${cls}">${d ? signed(d, fmt) : ""}</td>`;
}
const shapeX = (sh) => sh.length ? sh.join("x") : "scalar";

// colour per op kind (fixed for common kinds, hashed for the rest)
const KIND_COLORS = {
  conv: "#4e79a7", gemm: "#3f6fb0", matmul: "#3f6fb0", batchnorm: "#b07aa1", affine: "#c792bc",
  relu: "#f28e2b", clip: "#e8743b", maxpool: "#d35f5f", argmax: "#9c755f",
  add: "#59a14f", sub: "#59a14f", mul: "#8cc46f", upscale: "#76b7b2", trunc: "#4fa3a0",
  reshape: "#a9a29d", flatten: "#a9a29d", identity: "#c7c1bc", dropout: "#c7c1bc",
  pad: "#8fb3d9", concat: "#8fb3d9", avgpool: "#e0b92e", globalavgpool: "#e0b92e",
  sumpool: "#cfa81a", globalsumpool: "#cfa81a",
};
const colorCache = {};
function kindColor(kind) {
  if (!colorCache[kind]) {
    let c = KIND_COLORS[kind];
    if (!c) {
      let h = 0;
      for (const ch of kind) h = (h * 31 + ch.charCodeAt(0)) % 360;
      c = `hsl(${h}, 45%, 55%)`;
    }
    colorCache[kind] = c;
  }
  return colorCache[kind];
}
function kindFill(kind) {
  const c = kindColor(kind);
  if (c[0] !== "#") return c.replace("55%)", "88%)");
  const n = parseInt(c.slice(1), 16);
  const mix = (v) => Math.round(v + (255 - v) * 0.72);
  return `rgb(${mix(n >> 16)}, ${mix((n >> 8) & 255)}, ${mix(n & 255)})`;
}

// ------------------------------------------------------------------ per-pass model (built lazily)
const model = {};
function passModel(pi) {
  if (model[pi]) return model[pi];
  const p = PASSES[pi];
  const recs = p.ops.map((i) => OPS[i]);
  const byUid = new Map();
  const producer = new Map();
  recs.forEach((r, i) => {
    byUid.set(r.uid, i);
    for (const o of r.outs) producer.set(o.n, i);
  });
  const edges = [];  // [from op index, to op index]
  recs.forEach((r, i) => {
    for (const v of r.ins) {
      const j = producer.get(v.n);
      if (j !== undefined) edges.push([j, i]);
    }
  });
  const byY = recs.map((_, i) => i).sort((a, b) => p.xy[2 * a + 1] - p.xy[2 * b + 1]);
  return (model[pi] = { p, recs, byUid, edges, byY });
}

function recordOf(pi, uid) {
  const m = passModel(pi);
  const i = m.byUid.get(uid);
  return i === undefined ? null : m.recs[i];
}

// ------------------------------------------------------------------ diff (by uid, then provenance)
function diffPasses(ai, bi) {
  const A = passModel(ai), B = passModel(bi);
  const statusA = new Map(), statusB = new Map(), partner = new Map();
  const goneA = [], newB = [];
  A.recs.forEach((r, i) => {
    const j = B.byUid.get(r.uid);
    if (j === undefined) { goneA.push(i); return; }
    if (A.p.ops[i] !== B.p.ops[j]) { statusA.set(r.uid, "changed"); statusB.set(r.uid, "changed"); }
  });
  B.recs.forEach((r, j) => { if (!A.byUid.has(r.uid)) newB.push(j); });
  // provenance: an op rewritten under a new identity (same kind, same ONNX nodes) is "changed"
  const pool = new Map();
  for (const i of goneA) {
    const r = A.recs[i];
    if (!r.origin.length) continue;
    const key = r.kind + "|" + r.origin.join(",");
    if (!pool.has(key)) pool.set(key, []);
    pool.get(key).push(i);
  }
  const matchedA = new Set();
  for (const j of newB) {
    const r = B.recs[j];
    const cand = pool.get(r.kind + "|" + r.origin.join(","));
    if (cand && cand.length) {
      const i = cand.shift();
      matchedA.add(i);
      statusA.set(A.recs[i].uid, "changed");
      statusB.set(r.uid, "changed");
      partner.set(r.uid, A.recs[i].uid);
      partner.set(A.recs[i].uid, r.uid);
    } else {
      statusB.set(r.uid, "added");
    }
  }
  for (const i of goneA) if (!matchedA.has(i)) statusA.set(A.recs[i].uid, "removed");
  const list = (status, side, M) => M.recs.filter((r) => side.get(r.uid) === status);
  return {
    ai, bi, statusA, statusB, partner,
    removed: list("removed", statusA, A), added: list("added", statusB, B),
    changed: list("changed", statusB, B),
    same: B.recs.length - list("added", statusB, B).length - list("changed", statusB, B).length,
  };
}

// ------------------------------------------------------------------ graph pane
class GraphPane {
  constructor(side) {
    this.side = side;  // "single", "a" or "b"
    this.el = document.createElement("div");
    this.el.className = "pane " + side;
    this.el.innerHTML =
      `<div class="pane-head"><span class="pane-title"></span><span class="legend"></span>` +
      `<span class="zoom"><button data-z="out" title="zoom out">${MINUS}</button>` +
      `<button data-z="fit" title="whole graph">fit</button><button data-z="one" title="100%">1:1</button>` +
      `<button data-z="in" title="zoom in">+</button></span></div>` +
      `<div class="viewport"><svg class="graph"></svg></div>`;
    this.vp = this.el.querySelector(".viewport");
    this.svg = this.el.querySelector("svg");
    this.zoom = 1;
    this.pi = null;
    this.status = null;
    this.win = null;  // rendered window in graph coordinates
    this.el.querySelector(".zoom").addEventListener("click", (e) => {
      const b = e.target.closest("button");
      if (b) this.zoomBy(b.dataset.z);
    });
    this.vp.addEventListener("scroll", () => this.schedule());
    this.vp.addEventListener("wheel", (e) => {
      if (!e.ctrlKey) return;
      e.preventDefault();
      this.zoomBy(e.deltaY < 0 ? "in" : "out", e);
    }, { passive: false });
    this.svg.addEventListener("click", (e) => {
      const n = e.target.closest(".node");
      if (n) app.select(+n.dataset.uid, { from: "graph", pane: this.side });
    });
  }

  show(pi, status) {
    const first = this.pi === null;
    this.pi = pi;
    this.status = status;
    const m = passModel(pi);
    this.el.querySelector(".pane-title").textContent = `${m.p.index}. ${m.p.name}`;
    const kinds = [...new Set(m.recs.map((r) => r.kind))].sort();
    this.el.querySelector(".legend").innerHTML = kinds.map((k) =>
      `<span style="border-color:${kindColor(k)};background:${kindFill(k)}">${esc(k)}</span>`).join("");
    if (first) {
      const w = this.vp.clientWidth || 800;
      this.zoom = Math.max(0.2, Math.min(1, (w - 16) / m.p.size[0]));
    }
    this.layoutSvg();
    this.render();
  }

  layoutSvg() {
    const [w, h] = passModel(this.pi).p.size;
    this.svg.setAttribute("width", Math.ceil(w * this.zoom));
    this.svg.setAttribute("height", Math.ceil(h * this.zoom));
  }

  zoomBy(how, ev) {
    if (this.pi === null) return;
    const [w, h] = passModel(this.pi).p.size;
    const vp = this.vp;
    const box = vp.getBoundingClientRect();  // zoom around the pointer, else around the centre
    const cx = vp.scrollLeft + (ev ? ev.clientX - box.left : vp.clientWidth / 2);
    const cy = vp.scrollTop + (ev ? ev.clientY - box.top : vp.clientHeight / 2);
    const gx = cx / this.zoom, gy = cy / this.zoom;
    let z = this.zoom;
    if (how === "in") z *= 1.25;
    else if (how === "out") z /= 1.25;
    else if (how === "one") z = 1;
    else if (how === "fit") z = Math.min((vp.clientWidth - 4) / w, (vp.clientHeight - 4) / h, 1);
    this.zoom = Math.max(0.004, Math.min(2.5, z));
    this.layoutSvg();
    if (how === "fit") { vp.scrollLeft = 0; vp.scrollTop = 0; }
    else {
      vp.scrollLeft = gx * this.zoom - (cx - vp.scrollLeft);
      vp.scrollTop = gy * this.zoom - (cy - vp.scrollTop);
    }
    this.render();
  }

  visible() {
    const z = this.zoom, vp = this.vp;
    return { x0: vp.scrollLeft / z, y0: vp.scrollTop / z,
             x1: (vp.scrollLeft + (vp.clientWidth || 800)) / z, y1: (vp.scrollTop + (vp.clientHeight || 600)) / z };
  }

  schedule() {
    if (this.pending) return;
    this.pending = requestAnimationFrame(() => {
      this.pending = 0;
      const v = this.visible(), w = this.win;
      if (!w || v.x0 < w.x0 || v.y0 < w.y0 || v.x1 > w.x1 || v.y1 > w.y1) this.render();
    });
  }

  // Draw the nodes and edges that meet the visible region, plus one viewport around it.
  render() {
    if (this.pi === null) return;
    const m = passModel(this.pi), p = m.p, xy = p.xy, z = this.zoom;
    const v = this.visible(), dw = v.x1 - v.x0, dh = v.y1 - v.y0;
    const win = this.win = { x0: v.x0 - dw, y0: v.y0 - dh, x1: v.x1 + dw, y1: v.y1 + dh };
    const hw = NODE.w / 2, hh = NODE.h / 2, text = z >= LOD_TEXT;
    const st = this.status, sel = app.selected, sel2 = app.partnerSel, hits = app.hits;
    const out = [`<g transform="scale(${z})">`];
    // edges
    for (const [a, b] of m.edges) {
      const x1 = xy[2 * a], y1 = xy[2 * a + 1] + hh, x2 = xy[2 * b], y2 = xy[2 * b + 1] - hh;
      if (Math.max(y1, y2) < win.y0 || Math.min(y1, y2) > win.y1) continue;
      const far = y2 - y1 > NODE.row * 1.5 && Math.abs(x2 - x1) < NODE.w;
      const lo = Math.min(x1, x2) - (far ? NODE.w : 0), hi = Math.max(x1, x2) + (far ? NODE.w : 0);
      if (hi < win.x0 || lo > win.x1) continue;
      let d;
      if (far) {  // a long edge bows out to the right of the column it would cross
        const ox = hw + 18 + (((a * 7 + b) % 3) * 10);
        d = `M${x1} ${y1}C${x1 + ox} ${y1 + 40} ${x2 + ox} ${y2 - 40} ${x2} ${y2}`;
      } else {
        const my = (y1 + y2) / 2;
        d = `M${x1} ${y1}C${x1} ${my} ${x2} ${my} ${x2} ${y2}`;
      }
      const ua = m.recs[a].uid, ub = m.recs[b].uid;
      let cls = "edge";
      if (st) {
        const sa = st.get(ua), sb = st.get(ub);
        if (sa === "added" || sb === "added") cls += " added";
        else if (sa === "removed" || sb === "removed") cls += " removed";
      }
      if (sel === ua || sel === ub) cls += " hot";
      out.push(`<path class="${cls}" data-a="${ua}" data-b="${ub}" d="${d}"/>`);
    }
    // nodes, found by binary search on y
    const ys = m.byY;
    let lo = 0, hi = ys.length;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (xy[2 * ys[mid] + 1] + hh < win.y0) lo = mid + 1; else hi = mid; }
    for (let k = lo; k < ys.length; k++) {
      const i = ys[k], x = xy[2 * i], y = xy[2 * i + 1];
      if (y - hh > win.y1) break;
      if (x + hw < win.x0 || x - hw > win.x1) continue;
      const r = m.recs[i];
      let cls = "node";
      const s = st && st.get(r.uid);
      if (s) cls += " " + s;
      if (hits && hits.has(r.uid)) cls += " match";
      if (sel === r.uid || sel2 === r.uid) cls += " sel";
      out.push(`<g class="${cls}" data-uid="${r.uid}" data-kind="${esc(r.kind)}" transform="translate(${x - hw},${y - hh})">`,
        `<rect class="box" width="${NODE.w}" height="${NODE.h}" rx="5" fill="${kindFill(r.kind)}" stroke="${kindColor(r.kind)}"/>`,
        `<rect width="6" height="${NODE.h}" rx="2" fill="${kindColor(r.kind)}"/>`);
      if (text) {
        const shape = r.outs.length ? shapeX(r.outs[0].sh) : "";
        const nm = r.name.length > 24 ? "\u2026" + r.name.slice(-23) : r.name;
        out.push(`<text class="kd" x="12" y="15">${esc(r.kind)}</text>`,
          `<text class="sh" x="${NODE.w - 6}" y="15" text-anchor="end">${esc(shape)}</text>`,
          `<text class="nm" x="12" y="31">${esc(nm)}</text>`);
      }
      if (r.gate) {
        const label = compact(r.gate.count);
        const bw = 10 + label.length * 6.2;
        out.push(`<g class="badge${r.marked ? "" : " est"}" transform="translate(${NODE.w - bw + 4},-9)">`,
          `<rect width="${bw}" height="15" rx="7.5"/>`,
          text ? `<text x="${bw / 2}" y="11" text-anchor="middle">${label}</text>` : "", `</g>`);
      }
      out.push(`</g>`);
    }
    out.push(`</g>`);
    this.svg.classList.toggle("lod", !text);  // zoomed out: thicker status outlines
    this.svg.innerHTML = out.join("");
  }

  // Scroll so that the op is in view (centred) and redraw.
  reveal(uid) {
    const m = passModel(this.pi);
    const i = m.byUid.get(uid);
    if (i === undefined) return false;
    const x = m.p.xy[2 * i] * this.zoom, y = m.p.xy[2 * i + 1] * this.zoom, vp = this.vp;
    const inView = x > vp.scrollLeft + 40 && x < vp.scrollLeft + vp.clientWidth - 40 &&
                   y > vp.scrollTop + 30 && y < vp.scrollTop + vp.clientHeight - 30;
    if (!inView) {
      vp.scrollLeft = Math.max(0, x - vp.clientWidth / 2);
      vp.scrollTop = Math.max(0, y - vp.clientHeight / 2);
    }
    this.render();
    return true;
  }
}

// ------------------------------------------------------------------ the app
const app = {
  mode: "pass", pi: PASSES.length - 1, ai: Math.max(0, PASSES.length - 2), bi: PASSES.length - 1,
  selected: null, partnerSel: undefined, hits: null, diff: null, panes: [],

  init() {
    $("title").textContent = `${DOC.graph}${DOC.source ? " \u00b7 " + DOC.source : ""} \u00b7 ` +
      `batch ${DOC.batch} \u00b7 ${PASSES.length} passes`;
    const opts = PASSES.map((p, i) => `<option value="${i}">${p.index}. ${esc(p.name)}</option>`).join("");
    $("diff-a").innerHTML = opts;
    $("diff-b").innerHTML = opts;
    $("diff-a").addEventListener("change", (e) => this.setDiff(+e.target.value, this.bi));
    $("diff-b").addEventListener("change", (e) => this.setDiff(this.ai, +e.target.value));
    $("mode-pass").addEventListener("click", () => this.setMode("pass"));
    $("mode-diff").addEventListener("click", () => this.setMode("diff"));
    $("passes").addEventListener("click", (e) => {
      const tr = e.target.closest("tr.pass");
      if (!tr) return;
      const i = +tr.dataset.i;
      if (this.mode === "diff") this.setDiff(e.shiftKey ? i : Math.max(0, i - 1), e.shiftKey ? this.bi : i);
      else this.setPass(i);
    });
    $("diff").addEventListener("click", (e) => {
      const li = e.target.closest("li[data-uid]");
      if (li) this.select(+li.dataset.uid, { from: "list", pane: li.dataset.side });
    });
    $("text").addEventListener("click", (e) => {
      const ln = e.target.closest(".ln.op");
      if (ln) this.select(+ln.dataset.uid, { from: "text" });
    });
    $("inspector").addEventListener("click", (e) => {
      const h = e.target.closest("[data-goto]");
      if (!h) return;
      const uid = this.selected;
      if (this.mode === "diff") this.setMode("pass");
      this.setPass(+h.dataset.goto);
      if (uid !== null) this.select(uid, { from: "history" });
    });
    this.initSearch();
    this.readHash();
    this.renderPassList();
    this.layoutPanes();
    window.addEventListener("resize", () => this.panes.forEach((p) => p.render()));
  },

  // URL hash: #pass=N / #diff=A,B and &op=UID, so a view can be shared or reloaded
  readHash() {
    const h = new URLSearchParams(location.hash.slice(1));
    if (h.has("diff")) {
      const [a, b] = h.get("diff").split(",").map(Number);
      if (PASSES[a] && PASSES[b]) { this.mode = "diff"; this.ai = a; this.bi = b; }
    } else if (h.has("pass") && PASSES[+h.get("pass")]) this.pi = +h.get("pass");
    if (h.has("op")) this.selected = +h.get("op");
  },
  writeHash() {
    const parts = [this.mode === "diff" ? `diff=${this.ai},${this.bi}` : `pass=${this.pi}`];
    if (this.selected !== null) parts.push(`op=${this.selected}`);
    try { history.replaceState(null, "", "#" + parts.join("&")); } catch (e) { /* some file:// setups refuse */ }
  },

  current() { return this.mode === "diff" ? this.bi : this.pi; },

  setMode(mode) {
    if (mode === this.mode) return;
    if (mode === "diff") { this.bi = this.pi; this.ai = Math.max(0, this.pi - 1); }
    else this.pi = this.bi;
    this.mode = mode;
    this.layoutPanes();
  },
  setPass(i) {
    this.pi = i;
    this.refresh();
  },
  setDiff(a, b) {
    this.ai = a; this.bi = b;
    this.refresh();
  },

  layoutPanes() {
    const box = $("panes");
    box.innerHTML = "";
    this.panes = this.mode === "diff" ? [new GraphPane("a"), new GraphPane("b")] : [new GraphPane("single")];
    for (const p of this.panes) box.appendChild(p.el);
    $("mode-pass").classList.toggle("on", this.mode === "pass");
    $("mode-diff").classList.toggle("on", this.mode === "diff");
    $("diff-pick").hidden = this.mode !== "diff";
    $("diff-summary").hidden = this.mode !== "diff";
    this.refresh();
  },

  refresh() {
    if (this.mode === "diff") {
      this.diff = diffPasses(this.ai, this.bi);
      $("diff-a").value = this.ai;
      $("diff-b").value = this.bi;
      this.panes[0].show(this.ai, this.diff.statusA);
      this.panes[1].show(this.bi, this.diff.statusB);
      this.renderDiff();
    } else {
      this.diff = null;
      this.panes[0].show(this.pi, null);
    }
    this.renderPassList();
    this.renderCosts();
    this.renderText();
    this.runSearch(false);
    if (this.selected !== null) this.select(this.selected, { from: "refresh" });
    else this.writeHash();
  },

  // ---------------------------------------------------------------- pass list and costs
  renderPassList() {
    const rows = [`<tr><th>#</th><th>pass</th><th class="num" title="pass time (timings.js)">ms</th>` +
      `<th class="num" title="comparisons (FSS gates), whole batch">comparisons</th><th class="num">\u0394</th></tr>`];
    PASSES.forEach((p, i) => {
      let cls = "pass" + (p.changed ? "" : " same");
      if (this.mode === "pass" && i === this.pi) cls += " cur";
      if (this.mode === "diff" && i === this.ai) cls += " da";
      if (this.mode === "diff" && i === this.bi) cls += " db";
      const t = TIMINGS && i > 0 && TIMINGS[p.index] !== undefined ? (TIMINGS[p.index] * 1e3).toFixed(1) : "\u2013";
      const c = p.totals.comparisons, d = i ? c - PASSES[i - 1].totals.comparisons : 0;
      rows.push(`<tr class="${cls}" data-i="${i}" data-name="${esc(p.name)}" title="${p.changed ? "" : "IR unchanged"}">` +
        `<td>${p.index}</td><td class="nm">${esc(p.name)}</td><td class="num ms">${t}</td>` +
        `<td class="num">${fmtInt(c)}</td>${deltaCell(d, fmtInt)}</tr>`);
    });
    $("passes").innerHTML = rows.join("");
    $("timing-hint").textContent = TIMINGS ? "Greyed: the pass left the IR unchanged. \u0394: comparisons vs the pass before."
      : "Pass timings: timings.js (written beside this page by fssc compile) was not found.";
  },

  renderCosts() {
    const diff = this.mode === "diff";
    const b = PASSES[this.current()];
    const a = diff ? PASSES[this.ai] : PASSES[Math.max(0, this.pi - 1)];
    const hasBase = diff || this.pi > 0;
    const T = (p) => p.totals;
    const rows = [
      ["comparisons", (p) => T(p).comparisons, fmtInt],
      ["comparisons / image", (p) => T(p).comparisons / DOC.batch, fmtInt],
      ["key bytes P0", (p) => T(p).key_bytes_p0, fmtBytes],
      ["key bytes P1", (p) => T(p).key_bytes_p1, fmtBytes],
      ["rounds", (p) => T(p).rounds, fmtInt],
      ["sent P0", (p) => T(p).sent_p0, fmtBytes],
      ["sent P1", (p) => T(p).sent_p1, fmtBytes],
    ];
    const head = diff ? `<tr><th></th><th class="num" title="${esc(a.name)}">before</th>` +
      `<th class="num" title="${esc(b.name)}">after</th><th class="num">\u0394</th></tr>`
      : `<tr><th></th><th class="num">${esc(b.name)}</th><th class="num">\u0394 vs ${hasBase ? esc(a.name) : "\u2013"}</th></tr>`;
    const body = rows.map(([label, get, fmt]) => {
      const vb = get(b), va = get(a);
      const key = label.replace(/[^a-z0-9]+/gi, "-");
      return `<tr data-row="${key}"><td>${label}</td>` + (diff ? `<td class="num">${fmt(va)}</td>` : "") +
        `<td class="num">${fmt(vb)}</td>${hasBase ? deltaCell(vb - va, fmt) : "<td></td>"}</tr>`;
    });
    $("costs").innerHTML = head + body.join("");
    $("costs-title").textContent = diff ? `Cost: ${a.name} \u2192 ${b.name} (whole batch)` : "Cost after this pass (whole batch)";
    const gk = Object.entries(b.totals.gates_by_kind).map(([k, n]) => `${k} ${fmtInt(n)}`).join(", ");
    $("costs-hint").textContent = (gk ? `Gates: ${gk}. ` : "") + (b.totals.marked ? ""
      : "Estimated: comparisons are counted, but gates are marked (with their bitwidth) only by mark-comparisons; " +
        "before range analysis a comparison is costed over the full 64-bit ring.");
  },

  renderDiff() {
    const d = this.diff, A = PASSES[d.ai], B = PASSES[d.bi];
    const byKind = (recs) => {
      const c = {};
      for (const r of recs) c[r.kind] = (c[r.kind] || 0) + 1;
      return Object.entries(c).map(([k, n]) => `${k} \u00d7${n}`).join(", ");
    };
    const list = (title, cls, recs, side) => {
      if (!recs.length) return "";
      const items = recs.slice(0, MAX_LIST).map((r) =>
        `<li class="${cls}" data-uid="${r.uid}" data-kind="${esc(r.kind)}" data-side="${side}">` +
        `<span class="k">${esc(r.kind)}</span>${esc(r.name)}</li>`).join("");
      const more = recs.length > MAX_LIST ? `<li>\u2026 and ${recs.length - MAX_LIST} more</li>` : "";
      return `<h3 class="c-${cls}">${title} (${recs.length}): ${esc(byKind(recs))}</h3><ul class="${cls}-list">${items}${more}</ul>`;
    };
    $("diff").innerHTML =
      `<p class="hint">${esc(A.name)} \u2192 ${esc(B.name)}. Ops are matched by their stable id (uid), ` +
      `then by provenance (same kind and ONNX nodes), never by layout.</p>` +
      `<div class="counts"><span class="c-removed" id="n-removed">${d.removed.length} removed</span>` +
      `<span class="c-added" id="n-added">${d.added.length} added</span>` +
      `<span class="c-changed" id="n-changed">${d.changed.length} changed</span>` +
      `<span class="c-same">${d.same} unchanged</span></div>` +
      list("Removed", "removed", d.removed, "a") + list("Added", "added", d.added, "b") +
      list("Changed", "changed", d.changed, "b");
  },

  // ---------------------------------------------------------------- text IR
  renderText() {
    const pi = this.current(), m = passModel(pi), p = m.p;
    const st = this.diff ? this.diff.statusB : null;
    const out = [];
    let n = 0;
    for (const l of p.head) out.push(`<div class="ln"><i>${++n}</i>${esc(l)}</div>`);
    for (const r of m.recs) {
      const s = st && st.get(r.uid);
      out.push(`<div class="ln op${s ? " " + s : ""}" data-uid="${r.uid}"><i>${++n}</i>${esc(r.line)}</div>`);
    }
    for (const l of p.tail) out.push(`<div class="ln"><i>${++n}</i>${esc(l)}</div>`);
    $("text").innerHTML = out.join("");
    $("text-title").textContent = `IR text after ${p.name}`;
    $("raw").setAttribute("href", p.file);
  },

  // ---------------------------------------------------------------- selection
  select(uid, how = {}) {
    this.selected = uid;
    // which pass shows it: the current one, or (diff) the "before" pass for a removed op
    let pi = this.current(), pane = this.mode === "diff" ? 1 : 0;
    if (!recordOf(pi, uid) && this.mode === "diff" && recordOf(this.ai, uid)) { pi = this.ai; pane = 0; }
    if (this.mode === "diff" && how.pane === "a" && recordOf(this.ai, uid)) { pi = this.ai; pane = 0; }
    const r = recordOf(pi, uid);
    this.partnerSel = this.diff ? this.diff.partner.get(uid) : undefined;  // same op under a new id
    for (const p of this.panes) p.render();
    if (r) {
      if (how.from !== "graph") this.panes[pane].reveal(uid);
      // keep the other diff pane on the same op (or its provenance partner)
      if (this.mode === "diff") {
        const other = this.panes[1 - pane], otherPi = pane ? this.ai : this.bi;
        const u2 = recordOf(otherPi, uid) ? uid : this.diff.partner.get(uid);
        if (u2 !== undefined && recordOf(otherPi, u2)) other.reveal(u2);
      }
    }
    // text
    const prev = $("text").querySelector(".ln.sel");
    if (prev) prev.classList.remove("sel");
    const ln = $("text").querySelector(`.ln.op[data-uid="${uid}"]`) ||
      (this.partnerSel !== undefined ? $("text").querySelector(`.ln.op[data-uid="${this.partnerSel}"]`) : null);
    if (ln) {
      ln.classList.add("sel");
      if (how.from !== "text") ln.scrollIntoView({ block: "center" });
    }
    this.renderInspector(r, pi);
    this.writeHash();
  },

  renderInspector(r, pi) {
    const box = $("inspector");
    if (!r) {
      box.innerHTML = `<p class="hint">Op ${this.selected} is not in this pass. Click an op in the graph, ` +
        `the text or the search results.</p>` + this.historyHtml(this.selected, pi);
      return;
    }
    const p = PASSES[pi];
    const status = this.diff ? (pi === this.ai ? this.diff.statusA : this.diff.statusB).get(r.uid) : null;
    const rows = (pairs) => `<table>${pairs.map(([k, v]) => `<tr><td>${esc(k)}</td><td>${v}</td></tr>`).join("")}</table>`;
    const val = (v) => `%${esc(v.n)}: ${esc(shapeX(v.sh))} ${esc(v.dt)}` +
      (v.s !== undefined ? ` \u00b7 scale ${v.s}` : "") +
      (v.c ? ` \u00b7 const #${esc(v.c)}` : "");
    let html = `<h3 data-uid="${r.uid}" data-name="${esc(r.name)}"><span class="kindtag" style="border-color:${kindColor(r.kind)};background:${kindFill(r.kind)}">` +
      `${esc(r.kind)}</span>${esc(r.name)}${status ? `<span class="status ${status}">${status}</span>` : ""}</h3>` +
      `<div class="hint">op${r.uid} in pass ${p.index}. ${esc(p.name)}</div>`;
    if (status === "changed") {  // what changed: the op's text line before and after
      const d = this.diff, otherPi = pi === d.ai ? d.bi : d.ai;
      const other = recordOf(otherPi, r.uid) || recordOf(otherPi, d.partner.get(r.uid));
      if (other) {
        const [before, after] = pi === d.ai ? [r, other] : [other, r];
        html += `<div class="code change"><span class="cm">${esc(PASSES[d.ai].name)}:</span>\n${esc(before.line.trim())}\n` +
          `<span class="cm">${esc(PASSES[d.bi].name)}:</span>\n${esc(after.line.trim())}</div>`;
      }
    }
    const o = r.outs[0];
    html += `<div class="summary">output <b class="out-shape">${esc(o ? shapeX(o.sh) : "\u2013")}</b>` +
      (o && o.s !== undefined ? ` \u00b7 scale ${o.s}` : "") +
      (r.gate ? ` \u00b7 <b>${esc(r.gate.kind)}</b> gates: <b>${fmtInt(r.gate.count)}</b>, ` +
        `m=${r.gate.bits}${r.gate.estimated && !r.gate.ranged ? " (est.)" : ""}` : "") + `</div>`;
    if (r.gate) {
      const g = r.gate;
      html += `<h4>Gate${r.marked ? "" : " (not marked yet)"}</h4>` + rows([
        ["gate kind", `<span class="gate-kind">${esc(g.kind)}</span>`],
        ["gate count", `<span class="gate-count">${fmtInt(g.count)}</span> (batch) \u00b7 ${fmtInt(g.per_image)} per image`],
        ["bits", g.estimated && !g.ranged ? `${g.bits} (no range analysis yet)` : String(g.bits)],
        ["depth", String(g.depth)],
        ...["trunc", "shift"].filter((k) => g[k]).map((k) => [k, String(g[k])]),
      ]);
    }
    const c = r.cost;
    html += `<h4>Estimated secure cost (whole batch)</h4>` + rows([
      ["key bytes", `P0 ${fmtBytes(c.key_p0)} \u00b7 P1 ${fmtBytes(c.key_p1)}`],
      ["comm", `P0 sends ${fmtBytes(c.sent_p0)} \u00b7 P1 sends ${fmtBytes(c.sent_p1)}`],
      ["rounds", String(c.rounds)],
    ]) + (r.note ? `<div class="note">${esc(r.note)}</div>` : "");
    html += `<h4>Values</h4>` + rows([
      ["output shape", esc(o ? shapeX(o.sh) : "\u2013")],
      ["scale", o && o.s !== undefined ? `${o.s} fractional bits` : "not planned yet"],
      ["bitwidth", r.gate && (r.marked || r.gate.ranged) ? `m=${r.gate.bits} (this op's comparisons)` : "\u2013"],
      ...r.ins.map((v, i) => [`input ${i}`, val(v)]),
      ...r.outs.map((v, i) => [`output ${i}`, val(v)]),
    ]);
    const attrs = Object.entries(r.attrs);
    html += `<h4>Attributes</h4>` + (attrs.length ? rows(attrs.map(([k, v]) => [k, esc(v)])) : `<div class="hint">none</div>`);
    html += `<h4>Provenance</h4>` + rows([
      ["ONNX nodes", r.origin.length ? r.origin.map(esc).join("<br>") : "\u2013 (made by a pass)"],
      ["created by", esc(r.by)],
    ]) + this.historyHtml(r.uid, pi);
    html += `<h4>Generated code</h4>` + this.codeHtml(r.uid, pi);
    box.innerHTML = html;
  },

  // The op's life across passes: where it appears, changes and disappears.
  historyHtml(uid, here) {
    if (uid === null || uid === undefined) return "";
    const parts = [];
    let prev = null;
    PASSES.forEach((p, i) => {
      const m = passModel(i), j = m.byUid.get(uid);
      const ref = j === undefined ? null : p.ops[j];
      let cls = "", label = p.name;
      if (ref === null && prev === null) { prev = ref; return; }
      if (ref === null) cls = "gone";
      else if (prev === null) cls = "new";
      else if (ref !== prev) cls = "chg";
      if (i === here) cls += " here";
      parts.push(`<span class="${cls}" data-goto="${i}" title="${cls.includes("gone") ? "removed by" : cls.includes("chg") ?
        "changed by" : cls.includes("new") ? "first in" : "unchanged in"} ${esc(p.name)}">${esc(label)}</span>`);
      prev = ref;
    });
    return `<h4>History (click a pass)</h4><div class="hist">${parts.join("")}</div>`;
  },

  codeHtml(uid, pi) {
    const last = PASSES.length - 1;
    const code = DOC.code[String(uid)];
    if (!code) {
      if (!recordOf(last, uid)) {
        let gone = null;
        for (let i = pi + 1; i <= last; i++) if (!recordOf(i, uid)) { gone = PASSES[i].name; break; }
        return `<div class="hint">This op does not reach the generated program${gone ? ` (removed by ${esc(gone)})` : ""}.</div>`;
      }
      return `<div class="hint">No generated programs beside this dump.</div>`;
    }
    let html = pi === last ? "" : `<div class="hint">Lines of the final program (pass ${PASSES[last].name}):</div>`;
    for (const role of ["party0", "party1", "dealer"]) {
      const lines = code[role];
      if (!lines) continue;
      html += `<div class="code" data-role="${role}"><span class="file">${role}/program.py</span>\n` + lines.map(([no, cm, ln]) =>
        (cm ? `<span class="no">${no - 1}</span> <span class="cm"># ${esc(cm)}</span>\n` : "") +
        `<span class="no">${no}</span> ${esc(ln)}`).join("\n") + `</div>`;
    }
    return html;
  },

  // ---------------------------------------------------------------- search
  initSearch() {
    const input = $("search");
    let timer = 0;
    input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => this.runSearch(true), 80); });
    input.addEventListener("focus", () => { if (input.value.trim()) this.runSearch(true); });
    input.addEventListener("keydown", (e) => {
      if (e.key === "Escape") { input.value = ""; this.runSearch(true); input.blur(); }
      if (e.key === "Enter") {
        const first = $("results").querySelector(".r");
        if (first) first.click();
      }
    });
    $("results").addEventListener("mousedown", (e) => e.preventDefault());  // keep focus in the box
    $("results").addEventListener("click", (e) => {
      const r = e.target.closest(".r");
      if (!r) return;
      $("results").hidden = true;
      this.select(+r.dataset.uid, { from: "search", pane: r.dataset.side });
    });
    document.addEventListener("click", (e) => { if (!e.target.closest(".search")) $("results").hidden = true; });
  },

  haystack(r) {
    const shapes = [...r.ins, ...r.outs].map((v) => `${shapeX(v.sh)} [${v.sh.join(",")}] ${v.sh.join(",")}`).join(" ");
    const g = r.gate ? `${r.gate.kind} gate:${r.gate.kind} gate=${r.gate.kind}` : "";
    return `${r.name} ${r.kind} ${shapes} ${g} ${r.origin.join(" ")} op${r.uid} ${r.by}`.toLowerCase();
  },

  runSearch(open) {
    const q = $("search").value.trim().toLowerCase();
    const res = $("results");
    if (!q) {
      res.hidden = true;
      if (this.hits) { this.hits = null; this.panes.forEach((p) => p.render()); }
      return;
    }
    const terms = q.split(/\s+/);
    const found = [];
    const scan = (pi, side, only) => {
      for (const r of passModel(pi).recs) {
        if (only && !only(r)) continue;
        const h = this.haystack(r);
        if (terms.every((t) => h.includes(t))) found.push([r, side]);
      }
    };
    scan(this.current(), this.mode === "diff" ? "b" : "single");
    if (this.mode === "diff") scan(this.ai, "a", (r) => this.diff.statusA.get(r.uid) === "removed");
    this.hits = new Set(found.map(([r]) => r.uid));
    this.panes.forEach((p) => p.render());
    if (!open) return;
    res.innerHTML = found.length ? found.slice(0, MAX_LIST).map(([r, side]) => {
      const sh = r.outs.length ? shapeX(r.outs[0].sh) : "";
      const g = r.gate ? ` \u00b7 ${r.gate.kind} ${compact(r.gate.count)}` : "";
      const gone = side === "a" ? " \u00b7 removed" : "";
      return `<div class="r" data-uid="${r.uid}" data-kind="${esc(r.kind)}" data-side="${side}">` +
        `<span style="color:${kindColor(r.kind)};font-weight:700">${esc(r.kind)}</span>` +
        `<span class="nm">${esc(r.name)}</span><span class="meta">${esc(sh)}${esc(g)}${gone}</span></div>`;
    }).join("") + (found.length > MAX_LIST ? `<div class="none">\u2026 ${found.length - MAX_LIST} more</div>` : "")
      : `<div class="none">No op matches \u201c${esc(q)}\u201d in this pass.</div>`;
    res.dataset.q = q;
    res.hidden = false;
  },
};

app.init();
requestAnimationFrame(() => {
  window.fsscReady = performance.now();
  document.documentElement.dataset.ready = "1";
});
