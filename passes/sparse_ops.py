"""sparse_ops: put 1xN and 2:4 patterns into a GraphModule as a SparsePlan says.

Requires: a GraphModule whose conv/linear layers named in the plan are `call_module` nodes, and
per layer a pattern ("1xN" with a uniform block mask, or "2:4" with a 2:4 mask). Ensures: a new
GraphModule (the input is untouched) in which 1xN layers are `Conv2d1xN` / `Linear1xN` modules
(custom ops `graphprune::conv2d_1xn` / `linear_1xn`) and 2:4 layers hold the pattern as a masked
dense weight (`semi_structured`, run after BN folding, moves those the Sparse Tensor Core kernels
take onto them). `mask_dense` builds the oracle: the same weights with the pattern's zeros, all
layers dense.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["LayerSparsity", "sparse_ops", "mask_dense"]


@dataclass(frozen=True)
class LayerSparsity:
    """The decision for one layer: its pattern and mask (True = kept weight)."""

    node: str
    pattern: str  # "1xN" | "2:4"
    n: int
    mask: torch.Tensor


def _set_module(gm: fx.GraphModule, target: str, mod: nn.Module) -> None:
    prefix, _, name = target.rpartition(".")
    parent = gm.get_submodule(prefix) if prefix else gm
    setattr(parent, name, mod)


def _masked(mod: nn.Module, mask: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(mod)
    with torch.no_grad():
        new.weight.mul_(mask.to(new.weight.dtype))
    return new


def mask_dense(gm: fx.GraphModule, plan: list[LayerSparsity]) -> fx.GraphModule:
    """The oracle: a copy with every planned weight multiplied by its mask, all layers dense."""
    out = copy.deepcopy(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    for d in plan:
        tgt = nodes[d.node].target
        _set_module(out, tgt, _masked(out.get_submodule(tgt), d.mask))
    return out


def sparse_ops(gm: fx.GraphModule, plan: list[LayerSparsity]) -> tuple[fx.GraphModule, dict]:
    """Carry out the plan; returns (new module, {node: how the pattern is held})."""
    from graphprune.kernels.onexn import Conv2d1xN, Linear1xN

    out = copy.deepcopy(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    how = {}
    for d in plan:
        tgt = nodes[d.node].target
        mod = out.get_submodule(tgt)
        if d.pattern == "1xN":
            cls = Conv2d1xN if isinstance(mod, nn.Conv2d) else Linear1xN
            new = cls.from_dense(mod, d.mask, d.n)
            _set_module(out, tgt, new)
            how[d.node] = f"{cls.__name__} (graphprune::{'conv2d' if cls is Conv2d1xN else 'linear'}_1xn)"
            w = mod.weight
            if w.dtype != torch.float32 or not w.is_cpu:
                how[d.node] += (f"; PyTorch reference path: the C++ kernel takes float32 on CPU "
                                f"(this layer: {str(w.dtype).removeprefix('torch.')} on "
                                f"{w.device.type})")
            val = nodes[d.node].args[0].meta.get("val") if nodes[d.node].args else None
            if cls is Conv2d1xN and val is not None and new.uses_winograd(val.shape):
                how[d.node] += ", Winograd F(2x2,3x3) at the example's input shape"
        else:
            _set_module(out, tgt, _masked(mod, d.mask))
            how[d.node] = "masked dense weight"
    out.recompile()
    return out, how
