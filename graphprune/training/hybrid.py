"""Hybrid pruning: filter pruning that ranks filters by how they fare after 2:4, then 2:4.

Registers two importance criteria in `graphprune.importance.CRITERIA` at import:

* "hybrid": L1 of each filter after 2:4 pruning of its weights (a channel's score is the sum over
  the conv/linear filters that produce it; channels no filter produces fall back to dense L1);
* "hybrid_output": the output-L1 twin, mean |activation| at the producing layers' outputs measured
  on calibration data with every eligible conv/linear weight 2:4-pruned.

`filter_l1` is the dense filter-L1 baseline (Li et al.), the same sum without 2:4.
`hybrid_pipeline` runs filter-prune -> fine-tune -> 2:4 -> fine-tune on the user's training
function.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..analysis import Analysis
from ..importance import CRITERIA, _layer_weights, group_scores, param_tensor, per_class_param_stat
from ..kernels.masks import mask_24
from ..passes._common import get_tensor, set_tensor
from ..plan import Uniform
from .sparse24 import Sparse24Trainer

__all__ = ["filter_l1", "hybrid_scores", "hybrid_output_scores", "pruned24", "hybrid_pipeline",
           "HybridResult"]


def pruned24(w: torch.Tensor) -> torch.Tensor:
    """w with its 2:4 mask applied, or w unchanged when the layer cannot take 2:4."""
    if w.ndim not in (2, 4) or w.shape[1] % 4:
        return w
    return w * mask_24(w)


def _graph24(a: Analysis):
    """A copy of the analysed graph whose conv/linear weights are 2:4-pruned."""
    gm = copy.deepcopy(a.graph)
    with torch.no_grad():
        for name in set(_layer_weights(a).values()):
            t = get_tensor(gm, name)
            set_tensor(gm, name, pruned24(t.detach()), t)
    return gm


def _with_graph(a: Analysis, gm) -> Analysis:
    return dataclasses.replace(a, traced=dataclasses.replace(a.traced, gm=gm), _cache={})


def filter_l1(a: Analysis, prune24: bool = False, **_) -> dict[int, np.ndarray]:
    """Per group: sum over producing filters of their L1 (after 2:4 when prune24)."""
    by_name = {n: info for info in a.params.values() for n in info.names}
    acc = np.zeros(len(a.class_group))
    for name in sorted(set(_layer_weights(a).values())):
        info = by_name.get(name)
        f = info.tmap.factor_of(0) if info is not None else None
        if f is None or len(f.axes) != 1:
            continue
        w = param_tensor(a, name).detach().float()
        w = pruned24(w) if prune24 else w
        v = w.abs().sum(dim=list(range(1, w.ndim))).double().numpy()
        np.add.at(acc, a.labels[f.ids], v)
    acc = np.where(acc > 0, acc, per_class_param_stat(a, 1))
    return group_scores(a, acc)


def hybrid_scores(a: Analysis, **_) -> dict[int, np.ndarray]:
    """The "hybrid" criterion: filter L1 after 2:4 pruning."""
    return filter_l1(a, prune24=True)


def hybrid_output_scores(a: Analysis, data=None, reduce: str = "sum",
                         **_) -> dict[int, np.ndarray]:
    """The "hybrid_output" criterion: output L1 measured with 2:4-pruned weights."""
    return CRITERIA["output_l1"](_with_graph(a, _graph24(a)), data=data, reduce=reduce)


def _register(name: str, fn) -> None:
    if CRITERIA.get(name, fn) is not fn:
        raise KeyError(f"importance {name!r} is already registered")
    CRITERIA[name] = fn


_register("hybrid", hybrid_scores)
_register("hybrid_output", hybrid_output_scores)


@dataclass
class HybridResult:
    """The pipeline's models: filter-pruned (fine-tuned) and the final 2:4 export; notes."""

    pruned: nn.Module
    sparse: nn.Module
    report: dict


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


def hybrid_pipeline(model: nn.Module, example_inputs, data=None,
                    train_fn: Callable[[nn.Module, torch.optim.Optimizer], None] | None = None,
                    *, target=None, importance: str = "hybrid",
                    make_optimizer: Callable = _adamw, **prune_kw) -> HybridResult:
    """Filter-prune (`gp.prune`, default Uniform(0.4) with the hybrid ranking) -> fine-tune ->
    2:4 (`Sparse24Trainer`, mask fixed) -> fine-tune. `train_fn(model, optimizer)` fine-tunes in
    place (skipped when None); `data` are calibration batches for data-driven criteria; kept
    channel counts are multiples of `round_to` (default 4, so consumers stay 2:4-eligible).
    The user's model is not modified."""
    from ..api import prune

    target = target if target is not None else Uniform(0.4)
    prune_kw.setdefault("round_to", 4)  # kept channels stay multiples of 4: 2:4 needs C_in % 4
    slim = prune(model, example_inputs, target=target, importance=importance, data=data,
                 **prune_kw)
    report = {"target": repr(target), "importance": importance,
              "filter_verify": slim.graphprune_report.get("verify")}
    if train_fn is not None:
        train_fn(slim, make_optimizer(slim.parameters()))
    pruned = copy.deepcopy(slim)
    opt = make_optimizer(slim.parameters())
    s24 = Sparse24Trainer(slim, opt, example_inputs)
    report["kept_magnitude_24"] = s24.kept_magnitude()
    if train_fn is not None:
        train_fn(slim, opt)
    sparse = s24.export()
    s24.remove()
    report["sparse_verify"] = sparse.graphprune_report.get("verify")
    return HybridResult(pruned, sparse, report)
