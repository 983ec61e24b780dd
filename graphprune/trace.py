"""Tracing: capture a model as an fx.GraphModule with a shape on every node.

Two first-class paths: `torch.fx.symbolic_trace` (readable graph whose submodule names match the
model, user-chosen leaf modules) with shapes from FakeTensorProp, and `torch.export.export(...,
strict=False)` for code symbolic tracing cannot follow (Hugging Face models, data-dependent
Python). The user's model is never modified.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._pytree import tree_map

from .errors import TraceError

__all__ = ["Traced", "trace", "as_args"]


@dataclass(frozen=True, eq=False)
class Traced:
    """A traced model: graph module, the example call (args, kwargs) and how it was traced."""

    gm: fx.GraphModule
    args: tuple
    kwargs: dict = field(default_factory=dict)
    kind: str = "fx"  # "fx" | "export"
    model_name: str = ""
    errors: tuple[str, ...] = ()

    def call(self, m: nn.Module, args=None, kwargs=None):
        return m(*(self.args if args is None else args), **(self.kwargs if kwargs is None else kwargs))


def as_args(example_inputs) -> tuple[tuple, dict]:
    """Normalise user example inputs: a tensor, a tuple/list of args, or a dict of kwargs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if (
            len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list))
            and isinstance(example_inputs[1], dict)
        ):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise TraceError(
        f"example_inputs must be a tensor, a tuple of args, a dict of kwargs or (args, kwargs); "
        f"got {type(example_inputs).__name__}"
    )


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: Sequence[type | str] = ()):
        super().__init__()
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {t for t in leaf_modules if isinstance(t, str)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of an exception that is outside torch and graphprune."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        fn = fr.filename.replace("\\", "/")
        if "/torch/" in fn or "/graphprune/" in fn or fn.startswith("<"):
            continue
        return f"{fr.filename}:{fr.lineno} in {fr.name}: {(fr.line or '').strip()}"
    return ""


def _fx_placeholder_values(gm: fx.GraphModule, model: nn.Module, args, kwargs) -> list:
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    vals = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        name = node.target.lstrip("*")
        if name in bound.arguments:
            vals.append(bound.arguments[name])
        elif node.args:
            vals.append(node.args[0])
        else:
            vals.append(None)
    return vals


def _meta(x):
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


class MetaProp(fx.Interpreter):
    """Shapes on every node (node.meta['val']) by running the graph on the meta device.

    Parameters are swapped for meta tensors with torch.func.functional_call, so nothing real is
    computed or copied. Falls back to FakeTensorProp when an op has no meta kernel.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.by_prefix: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in gm.state_dict(keep_vars=True).items():
            prefix, _, _ = k.rpartition(".")
            self.by_prefix.setdefault(prefix, {})[k] = v

    def _module_state(self, target: str) -> dict[str, torch.Tensor]:
        out = {}
        n = len(target) + 1
        for prefix, d in self.by_prefix.items():
            if prefix == target or prefix.startswith(target + "."):
                for k, v in d.items():
                    out[k[n:]] = torch.empty_like(v, device="meta")
        return out

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        n.meta["val"] = out
        return out

    def get_attr(self, target, args, kwargs):
        return tree_map(_meta, super().get_attr(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        return torch.func.functional_call(mod, self._module_state(target), args, kwargs)

    def call_function(self, target, args, kwargs):
        kwargs = dict(kwargs)
        if "device" in kwargs and kwargs["device"] is not None:
            kwargs["device"] = "meta"
        return super().call_function(target, args, kwargs)


def _shapes(gm: fx.GraphModule, vals) -> None:
    with torch.no_grad():
        try:
            MetaProp(gm).run(*tree_map(_meta, vals))
            return
        except Exception:  # noqa: BLE001 - an op without a meta kernel: use fake tensors
            pass
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*vals)


def _trace_fx(model, args, kwargs, leaf_modules) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules)
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _shapes(gm, _fx_placeholder_values(gm, model, args, kwargs))
    return gm


def _trace_export(model, args, kwargs) -> fx.GraphModule:
    with torch.no_grad():
        ep = torch.export.export(model, args, kwargs, strict=False)
    gm = ep.module()
    return gm


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type | str] = (),
    method: str = "auto",
) -> Traced:
    """Trace `model` on `example_inputs` (tensor, tuple of args, dict of kwargs, (args, kwargs)).

    method: "auto" (symbolic_trace, then torch.export), "fx" or "export".
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    args, kwargs = as_args(example_inputs)
    name = type(model).__name__
    was_training = model.training
    errors: list[str] = []
    try:
        model.eval()
        if method in ("auto", "fx"):
            try:
                gm = _trace_fx(model, args, kwargs, leaf_modules)
                return Traced(gm, args, kwargs, "fx", name)
            except Exception as e:  # noqa: BLE001 - any failure falls back to export
                where = _user_frame(e)
                errors.append(
                    f"torch.fx.symbolic_trace failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    + (f" (at {where})" if where else "")
                )
                if method == "fx":
                    raise TraceError(_trace_message(name, errors)) from e
        try:
            gm = _trace_export(model, args, kwargs)
            return Traced(gm, args, kwargs, "export", name, tuple(errors))
        except Exception as e:  # noqa: BLE001
            where = _user_frame(e)
            msg = str(e).strip().splitlines()
            errors.append(
                f"torch.export(strict=False) failed: {type(e).__name__}: {msg[0] if msg else ''}"
                + (f" (at {where})" if where else "")
            )
            raise TraceError(_trace_message(name, errors)) from e
    finally:
        model.train(was_training)


def _trace_message(name: str, errors: list[str]) -> str:
    return (
        f"could not trace {name}:\n  - "
        + "\n  - ".join(errors)
        + "\nWhat to do: keep the offending submodule opaque with leaf_modules=[...] (its channels "
        "become unprunable), or rewrite the data-dependent Python at the line above."
    )
