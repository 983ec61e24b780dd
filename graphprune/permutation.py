"""Channel-permutation searches that raise the weight magnitude kept by sparse masks.

`filter_order_1xn`: Lin et al.'s output-filter reordering for 1xN — order a group's channels by
group L1 so that each block of N consecutive filters holds filters of similar magnitude.
`search_24`: ASP-style input-channel permutation for 2:4 — greedy swaps between columns of
different groups of 4 that increase the magnitude 2:4 keeps in every consumer of the group.
Both return a permutation per group for the `permute` pass, which keeps the model's function.
"""

from __future__ import annotations

import numpy as np
import torch

from .analysis import Analysis
from .importance import param_tensor, score

__all__ = ["filter_order_1xn", "search_24", "kept_24", "consumers"]


def consumers(a: Analysis, gid: int) -> list[tuple[torch.Tensor, int]]:
    """(weight, axis) of every conv/linear weight whose input axis (1) sees the group."""
    out = []
    for info in a.params.values():
        f = info.tmap.factor_of(1)
        if f is None or len(f.axes) != 1 or info.grouped_in is not None:
            continue
        gids = a.class_group[a.labels[f.ids]]
        if (gids == gid).all():
            t = param_tensor(a, info.names[0])
            if t.ndim in (2, 4):
                out.append(t.detach())
    return out


def filter_order_1xn(a: Analysis, groups) -> dict[int, np.ndarray]:
    """Descending group-L1 order of each group's channels."""
    s = score(a, "l1")
    return {gid: np.argsort(-s[gid], kind="stable") for gid in groups}


def _cols(w: torch.Tensor) -> torch.Tensor:
    """|w| as [rows, C] with rows = (K, R, S): the 2:4 groups run along C."""
    w = w.abs()
    return w.permute(0, 2, 3, 1).reshape(-1, w.shape[1]) if w.ndim == 4 else w


def kept_24(mats: list[torch.Tensor], perm: np.ndarray) -> float:
    """Magnitude kept by 2:4 masks after permuting input channels by perm."""
    total = 0.0
    for m in mats:
        x = m[:, perm].reshape(m.shape[0], -1, 4)
        total += float(x.topk(2, dim=2).values.sum())
    return total


def search_24(a: Analysis, groups, iters: int = 400, seed: int = 0) -> dict[int, np.ndarray]:
    """Greedy random-swap search per group; keeps a swap only if the kept magnitude grows."""
    rng = np.random.default_rng(seed)
    out = {}
    for gid in groups:
        mats = [_cols(w.double()) for w in consumers(a, gid)]
        n = a.groups[gid].size
        if not mats or n % 4 or n < 8:
            continue
        perm = np.arange(n)
        best = kept_24(mats, perm)
        for _ in range(iters):
            i, j = rng.integers(0, n, 2)
            if i // 4 == j // 4:
                continue
            gi, gj = (i // 4) * 4, (j // 4) * 4
            cand = perm.copy()
            cand[i], cand[j] = cand[j], cand[i]
            before = _blocks(mats, perm, gi, gj)
            after = _blocks(mats, cand, gi, gj)
            if after > before + 1e-12:
                perm = cand
                best += after - before
        out[gid] = perm
    return out


def _blocks(mats, perm, gi, gj) -> float:
    cols = np.r_[perm[gi:gi + 4], perm[gj:gj + 4]]
    t = 0.0
    for m in mats:
        x = m[:, cols].reshape(m.shape[0], 2, 4)
        t += float(x.topk(2, dim=2).values.sum())
    return t
