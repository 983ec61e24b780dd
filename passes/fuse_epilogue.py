"""fuse_epilogue: fold eval-mode BatchNorm into the conv before it, then fuse a following
residual add and ReLU into a 1xN layer's kernel epilogue.

Requires: a GraphModule whose nodes carry shapes (``meta["val"]`` or ``meta["tensor_meta"]``).
Ensures: a copy computing the same function up to float rounding, with fewer nodes: a
conv -> BatchNorm pair (a ``BatchNorm2d`` module in eval mode, or a functional batch norm --
``F.batch_norm`` as in torch.compile graphs, ``aten.batch_norm`` as in torch.export graphs -- with
``training=False`` and constant statistics; the conv's only user, the conv called once) becomes
one conv; after a 1xN layer (``Conv2d1xN`` / ``Linear1xN``) an
``add(layer, r)`` with ``r`` of the same shape and dtype, then a ``relu``, become the layer's
``residual`` input and ``relu`` flag. Returns ``(module, {layer node: "bn+add+relu"})``.

What counts as a BatchNorm, an add or a ReLU is one table keyed by op (``_EPILOGUE``); anything
else (ReLU6, add with ``alpha``, a broadcasting add, an in-place add into the residual, a layer
output used twice) ends the chain and is left as it was.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from graphprune.optable import op_key

from ._common import get_tensor, node_val

__all__ = ["fuse_epilogue"]

aten = torch.ops.aten

# op -> its role in an epilogue ("add_" mutates its first argument); the aten spellings are what
# torch.export graphs (a saved .pt2, after `modulize`) contain
_EPILOGUE: dict = {
    nn.BatchNorm2d: "bn",
    F.batch_norm: "bn",
    torch.batch_norm: "bn",
    aten.batch_norm.default: "bn",
    operator.add: "add",
    torch.add: "add",
    "method:add": "add",
    aten.add.Tensor: "add",
    operator.iadd: "add_",
    "method:add_": "add_",
    aten.add_.Tensor: "add_",
    nn.ReLU: "relu",
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    "method:relu": "relu",
    "method:relu_": "relu",
    aten.relu.default: "relu",
    aten.relu_.default: "relu",
}


# functional batch norms: (position, keyword, default) of weight, bias, running_mean,
# running_var, training, eps. F.batch_norm is what torch.compile (Dynamo) graphs hold; the aten /
# torch.batch_norm order is what torch.export graphs hold.
_REQ = object()
_ATEN_BN = ((1, "weight", _REQ), (2, "bias", _REQ), (3, "running_mean", _REQ),
            (4, "running_var", _REQ), (5, "training", _REQ), (7, "eps", _REQ))
_BN_ARGS: dict = {
    aten.batch_norm.default: _ATEN_BN,
    torch.batch_norm: _ATEN_BN,
    F.batch_norm: ((3, "weight", None), (4, "bias", None), (1, "running_mean", _REQ),
                   (2, "running_var", _REQ), (5, "training", False), (7, "eps", 1e-5)),
}
_BN_KWARGS = {"weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
              "cudnn_enabled"}


def _role(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    mod = gm.get_submodule(node.target) if node.op == "call_module" else None
    try:
        return _EPILOGUE.get(op_key(node, mod))
    except TypeError:  # unhashable target
        return None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _bn_stats(gm: fx.GraphModule, bn_node: fx.Node, calls: dict):
    """(weight, bias, running_mean, running_var, eps) of an eval-mode BN node, else None."""
    if bn_node.op == "call_module":
        if len(bn_node.args) > 1 or bn_node.kwargs or calls.get(bn_node.target, 0) != 1:
            return None
        bn = gm.get_submodule(bn_node.target)
        if bn.training or bn.running_mean is None:
            return None
        return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    spec = _BN_ARGS.get(bn_node.target)
    if spec is None or set(bn_node.kwargs) - _BN_KWARGS:
        return None
    vals = []
    for pos, name, default in spec:
        v = bn_node.args[pos] if len(bn_node.args) > pos else bn_node.kwargs.get(name, default)
        if v is _REQ:
            return None
        vals.append(v)
    *tensors, training, eps = vals
    if training is not False or not isinstance(eps, float):
        return None
    consts = []
    for v in tensors:
        if v is not None and (not isinstance(v, fx.Node) or v.op != "get_attr"):
            return None
        consts.append(None if v is None else get_tensor(gm, v.target))
    if consts[2] is None or consts[3] is None:
        return None
    return (*consts, eps)


def _fold_bn(gm: fx.GraphModule, layer: fx.Node, calls: dict) -> bool:
    """conv -> BN (eval) into one conv; True when folded."""
    from graphprune.kernels.onexn import Conv2d1xN

    bn_node = _only_user(layer)
    if bn_node is None or _role(gm, bn_node) != "bn" or bn_node.args[:1] != (layer,):
        return False
    stats = _bn_stats(gm, bn_node, calls)
    mod = gm.get_submodule(layer.target)
    if stats is None or stats[2].numel() != mod.out_channels:
        return False
    weight, bias, mean, var, eps = stats
    with torch.no_grad():
        if isinstance(mod, Conv2d1xN):  # values [G, kept, taps * N]: scale output g*N + n
            scale = torch.rsqrt(var + eps) * (1.0 if weight is None else weight)
            shift = (0.0 if bias is None else bias) - mean * scale
            g, kept, tn = mod.values.shape
            s = scale.to(mod.values.dtype).reshape(g, 1, 1, mod.n)
            mod.values.copy_((mod.values.reshape(g, kept, tn // mod.n, mod.n) * s).reshape(g, kept, tn))
            old = mod.bias.detach() if mod.bias is not None else torch.zeros_like(scale)
            mod.bias = nn.Parameter((old * scale + shift).to(mod.values.dtype))
        else:
            new = copy.deepcopy(mod)
            new.weight, new.bias = fuse_conv_bn_weights(new.weight, new.bias, mean, var, eps,
                                                        weight, bias)  # fmt: skip
            new.bias.requires_grad_(mod.weight.requires_grad)
            prefix, _, attr = layer.target.rpartition(".")
            setattr(gm.get_submodule(prefix) if prefix else gm, attr, new)
    consts = [v for v in [*bn_node.args[1:], *bn_node.kwargs.values()] if isinstance(v, fx.Node)]
    bn_node.replace_all_uses_with(layer)
    gm.graph.erase_node(bn_node)
    for v in consts:  # an export graph's BN constants, now unused
        if v.op == "get_attr" and not v.users:
            gm.graph.erase_node(v)
    return True


def _fuse_add(gm: fx.GraphModule, layer: fx.Node) -> bool:
    """layer -> add(layer, r) into layer(x, residual=r); True when fused."""
    add = _only_user(layer)
    role = _role(gm, add) if add is not None else None
    if role not in ("add", "add_") or add.kwargs or len(add.args) != 2:
        return False
    a, b = add.args
    if role == "add_" and a is not layer:  # in place into the residual: others may see it
        return False
    r = b if a is layer else a
    if not isinstance(r, fx.Node) or r is layer:
        return False
    lv, rv = node_val(layer), node_val(r)
    if lv is None or rv is None or tuple(lv.shape) != tuple(rv.shape) or lv.dtype != rv.dtype:
        return False
    add.prepend(layer)  # after r, which comes before the add
    layer.args = (layer.args[0], r)
    add.replace_all_uses_with(layer)
    gm.graph.erase_node(add)
    return True


def _fuse_relu(gm: fx.GraphModule, layer: fx.Node) -> bool:
    act = _only_user(layer)
    if act is None or _role(gm, act) != "relu" or act.args[:1] != (layer,) or len(act.args) > 1:
        return False
    if set(act.kwargs) - {"inplace"}:
        return False
    gm.get_submodule(layer.target).relu = True
    act.replace_all_uses_with(layer)
    gm.graph.erase_node(act)
    return True


def fuse_epilogue(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    """Fold BN and fuse add/ReLU epilogues on a copy of gm (see the module docstring)."""
    from graphprune.kernels.onexn import Conv2d1xN, Linear1xN

    out = copy.deepcopy(gm)
    calls: dict = {}
    for node in out.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused: dict[str, str] = {}
    for node in list(out.graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        mod = out.get_submodule(node.target)
        steps = []
        if type(mod) in (nn.Conv2d, Conv2d1xN) and _fold_bn(out, node, calls):
            steps.append("bn")
        if type(mod) in (Conv2d1xN, Linear1xN) and len(node.args) == 1 and not node.kwargs \
                and not mod.relu:  # fmt: skip
            if _fuse_add(out, node):
                steps.append("add")
            if _fuse_relu(out, node):
                steps.append("relu")
        if steps:
            fused[node.name] = "+".join(steps)
    out.graph.lint()
    out.delete_all_unused_submodules()
    out.recompile()
    return out, fused
