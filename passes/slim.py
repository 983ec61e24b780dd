"""slim: structurally remove the channels a Plan drops.

Requires: an Analysis of the graph and a Plan made for it (checked). Ensures: a new GraphModule
whose parameters and buffers are sliced, whose module attributes (in/out channels, groups,
num_features, normalized_shape, embed dims) and shape constants (view/reshape/expand sizes,
split sizes, slice bounds, functional groups, SDPA scale) match; the analysed graph is untouched.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.fx as fx

from graphprune.analysis import Analysis, ParamInfo
from graphprune.errors import PlanError
from graphprune.optable import lookup
from graphprune.plan import Plan

from ._common import Live, get_tensor

__all__ = ["slim"]


def _slice(live: Live, t: torch.Tensor, info: ParamInfo) -> torch.Tensor | None:
    out, changed = t.detach(), False
    for f in info.tmap.factors:
        ax = f.axes[0]
        if info.grouped_in is not None and ax == 1:
            continue
        m = live.alive(f.ids)
        if not m.all():
            out = out.index_select(ax, torch.as_tensor(np.flatnonzero(m), device=t.device))
            changed = True
    if info.grouped_in is not None:
        gi = info.grouped_in
        g = gi.shape[0]
        cols = live.alive(gi)
        o_ids = info.tmap.factor_of(0).ids.reshape(g, -1)
        rows = live.alive(o_ids)
        if not cols.all() or not rows.all():
            w = t.detach().reshape(g, -1, *t.shape[1:])
            parts = []
            for i in range(g):
                r = torch.as_tensor(np.flatnonzero(rows[i]))
                c = torch.as_tensor(np.flatnonzero(cols[i]))
                parts.append(w[i].index_select(0, r).index_select(1, c))
            if len({p.shape for p in parts}) != 1:
                raise PlanError(f"grouped conv weight {info.names[0]}: groups keep unequal counts")
            out = torch.cat(parts, 0)
            changed = True
    return out if changed else None


def slim(a: Analysis, plan: Plan, src: fx.GraphModule | None = None) -> fx.GraphModule:
    """Remove the plan's channels; see the module docstring. `src` (default: the analysed
    graph) may be a converted copy of it, e.g. in float64."""
    alive = plan.alive(a)
    src = a.graph if src is None else src
    live = Live(a, alive, src)
    memo: dict[int, object] = {}  # deepcopy maps each sliced tensor straight to its slice
    for info in a.params.values():
        t = get_tensor(src, info.names[0])
        new = _slice(live, t, info)
        if new is None:
            continue
        new = new.contiguous()
        if isinstance(t, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
        memo[id(t)] = new
    gm = copy.deepcopy(src, memo)
    live.gm = gm
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        mod = live.module(node) if node.op == "call_module" else None
        rule = lookup(node, mod)
        if rule is not None and rule.slim is not None and a.tmaps.get(node.name) is not None:
            rule.slim(live, node)
    gm.graph.lint()
    gm.recompile()
    return gm
