"""The public pipeline: analyze -> plan -> mask/apply, and prune (all of it in one call)."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch.fx as fx
import torch.nn as nn

from graphprune.passes.cleanup import cleanup
from graphprune.passes.mask import mask as _mask_pass
from graphprune.passes.slim import slim as _slim_pass

from .analysis import Analysis, analyze_graph
from .config import PruneConfig
from .errors import PlanError
from .importance import score
from .plan import Plan, Uniform, keep_count, repair_empty, select_top
from .report import count_macs, count_params
from .trace import trace
from .verify import verify_against

__all__ = ["analyze", "plan", "mask", "apply", "prune"]


def analyze(model: nn.Module, example_inputs, *, leaf_modules=(), method: str = "auto") -> Analysis:
    """Trace the model (on a copy-free read-only basis) and compute its channel groups."""
    return analyze_graph(trace(model, example_inputs, leaf_modules=leaf_modules, method=method))


def _ignored_groups(a: Analysis, ignore) -> set[int]:
    if not ignore:
        return set()
    out = set()
    for g in a.groups:
        for m in g.members:
            name = m.split("[")[0]
            if any(name == i or name.startswith(i + ".") for i in ignore):
                out.add(g.id)
    return out


def plan(a: Analysis, target=None, importance="l1", *, config: PruneConfig | None = None,
         **kw) -> Plan:
    """Decide which channels each prunable group keeps to meet `target`."""
    cfg = (config or PruneConfig()).update(target=target if target is not None else (
        config.target if config else None), importance=importance, **kw)
    tgt = cfg.target if cfg.target is not None else Uniform(0.3)
    t0 = time.perf_counter()
    scores = score(a, cfg.importance, reduce=cfg.reduce, seed=cfg.seed, data=cfg.data,
                   loss_fn=cfg.loss_fn, **cfg.extra)
    skip = _ignored_groups(a, cfg.ignore)
    keep: dict[int, tuple[int, ...]] = {}
    sizes = {g.id: g.size for g in a.groups}
    if isinstance(tgt, Uniform):
        for g in a.prunable_groups:
            if g.id in skip:
                continue
            if g.rows is not None:
                r, c = g.rows.shape
                k = r * keep_count(c, tgt.ratio, 1, max(1, -(-cfg.min_channels // r)))
            else:
                k = keep_count(g.size, tgt.ratio, cfg.round_to, cfg.min_channels)
            if k < g.size:
                sel = select_top(g, scores[g.id], k)
                if g.rows is None:
                    sel = repair_empty(a, g, sel, scores[g.id])
                keep[g.id] = sel
        meta = {"target": repr(tgt), "importance": str(cfg.importance)}
    else:
        from .allocate import allocate

        keep, meta = allocate(a, tgt, scores, cfg, skip)
    meta["plan_seconds"] = round(time.perf_counter() - t0, 4)
    return Plan(keep, sizes, meta)


def mask(a: Analysis, p: Plan) -> fx.GraphModule:
    """The oracle: a dense copy in which the plan's channels are dead (zeroed at every consumer)."""
    return _mask_pass(a, p)


def apply(a: Analysis, p: Plan, *, verify: bool = True, trials: int = 2, seed: int = 0
          ) -> fx.GraphModule:
    """The structurally slimmed model, checked against the oracle unless verify=False."""
    t0 = time.perf_counter()
    slim = cleanup(_slim_pass(a, p))
    t_slim = time.perf_counter() - t0
    report = {"slim_seconds": round(t_slim, 4)}
    if verify:
        ref = mask(a, p)

        def build64():
            src64 = copy.deepcopy(a.graph).double()
            return cleanup(_slim_pass(a, p, src64)), _mask_pass(a, p, src64)

        rep = verify_against(slim, ref, a.traced.args, a.traced.kwargs, trials=trials, seed=seed,
                             build64=build64)
        report["verify"] = str(rep)
        report["max_rel_err_fp32"] = rep.err32
        report["max_rel_err_fp64"] = rep.err64
    slim.graphprune_report = report
    slim.graphprune_plan = p
    return slim


def prune(model: nn.Module, example_inputs, target=None, importance="l1", *,
          config: PruneConfig | None = None, **kw) -> fx.GraphModule:
    """analyze + plan + apply in one call. The user's model is not modified."""
    cfg = (config or PruneConfig()).update(importance=importance, **kw)
    if target is not None:
        cfg = cfg.update(target=target)
    a = analyze(model, example_inputs, leaf_modules=cfg.leaf_modules, method=cfg.trace)
    p = plan(a, cfg.target, cfg.importance, config=cfg)
    slim = apply(a, p, verify=cfg.verify, trials=cfg.verify_trials, seed=cfg.seed)
    return slim


def stats(model: nn.Module, example_inputs) -> dict:
    """Parameters and MACs of a model on the example inputs."""
    from .trace import as_args

    args, kwargs = as_args(example_inputs)
    return {"params": count_params(model), "macs": count_macs(model, args, kwargs)}


_ = (np, PlanError)
