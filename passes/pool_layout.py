"""pool_layout: run large NCHW max-pools in channels_last and convert the result back.

Requires: a GraphModule whose nodes carry shapes (``meta["val"]`` or ``meta["tensor_meta"]``).
Ensures: a copy computing exactly the same values (a max is exact in any layout) where every
``nn.MaxPool2d`` / ``F.max_pool2d`` without indices, on a 4-D float CPU NCHW input of at least
``MIN_ELEMENTS`` elements, becomes :func:`max_pool2d_cl`. Returns ``(module, [node names])``.

Why: PyTorch's CPU max-pool over NCHW input is not vectorised across channels; its channels_last
one is. At ResNet's stem (64 x 112 x 112, 3x3 stride 2) the round trip through channels_last is
2.5-3.7x faster than the NCHW pool, and 2-5x at other sizes measured; below about 64k elements
the two copies cost more than they save (``benchmarks/RESULTS.md``, issue 4).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphprune.optable import op_key

from ._common import node_val

__all__ = ["pool_layout", "max_pool2d_cl", "MIN_ELEMENTS"]

MIN_ELEMENTS = 1 << 16

# op -> how to read (kernel_size, stride, padding, dilation, ceil_mode, return_indices)
_POOLS: dict = {
    nn.MaxPool2d: "module",
    F.max_pool2d: "function",
    torch.max_pool2d: "function",
    torch.ops.aten.max_pool2d.default: "function",  # torch.export graphs (a saved .pt2)
}
_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
             "return_indices": False}  # fmt: skip


def max_pool2d_cl(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """``F.max_pool2d`` computed in channels_last; returns x's memory format (NCHW)."""
    y = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size, stride,
                     padding, dilation, ceil_mode)  # fmt: skip
    return y.contiguous()


def _pool_args(gm: fx.GraphModule, node: fx.Node) -> dict | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if _POOLS.get(op_key(node, mod)) != "module":
            return None
        return {a: getattr(mod, a) for a in _ARGS}
    if node.op != "call_function":
        return None
    try:
        if _POOLS.get(op_key(node)) != "function":
            return None
    except TypeError:  # unhashable target
        return None
    got = dict(zip(_ARGS, node.args[1:]))
    got.update({k: v for k, v in node.kwargs.items() if k in _ARGS})
    if "kernel_size" not in got or set(node.kwargs) - set(_ARGS) - {"input"}:
        return None
    return {**_DEFAULTS, **got}


def _nchw_float_cpu(node) -> bool:
    v = node_val(node)
    if v is None or len(v.shape) != 4 or v.dtype != torch.float32:
        return False
    dev = torch.device(getattr(v, "device", "cpu"))  # trace() keeps shapes as "meta" tensors
    if dev.type not in ("cpu", "meta") or v.shape.numel() < MIN_ELEMENTS:
        return False
    mf = getattr(v, "memory_format", None)  # tensor_meta
    return mf == torch.contiguous_format if mf is not None else v.is_contiguous()


def pool_layout(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """Swap large NCHW max-pools for :func:`max_pool2d_cl` on a copy of gm."""
    out = copy.deepcopy(gm)
    done = []
    for node in list(out.graph.nodes):
        args = _pool_args(out, node)
        if args is None or args["return_indices"] or not node.args:
            continue
        x = node.args[0]
        if not _nchw_float_cpu(x):
            continue
        with out.graph.inserting_before(node):
            new = out.graph.call_function(
                max_pool2d_cl, (x, args["kernel_size"], args["stride"], args["padding"],
                                args["dilation"], args["ceil_mode"]))  # fmt: skip
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        out.graph.erase_node(node)
        done.append(new.name)
    out.graph.lint()
    out.delete_all_unused_submodules()
    out.recompile()
    return out, done
