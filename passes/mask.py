"""mask: build the oracle, the dense model in which removed channels are dead.

Requires: an Analysis and a Plan made for it. Ensures: a new GraphModule computing what the slim
model must compute: parameter entries of removed channels are zeroed (every consumer stops seeing
them), every activation is zeroed at removed positions, and ops that reduce over channels (layer
and group norm, mean/var, softmax, max) compute over the kept channels only. Same shapes as the
original; the analysed graph is untouched.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from graphprune import oracle_ops
from graphprune.analysis import Analysis
from graphprune.optable import lookup
from graphprune.plan import Plan
from graphprune.tmap import TMap

from ._common import Live, get_tensor, set_tensor

__all__ = ["mask"]


class _Oracle(Live):
    def __init__(self, a, alive, gm):
        super().__init__(a, alive, gm)
        self.n_const = 0
        self.at: fx.Node | None = None

    def mask(self, tm: TMap) -> torch.Tensor:
        m = torch.ones([1] * tm.ndim, dtype=torch.bool)
        for f in tm.factors:
            shape = [1] * tm.ndim
            for k, ax in enumerate(f.axes):
                shape[ax] = f.ids.shape[k]
            m = m & torch.as_tensor(self.alive(f.ids)).reshape(shape)
        return m

    def const(self, t: torch.Tensor) -> fx.Node:
        name = f"_gp_oracle_{self.n_const}"
        self.n_const += 1
        self.gm.register_buffer(name, t.detach().clone())
        with self.gm.graph.inserting_before(self.at):
            return self.gm.graph.get_attr(name)

    def replace(self, node: fx.Node, fn, args) -> None:
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_function(fn, tuple(args))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)
        self.aliases[new.name] = self.aliases.get(node.name, node.name)


def _zero_params(o: _Oracle, a: Analysis, src) -> None:
    for info in a.params.values():
        t = get_tensor(src, info.names[0])
        if not torch.is_floating_point(t):
            continue
        m = o.mask(TMap(tuple(t.shape), tuple(f for f in info.tmap.factors
                                             if not (info.grouped_in is not None and f.axes[0] == 1))))
        if info.grouped_in is not None:
            g = info.grouped_in.shape[0]
            cols = torch.as_tensor(o.alive(info.grouped_in))  # [g, cin/g]
            rows = cols.repeat_interleave(t.shape[0] // g, dim=0)  # [C_out, cin/g]
            m = m & rows.reshape(rows.shape + (1,) * (t.ndim - 2))
        if bool(m.all()):
            continue
        new = torch.where(m, t.detach(), torch.zeros((), dtype=t.dtype))
        for name in info.names:
            set_tensor(o.gm, name, new.clone(), get_tensor(o.gm, name))


def mask(a: Analysis, plan: Plan, src: fx.GraphModule | None = None) -> fx.GraphModule:
    """The masked dense oracle; see the module docstring. `src` as in `slim`."""
    alive = plan.alive(a)
    src = a.graph if src is None else src
    gm = copy.deepcopy(src)
    o = _Oracle(a, alive, gm)
    _zero_params(o, a, src)
    g = gm.graph
    # 1) zero dead positions of every activation
    for node in list(g.nodes):
        if node.op in ("output", "get_attr"):
            continue
        tm = a.tmaps.get(node.name)
        if not isinstance(tm, TMap) or not tm.factors or not o.dead(tm):
            continue
        o.at = node.next
        mnode = o.const(o.mask(tm))
        with g.inserting_after(mnode):
            w = g.call_function(oracle_ops.keep, (node, mnode))
        node.replace_all_uses_with(w, delete_user_cb=lambda u, w=w: u is not w)
        o.aliases[w.name] = node.name
    # 2) ops that reduce over channels compute over kept channels only
    for node in list(g.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        mod = o.module(node) if node.op == "call_module" else None
        rule = lookup(node, mod)
        if rule is None or rule.oracle is None:
            continue
        o.at = node
        rule.oracle(o, node)
    g.lint()
    gm.recompile()
    return gm
