"""The op table: one registry, keyed by op, of how channels flow through each op.

A key is a module class (call_module), a callable (call_function: torch, F, operator or aten
overloads) or a method name (call_method, as the string "method:view"). Each entry is an
`OpRule`: `analyze` maps input channel maps to output channel maps (and records couplings);
`slim` rewrites the node's constants after parameters were sliced; `oracle` rewrites a node of the
masked reference model when the op reduces over channels (norms, means, softmax).
Registration refuses duplicates; lookup of an op without an entry returns None, and the analysis
then makes every channel the node touches unprunable, naming the node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn as nn

__all__ = ["OpRule", "register", "lookup", "op_key", "registered_keys"]


@dataclass(frozen=True)
class OpRule:
    """How one op (or family) moves channels; see the module docstring."""

    name: str
    analyze: Callable[..., Any]
    slim: Callable[..., None] | None = None
    oracle: Callable[..., None] | None = None
    shape_args: bool = False  # non-tensor args are sizes (view, reshape, expand, zeros, ...)
    mixes: bool = False  # an activation x activation product (matmul, attention): every output
    # reads all channels of the contracted axis of both inputs, and costs FLOPs of its own


_TABLE: dict[Any, OpRule] = {}


def register(*keys: Any, name: str | None = None, slim=None, oracle=None, shape_args=False,
             mixes=False):
    """Decorator: register an analyze function (and hooks) for keys; refuses duplicates."""

    def deco(fn):
        rule = OpRule(name or fn.__name__, fn, slim, oracle, shape_args, mixes)
        for k in keys:
            if k is None:
                continue
            if k in _TABLE:
                raise KeyError(f"op {k!r} already has a rule ({_TABLE[k].name})")
            _TABLE[k] = rule
        return fn

    return deco


def op_key(node: fx.Node, module: nn.Module | None = None) -> Any:
    """The table key of a node."""
    if node.op == "call_module":
        return type(module)
    if node.op == "call_method":
        return f"method:{node.target}"
    return node.target


def lookup(node: fx.Node, module: nn.Module | None = None) -> OpRule | None:
    """The rule for a node, or None when the op has no rule."""
    key = op_key(node, module)
    try:
        return _TABLE.get(key)
    except TypeError:  # unhashable target
        return None


def registered_keys() -> list[Any]:
    return list(_TABLE)
