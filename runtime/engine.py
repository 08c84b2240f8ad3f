"""Run a compiled (planned and marked) IR graph under the protocol.

``deal`` walks the graph on masks and writes both parties' keys;
``run_party`` walks it on masked values. The two walks visit ops in the same
order and call matching ``Dealer`` / ``Party`` methods with the same tags,
which is what keeps key streams and programs in step. Generated programs
(``fssc compile``) call these same per-op functions.

What each party holds:

* P0 (data owner): the graph without weights (shapes only), its input, its
  keys, and W^ = W + A for each weighted layer, received from P1 once per
  model. It computes every linear layer's z_0 before the input is known.
* P1 (model owner): the graph with weights, its keys and its setup seed for A.
* D: the graph without weights, the setup seed (A) and fresh randomness.

Constants in the IR are the model owner's; attributes (shapes, pads, clip
bounds, bitwidths, scales) are the public architecture both parties know.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fssc.compiler.errors import FsscError
from fssc.compiler.gates import gate_tag
from fssc.compiler.ir import Graph, Op
from fssc.compiler.ops import OPS, _windows, conv_float

from . import ring
from .pooling import max_tree
from .prg import expand
from .protocol import Dealer, Party

U64 = np.uint64
WEIGHTED = {"conv", "gemm", "matmul", "mul", "affine"}
LOCAL_STRUCTURAL = {"reshape", "pad", "concat", "flatten"}


# ------------------------------------------------------------ linear layers
@dataclass
class LinearSpec:
    """The bilinear map of a weighted op: y = fn(x, W) + bias."""

    fn: object
    k: int  # reduction length
    w_name: str | None  # constant input holding W (None: identity, e.g. add of a constant)
    b_name: str | None
    w_transform: object = None  # float weights -> the operand fn expects
    bias_scale_extra: int = 0


def linear_spec(op: Op, graph: Graph) -> LinearSpec:
    a = op.attrs
    consts = [i for i in op.inputs if graph.values[i].is_const]
    if op.kind == "conv":
        w_shape = graph.values[op.inputs[1]].shape
        return LinearSpec(lambda x, w: conv_float(a, x, w)[0], int(np.prod(w_shape[1:])), op.inputs[1],
                          op.inputs[2] if len(op.inputs) > 2 else None)
    if op.kind == "gemm":
        if a.get("transA") or any(k in a for k in ("alpha", "beta", "transB")):
            raise FsscError(f"secure runtime: gemm %{op.name} is not canonical (run canonicalize)")
        return LinearSpec(lambda x, w: x @ w, graph.values[op.inputs[1]].shape[0], op.inputs[1],
                          op.inputs[2] if len(op.inputs) > 2 else None)
    if op.kind == "matmul":
        left_const = op.inputs[0] in consts
        w = op.inputs[0] if left_const else op.inputs[1]
        shp = graph.values[w].shape
        if left_const:
            return LinearSpec(lambda x, w_: np.matmul(w_, x), shp[-1], w, None)
        return LinearSpec(lambda x, w_: np.matmul(x, w_), shp[-2] if len(shp) > 1 else shp[0], w, None)
    if op.kind == "mul":
        w = consts[0]
        return LinearSpec(lambda x, w_: x * w_, 1, w, None)
    if op.kind == "affine":
        nd = len(graph.values[op.inputs[0]].shape)
        sh = (1, -1) + (1,) * (nd - 2)
        return LinearSpec(lambda x, w_: x * w_.reshape(sh), 1, op.inputs[1], op.inputs[2])
    raise FsscError(f"secure runtime: {op.kind} %{op.name} is not a weighted linear op")


def _is_const_name(graph: Graph, name: str) -> bool:
    return graph.values[name].is_const


def is_weighted(op: Op, graph: Graph) -> bool:
    """Ops computed with the model owner's constants (the linear-layer protocol)."""
    if op.kind in WEIGHTED:
        return True
    return op.kind in ("add", "sub") and any(_is_const_name(graph, i) for i in op.inputs)


def encode_weights(op: Op, graph: Graph) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """P1's ring encodings (W at wscale, bias at the output scale) and W's signed bit width."""
    spec = linear_spec(op, graph) if op.kind in WEIGHTED else None
    s_in = graph.values[_first_secret(op, graph)].scale
    if spec is None:  # add/sub of a constant: identity map plus a bias at the input scale
        c_name = next(i for i in op.inputs if _is_const_name(graph, i))
        c = graph.values[c_name].data.astype(np.float64)
        if op.kind == "sub":
            if op.inputs[0] == c_name:
                raise FsscError(f"secure runtime: sub(constant, x) at %{op.name} is not supported")
            c = -c
        out_shape = graph.values[op.outputs[0]].shape
        return None, np.broadcast_to(ring.encode(c, s_in), out_shape).copy(), 64
    ws = op.attrs["wscale"]
    w = graph.values[spec.w_name].data.astype(np.float64)
    w_enc = ring.encode(w, ws)
    b_enc = None
    if spec.b_name is not None:
        b = graph.values[spec.b_name].data.astype(np.float64)
        out_shape = graph.values[op.outputs[0]].shape
        if op.kind == "conv":
            b = b.reshape((1, -1) + (1,) * (len(out_shape) - 2))
        elif op.kind == "affine":
            b = b.reshape((1, -1) + (1,) * (len(out_shape) - 2))
        b_enc = np.broadcast_to(ring.encode(b, s_in + ws), out_shape).copy()
    return w_enc, b_enc, ring.signed_bits(w_enc)


def _first_secret(op: Op, graph: Graph) -> str:
    return next(i for i in op.inputs if not _is_const_name(graph, i))


def weight_mask(setup_seed: bytes, op: Op, shape) -> np.ndarray:
    """A for one weighted layer: expanded from the per-model seed D shares with P1."""
    return expand(setup_seed, shape, nonce=1_000_000 + op.uid)


def weighted_ops(graph: Graph) -> list[Op]:
    return [op for op in graph.ops if is_weighted(op, graph)]


def masked_weights(graph: Graph, setup_seed: bytes) -> dict[int, np.ndarray]:
    """P1's one-time setup message: W^ = W + A per weighted layer (uid -> array)."""
    out = {}
    for op in weighted_ops(graph):
        w_enc, _, _ = encode_weights(op, graph)
        if w_enc is not None:
            out[op.uid] = w_enc + weight_mask(setup_seed, op, w_enc.shape)
    return out


# ------------------------------------------------------------ public local ops
def _avg_factor(op: Op, x_shape) -> np.ndarray:
    dummy = np.zeros((1, 1) + tuple(x_shape[2:]), dtype=np.int8)
    _, valid, inpad, nd = _windows(dummy, op.attrs, 0)
    cnt = (inpad if op.attrs.get("count_include_pad", 0) else valid).sum(axis=tuple(range(-nd, 0)))
    return ring.encode(1.0 / cnt, op.attrs["wscale"])


def local_op(op: Op, graph: Graph, ins: list[np.ndarray]) -> np.ndarray:
    """Ops that are linear with public constants: the same on masks and masked values."""
    k = op.kind
    if k == "add":
        return ins[0] + ins[1]
    if k == "sub":
        return ins[0] - ins[1]
    if k == "upscale":
        return ring.upscale(ins[0], op.attrs["shift"])
    if k in LOCAL_STRUCTURAL:
        return OPS[k].run(op.attrs, *ins)[0]
    if k == "sumpool":
        w, _, _, nd = _windows(ins[0], op.attrs, 0)
        return w.sum(axis=tuple(range(-nd, 0)), dtype=U64)
    if k == "globalsumpool":
        x = ins[0]
        return x.sum(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=U64)
    if k == "avgpool":
        w, _, _, nd = _windows(ins[0], op.attrs, 0)
        return w.sum(axis=tuple(range(-nd, 0)), dtype=U64) * _avg_factor(op, graph.values[op.inputs[0]].shape)
    if k == "globalavgpool":
        x = ins[0]
        n = int(np.prod(x.shape[2:]))
        return x.sum(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=U64) * ring.encode(1.0 / n,
                                                                                           op.attrs["wscale"])
    raise FsscError(f"secure runtime: no local rule for {k} %{op.name}")


LOCAL = {"add", "sub", "upscale", "sumpool", "globalsumpool", "avgpool", "globalavgpool"} | LOCAL_STRUCTURAL


def _bounds(op: Op, graph: Graph):
    s = graph.values[op.inputs[0]].scale
    lo = op.attrs.get("min")
    hi = op.attrs.get("max")
    enc = lambda v: ring.encode(np.clip(v, -2.0 ** 62 / 2 ** s, 2.0 ** 62 / 2 ** s), s)  # noqa: E731
    return (None if lo is None else enc(lo)), (None if hi is None else enc(hi))


def check_supported(graph: Graph) -> None:
    """Fail at compile time, naming the op, for anything the protocol cannot run."""
    for op in graph.ops:
        if op.kind == "trunc":
            raise FsscError(f"secure runtime: standalone truncation at %{op.name} (from "
                            f"{', '.join(op.origin) or 'a pass'}) is not supported: no comparison gate absorbs it")
        if op.kind == "batchnorm":
            raise FsscError(f"secure runtime: batchnorm %{op.name} left unfolded")
        if OPS[op.kind].comparison and not op.gate:
            raise FsscError(f"secure runtime: {op.kind} %{op.name} has no gate plan (run mark-comparisons)")
        if op.kind == "argmax" and op.outputs[0] not in graph.outputs:
            raise FsscError(f"secure runtime: argmax %{op.name} feeds other ops; only a final argmax is supported")
        if not (is_weighted(op, graph) or op.kind in LOCAL or OPS[op.kind].comparison):
            raise FsscError(f"secure runtime: op kind {op.kind} (%{op.name}) is not supported")


# ------------------------------------------------------------ the walks
_tag = gate_tag


@dataclass
class DealTrace:
    """What a deal produced beyond the keys (for tests): every wire's mask."""

    masks: dict[str, np.ndarray] = field(default_factory=dict)
    compare_masks: dict[str, np.ndarray] = field(default_factory=dict)


def deal(graph: Graph, D: Dealer, setup_seed: bytes, trace: DealTrace | None = None) -> None:
    """The dealer's walk: masks through the graph, keys for both parties."""
    check_supported(graph)
    seeds = {op.uid: D.linear_seeds(_tag(op)) for op in weighted_ops(graph)}
    r: dict[str, np.ndarray] = {}
    for name in graph.inputs:
        r[name] = D.input(f"in.{name}", graph.values[name].shape)
    for op in graph.ops:
        ins = [r.get(i) for i in op.inputs]
        k = op.kind
        y_shape = graph.values[op.outputs[0]].shape
        if is_weighted(op, graph):
            spec = linear_spec(op, graph) if op.kind in WEIGHTED else None
            x_name = _first_secret(op, graph)
            a_mask = None
            if spec is not None:
                a_mask = weight_mask(setup_seed, op, graph.values[spec.w_name].shape)
            fn = spec.fn if spec else None
            out = D.linear(_tag(op), fn, spec.k if spec else 1, r[x_name], a_mask, y_shape, seeds[op.uid])
        elif k in LOCAL:
            out = local_op(op, graph, ins)
        elif k == "relu":
            out = D.relu(_tag(op), ins[0], op.gate["bits"], op.attrs.get("trunc", 0))
            if trace is not None:
                trace.compare_masks[_tag(op)] = ins[0].reshape(-1)
        elif k == "maxpool":
            def pairmax(level, ra, rb, op=op):
                if trace is not None:
                    trace.compare_masks[_tag(op, f".L{level}")] = ra - rb
                return D.max(_tag(op, f".L{level}"), ra, rb, op.gate["bits"], op.attrs.get("cmp_trunc", 0))
            out = max_tree(ins[0], op.attrs, pairmax)
        elif k == "clip":
            out = _clip(op, graph, ins[0], lambda z, op=op: D.relu(_tag(op), z, op.gate["bits"]), False)
        elif k == "argmax":
            _argmax_deal(op, graph, D, ins[0], trace)
            continue
        else:  # pragma: no cover - check_supported guards this
            raise FsscError(f"secure runtime: no dealer rule for {k}")
        r[op.outputs[0]] = out.reshape(y_shape)
    if trace is not None:
        trace.masks = r
    for o in graph.outputs:
        if graph.values[o].dtype != "int64":
            D.output(f"out.{o}", r[o])


def _clip(op: Op, graph: Graph, x: np.ndarray, relu, is_party: bool) -> np.ndarray:
    """clip(x) = lo + ReLU(x - lo) - ReLU(x - hi): both comparisons in one gate call.

    Public constants move masked values only, so the dealer (on masks) sees
    them as zero.
    """
    lo, hi = _bounds(op, graph)
    c = (lambda v: v) if is_party else (lambda v: U64(0))  # noqa: E731
    flat = x.reshape(-1)
    n = flat.size
    if lo is not None and hi is not None:
        y = relu(np.concatenate([flat - c(lo), flat - c(hi)]))
        return c(lo) + y[:n] - y[n:]
    if lo is not None:
        return c(lo) + relu(flat - c(lo))
    return c(hi) - relu(c(hi) - flat)


def _argmax_classes(op: Op, graph: Graph) -> tuple[int, int]:
    x = graph.values[op.inputs[0]]
    ax = op.attrs.get("axis", 0) % len(x.shape)
    return ax, x.shape[ax]


def _argmax2_input(op: Op, x: np.ndarray) -> np.ndarray:
    """The DReLU input of a 2-class argmax (x is [rows, 2]; masks or masked values).

    argmax = 1 iff l1 > l0, i.e. 1 - DReLU(l0 - l1); with select_last_index a
    tie picks class 1: argmax = 1 iff l1 >= l0 = DReLU(l1 - l0).
    """
    return x[:, 1] - x[:, 0] if op.attrs.get("select_last_index", 0) else x[:, 0] - x[:, 1]


def _argmax_deal(op, graph, D: Dealer, rx, trace):
    ax, c = _argmax_classes(op, graph)
    m = op.gate["bits"]
    x = np.moveaxis(rx, ax, -1).reshape(-1, c)
    if c == 2:
        D.drelu_to_p0(_tag(op), _argmax2_input(op, x), m)
        return
    raise FsscError(f"secure runtime: argmax over {c} classes is not supported yet (2 classes are)")


def _argmax_party(op, graph, P: Party, xhat):
    ax, c = _argmax_classes(op, graph)
    m = op.gate["bits"]
    x = np.moveaxis(xhat, ax, -1).reshape(-1, c)
    if c == 2:
        d = P.drelu_to_p0(_tag(op), _argmax2_input(op, x), m)
        if d is None:
            return None
        lab = d if op.attrs.get("select_last_index", 0) else 1 - d
        shape = list(graph.values[op.inputs[0]].shape)
        shape.pop(ax)
        lab = lab.reshape(shape)
        return np.expand_dims(lab, ax) if op.attrs.get("keepdims", 1) else lab
    raise FsscError(f"secure runtime: argmax over {c} classes is not supported yet (2 classes are)")


def precompute_p0(graph: Graph, P: Party, w_hat: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """P0's offline half of every linear layer (reads the linear seeds, which D writes first)."""
    z0 = {}
    for op in weighted_ops(graph):
        spec = linear_spec(op, graph) if op.kind in WEIGHTED else None
        x_shape = graph.values[_first_secret(op, graph)].shape
        y_shape = graph.values[op.outputs[0]].shape
        z0[op.uid] = P.linear_offline(_tag(op), spec.fn if spec else None, spec.k if spec else 1, x_shape,
                                      w_hat.get(op.uid), y_shape)
    return z0


def run_party(graph: Graph, P: Party, x: np.ndarray | None = None, w_hat: dict | None = None,
              z0: dict | None = None) -> list[np.ndarray] | None:
    """A party's walk. P0 passes its encoded input ``x`` and its z_0 halves; P1 needs the weights in ``graph``.

    Returns P0's outputs as ring elements / labels; P1 gets None.
    """
    check_supported(graph)
    xh: dict[str, np.ndarray] = {}
    for name in graph.inputs:
        xh[name] = P.input(f"in.{name}", x if P.b == 0 else None, graph.values[name].shape)
    labels = {}
    for op in graph.ops:
        ins = [xh.get(i) for i in op.inputs]
        k = op.kind
        y_shape = graph.values[op.outputs[0]].shape
        if is_weighted(op, graph):
            if P.b == 0:
                out = P.linear(_tag(op), None, z0=z0[op.uid])
            else:
                spec = linear_spec(op, graph) if op.kind in WEIGHTED else None
                w_enc, b_enc, wbits = encode_weights(op, graph)
                out = P.linear(_tag(op), xh[_first_secret(op, graph)], spec.fn if spec else None,
                               spec.k if spec else 1, w_enc, b_enc, wbits)
        elif k in LOCAL:
            out = local_op(op, graph, ins)
        elif k == "relu":
            out = P.relu(_tag(op), ins[0], op.gate["bits"], op.attrs.get("trunc", 0))
        elif k == "maxpool":
            out = max_tree(ins[0], op.attrs, lambda level, a, b, op=op: P.max(
                _tag(op, f".L{level}"), a, b, op.gate["bits"], op.attrs.get("cmp_trunc", 0)))
        elif k == "clip":
            out = _clip(op, graph, ins[0], lambda z, op=op: P.relu(_tag(op), z, op.gate["bits"]), True)
        elif k == "argmax":
            labels[op.outputs[0]] = _argmax_party(op, graph, P, ins[0])
            continue
        else:  # pragma: no cover
            raise FsscError(f"secure runtime: no party rule for {k}")
        xh[op.outputs[0]] = out.reshape(y_shape)
    outs = []
    for o in graph.outputs:
        if o in labels:
            outs.append(labels[o])
        else:
            outs.append(P.output(f"out.{o}", xh[o]))
    return outs if P.b == 0 else None


def strip_weights(graph: Graph) -> Graph:
    """The graph P0 and D see: constants reduced to shape and dtype, no bytes."""
    g = graph.clone()
    for v in g.values.values():
        if v.is_const:
            v.data = None
            v.stripped = True
    return g


def log2ceil(n: int) -> int:
    return max(0, math.ceil(math.log2(max(1, n))))
