"""permute: reorder the channels of groups consistently in every member (no runtime cost).

Requires: an Analysis and, per group, a permutation of its local channel order; each group must be
`permutable` (every tensor/parameter axis that sees it holds the whole group in natural order, no
head/group rows, no grouped conv). Ensures: a new GraphModule computing the same function (up to
floating-point summation order): producer outputs, their norms/biases and every consumer's input
weights are reordered together. Used to raise the magnitude kept by 2:4 and 1xN masks.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.fx as fx

from graphprune.analysis import Analysis, iter_maps

from ._common import get_tensor

__all__ = ["permute", "permutable"]


def _local(a: Analysis) -> np.ndarray:
    local = np.full(len(a.class_group), -1, np.int64)
    for g in a.groups:
        local[g.classes] = np.arange(g.size)
    return local


def permutable(a: Analysis) -> set[int]:
    """Groups whose channels appear whole and in natural order wherever they appear."""
    local = _local(a)
    ok = {g.id for g in a.groups if g.prunable and g.rows is None}
    factors = [f for v in a.tmaps.values() for tm in iter_maps(v) for f in tm.factors]
    factors += [f for info in a.params.values() for f in info.tmap.factors]
    for info in a.params.values():
        if info.grouped_in is not None:
            ok -= set(a.class_group[a.labels[info.grouped_in.reshape(-1)]].tolist())
    for f in factors:
        gids = a.class_group[a.labels[f.ids.reshape(-1)]]
        if len(f.axes) > 1:
            ok -= set(gids.tolist())
            continue
        for gid in set(gids.tolist()) & ok:
            seq = local[a.labels[f.ids[gids == gid]]]
            if not np.array_equal(seq, np.arange(a.groups[gid].size)):
                ok.discard(gid)
    return ok


def permute(a: Analysis, perms: dict[int, np.ndarray]) -> fx.GraphModule:
    """Apply `perms` (new local position i holds old local channel perms[g][i])."""
    bad = set(perms) - permutable(a)
    if bad:
        raise ValueError(f"groups {sorted(bad)} cannot be permuted (partial or structured use)")
    local = _local(a)
    memo = {}
    for info in a.params.values():
        t = get_tensor(a.graph, info.names[0])
        out, changed = t.detach(), False
        for f in info.tmap.factors:
            gids = a.class_group[a.labels[f.ids]]
            idx = np.arange(len(f.ids))
            for gid in set(gids.tolist()) & set(perms):
                pos = np.flatnonzero(gids == gid)  # positions holding the group, natural order
                idx[pos] = pos[np.asarray(perms[gid])]
                changed = True
            if changed:
                out = out.index_select(f.axes[0], torch.as_tensor(idx))
        if changed:
            new = out.contiguous()
            if isinstance(t, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
            memo[id(t)] = new
    _ = local
    gm = copy.deepcopy(a.graph, memo)
    gm.recompile()
    return gm
