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


def _layer_weights(a: Analysis, kinds=("conv", "linear")) -> dict[str, str]:
    """node name -> qualified name of its weight, for conv/linear (or batchnorm) nodes."""
    from .optable import lookup

    out = {}
    for node in a.graph.graph.nodes:
        if node.op not in ("call_module", "call_function"):
            continue
        mod = a.graph.get_submodule(node.target) if node.op == "call_module" else None
        rule = lookup(node, mod)
        if rule is None or not rule.name.startswith(kinds):
            continue
        if mod is not None:
            if getattr(mod, "weight", None) is not None:
                out[node.name] = f"{node.target}.weight"
            continue
        w = node.args[1] if len(node.args) > 1 else None
        if rule.name.startswith("batchnorm") and node.target is not torch.nn.functional.batch_norm:
            w = node.args[1] if len(node.args) > 1 else None
        elif rule.name.startswith("batchnorm"):
            w = node.args[3] if len(node.args) > 3 else node.kwargs.get("weight")
        if isinstance(w, torch.fx.Node) and w.op == "get_attr":
            out[node.name] = w.target
    return out


def _bn_scale(a: Analysis, reduce: str = "sum", **_) -> dict[int, np.ndarray]:
    """|gamma| of the norm layers in each group (0 for groups without one)."""
    names = set(_layer_weights(a, ("batchnorm",)).values())
    return group_scores(a, per_class_param_stat(a, 1, reduce,
                                                only=lambda info: bool(set(info.names) & names)))


def _eval(gm) -> bool:
    """Put a graph module in eval mode (export graphs are traced in eval and refuse the call)."""
    was = gm.training
    try:
        gm.eval()
    except NotImplementedError:
        pass
    return was


def _train(gm, mode: bool) -> None:
    try:
        gm.train(mode)
    except NotImplementedError:
        pass


def _batches(data, a: Analysis | None = None):
    """Calibration batches; on the export path (static batch size) re-chunked to the example's."""
    if data is None:
        raise ValueError("this importance needs calibration data: pass data=[batches]")
    b0 = None
    if a is not None and a.traced.kind == "export":
        from torch.utils._pytree import tree_flatten

        ex = [t for t in tree_flatten((a.traced.args, a.traced.kwargs))[0]
              if isinstance(t, torch.Tensor)]
        b0 = int(ex[0].shape[0]) if ex and ex[0].ndim else None
    for b in data:
        if b0 is None:
            yield b
            continue
        from torch.utils._pytree import tree_map

        n = next(t for t in (b.values() if isinstance(b, dict) else
                             b if isinstance(b, (tuple, list)) else [b])).shape[0]
        for i in range(0, n - b0 + 1, b0):
            yield tree_map(lambda t, i=i: t[i:i + b0] if isinstance(t, torch.Tensor) else t, b)


def _split(batch):
    """(model args, target or None) from a batch: x, (x,), (x, y) or dict."""
    if isinstance(batch, dict):
        return (), batch, None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2 and isinstance(batch[1], torch.Tensor) and not torch.is_floating_point(
            batch[1]
        ):
            return (batch[0],), {}, batch[1]
        return tuple(batch), {}, None
    return (batch,), {}, None


def _output_l1(a: Analysis, data=None, reduce: str = "sum", **_) -> dict[int, np.ndarray]:
    """Mean |activation| of each channel at the outputs of the layers that produce it."""
    from torch.fx import Interpreter

    from .tmap import TMap

    targets = set(_layer_weights(a))
    acc = np.zeros(len(a.class_group))
    cnt = np.zeros(len(a.class_group))

    class Rec(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            tm = a.tmaps.get(n.name)
            if n.name in targets and isinstance(tm, TMap) and isinstance(out, torch.Tensor):
                for f in tm.factors:
                    if len(f.axes) != 1:
                        continue
                    ax = f.axes[0]
                    dims = [d for d in range(out.ndim) if d != ax]
                    v = out.detach().abs().double().mean(dim=dims).numpy()
                    lab = a.labels[f.ids]
                    np.add.at(acc, lab, v)
                    np.add.at(cnt, lab, 1)
            return out

    gm = a.graph
    was = _eval(gm)
    try:
        with torch.no_grad():
            for batch in _batches(data, a):
                args, kwargs, _ = _split(batch)
                flat = _flat_inputs(a, args, kwargs)
                Rec(gm).run(*flat)
    finally:
        _train(gm, was)
    return group_scores(a, acc / np.maximum(cnt, 1) if reduce == "mean" else acc)


def _flat_inputs(a: Analysis, args, kwargs):
    from torch.utils._pytree import tree_flatten

    if a.traced.kind == "export":
        return tree_flatten((args, kwargs))[0]
    return list(args) + list(kwargs.values())


def _taylor(a: Analysis, data=None, loss_fn=None, reduce: str = "sum", **_):
    """First-order Taylor |sum(w * dL/dw)| over each consumer's input-channel slice (SMCP)."""
    if loss_fn is None:
        raise ValueError("importance='taylor' needs loss_fn(output, target) and data")
    weights = sorted(set(_layer_weights(a).values()))
    params = [param_tensor(a, n) for n in weights]
    grads = [torch.zeros_like(p) for p in params]
    gm = a.graph
    was = _eval(gm)
    try:
        for batch in _batches(data, a):
            args, kwargs, y = _split(batch)
            out = gm(*args, **kwargs)
            loss = loss_fn(out, y) if y is not None else loss_fn(out)
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(grads, gs):
                if g is not None:
                    acc += g.detach()
    finally:
        _train(gm, was)
    by_name = dict(zip(weights, zip(params, grads)))
    n = len(a.class_group)
    acc = np.zeros(n)
    for info in a.params.values():
        hit = next((nm for nm in info.names if nm in by_name), None)
        if hit is None:
            continue
        w, g = by_name[hit]
        wg = (w.detach() * g).double()
        f = info.tmap.factor_of(1) if w.ndim >= 2 else None
        if info.grouped_in is not None:
            gcount, cin = info.grouped_in.shape
            v = wg.reshape(gcount, -1, cin, *w.shape[2:]).sum(
                dim=[1] + list(range(3, w.ndim + 1))).abs().numpy()
            np.add.at(acc, a.labels[info.grouped_in], v)
        elif f is not None and len(f.axes) == 1:
            dims = [d for d in range(w.ndim) if d != 1]
            v = wg.sum(dim=dims).abs().numpy()
            np.add.at(acc, a.labels[f.ids], v)
        elif w.ndim == 2 and info.tmap.factor_of(0) is not None and w.shape[1] == 1:
            pass
    # producer rows: the fallback for channels no weight consumes (q/k dims feed a matmul)
    prod = np.zeros(n)
    for info in a.params.values():
        hit = next((nm for nm in info.names if nm in by_name), None)
        f0 = info.tmap.factor_of(0)
        if hit is None or f0 is None:
            continue
        w, g = by_name[hit]
        v = (w.detach() * g).double().sum(dim=list(range(1, w.ndim))).abs().numpy()
        np.add.at(prod, a.labels[f0.ids], v)
    # depthwise convs consume their channels on axis 0
    for info in a.params.values():
        hit = next((nm for nm in info.names if nm in by_name), None)
        if hit is None:
            continue
        w, g = by_name[hit]
        if w.ndim == 4 and w.shape[1] == 1 and info.tmap.factor_of(0) is not None:
            v = (w.detach() * g).double().sum(dim=[1, 2, 3]).abs().numpy()
            np.add.at(acc, a.labels[info.tmap.factor_of(0).ids], v)
    return group_scores(a, np.where(acc > 0, acc, prod))


CRITERIA: dict[str, Callable[..., dict[int, np.ndarray]]] = {
    "l1": _l1,
    "l2": _l2,
    "random": _random,
    "bn_scale": _bn_scale,
    "output_l1": _output_l1,
    "taylor": _taylor,
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
