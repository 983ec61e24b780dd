"""Cost-constrained allocation: how many channels each group keeps under a FLOPs/params/latency
budget, solved globally by `solver` over exact per-layer costs of (kept in, kept out)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from . import cost as C
from .analysis import Analysis, ChannelGroup
from .errors import PlanError
from .optable import lookup
from .plan import Flops, Latency, Params, repair_empty, select_top
from .tmap import TMap

__all__ = ["CostLayer", "OverheadTerm", "cost_layers", "overhead_terms", "allocate",
           "group_choices", "layer_cost_fn"]

aten = torch.ops.aten
_CONV_FN = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
            torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_LINEAR_FN = {aten.linear.default, torch._C._nn.linear}


@dataclass(frozen=True)
class CostLayer:
    """A conv/linear node's cost inputs: its signature and how c_in / c_out follow the groups."""

    node: str
    sig: C.LayerSig
    c_in: int
    c_out: int
    in_terms: tuple[tuple[int, int], ...]  # (group id, multiplicity)
    in_const: int
    out_group: int | None
    out_mult: int  # output channels per kept class (depthwise channel multiplier)


def _tup(v, n):
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v),) * n


def _sig(a: Analysis, node: fx.Node):
    """(LayerSig, c_in, c_out, channel axis of the input) or None."""
    x = node.args[0]
    xs = tuple(x.meta["val"].shape)
    if node.op == "call_module":
        mod = a.graph.get_submodule(node.target)
        if not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) or getattr(
            mod, "output_padding", (0,)
        ) != (0,) * len(getattr(mod, "output_padding", (0,))):
            return None
        try:
            sig, ci, co = C.sig_from_module(mod, xs)
        except (TypeError, ValueError):
            return None
        return sig, ci, co, (len(xs) - 1 if isinstance(mod, nn.Linear) else 1)
    w = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
    if w is None:
        return None
    has_bias = len(node.args) > 2 and node.args[2] is not None
    if node.target in _LINEAR_FN:
        spatial = (int(np.prod(xs[1:-1])),) if len(xs) > 2 else ()
        sig = C.LayerSig("linear", spatial=spatial, batch=xs[0] if len(xs) > 1 else 1,
                         bias=has_bias)
        return sig, int(w.shape[1]), int(w.shape[0]), len(xs) - 1
    nd = _CONV_FN.get(node.target)
    if nd is None:
        return None
    stride, padding, dilation = (node.args[i] if len(node.args) > i else d
                                 for i, d in ((3, 1), (4, 0), (5, 1)))
    if isinstance(padding, str):
        return None
    g = node.args[6] if len(node.args) > 6 else 1
    ci, co = int(xs[1]), int(w.shape[0])
    groups = "1" if g == 1 else ("depthwise" if g == ci and co % ci == 0 else f"g={g}")
    sig = C.LayerSig(f"conv{nd}d", kernel=tuple(w.shape[2:]), stride=_tup(stride, nd),
                     padding=_tup(padding, nd), dilation=_tup(dilation, nd), groups=groups,
                     spatial=xs[2:], batch=xs[0], bias=has_bias)
    return sig, ci, co, 1


def cost_layers(a: Analysis, frozen: set[int] = frozenset()) -> list[CostLayer]:
    """Every conv/linear node with how its channel counts depend on the prunable groups."""
    out = []
    free = {g.id for g in a.groups if g.prunable and g.id not in frozen}
    for node in a.graph.graph.nodes:
        if node.op not in ("call_module", "call_function"):
            continue
        if node.op == "call_function" and node.target not in _CONV_FN and node.target not in _LINEAR_FN:
            continue
        got = _sig(a, node)
        if got is None:
            continue
        sig, ci, co, cax = got
        x_tm = a.tmaps.get(node.args[0].name)
        in_terms, in_const = _terms(a, x_tm, cax, ci, free)
        y_tm = a.tmaps.get(node.name)
        out_terms, out_const = _terms(a, y_tm, y_tm.ndim - 1 if cax != 1 else 1, co, free)
        out_group, out_mult = None, 1
        if len(out_terms) == 1 and out_const == 0:
            out_group, out_mult = out_terms[0]
        out.append(CostLayer(node.name, sig, ci, co, tuple(in_terms), in_const, out_group,
                             out_mult))
    return out


def _terms(a: Analysis, tm, axis: int, n: int, free: set[int]):
    """Split an axis of n channels into (group, multiplicity) terms plus a constant."""
    if not isinstance(tm, TMap):
        return [], n
    f = tm.factor_of(axis)
    if f is None or len(f.axes) != 1:
        return [], n
    labs = a.labels[f.ids]
    gids = a.class_group[labs]
    terms, const = [], 0
    for gid in np.unique(gids):
        pos = int((gids == gid).sum())
        g = a.groups[gid] if gid >= 0 else None
        if g is None or gid not in free:
            const += pos
            continue
        distinct = len(np.unique(labs[gids == gid]))
        if distinct == g.size and pos % g.size == 0:
            terms.append((int(gid), pos // g.size))
        else:  # the layer sees part of the group: modelled as constant (never underestimates)
            const += pos
    return terms, const


def group_choices(g: ChannelGroup, scores: np.ndarray, round_to: int, min_channels: int):
    """Candidate kept counts (ascending) and the value (sum of kept scores) of each."""
    if g.rows is not None:
        r, c = g.rows.shape
        per_row = np.sort(scores[g.rows], axis=1)[:, ::-1]
        cum = np.cumsum(per_row, axis=1).sum(axis=0)  # value of keeping j+1 per row
        cs = [j for j in range(1, c + 1) if (r * j) % max(round_to, 1) == 0 or j == c]
        cs = [j for j in cs if r * j >= min_channels] or [c]
        return [r * j for j in cs], [float(cum[j - 1]) for j in cs]
    s = np.sort(scores)[::-1]
    cum = np.cumsum(s)
    step = max(round_to, 1)
    ks = sorted({k for k in range(step, g.size + 1, step)} | {g.size})
    ks = [k for k in ks if k >= min_channels] or [g.size]
    return ks, [float(cum[k - 1]) for k in ks]


def _groups_of(sig: C.LayerSig, ci):
    if sig.groups == "1":
        return 1
    if sig.groups == "depthwise":
        return ci
    return int(sig.groups.split("=")[1])


def _vec_analytic(sig: C.LayerSig, ci, co, kind: str):
    """MACs*2 or params for arrays of (c_in, c_out); equals cost.flops/params elementwise."""
    ci = np.asarray(ci, dtype=np.int64)
    co = np.asarray(co, dtype=np.int64)
    g = _groups_of(sig, ci)
    k = int(np.prod(sig.kernel)) if sig.kernel else 1
    if kind == "params":
        bias = co if sig.bias else 0
        if sig.op.startswith("conv_transpose"):
            return (ci * (co // g) * k + bias).astype(float)
        if sig.op.startswith("conv"):
            return (co * (ci // g) * k + bias).astype(float)
        return (ci * co + bias).astype(float) if sig.op == "linear" else np.zeros(ci.shape)
    if sig.op.startswith("conv_transpose"):
        return 2.0 * sig.batch * int(np.prod(sig.spatial)) * ci * (co // g) * k
    if sig.op.startswith("conv"):
        return 2.0 * sig.batch * int(np.prod(C.output_spatial(sig))) * co * (ci // g) * k
    return 2.0 * sig.batch * int(np.prod(sig.spatial)) * ci * co


def layer_cost_fn(target, table=None):
    """cost(sig, c_in, c_out) for a target kind; c_in/c_out may be equal-shape arrays."""
    if isinstance(target, (Flops, Params)):
        kind = "flops" if isinstance(target, Flops) else "params"
        scalar = C.flops if kind == "flops" else C.params

        def analytic(sig, ci, co):
            if np.ndim(ci) == 0 and np.ndim(co) == 0:
                return float(scalar(sig, int(ci), int(co)))
            return _vec_analytic(sig, ci, co, kind)

        return analytic
    if isinstance(target, Latency):

        # in-model context (LatencyTable.calibrate_context); duck-typed tables may lack it
        layer_scale = getattr(table, "layer_scale", lambda sig: 1.0)

        def latency(sig, ci, co):
            scale = layer_scale(sig)
            if np.ndim(ci) == 0 and np.ndim(co) == 0:
                return float(table.lookup(sig, int(ci), int(co))) * scale
            ci, co = np.broadcast_arrays(np.asarray(ci), np.asarray(co))
            ui, ii = np.unique(ci, return_inverse=True)
            uo, io = np.unique(co, return_inverse=True)
            grid = table.lookup_grid(sig, ui, uo)
            return grid[ii.reshape(ci.shape), io.reshape(co.shape)] * scale

        return latency
    raise PlanError(f"unsupported target {target!r}")


def _groups_in(a: Analysis, tm, free: set[int]) -> set[int]:
    if not isinstance(tm, TMap):
        return set()
    out = set()
    for f in tm.factors:
        out |= {int(g) for g in np.unique(a.class_group[a.labels[f.ids.reshape(-1)]])}
    return out & free


def _mm_macs(sa, sb) -> int:
    batch = int(np.prod(np.broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2]))))
    return batch * int(sa[-2]) * int(sa[-1]) * int(sb[-1])


def matmul_terms(a: Analysis, free: set[int]) -> list[tuple[int | None, float]]:
    """FLOPs of activation x activation matmuls (attention) as (group, FLOPs at full size):
    linear in the kept count of the one prunable group on their channel axes (None: fixed)."""
    out = []
    for node in a.graph.graph.nodes:
        rule = lookup(node) if node.op in ("call_function", "call_method") else None
        if rule is None or not rule.mixes:
            continue
        args = [x for x in node.args[:3] if isinstance(x, fx.Node)]
        if any(x.op == "get_attr" for x in args) or len(args) < 2:
            continue
        shapes = [tuple(x.meta["val"].shape) for x in args]
        if any(len(sh) < 2 for sh in shapes):
            continue
        if rule.name == "sdpa" and len(shapes) == 3:
            q, k, v = shapes
            kt = k[:-2] + (k[-1], k[-2])
            pairs = [(2.0 * _mm_macs(q, kt), [args[0], args[1]]),
                     (2.0 * _mm_macs(q[:-1] + (k[-2],), v), [args[2]])]
        else:
            pairs = [(2.0 * _mm_macs(shapes[0], shapes[1]), args[:2])]
        for flops, who in pairs:
            gs = set().union(*(_groups_in(a, a.tmaps.get(x.name), free) for x in who))
            out.append((gs.pop() if len(gs) == 1 else None, flops))
    return out


@dataclass(frozen=True)
class OverheadTerm:
    """A non-layer op (norm, activation, add, pooling, ...) in a latency allocation: its
    measured cost (:meth:`~graphprune.cost.LatencyTable.op_ms`) at ``bytes_per_channel *
    channels``, channels = in_const + sum(mult * kept[group] for group, mult in in_terms)."""

    node: str
    kind: str
    bytes_per_channel: float
    channels: int
    in_terms: tuple[tuple[int, int], ...]
    in_const: int


def _nbytes(t) -> int:
    return int(t.numel()) * t.element_size()


def overhead_terms(a: Analysis, table: C.LatencyTable,
                   frozen: set[int] = frozenset()) -> list[OverheadTerm]:
    """Every op of the graph with an overhead curve in ``table``, with how the bytes it reads
    follow the prunable groups (the same kinds and bytes as
    :func:`graphprune.cost.model_cost_items`, so that the allocation's predicted latency is the
    slimmed model's :func:`~graphprune.cost.estimate_model_latency`). The channel axis is the
    first axis of the op's (largest) input that maps to free groups; an op on no free group
    costs its full size."""
    free = {g.id for g in a.groups if g.prunable and g.id not in frozen}
    gm, out = a.graph, []
    for node in gm.graph.nodes:
        kind = C.node_kind(gm, node)
        if kind in (None, "layer", "free", "unknown"):
            continue
        args = node.args[0] if node.target is torch.cat else node.args
        args = args if isinstance(args, (list, tuple)) else [args]
        ins = [x for x in args if isinstance(x, fx.Node)
               and isinstance(x.meta.get("val"), torch.Tensor)]
        if not ins:
            continue
        sizes = [_nbytes(x.meta["val"]) for x in ins]
        kind, nbytes = C.overhead_bytes(kind, node, sizes)
        if kind not in table.overheads:
            continue
        ref = node if node.target is torch.cat else ins[int(np.argmax(sizes))]
        val = ref.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        tm = a.tmaps.get(ref.name)
        terms, const, n = [], 1, 1
        for ax in range(val.dim()):
            t, c = _terms(a, tm, ax, int(val.shape[ax]), free)
            if t:
                terms, const, n = t, c, int(val.shape[ax])
                break
        out.append(OverheadTerm(node.name, kind, nbytes / n, n, tuple(terms),
                                const if terms else n))
    return out


def _overhead_cost(table: C.LatencyTable, term: OverheadTerm):
    def cost(ci, co):
        ms = table.op_ms(term.kind, np.asarray(ci, dtype=float) * term.bytes_per_channel)
        return float(ms) if np.ndim(ms) == 0 else ms + 0.0 * np.asarray(co)

    return cost


def _table_for(a: Analysis, target: Latency, layers, round_to: int):
    if target.table is not None:
        return target.table
    reqs = {}
    for L in layers:
        ci, co = reqs.get(L.sig, (0, 0))
        reqs[L.sig] = (max(ci, L.c_in), max(co, L.c_out))
    return C.LatencyTable.measure(reqs, round_to=max(round_to, 8))


def allocate(a: Analysis, target, scores: dict, cfg, skip: set[int]):
    """Solve the allocation; returns (keep dict, plan metadata)."""
    from . import solver as S

    layers = cost_layers(a, frozen=skip)
    table = _table_for(a, target, layers, cfg.round_to) if isinstance(target, Latency) else None
    fn = layer_cost_fn(target, table)
    free = sorted({gid for L in layers for gid, _ in L.in_terms} |
                  {L.out_group for L in layers if L.out_group is not None})
    index = {gid: i for i, gid in enumerate(free)}
    groups = []
    for gid in free:
        floor = max(cfg.min_channels, int(np.ceil(cfg.min_fraction * a.groups[gid].size)))
        ks, vs = group_choices(a.groups[gid], scores[gid], cfg.round_to, floor)
        groups.append(S.AllocGroup(str(gid), tuple(ks), tuple(vs)))
    alloc_layers, const_cost, full_cost = [], 0.0, 0.0
    for L in layers:
        full = fn(L.sig, L.c_in, L.c_out)
        full_cost += full
        if not L.in_terms and L.out_group is None:
            const_cost += full
            continue

        def cost(ci, co, L=L):
            return fn(L.sig, ci, np.asarray(co) * L.out_mult)

        alloc_layers.append(S.AllocLayer(
            L.node, tuple((index[g], m) for g, m in L.in_terms), L.in_const,
            None if L.out_group is None else index[L.out_group],
            L.c_out if L.out_group is None else 0, cost))
    if isinstance(target, Latency) and getattr(table, "overheads", None):
        # the ops between the layers (norms, activations, adds, pooling) scale with the kept
        # channels too: the budget is a fraction of the whole model's predicted latency
        for term in overhead_terms(a, table, frozen=skip):
            fn_o = _overhead_cost(table, term)
            full = fn_o(term.channels, 1)
            full_cost += full
            groups_in = [(index[g], m) for g, m in term.in_terms if g in index]
            if not groups_in:
                const_cost += full
                continue
            const_in = term.in_const + sum(a.groups[g].size * m for g, m in term.in_terms
                                           if g not in index)
            alloc_layers.append(S.AllocLayer(f"op:{term.node}", tuple(groups_in), const_in,
                                             None, 1, fn_o))
        # the slimmed GraphModule's own call plus one per module node (cost.py counts the same)
        calls = 1 + sum(1 for n in a.graph.graph.nodes if n.op == "call_module")
        per_call = calls * table.overhead("module_call", 0) if "module_call" in table.overheads \
            else 0.0
        full_cost += per_call
        const_cost += per_call
    if isinstance(target, Flops):  # attention matmuls: linear in the head-dim group's count
        for gid, flops in matmul_terms(a, set(free)):
            full_cost += flops
            if gid is None:
                const_cost += flops
                continue
            size = a.groups[gid].size

            def mm_cost(ci, co, flops=flops, size=size):
                return flops * np.asarray(ci, dtype=float) / size + 0.0 * np.asarray(co)

            alloc_layers.append(S.AllocLayer(f"matmul:{gid}", ((index[gid], 1),), 0, None, 1,
                                             mm_cost))
    budget = float(target.fraction) * full_cost
    prob = S.AllocProblem(tuple(groups), tuple(alloc_layers), budget, const_cost)
    try:
        sol = S.solve(prob, time_limit=cfg.time_limit)
    except S.InfeasibleBudget as e:
        raise PlanError(f"{target!r} cannot be met: {e}") from None
    keep = {}
    for gid, k in zip(free, sol.kept):
        g = a.groups[gid]
        if k < g.size:
            sel = select_top(g, scores[gid], k)
            keep[gid] = sel if g.rows is not None else repair_empty(a, g, sel, scores[gid])
    meta = {
        "target": repr(target), "importance": str(cfg.importance), "solver_status": sol.status,
        "proven_gap": float(sol.gap), "solve_seconds": round(float(sol.seconds), 3),
        "budget": budget, "predicted_cost": float(sol.cost), "full_cost": full_cost,
        "predicted_fraction": float(sol.cost) / full_cost if full_cost else 1.0,
        "heuristic_value": float(sol.heuristic_value), "value": float(sol.value),
        "layers": len(alloc_layers), "groups": len(groups),
    }
    return keep, meta
