"""The `torch.compile` backend: `torch.compile(model, backend="graphprune")`.

Registered as `"graphprune"` when graphprune is imported (and through the
`torch_dynamo_backends` entry point). Dynamo hands the backend one FX graph per captured region
(a graph break gives several graphs; each is handled on its own) whose parameters and buffers are
placeholders. The backend lifts them into the graph as constants, analyses the channel groups
(the same op table as `gp.analyze`), rewrites, verifies, and hands the result to the inner
compiler (`inner="inductor"` by default, `"eager"`, any Dynamo backend name or callable).

**Lossless (default).** Nothing the model computes changes (up to float rounding where BN is
folded):

* channels whose every consumer input (the conv/linear input-channel slices that read them) is
  already all-zero, e.g. after soft-mask training, are removed with the slim pass; the result is
  checked against the unmodified graph on random inputs (fp32 and fp64) and a group whose removal
  changes the output (a norm or softmax over channels still sees it) is kept, and so is a channel
  whose removal would break a 1xN pattern of the layer producing it (only whole blocks of N go)
  or a 2:4 pattern of a layer reading it;
* uniform 1xN block patterns already present in conv/linear weights become
  `graphprune::conv2d_1xn` / `linear_1xn` ops (exact masks: the nonzero blocks), kept dense where
  the sparse kernel is measured slower (`check_speed`); 2:4 patterns become
  `to_sparse_semi_structured` weights where the kernels apply (CUDA, fp16/bf16), otherwise they
  are reported and left dense;
* then (`fuse=True`, the default) as in `gp.sparsify`: eval-mode BatchNorms fold into the conv
  before them, a residual add and ReLU after a 1xN layer move into its kernel's stores, and
  (with `inner="eager"`; inductor makes its own pools) large NCHW max-pools run in channels_last;
  checked against the unfused graph (float rounding only: folded BN weights are float32
  products).

Graph inputs and outputs keep their shapes. A graph with nothing to exploit, a graph that needs
gradients for parameters (grad mode on and a parameter with `requires_grad`), a training-mode
graph (batch norm in training mode, dropout) and a graph with symbolic shapes are handed to the
inner compiler unchanged.

**Lossy (opt-in).** `gp.backend(target=gp.Flops(0.5), inner=...)` returns a backend that runs the
pruning pipeline (analysis, plan, slim, verification against the masked oracle) on every captured
graph with the given target and options (those of `gp.PruneConfig`). A graph without prunable
channels, or one where the target is infeasible, is passed through with a warning.

**Parameters are snapshots.** A graph the backend rewrites holds *copies* of the parameters and
buffers it read at compile time: changing the model's weights afterwards (an optimizer step,
`load_state_dict`, in-place edits) does not change what the compiled model computes, and no
gradient reaches the model's parameters through a rewritten graph. Call `torch._dynamo.reset()`
(or compile again) after changing weights. Graphs passed through unchanged read the live
parameters as usual. Every compiled graph leaves a report in `graphprune.backend.reports()`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import operator
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from graphprune.passes._common import get_tensor

__all__ = [
    "graphprune_backend",
    "backend",
    "reports",
    "clear_reports",
    "last_report",
    "Lifted",
    "lift_parameters",
    "analysis_of",
    "zero_channel_plan",
    "find_sparse_layers",
    "unlift",
    "modulize",
    "register",
]

_REPORTS: collections.deque = collections.deque(maxlen=32)


def reports() -> list[dict]:
    """Reports of the most recent graphs the backend compiled (oldest first, at most 32)."""
    return list(_REPORTS)


def clear_reports() -> None:
    """Forget the kept reports (e.g. before compiling the model whose reports you want)."""
    _REPORTS.clear()


def last_report() -> dict | None:
    """The report of the last graph the backend compiled, or None."""
    return _REPORTS[-1] if _REPORTS else None


# ---- lifting parameters out of the Dynamo placeholders ----------------------------------------


@dataclass
class Lifted:
    """A Dynamo graph with its parameters and buffers turned into graph constants (`get_attr`).

    `keep` are the positions of Dynamo's example inputs that stay graph inputs (in order);
    `params` maps each constant's qualified name to the tensor Dynamo passed (the model's own).
    """

    gm: fx.GraphModule
    inputs: list
    keep: list[int]
    params: dict[str, torch.Tensor] = field(default_factory=dict)


_KEY = re.compile(r"\[['\"]([^'\"]+)['\"]\]|\.([A-Za-z_][A-Za-z0-9_]*)")


def _source_name(node: fx.Node) -> str:
    ga = node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    try:
        name = getattr(src, "name", "")  # a property in recent torch, a method in older ones
        return str(name() if callable(name) else name or "")
    except Exception:  # noqa: BLE001 - a source kind without a name
        return ""


def _is_param(node: fx.Node, value) -> bool:
    if not isinstance(value, torch.Tensor):
        return False
    src = _source_name(node)
    return (isinstance(value, nn.Parameter) or "._parameters[" in src or "._buffers[" in src
            or getattr(value, "_dynamo_static_input_type", None) is not None)


def _qualname(node: fx.Node) -> str:
    """`L['self']._modules['conv1']._parameters['weight']` -> `conv1.weight` (else node name)."""
    src = _source_name(node)
    parts = []
    for m in _KEY.finditer(src):
        key = m.group(1) or m.group(2)
        if key in ("_modules", "_parameters", "_buffers"):
            continue
        parts.append(key)
    if len(parts) >= 2 and all(re.fullmatch(r"[A-Za-z0-9_]+", p) for p in parts[1:]):
        return ".".join(parts[1:])
    return node.name


def _unique_names(names: list[str], fallback: list[str]) -> list[str]:
    """Qualified names if they nest consistently (no name is another's prefix), else fallback."""
    s = set(names)
    bad = len(s) != len(names) or any(
        n.rpartition(".")[0] and any(n.startswith(o + ".") for o in s) for n in names)
    return fallback if bad else names


def lift_parameters(gm: fx.GraphModule, example_inputs) -> Lifted:
    """Turn parameter/buffer placeholders of a Dynamo graph into `get_attr` constants."""
    g = copy.deepcopy(gm.graph)
    phs = [n for n in g.nodes if n.op == "placeholder"]
    ex = list(example_inputs)
    lift = [i for i, (n, v) in enumerate(zip(phs, ex)) if _is_param(n, v)]
    names = _unique_names([_qualname(phs[i]) for i in lift],
                          [f"p_{phs[i].name.strip('_')}" for i in lift])
    root: dict[str, Any] = {}
    for n in g.nodes:
        if n.op == "get_attr":
            root[n.target] = get_tensor(gm, n.target)
        elif n.op == "call_module":
            root[n.target] = gm.get_submodule(n.target)
    first = next((n for n in g.nodes if n.op != "placeholder"), None)
    params = {}
    for i, name in zip(lift, names):
        node = phs[i]
        while name in root:
            name = name + "_"
        with g.inserting_before(first):
            new = g.get_attr(name)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        root[name] = ex[i]
        params[name] = ex[i]
    keep = [i for i in range(len(phs)) if i not in set(lift)]
    out = fx.GraphModule(root, g, "GraphpruneGraph")
    return Lifted(out, [ex[i] for i in keep], keep, params)


def analysis_of(lifted: Lifted, name: str = "dynamo graph"):
    """Shapes on every node and the channel groups of a lifted graph (an `Analysis`)."""
    from .analysis import analyze_graph
    from .trace import Traced, _shapes

    _shapes(lifted.gm, list(lifted.inputs))
    return analyze_graph(Traced(lifted.gm, tuple(lifted.inputs), {}, "dynamo", name))


# ---- why a graph is passed through unchanged --------------------------------------------------


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _training_op(gm: fx.GraphModule) -> str:
    """A node that makes the graph stateful or random (training-mode norm, dropout), or ''."""
    import torch.nn.functional as F

    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in (F.batch_norm, F.instance_norm) and _arg(n, 5, "training", False) is True:
            return f"{n.name}: batch norm in training mode"
        if n.target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout) and \
                _arg(n, 2, "training", True) is True and _arg(n, 1, "p", 0.5) != 0:
            return f"{n.name}: dropout in training mode"
        if n.target in (torch.bernoulli, torch.rand, torch.randn, torch.rand_like,
                        torch.randn_like, torch.randint):
            return f"{n.name}: random op"
    return ""


_INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _mutated_param(gm: fx.GraphModule, example_inputs) -> str:
    """A parameter/buffer the graph writes to in place (a counter, a running statistic), or ''."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {n for n, v in zip(phs, example_inputs) if _is_param(n, v)}
    for n in gm.graph.nodes:
        if not n.args or n.args[0] not in params:
            continue
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        inplace = (isinstance(name, str) and name.endswith("_") and not name.startswith("_")) \
            or n.target in _INPLACE or "out" in n.kwargs
        if inplace:
            return f"{n.name} writes to {n.args[0].name} in place"
    return ""


def _skip_reason(gm: fx.GraphModule, example_inputs, lifted: Lifted) -> str:
    if any(not isinstance(x, torch.Tensor) for x in example_inputs):
        return "symbolic shapes (dynamic=True or a recompile with another size); compile with " \
               "dynamic=False to slim"
    why = _training_op(gm)
    if why:
        return f"training-mode graph ({why})"
    why = _mutated_param(gm, example_inputs)
    if why:
        return f"the graph mutates model state ({why})"
    if torch.is_grad_enabled() and any(p.requires_grad for p in lifted.params.values()):
        return "gradients needed for parameters (grad mode is on); run under torch.no_grad() / " \
               "torch.inference_mode() or call model.requires_grad_(False) to slim"
    if not lifted.params:
        return "no parameters in this graph"
    return ""


# ---- lossless: channels that are already dead -------------------------------------------------

_CONSUMERS = ("conv", "conv_fn", "linear", "linear_fn")


def _consumer_weights(a):
    """(node, weight tensor, ParamInfo) for every non-transposed, non-depthwise conv/linear."""
    from .optable import lookup

    gm = a.graph
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function"):
            continue
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        rule = lookup(node, mod)
        if rule is None or rule.name not in _CONSUMERS:
            continue
        if a.notes.get(node.name, {}).get("depthwise"):
            continue
        if mod is not None:
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                continue
            w = getattr(mod, "weight", None)
        else:
            wn = _arg(node, 1, "weight")
            if "transpose" in str(node.target) or getattr(node.target, "__name__", "").startswith(
                    "conv_transpose") or not (isinstance(wn, fx.Node) and wn.op == "get_attr"):
                continue
            w = get_tensor(gm, wn.target)
        info = a.params.get(id(w)) if isinstance(w, torch.Tensor) else None
        if info is not None and w.ndim >= 2:
            yield node, w, info


def _column_liveness(a) -> tuple[np.ndarray, np.ndarray]:
    """Per channel class: seen by some consumer input axis, and nonzero in some consumer."""
    n = len(a.class_group)
    seen, alive = np.zeros(n, bool), np.zeros(n, bool)
    for _node, w, info in _consumer_weights(a):
        t = w.detach()
        if info.grouped_in is not None:
            g = info.grouped_in.shape[0]
            nz = t.reshape(g, t.shape[0] // g, t.shape[1], -1).ne(0).any(3).any(1)  # [g, cin/g]
            ids = info.grouped_in
        else:
            f = info.tmap.factor_of(1)
            if f is None:
                continue
            nz = t.transpose(0, 1).reshape(t.shape[1], -1).ne(0).any(1)
            ids = f.ids
        labs = a.labels[np.asarray(ids).reshape(-1)]
        seen[labs] = True
        np.logical_or.at(alive, labs, nz.reshape(-1).numpy())
    return seen, alive


def _rows_keep(rows: np.ndarray, live: np.ndarray) -> list[int]:
    """Same count per row: every live channel plus dead ones up to the largest live count."""
    k = max(1, max(int(live[r].sum()) for r in rows))
    keep = []
    for r in rows:
        order = sorted(r.tolist(), key=lambda i: (not live[i], i))
        keep.extend(order[:k])
    return sorted(keep)


_REDUCE_NAMES = ("mean", "var", "std", "amax", "amin", "logsumexp")


def _reduced_groups(a) -> set[int]:
    """Groups an op reduces over (norms, softmax, mean over channels): removing one of their
    channels changes that op's result even when every consumer ignores the channel."""
    from .optable import lookup
    from .rules import _reduce_dims, arg
    from .tmap import TMap

    out: set[int] = set()
    gm = a.graph
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        rule = lookup(node, mod)
        x = node.args[0] if node.args else None
        tm = a.tmaps.get(x.name) if isinstance(x, fx.Node) else None
        if rule is None or rule.oracle is None or not isinstance(tm, TMap):
            continue
        if rule.name in _REDUCE_NAMES:
            axes = _reduce_dims(node, tm.ndim)
        elif rule.name in ("softmax", "log_softmax") and mod is None:
            axes = [int(arg(node, 1, "dim")) % tm.ndim]
        else:
            axes = range(tm.ndim)
        for d in axes:
            f = tm.factor_of(d)
            if f is not None:
                out |= {int(g) for g in a.class_group[a.labels[f.ids.reshape(-1)]] if g >= 0}
    return out


def _pattern_pinned(a, dead: np.ndarray, layers) -> np.ndarray:
    """Channel classes to keep so the sparse patterns of `layers` survive the slim: a 1xN layer
    may lose output channels only as whole blocks of N (a lone removed row would shift every
    block after it), a 2:4 layer that will run on the 2:4 kernels no input channels (the groups
    of 4 run along them). A "1xN" layer whose groups all keep the same input channels is just
    input-channel pruning, the slim's business: not pinned."""
    from .kernels.masks import groups_differ_1xn
    from .kernels.semi24 import semi_structured_weight_ok

    pinned = np.zeros(len(dead), bool)
    by_name = {s.node: s for s in layers}
    for node, w, info in _consumer_weights(a):
        s = by_name.get(node.name)
        if s is None or info.grouped_in is not None:
            continue
        f = info.tmap.factor_of(0 if s.pattern == "1xN" else 1)
        if f is None:
            continue
        labs = a.labels[np.asarray(f.ids).reshape(-1)]
        if s.pattern == "2:4":
            if semi_structured_weight_ok(w):
                pinned[labs] = True
            continue
        if len(labs) % s.n or not groups_differ_1xn(w.detach() != 0, s.n):
            continue
        blocks = labs.reshape(-1, s.n)
        pinned[blocks[~dead[blocks].all(1)].reshape(-1)] = True
    return pinned


def zero_channel_plan(a, sparse_layers=()):
    """A Plan removing exactly the channels whose every consumer input slice is all-zero
    (groups an op reduces over are left alone: see `_reduced_groups`; channels whose removal
    would break a pattern of `sparse_layers` too: see `_pattern_pinned`)."""
    from .plan import Plan, repair_empty

    seen, alive = _column_liveness(a)
    dead_all = seen & ~alive
    if sparse_layers:
        dead_all &= ~_pattern_pinned(a, dead_all, sparse_layers)
    reduced = _reduced_groups(a)
    keep = {}
    for g in a.prunable_groups:
        if g.id in reduced:
            continue
        dead = dead_all[g.classes]
        if not dead.any():
            continue
        live = ~dead
        if g.rows is not None:
            sel = _rows_keep(g.rows, live)
        else:
            sel = np.flatnonzero(live).tolist() or [0]
            sel = list(repair_empty(a, g, tuple(sel), live.astype(float)))
        if len(sel) < g.size:
            keep[g.id] = tuple(sel)
    sizes = {g.id: g.size for g in a.groups}
    return Plan(keep, sizes, {"target": "lossless: all-zero consumer channels"})


def _slim(a, plan) -> fx.GraphModule:
    from .passes.cleanup import cleanup
    from .passes.slim import slim

    return cleanup(slim(a, plan))


def _verify(new: fx.GraphModule, ref: fx.GraphModule, inputs, what: str,
            rtol64: float = 1e-9, build64=None) -> str:
    """Check `new` against `ref` on random inputs (fx prints failing generated code to stderr:
    a failure here is an expected outcome, so that print is swallowed)."""
    from .verify import verify_against

    with contextlib.redirect_stderr(io.StringIO()):
        return str(verify_against(new, ref, tuple(inputs), {}, trials=2, what=what,
                                  rtol64=rtol64, build64=build64))


def _lossless_slim(a, lifted: Lifted, rep: dict, sparse_layers=()) -> fx.GraphModule | None:
    """Slim the dead channels; groups whose removal changes the output are kept, and so are
    channels whose removal would break the pattern of one of `sparse_layers`."""
    from .errors import GraphpruneError
    from .plan import Plan

    plan = zero_channel_plan(a, sparse_layers)
    if not plan.keep:
        return None
    try:
        new = _slim(a, plan)
        rep["verify"] = _verify(new, lifted.gm, lifted.inputs, "lossless slimmed graph")
    except GraphpruneError:
        ok = {}
        for gid, sel in plan.keep.items():
            one = Plan({gid: sel}, plan.sizes, plan.meta)
            try:
                _verify(_slim(a, one), lifted.gm, lifted.inputs, "lossless slimmed graph")
                ok[gid] = sel
            except GraphpruneError as e:
                rep.setdefault("kept_groups", {})[gid] = str(e).splitlines()[0]
        if not ok:
            return None
        plan = Plan(ok, plan.sizes, plan.meta)
        new = _slim(a, plan)
        rep["verify"] = _verify(new, lifted.gm, lifted.inputs, "lossless slimmed graph")
    rep["removed_channels"] = {int(g): plan.sizes[g] - len(k) for g, k in plan.keep.items()}
    new.graphprune_plan = plan
    return new


# ---- lossless: sparse patterns already in the weights -----------------------------------------


@dataclass(frozen=True)
class SparseLayer:
    """A conv/linear whose weight already holds a pattern: node, layer (weight name without
    `.weight`), "1xN" | "2:4", N and the kept fraction of its weights."""

    node: str
    layer: str
    pattern: str
    n: int
    kept: float


def _conv_targets():
    import torch.nn.functional as F

    return {F.conv2d, torch.ops.aten.conv2d.default, torch.ops.aten.conv2d.padding}


def _linear_targets():
    import torch.nn.functional as F

    return {F.linear, torch.ops.aten.linear.default}


def _const_layers(gm: fx.GraphModule, grouped: bool = False):
    """(node, weight, bias, groups) of 2-D convs and linears whose weight and bias are constants
    (`get_attr`); grouped convs only when `grouped`."""
    convs, linears = _conv_targets(), _linear_targets()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in convs | linears:
            continue
        wn, bn = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if not (isinstance(wn, fx.Node) and wn.op == "get_attr"):
            continue
        if bn is not None and not (isinstance(bn, fx.Node) and bn.op == "get_attr"):
            continue
        w = get_tensor(gm, wn.target)
        b = get_tensor(gm, bn.target) if bn is not None else None
        if node.target in convs:
            groups = _arg(node, 6, "groups", 1)
            if w.ndim == 4 and isinstance(groups, int) and (groups == 1 or grouped):
                yield node, w, b, groups
        elif w.ndim == 2:
            yield node, w, b, None


def find_sparse_layers(gm: fx.GraphModule, ns=(32, 16, 8, 4)) -> list[SparseLayer]:
    """Layers whose nonzero weights already form a uniform 1xN or a 2:4 pattern.

    1xN: the blocks holding a nonzero weight (`block_cover_1xn`: a kept weight may itself be
    exactly zero) are as many in every group of N outputs; of the N that fit, the one keeping the
    fewest blocks (a 1x16 pattern read as 1x32 keeps the union of two groups), then the largest."""
    from .kernels.masks import block_cover_1xn, is_24

    out = []
    for node, w, _b, _groups in _const_layers(gm):
        layer = node.args[1].target.removesuffix(".weight")
        nz = w.detach() != 0
        if not nz.any() or bool(nz.all()):
            continue
        k, c = nz.shape[:2]
        hit = None
        for n in ns:
            cover = block_cover_1xn(nz, n) if k % n == 0 else None
            if cover is None:
                continue
            kept = int(cover.reshape(k // n, n, c, -1)[0, 0, :, 0].sum())
            if 0 < kept < c and (hit is None or kept / c < hit.kept):
                hit = SparseLayer(node.name, layer, "1xN", n, kept / c)
        if hit is None and is_24(nz):
            hit = SparseLayer(node.name, layer, "2:4", 4, float(nz.float().mean()))
        if hit is not None:
            out.append(hit)
    return out


def _sparse_name(gm: fx.GraphModule, node: fx.Node, i: int) -> str:
    """The layer's own name (`features.3` for `features.3.weight`) when that module holds only
    this layer's weight and bias, else `gp_sparse_<i>`."""
    wt = node.args[1].target
    bn = _arg(node, 2, "bias")
    prefix, _, leaf = wt.rpartition(".")
    if leaf == "weight" and prefix and (bn is None or bn.target == prefix + ".bias"):
        try:
            cont = gm.get_submodule(prefix)
        except AttributeError:
            cont = None
        if cont is not None and type(cont) is nn.Module:
            own = set(cont._parameters) | set(cont._buffers) | set(cont._modules)
            own |= {k for k, v in vars(cont).items() if isinstance(v, torch.Tensor)}
            if own <= {"weight", "bias"}:
                return prefix
    return f"gp_sparse_{i}"


def modulize(gm: fx.GraphModule, names: set[str] | None = None) -> fx.GraphModule:
    """Turn functional conv2d / linear calls with constant weights (torch-level or aten, as in
    Dynamo and torch.export graphs) into `nn.Conv2d` / `nn.Linear` call_module nodes, in place;
    `names` limits it to those nodes. Module-level passes (`gp.sparsify`) then see the layers."""
    layers = [(n, w, b, g) for n, w, b, g in _const_layers(gm, grouped=True)
              if names is None or n.name in names]
    for i, (node, w, b, groups) in enumerate(layers):
        if groups is not None:
            stride, padding, dilation = (_arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0),
                                         _arg(node, 5, "dilation", 1))
            mod = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride, padding,
                            dilation, groups, bias=b is not None, device="meta")
        else:
            mod = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        mod.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        if b is not None:
            mod.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        target = _sparse_name(gm, node, i)
        gm.add_submodule(target, mod)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (node.args[0],))
        new.meta = {**node.meta, "graphprune_functional_node": node.name}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _sparse_rewrite(gm: fx.GraphModule, inputs, layers, check_speed: bool, rep: dict):
    """Put the found 1xN / 2:4 layers into sparse ops (2:4: as masked dense modules, for
    `_semi_structured` after BN folding); returns (the new graph or None, {its 2:4 node: the
    report's node})."""
    from .kernels.masks import block_cover_1xn
    from .kernels.onexn import faster_than_dense
    from .kernels.semi24 import weight_why_not, why_not_semi_structured
    from .passes.sparse_ops import LayerSparsity, sparse_ops

    rep["sparse"] = [dict(vars(s)) for s in layers]
    todo = {}
    for s in layers:
        entry = next(e for e in rep["sparse"] if e["node"] == s.node)
        if s.pattern == "2:4":
            w = get_tensor(gm, next(n for n in gm.graph.nodes if n.name == s.node).args[1].target)
            if why := weight_why_not(w):
                entry["applied"] = f"no: {why} (left dense)"
                continue
        todo[s.node] = s
    if not todo:
        return None, {}
    gm = modulize(copy.deepcopy(gm), set(todo))
    _shape_inputs(gm, inputs)
    nodes = {n.meta.get("graphprune_functional_node", n.name): n for n in gm.graph.nodes}
    plan, renamed = [], {}
    for name, s in todo.items():
        node = nodes[name]
        mod = gm.get_submodule(node.target)
        entry = next(e for e in rep["sparse"] if e["node"] == name)
        if s.pattern == "2:4" and (why := why_not_semi_structured(mod)):
            entry["applied"] = f"no: {why} (left dense)"
            continue
        if s.pattern == "1xN" and check_speed:
            x = node.args[0].meta.get("val")
            kw = ({"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation}
                  if isinstance(mod, nn.Conv2d) else {})
            try:
                ok, sp, de = faster_than_dense(mod, tuple(x.shape), s.n, 1 - s.kept, **kw)
            except Exception as e:  # noqa: BLE001 - a layer the kernel does not take
                ok, sp, de = False, float("nan"), float("nan")
                entry["error"] = f"{type(e).__name__}: {e}"
            if not ok:
                entry["applied"] = f"no: sparse kernel slower here ({sp:.3f} ms vs {de:.3f} ms)"
                continue
        nz = mod.weight.detach() != 0
        plan.append(LayerSparsity(node.name, s.pattern, s.n,
                                  block_cover_1xn(nz, s.n) if s.pattern == "1xN" else nz))
        renamed[node.name] = name
    if not plan:
        return None, {}
    try:
        new, how = sparse_ops(gm, plan)
    except ValueError as e:
        rep["sparse_error"] = str(e)
        return None, {}
    for new_name, held in how.items():
        entry = next(e for e in rep["sparse"] if e["node"] == renamed[new_name])
        entry["applied"] = held
    return new, {d.node: renamed[d.node] for d in plan if d.pattern == "2:4"}


def _semi_structured(gm: fx.GraphModule, inputs, rep: dict, nodes: dict) -> fx.GraphModule:
    """The 2:4 layers of `nodes` ({graph node: report node}) the kernels take, on them (the
    `semi_structured` pass), verified against `gm`; `gm` itself when none is taken or the check
    fails (reported)."""
    from .errors import GraphpruneError
    from .passes.semi_structured import semi_structured

    if not nodes:
        return gm
    try:
        new, how = semi_structured(gm, list(nodes))
        if any("semi_structured" in h for h in how.values()):
            rep["verify_semi_structured"] = _verify(new, gm, inputs, "2:4 (semi-structured) graph")
    except (GraphpruneError, ValueError, RuntimeError, NotImplementedError) as e:
        rep["semi_structured_error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return gm
    for name, held in how.items():
        entry = next(e for e in rep["sparse"] if e["node"] == nodes[name])
        entry["applied"] = held
    return new


def _shape_inputs(gm: fx.GraphModule, inputs) -> None:
    from .trace import _shapes

    _shapes(gm, list(inputs))


# ---- inner compiler ---------------------------------------------------------------------------


def _inner(gm: fx.GraphModule, inputs, inner):
    if inner in (None, "eager"):
        return gm
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, list(inputs))
    if isinstance(inner, str):
        from torch._dynamo import lookup_backend

        return lookup_backend(inner)(gm, list(inputs))
    return inner(gm, list(inputs))


def unlift(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """The form Dynamo hands to backends: every tensor constant (`get_attr`) becomes a leading
    placeholder; returns the new graph and the constants to pass in front of the inputs."""
    g = copy.deepcopy(gm.graph)
    first = next(iter(g.nodes))
    consts, seen = [], {}
    for node in list(g.nodes):
        if node.op != "get_attr":
            continue
        t = get_tensor(gm, node.target)
        if not isinstance(t, torch.Tensor):
            continue
        if node.target not in seen:
            with g.inserting_before(first):
                ph = g.placeholder(f"c_{node.target.replace('.', '_')}")
            ph.meta = dict(node.meta)
            seen[node.target] = ph
            consts.append(t.detach())
        node.replace_all_uses_with(seen[node.target])
        g.erase_node(node)
    root = {n.target: gm.get_submodule(n.target) for n in g.nodes if n.op == "call_module"}
    root.update({n.target: get_tensor(gm, n.target) for n in g.nodes if n.op == "get_attr"})
    out = fx.GraphModule(root, g, "GraphpruneGraph")
    return out, consts


def _caller(fn):
    return lambda args: fn(*args)  # Dynamo's convention for what a backend returns


def _wrap(compiled, keep: list[int] | None, rep: dict, consts=()):
    call = _caller(compiled)
    consts = list(consts)
    if keep is None:
        def run(*args):
            return call(args)
    else:
        def run(*args):
            return call(consts + [args[i] for i in keep])
    run.graphprune_report = rep
    return run


def _count(gm: fx.GraphModule, example_inputs=None) -> tuple[int, int]:
    """(parameter/constant elements, call nodes) of a graph."""
    elems = sum(t.numel() for t in gm.state_dict().values())
    if example_inputs is not None:
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        elems += sum(x.numel() for n, x in zip(phs, example_inputs) if _is_param(n, x))
    calls = sum(1 for n in gm.graph.nodes if n.op.startswith("call_"))
    return elems, calls


def _pass_through(gm, example_inputs, inner, rep: dict, reason: str):
    rep.update(action="passed through", reason=reason)
    _REPORTS.append(rep)
    return _wrap(_inner(gm, example_inputs, inner), None, rep)


def _finish(new: fx.GraphModule, lifted: Lifted, inner, rep: dict, t0: float):
    rep["params_after"], rep["calls_after"] = _count(new)
    rep["seconds"] = round(time.perf_counter() - t0, 3)
    rep["graph"] = new
    _REPORTS.append(rep)
    flat, consts = unlift(new)
    return _wrap(_inner(flat, consts + list(lifted.inputs), inner), lifted.keep, rep, consts)


# ---- the backends -----------------------------------------------------------------------------


def _fuse(sp: fx.GraphModule, inputs, rep: dict, pools: bool) -> fx.GraphModule:
    """The sparse graph with BN folded and add / ReLU fused into the 1xN layers, and (`pools`)
    large max-pools in channels_last (as `gp.sparsify(fuse=True)`), verified against `sp`; `sp`
    itself when there is nothing to fuse or the check fails (reported)."""
    from .errors import GraphpruneError
    from .passes.fuse_epilogue import fuse_epilogue
    from .passes.pool_layout import pool_layout

    def passes(g):
        g, fused = fuse_epilogue(g)
        g, done = pool_layout(g) if pools else (g, [])
        return g, fused, done

    def build64():  # folded BN weights are products rounded to the model's dtype: the fp64
        sp64 = copy.deepcopy(sp).double()  # check folds a float64 copy, so it must be exact
        return passes(sp64)[0], sp64

    try:
        out, fused, done = passes(sp)
        if not fused and not done:
            return sp
        rep["verify_fused"] = _verify(out, sp, inputs, "BN-folded / epilogue-fused graph",
                                      build64=build64)
    except (GraphpruneError, ValueError, RuntimeError) as e:
        rep["fuse_error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return sp
    rep["fused"], rep["pools_channels_last"] = fused, done
    return out


def _lossless(gm, example_inputs, inner="inductor", sparse: bool = True, check_speed: bool = True,
              fuse: bool = True):
    from .errors import GraphpruneError

    t0 = time.perf_counter()
    rep: dict = {"mode": "lossless"}
    rep["params_before"], rep["calls_before"] = _count(gm, example_inputs)
    try:
        lifted = lift_parameters(gm, example_inputs)
    except Exception as e:  # noqa: BLE001 - an unusual graph: compile it as it is
        return _pass_through(gm, example_inputs, inner, rep, f"could not lift parameters: {e}")
    why = _skip_reason(gm, example_inputs, lifted)
    if why:
        return _pass_through(gm, example_inputs, inner, rep, why)
    cur = lifted.gm
    try:
        a = analysis_of(lifted)
        layers = find_sparse_layers(cur) if sparse else []
        slim = _lossless_slim(a, lifted, rep, layers)
        if slim is not None:
            cur = slim
            layers = find_sparse_layers(cur) if sparse else []  # (weights sliced: found again)
        sp, semi = (_sparse_rewrite(cur, lifted.inputs, layers, check_speed, rep) if layers
                    else (None, {}))
        if sp is not None:
            rep["verify_sparse"] = _verify(sp, cur, lifted.inputs, "sparse graph")
            # (pool_layout only for eager: inductor picks its own pool layout, and tracing
            # max_pool2d_cl inside Dynamo's shape env fails a guard in 2.13)
            cur = _fuse(sp, lifted.inputs, rep, inner == "eager") if fuse else sp
            cur = _semi_structured(cur, lifted.inputs, rep, semi)  # last: no fold into it
    except (GraphpruneError, ValueError, RuntimeError, NotImplementedError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return _pass_through(gm, example_inputs, inner, rep, f"analysis failed: {msg}")
    if cur is lifted.gm:
        return _pass_through(gm, example_inputs, inner, rep,
                             "nothing to exploit (no all-zero channels, no sparse pattern)")
    rep["action"] = "rewritten"
    return _finish(cur, lifted, inner, rep, t0)


def graphprune_backend(gm: fx.GraphModule, example_inputs, **opts):
    """The lossless `torch.compile` backend (`backend="graphprune"`); see the module docstring.

    Options (via `torch.compile(..., options=...)` they are not passed; use `gp.backend(...)`):
    `inner` ("inductor" | "eager" | a backend name or callable), `sparse` (look for 1xN / 2:4
    patterns, default True), `check_speed` (keep a 1xN layer dense when its kernel is slower),
    `fuse` (fold BN and fuse add / ReLU into the sparse layers, default True).
    """
    return _lossless(gm, example_inputs, **opts)


def _lossy(gm, example_inputs, cfg, inner):
    from .api import apply
    from .api import plan as make_plan
    from .errors import GraphpruneError, PlanError

    t0 = time.perf_counter()
    rep: dict = {"mode": "lossy", "target": repr(cfg.target)}
    rep["params_before"], rep["calls_before"] = _count(gm, example_inputs)
    lifted = lift_parameters(gm, example_inputs)
    if any(not isinstance(x, torch.Tensor) for x in example_inputs):
        return _pass_through(gm, example_inputs, inner, rep, "symbolic shapes")
    if not lifted.params:
        return _pass_through(gm, example_inputs, inner, rep, "no parameters in this graph")
    try:
        a = analysis_of(lifted)
    except (GraphpruneError, ValueError, RuntimeError, NotImplementedError) as e:
        return _pass_through(gm, example_inputs, inner, rep, f"analysis failed: {e}")
    if not a.prunable_groups:
        warnings.warn("graphprune backend: a captured graph has no prunable channel group; "
                      "compiled unchanged", stacklevel=2)
        return _pass_through(gm, example_inputs, inner, rep, "no prunable channel group")
    try:
        p = make_plan(a, cfg.target, cfg.importance, config=cfg)
    except PlanError as e:
        warnings.warn(f"graphprune backend: {str(e).splitlines()[0]}; graph compiled unchanged",
                      stacklevel=2)
        return _pass_through(gm, example_inputs, inner, rep, f"plan error: {e}")
    try:
        new = apply(a, p, verify=cfg.verify, trials=cfg.verify_trials, seed=cfg.seed)
    except GraphpruneError as e:
        warnings.warn(f"graphprune backend: {str(e).splitlines()[0]}; graph compiled unchanged",
                      stacklevel=2)
        return _pass_through(gm, example_inputs, inner, rep, f"pruning failed: {e}")
    rep.update(action="pruned", plan=p.to_json(), **new.graphprune_report)
    return _finish(new, lifted, inner, rep, t0)


def backend(target=None, *, inner="inductor", config=None, sparse: bool = True,
            check_speed: bool = True, fuse: bool = True, **options):
    """A configured backend for `torch.compile(model, backend=gp.backend(...))`.

    `target=None`: the lossless backend with these options. With a target (`gp.Flops(0.5)`,
    `gp.Uniform(0.3)`, ...): the lossy mode, the pruning pipeline on every captured graph;
    `config` / `options` are `gp.PruneConfig` fields (importance, round_to, min_channels, ...).
    Rewritten graphs hold snapshots of the parameters (see the module docstring).
    """
    from .config import PruneConfig

    if target is None and config is None and not options:
        def lossless(gm, example_inputs):
            return _lossless(gm, example_inputs, inner, sparse, check_speed, fuse)

        lossless.__name__ = "graphprune_lossless"
        return lossless
    cfg = (config or PruneConfig()).update(**options)
    if target is not None:
        cfg = cfg.update(target=target)
    if cfg.target is None:
        raise ValueError("gp.backend: PruneConfig options given but no target; pass target=...")

    def lossy(gm, example_inputs):
        return _lossy(gm, example_inputs, cfg, inner)

    lossy.__name__ = "graphprune_lossy"
    return lossy


def register() -> None:
    """Register `"graphprune"` with Dynamo (idempotent; done on `import graphprune`)."""
    try:
        from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend
    except ImportError:  # pragma: no cover - a torch without Dynamo
        return
    # already known through the entry point (Dynamo registers it when it loads it) or registered
    if "graphprune" not in _BACKENDS and "graphprune" not in _COMPILER_FNS:
        register_backend(name="graphprune")(graphprune_backend)


register()

# `gp.backend` is this function (it shadows the module name on the package): reach the reports
# through it, `gp.backend.last_report()` / `gp.backend.reports()`.
backend.reports = reports  # type: ignore[attr-defined]
backend.last_report = last_report  # type: ignore[attr-defined]
backend.clear_reports = clear_reports  # type: ignore[attr-defined]
