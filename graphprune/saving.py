"""Saving and loading slimmed / sparsified models as `torch.export` programs (.pt2).

`gp.save(model, "slim.pt2", example_inputs)` exports the model with a dynamic batch dimension
(dim 0 of every tensor input shares one `Dim`; when export refuses, e.g. because the graph bakes
the batch size in, it falls back to static shapes with a warning), checks the exported program
against the model on the example inputs, and writes it with `torch.export.save`. The Plan of a
pruned model (`.graphprune_plan`) goes beside it as JSON (`slim.pt2.plan.json`), and
`graphprune.json` inside the archive records what was saved (batch dynamic or not, input shapes,
graphprune and torch versions).

`gp.load("slim.pt2")` returns a callable module. It needs neither the model's class nor its
source: only torch and graphprune (imported for its custom ops, e.g. `graphprune::conv2d_1xn`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import GraphpruneError
from .trace import as_args

__all__ = ["save", "load", "plan_path", "read_meta"]

_META = "graphprune.json"


def plan_path(path: str | os.PathLike) -> Path:
    """Where the Plan of a saved model lives: `<path>.plan.json`."""
    return Path(str(path) + ".plan.json")


def _batch_of(args, kwargs) -> int | None:
    """The batch size shared by every tensor input with at least one dim, else None."""
    ts = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.ndim]
    sizes = {int(t.shape[0]) for t in ts}
    return sizes.pop() if len(sizes) == 1 else None


def _dynamic_shapes(args, kwargs, dim):
    """One spec per input: {0: dim} for tensors with a batch axis, None for the rest."""
    def spec(x):
        return {0: dim} if isinstance(x, torch.Tensor) and x.ndim else None

    return tuple(tree_map(spec, a) for a in args), {k: tree_map(spec, v) for k, v in
                                                    kwargs.items()}


def _widen(args, kwargs, n: int):
    """Inputs with batch n (export specialises a batch of 1, so a batch of 1 is repeated)."""
    def grow(x):
        if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == 1:
            return x.expand(n, *x.shape[1:]).contiguous()
        return x

    return tree_map(grow, args), tree_map(grow, kwargs)


def _export(model: nn.Module, args, kwargs, dynamic: bool):
    """(ExportedProgram, batch_dynamic: bool)."""
    batch = _batch_of(args, kwargs)
    if dynamic and batch is not None:
        dim = torch.export.Dim("batch", min=1, max=1 << 20)
        ea, ek = _widen(args, kwargs, 2) if batch == 1 else (args, kwargs)
        ds = _dynamic_shapes(ea, ek, dim)
        spec = ds[0] if not ek else _kw_spec(model, ds)
        try:
            with torch.no_grad():
                ep = torch.export.export(model, tuple(ea), dict(ek), dynamic_shapes=spec,
                                         strict=False)
            return ep, True
        except Exception as e:  # noqa: BLE001 - export refuses a dynamic batch: go static
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            warnings.warn(f"gp.save: torch.export refused a dynamic batch dimension ({first}); "
                          f"saving with static shapes {_shapes(args, kwargs)}", stacklevel=3)
    elif dynamic:
        warnings.warn("gp.save: tensor inputs do not share a batch size; saving static shapes",
                      stacklevel=3)
    try:
        with torch.no_grad():
            ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GraphpruneError(f"gp.save: torch.export failed: {type(e).__name__}: {first}") from e
    return ep, False


def _kw_spec(model: nn.Module, ds):
    """dynamic_shapes as a dict keyed by forward's parameter names (args and kwargs mixed)."""
    import inspect

    names = [p for p in inspect.signature(model.forward).parameters]
    spec = dict(zip(names, ds[0]))
    spec.update(ds[1])
    return spec


def _shapes(args, kwargs) -> list:
    return [tuple(t.shape) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]


def _check(ep, model, args, kwargs) -> float:
    """Max relative error of the exported program against the model on the example inputs."""
    from .verify import max_rel_error

    with torch.no_grad():
        return max_rel_error(ep.module()(*args, **kwargs), model(*args, **kwargs))


def save(model: nn.Module, path: str | os.PathLike, example_inputs, *, dynamic_batch: bool = True,
         check: bool = True) -> Path:
    """Export `model` on `example_inputs` to `path` (.pt2) plus its Plan beside it; returns path.

    `example_inputs`: a tensor, a tuple of args, a dict of kwargs or (args, kwargs), as for
    `gp.analyze`. Dim 0 of the tensor inputs is exported as one dynamic batch dimension unless
    `dynamic_batch=False` or export refuses (then static, with a warning). `check` compares the
    exported program with the model on the example inputs (fp32 relative error < 1e-5).
    """
    args, kwargs = as_args(example_inputs)
    if getattr(model, "training", False):
        warnings.warn("gp.save: the model is in training mode (batch norm uses batch statistics, "
                      "dropout is active); call model.eval() first to save an inference program",
                      stacklevel=2)
    ep, dyn = _export(model, args, kwargs, dynamic_batch)
    if check:
        err = _check(ep, model, args, kwargs)
        if err > 1e-5:
            raise GraphpruneError(f"gp.save: the exported program differs from the model "
                                  f"(max relative error {err:.2e})")
    path = Path(path)
    meta = {"format": "graphprune.saved/1", "dynamic_batch": dyn,
            "input_shapes": [list(s) for s in _shapes(args, kwargs)],
            "torch": torch.__version__, "graphprune": _version(),
            "model": type(model).__name__, "has_plan": hasattr(model, "graphprune_plan")}
    rep = getattr(model, "graphprune_report", None)
    if isinstance(rep, dict):
        meta["report"] = json.loads(json.dumps(rep, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path), extra_files={_META: json.dumps(meta)})
    plan = getattr(model, "graphprune_plan", None)
    if plan is not None:
        plan_path(path).write_text(plan.to_json())
    return path


def _version() -> str:
    from . import __version__

    return __version__


def read_meta(path: str | os.PathLike) -> dict:
    """What `gp.save` recorded about a saved program ({} for a .pt2 saved elsewhere)."""
    extra = {_META: ""}
    torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[_META]) if extra[_META] else {}


def load(path: str | os.PathLike) -> nn.Module:
    """Load a program saved by `gp.save` (or any `torch.export` .pt2) as a callable module.

    The module carries `.graphprune_plan` (when a plan was saved beside it) and
    `.graphprune_meta` (what `gp.save` recorded).
    """
    from . import kernels  # noqa: F401  (registers graphprune's custom ops)
    from .kernels import onexn  # noqa: F401
    from .plan import Plan

    path = Path(path)
    if not path.exists():
        raise GraphpruneError(f"gp.load: no such file: {path}")
    extra = {_META: ""}
    try:
        ep = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GraphpruneError(f"gp.load: {path} is not a torch.export program: {first}") from e
    module = ep.module()
    module.graphprune_meta = json.loads(extra[_META]) if extra[_META] else {}
    pp = plan_path(path)
    if pp.exists():
        module.graphprune_plan = Plan.from_json(pp.read_text())
    module.graphprune_program = ep
    return module
