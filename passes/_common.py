"""Helpers shared by passes: parameter access by qualified name and channel liveness."""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from graphprune.analysis import Analysis
from graphprune.tmap import TMap, compacted_shape

__all__ = ["get_tensor", "set_tensor", "node_val", "Live"]


def get_tensor(root: nn.Module, name: str):
    obj = root
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def node_val(node):
    """A node's shape/dtype record (``meta["val"]``, else ``meta["tensor_meta"]``); None when it
    has neither or is not a node."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val", node.meta.get("tensor_meta"))
    return v if hasattr(v, "shape") and hasattr(v, "dtype") else None


def set_tensor(root: nn.Module, name: str, value: torch.Tensor, like) -> None:
    """Replace a parameter/buffer/attribute tensor, keeping its kind (Parameter or buffer)."""
    prefix, _, attr = name.rpartition(".")
    owner = root.get_submodule(prefix) if prefix else root
    if isinstance(like, nn.Parameter):
        owner._parameters[attr] = nn.Parameter(value, requires_grad=like.requires_grad)
    elif attr in getattr(owner, "_buffers", {}):
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


class Live:
    """Which channel ids survive a plan, and the shapes that follow."""

    def __init__(self, a: Analysis, alive_labels: np.ndarray, gm: fx.GraphModule):
        self.a = a
        self.alive_labels = alive_labels
        self.gm = gm
        self.aliases: dict[str, str] = {}

    def alive(self, ids) -> np.ndarray:
        return self.alive_labels[self.a.labels[np.asarray(ids)]]

    def tm(self, x):
        name = x.name if isinstance(x, fx.Node) else x
        name = self.aliases.get(name, name)
        return self.a.tmaps.get(name)

    def new_shape(self, tm: TMap) -> tuple[int, ...]:
        return compacted_shape(tm, self.alive)

    def dead(self, tm: TMap) -> bool:
        return any(not self.alive(f.ids).all() for f in tm.factors)

    def module(self, node: fx.Node):
        return self.gm.get_submodule(node.target)

    def note(self, node: fx.Node) -> dict:
        name = self.aliases.get(node.name, node.name)
        return dict(self.a.notes.get(name, {}))
