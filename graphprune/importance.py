"""Importance criteria: one score per channel of each group, reduced over the group's members.

Weight-based criteria ("l1", "l2", "bn_scale", "random") need only the analysis; data-driven ones
("taylor", "output_l1", "hybrid") take calibration batches. A user callable
`fn(analysis) -> {group id: scores}` is accepted too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .analysis import Analysis

__all__ = ["score", "param_tensor", "per_class_param_stat", "group_scores", "CRITERIA"]


def param_tensor(a: Analysis, name: str) -> torch.Tensor:
    obj = a.graph
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _axis_stat(x: torch.Tensor, axis: int) -> np.ndarray:
    dims = [d for d in range(x.ndim) if d != axis]
    return (x.sum(dim=dims) if dims else x).double().cpu().numpy()


def per_class_param_stat(a: Analysis, p: int = 1, reduce: str = "sum",
                         only=None) -> np.ndarray:
    """Sum (or mean/max) over members of each channel's |w|^p, per class label."""
    n = len(a.class_group)
    acc = np.zeros(n)
    cnt = np.zeros(n)
    mx = np.zeros(n)
    for info in a.params.values():
        if only is not None and not only(info):
            continue
        t = param_tensor(a, info.names[0])
        if not torch.is_floating_point(t):
            continue
        x = None
        for f in info.tmap.factors:
            ax = f.axes[0]
            if info.grouped_in is not None and ax == 1:
                continue
            lab = a.labels[f.ids]
            vis = a.class_group[lab] >= 0
            if not vis.any():
                continue
            if x is None:
                with torch.no_grad():
                    x = t.detach().float().abs()
                    if p == 2:
                        x = x * x
            v = _axis_stat(x, ax)
            np.add.at(acc, lab, v)
            np.add.at(cnt, lab, 1)
            np.maximum.at(mx, lab, v)
        if info.grouped_in is not None:
            g, cin = info.grouped_in.shape
            x = t.detach().double().abs()
            if p == 2:
                x = x * x
            v = x.reshape(g, -1, cin, *t.shape[2:]).sum(dim=[1] + list(range(3, t.ndim + 1)))
            lab = a.labels[info.grouped_in]
            v = v.cpu().numpy()
            np.add.at(acc, lab, v)
            np.add.at(cnt, lab, 1)
            np.maximum.at(mx, lab, v)
    if reduce == "mean":
        return acc / np.maximum(cnt, 1)
    if reduce == "max":
        return mx
    return acc


def group_scores(a: Analysis, per_class: np.ndarray) -> dict[int, np.ndarray]:
    return {g.id: np.asarray(per_class[g.classes], dtype=np.float64) for g in a.groups}


def _l1(a: Analysis, reduce: str = "sum", **_) -> dict[int, np.ndarray]:
    return group_scores(a, per_class_param_stat(a, 1, reduce))


def _l2(a: Analysis, reduce: str = "sum", **_) -> dict[int, np.ndarray]:
    return group_scores(a, np.sqrt(per_class_param_stat(a, 2, reduce)))


def _random(a: Analysis, seed: int = 0, **_) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {g.id: rng.random(g.size) for g in a.groups}


CRITERIA: dict[str, Callable[..., dict[int, np.ndarray]]] = {
    "l1": _l1,
    "l2": _l2,
    "random": _random,
}


def score(a: Analysis, importance="l1", **kw) -> dict[int, np.ndarray]:
    """Scores per group (local channel order) for a named criterion or a callable."""
    if callable(importance):
        out = importance(a)
        return {int(k): np.asarray(v, dtype=np.float64) for k, v in out.items()}
    try:
        fn = CRITERIA[importance]
    except KeyError:
        raise ValueError(
            f"unknown importance {importance!r}; choose one of {sorted(CRITERIA)} or a callable"
        ) from None
    return fn(a, **kw)
