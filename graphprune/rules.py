"""Op-table rules for generic ops: elementwise, shape/view ops, indexing, reductions, sizes.

Each rule maps the channel maps of a node's inputs to its output's map and records couplings
on the Builder `b`. Slim hooks (`_slim_*`) rewrite constants after channels were removed; oracle
hooks (`_oracle_*`) turn channel-reducing ops into their masked equivalents. Layers (conv,
linear, norms, attention) live in `rules_nn`.
"""

from __future__ import annotations

import builtins
import math
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .analysis import Builder, SizeVal, iter_maps, iter_sizes
from .errors import target_name
from .optable import lookup, register
from .tmap import FIXED, Factor, TMap, rigid

__all__ = ["dispatch", "arg", "rigid_from_val"]

aten = torch.ops.aten


def arg(node: fx.Node, i: int, name: str | None = None, default=None):
    """Positional arg i, else keyword `name`, else default."""
    if len(node.args) > i:
        return node.args[i]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    return default


def rigid_from_val(v):
    if isinstance(v, torch.Tensor):
        return rigid(v.shape)
    if isinstance(v, (tuple, list)):
        return tuple(rigid_from_val(x) for x in v)
    return None


def _flat_nodes(x):
    if isinstance(x, fx.Node):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _flat_nodes(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat_nodes(y)
    elif isinstance(x, slice):
        yield from _flat_nodes((x.start, x.stop, x.step))


def _input_values(b: Builder, node: fx.Node):
    return [b.tm(n) for n in _flat_nodes((node.args, node.kwargs))]


def dispatch(b: Builder, node: fx.Node):
    """Apply the node's rule (or the unknown-op rule) and return its output map."""
    if node.op == "placeholder":
        return rigid_from_val(b.val(node))
    if node.op == "get_attr":
        return b.param(node.target)
    if node.op == "output":
        for v in _input_values(b, node):
            b.fix_map(v, "reaches the graph output")
        return None
    module = b.module(node)
    rule = lookup(node, module)
    vals = _input_values(b, node)
    has_tensor = any(True for v in vals for _ in iter_maps(v))
    if rule is not None and rule.name == "elementwise" and not has_tensor:
        return _python_value(b, node, vals)  # arithmetic on Python numbers (sizes)
    if rule is None:
        if node.op == "call_function" and not has_tensor:
            return _python_value(b, node, vals)
        if node.op == "call_module" and node.target == "_guards_fn":
            return None
        return _unknown(b, node, module, vals)
    if not rule.shape_args:
        for v in vals:
            if isinstance(v, SizeVal) and v.ids is not None and has_tensor:
                b.fix(v.ids, "a channel count is used as a value")
    return rule.analyze(b, node)


def _python_value(b: Builder, node: fx.Node, vals):
    sizes = [s for v in vals for s in iter_sizes(v)]
    if not sizes:
        return None
    ids = [s.ids for s in sizes if s.ids is not None]
    return SizeVal(b.val(node), np.concatenate(ids) if ids else None, derived=True)


def _unknown(b: Builder, node: fx.Node, module, vals):
    what = type(module).__name__ if module is not None else target_name(node)
    for v in vals:
        b.fix_map(v, f"no rule for op {what}")
    return rigid_from_val(b.val(node))


# --------------------------------------------------------------------------------------------
# elementwise and pass-through


def _elementwise(b: Builder, node: fx.Node):
    v = b.val(node)
    if not isinstance(v, torch.Tensor):
        return rigid_from_val(v)
    shape = tuple(v.shape)
    maps = [b.align(m, len(shape)) for m in _input_values(b, node) if isinstance(m, TMap)]
    return b.merge(maps, shape)


def _first(b: Builder, node: fx.Node):
    m = b.tm(node.args[0])
    v = b.val(node)
    if isinstance(m, TMap) and isinstance(v, torch.Tensor) and tuple(v.shape) == m.shape:
        return m
    return _elementwise(b, node)


_EW_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.pow, operator.neg, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.and_, operator.or_, operator.eq, operator.ne, operator.lt, operator.le,
    operator.gt, operator.ge, operator.invert, operator.abs, operator.mod,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow, torch.neg,
    torch.abs, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.sigmoid, torch.tanh,
    torch.relu, torch.erf, torch.clamp, torch.clip, torch.where, torch.maximum, torch.minimum,
    torch.sin, torch.cos, torch.square, torch.reciprocal, torch.sign, torch.floor, torch.ceil,
    torch.round, torch.masked_fill, torch.zeros_like, torch.ones_like, torch.full_like,
    torch.empty_like, torch.rand_like, torch.randn_like, torch.lerp, torch.addcmul,
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.mish, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.threshold, F.logsigmoid,
    F.softsign, F.tanhshrink, F.hardshrink, F.softshrink, F.relu_, F.silu, F.glu if False else None,
    aten.add.Tensor, aten.add_.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
    aten.rsub.Scalar, aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar, aten.div.Tensor,
    aten.div.Scalar, aten.div.Tensor_mode, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
    aten.neg.default, aten.abs.default, aten.exp.default, aten.log.default, aten.sqrt.default,
    aten.rsqrt.default, aten.sigmoid.default, aten.tanh.default, aten.relu.default,
    aten.relu_.default, aten.gelu.default, aten.silu.default, aten.silu_.default,
    aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default,
    aten.hardtanh.default, aten.hardtanh_.default, aten.leaky_relu.default, aten.elu.default,
    aten.erf.default, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.where.self, aten.where.ScalarOther, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten.maximum.default, aten.minimum.default, aten.dropout.default, aten.dropout_.default,
    aten.__and__.Tensor, aten.__or__.Tensor, aten.bitwise_not.default, aten.ge.Scalar,
    aten.gt.Scalar, aten.le.Scalar, aten.lt.Scalar, aten.eq.Scalar, aten.ne.Scalar,
    aten.ge.Tensor, aten.gt.Tensor, aten.le.Tensor, aten.lt.Tensor, aten.eq.Tensor,
    aten.ne.Tensor, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.mish.default, aten.softplus.default, aten.sin.default, aten.cos.default,
    aten.square.default, aten.reciprocal.default, aten.logical_not.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.log_sigmoid_forward.default
    if hasattr(aten, "log_sigmoid_forward") else None,
]
_EW_MODULES = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Threshold,
    nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
]
_EW_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "neg", "abs", "exp",
    "log", "sqrt", "rsqrt", "sigmoid", "sigmoid_", "tanh", "relu", "relu_", "clamp", "clamp_",
    "clip", "masked_fill", "masked_fill_", "where", "sin", "cos", "square", "reciprocal",
    "sign", "floor", "ceil", "round", "erf", "lerp", "__and__", "__or__", "eq", "ne", "lt",
    "le", "gt", "ge", "logical_not", "bool", "zero_", "fill_", "addcmul", "maximum", "minimum",
    "hardswish", "silu",
]
def _inplace_variants(ops):
    """aten `x_.default` in-place twins of elementwise overloads (hardsigmoid_, relu_, ...)."""
    out = []
    for op in ops:
        name = str(op)
        if not name.startswith("aten.") or name.count(".") != 2:
            continue
        _, base, overload = name.split(".")
        if base.endswith("_"):
            continue
        packet = getattr(aten, base + "_", None)
        twin = getattr(packet, overload, None) if packet is not None else None
        if twin is not None:
            out.append(twin)
    return out


_EW_ALL = list(dict.fromkeys([f for f in _EW_FUNCS if f is not None]))
_EW_ALL += [t for t in _inplace_variants(_EW_ALL) if t not in _EW_ALL]
register(*dict.fromkeys(_EW_ALL), *_EW_MODULES, *[f"method:{m}" for m in _EW_METHODS],
         name="elementwise")(_elementwise)

_PASS_METHODS = [
    "contiguous", "clone", "detach", "to", "float", "double", "half", "bfloat16", "type",
    "type_as", "requires_grad_", "cpu", "cuda", "int", "long",
]
register(
    *[f"method:{m}" for m in _PASS_METHODS], torch.clone, torch.detach,
    aten.clone.default, aten.detach.default, aten.alias.default, aten.to.dtype, aten.to.device,
    aten.to.dtype_layout, aten._to_copy.default, aten.lift_fresh_copy.default,
    aten.contiguous.default if hasattr(aten, "contiguous") else None,
    name="passthrough",
)(_first)


def _ignore(b: Builder, node: fx.Node):
    return None


def _slim_assert_meta(s, node):
    kw = dict(node.kwargs)
    changed = False
    for k in ("size", "stride"):
        if kw.get(k) is not None:
            kw[k] = None
            changed = True
    if changed:
        node.kwargs = kw
    if len(node.args) > 1:
        node.args = node.args[:1]


register(aten._assert_tensor_metadata.default, name="assert_metadata", slim=_slim_assert_meta)(
    _ignore
)
register(
    aten._assert_scalar.default if hasattr(aten, "_assert_scalar") else None,
    torch._assert if hasattr(torch, "_assert") else None,
    name="assert",
)(_ignore)


# --------------------------------------------------------------------------------------------
# sizes


def _sizeval(tm: TMap | None, axis: int, value) -> SizeVal:
    if tm is None or not isinstance(tm, TMap):
        return SizeVal(value, None)
    f = tm.factor_of(axis)
    return SizeVal(value, None if f is None else f.ids.reshape(-1))


def _getattr(b: Builder, node: fx.Node):
    obj, name = node.args[0], node.args[1]
    tm = b.tm(obj)
    v = b.val(node)
    if isinstance(tm, TMap) and name == "shape":
        return tuple(_sizeval(tm, a, int(v[a])) for a in range(tm.ndim))
    if isinstance(tm, TMap) and name in ("dtype", "device", "ndim", "is_cuda", "requires_grad"):
        return None
    if isinstance(tm, TMap) and name in ("T", "mT"):
        return tm.permute(list(range(tm.ndim))[::-1]) if name == "T" else tm.permute(
            list(range(tm.ndim - 2)) + [tm.ndim - 1, tm.ndim - 2]
        )
    if isinstance(tm, TMap):
        b.fix_map(tm, f"tensor attribute .{name} not understood")
        return rigid_from_val(v)
    return None


register(builtins.getattr, name="getattr")(_getattr)


def _size(b: Builder, node: fx.Node):
    tm = b.tm(node.args[0])
    dim = arg(node, 1, "dim")
    v = b.val(node)
    if dim is None:
        return tuple(_sizeval(tm, a, int(v[a])) for a in range(tm.ndim))
    return _sizeval(tm, dim % tm.ndim, v)


register("method:size", aten.sym_size.int, name="size")(_size)


def _numel(b: Builder, node: fx.Node):
    tm = b.tm(node.args[0])
    ids = [f.ids.reshape(-1) for f in tm.factors] if isinstance(tm, TMap) else []
    return SizeVal(b.val(node), np.concatenate(ids) if ids else None, derived=True)


register("method:numel", "method:dim", "method:nelement", torch.numel, name="numel")(_numel)


# --------------------------------------------------------------------------------------------
# reshape-like ops


def _new_size_list(s, node: fx.Node, out_tm: TMap, items: list):
    """Rewrite the sizes in a size list: literal ints of axes that changed length, and sizes
    computed from channel counts (they may count another group's channels) become literals."""
    new = s.new_shape(out_tm)
    out = list(items)
    for a, it in enumerate(items):
        if a >= len(new):
            break
        if isinstance(it, int) and it != -1 and new[a] != out_tm.shape[a]:
            out[a] = int(new[a])
        elif isinstance(it, fx.Node):
            sv = s.tm(it)
            if isinstance(sv, SizeVal) and sv.ids is not None:
                out[a] = int(new[a])
    return out


def _size_items(node: fx.Node, start: int):
    """(items, how) where how says how the sizes were passed: 'list' or 'varargs' or 'kw'."""
    if len(node.args) > start and isinstance(node.args[start], (list, tuple)):
        return list(node.args[start]), "list"
    if len(node.args) > start:
        return list(node.args[start:]), "varargs"
    for k in ("size", "shape", "sizes"):
        if k in node.kwargs:
            return list(node.kwargs[k]), k
    return None, None


def _set_size_items(node: fx.Node, start: int, items, how):
    if how == "list":
        args = list(node.args)
        args[start] = type(node.args[start])(items) if isinstance(node.args[start], tuple) else items
        node.args = tuple(args)
    elif how == "varargs":
        node.args = tuple(node.args[:start]) + tuple(items)
    elif how is not None:
        kw = dict(node.kwargs)
        kw[how] = items
        node.kwargs = kw


def _slim_sizes(start: int):
    def hook(s, node: fx.Node):
        out_tm = s.tm(node)
        if not isinstance(out_tm, TMap):
            return
        items, how = _size_items(node, start)
        if items is None:
            return
        new = _new_size_list(s, node, out_tm, items)
        if new != items:
            _set_size_items(node, start, new, how)

    return hook


def _reshape(b: Builder, node: fx.Node):
    tm = b.tm(node.args[0])
    v = b.val(node)
    if not isinstance(tm, TMap):
        return rigid_from_val(v)
    return b.reshape(tm, tuple(v.shape))


register(
    "method:view", "method:reshape", torch.reshape, aten.view.default, aten.reshape.default,
    aten._unsafe_view.default,
    name="reshape", slim=_slim_sizes(1), shape_args=True,
)(_reshape)
register(
    "method:flatten", torch.flatten, nn.Flatten, aten.flatten.using_ints, "method:squeeze",
    torch.squeeze, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    "method:unsqueeze", torch.unsqueeze, aten.unsqueeze.default, "method:view_as",
    "method:reshape_as", nn.Unflatten,
    name="reshape_implicit", shape_args=True,
)(_reshape)


def _slim_unflatten(s, node: fx.Node):
    out_tm = s.tm(node)
    in_tm = s.tm(node.args[0])
    dim = arg(node, 1, "dim")
    sizes = arg(node, 2, "sizes")
    if not isinstance(out_tm, TMap) or sizes is None:
        return
    dim = dim % in_tm.ndim
    new = s.new_shape(out_tm)
    items = list(sizes)
    for k, it in enumerate(items):
        a = dim + k
        if isinstance(it, int) and it != -1 and new[a] != out_tm.shape[a]:
            items[k] = int(new[a])
    args = list(node.args)
    if len(args) > 2:
        args[2] = type(sizes)(items)
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "sizes": type(sizes)(items)}


register("method:unflatten", torch.unflatten, aten.unflatten.int, name="unflatten",
         slim=_slim_unflatten, shape_args=True)(_reshape)


def _perm_of(node: fx.Node, nd: int):
    t = node.target
    if t in ("permute",):
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        return [int(d) % nd for d in dims]
    if t in (torch.permute, aten.permute.default):
        return [int(d) % nd for d in arg(node, 1, "dims")]
    if t in ("transpose", "swapaxes", "swapdims", torch.transpose, aten.transpose.int,
             torch.swapaxes):
        d0, d1 = int(arg(node, 1, "dim0")) % nd, int(arg(node, 2, "dim1")) % nd
        p = list(range(nd))
        p[d0], p[d1] = p[d1], p[d0]
        return p
    if t in ("t", torch.t, aten.t.default):
        return list(range(nd))[::-1]
    if t in ("movedim", torch.movedim):
        src, dst = int(arg(node, 1, "source")) % nd, int(arg(node, 2, "destination")) % nd
        p = [i for i in range(nd) if i != src]
        p.insert(dst, src)
        return p
    raise KeyError(t)


def _permute(b: Builder, node: fx.Node):
    tm = b.tm(node.args[0])
    if not isinstance(tm, TMap):
        return rigid_from_val(b.val(node))
    return tm.permute(_perm_of(node, tm.ndim))


register(
    "method:permute", torch.permute, aten.permute.default, "method:transpose", "method:swapaxes",
    "method:swapdims", torch.transpose, aten.transpose.int, torch.swapaxes, "method:t",
    torch.t, aten.t.default, "method:movedim", torch.movedim,
    name="permute",
)(_permute)


def _expand(b: Builder, node: fx.Node):
    tm = b.tm(node.args[0])
    v = b.val(node)
    shape = tuple(v.shape)
    tm = b.align(tm, len(shape))
    for f in tm.factors:
        for a in f.axes:
            if shape[a] != tm.shape[a]:
                b.fix(f.ids, "expand changes a channel axis")
    return tm.with_shape(shape)


register("method:expand", aten.expand.default, name="expand", slim=_slim_sizes(1),
         shape_args=True)(_expand)
register("method:expand_as", name="expand_as")(_expand)


def _repeat(b: Builder, node: fx.Node):
    tm = b.tm(node.args[0])
    v = b.val(node)
    shape = tuple(v.shape)
    tm = b.align(tm, len(shape))
    out = []
    for f in tm.factors:
        reps = [shape[a] // tm.shape[a] for a in f.axes]
        if len(f.axes) == 1:
            out.append(Factor(f.axes, np.tile(f.ids, reps[0])))
        elif all(r == 1 for r in reps):
            out.append(f)
        else:
            b.fix(f.ids, "repeat of a split channel axis")
    return TMap(shape, tuple(out))


register("method:repeat", aten.repeat.default, name="repeat", shape_args=True)(_repeat)


# --------------------------------------------------------------------------------------------
# concatenation, splitting, indexing


def _cat(b: Builder, node: fx.Node):
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    v = b.val(node)
    shape = tuple(v.shape)
    maps = [b.tm(t) for t in tensors]
    maps = [m for m in maps if isinstance(m, TMap) and m.ndim == len(shape)]
    dim %= len(shape)
    parts, ok = [], True
    rest = []
    for m in maps:
        f = m.factor_of(dim)
        if f is not None and len(f.axes) > 1:
            b.fix(f.ids, "cat along a split channel axis")
            ok = False
        ids = f.ids if (f is not None and len(f.axes) == 1) else np.full(m.shape[dim], FIXED)
        parts.append(ids)
        others = tuple(g for g in m.factors if dim not in g.axes)
        s = list(m.shape)
        s[dim] = 1
        rest.append(TMap(tuple(s), others))
    s = list(shape)
    s[dim] = 1
    merged = b.merge(rest, tuple(s))
    factors = list(merged.factors)
    if ok and shape[dim] > 1:
        cat_ids = np.concatenate(parts)
        if (cat_ids != FIXED).any():
            factors.append(Factor((dim,), cat_ids))
    return TMap(shape, tuple(sorted(factors, key=lambda f: f.axes)))


register(torch.cat, torch.concat, torch.concatenate, aten.cat.default, name="cat")(_cat)


def _stack(b: Builder, node: fx.Node):
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    shape = tuple(b.val(node).shape)
    maps = [b.tm(t).insert_axis(dim % len(shape)) for t in tensors]
    return b.merge(maps, shape)


register(torch.stack, aten.stack.default, name="stack")(_stack)


def _split_outputs(b: Builder, tm: TMap, dim: int, sizes: list[int]):
    dim %= tm.ndim
    f = tm.factor_of(dim)
    if f is not None and len(f.axes) > 1:
        b.fix(f.ids, "split of a split channel axis")
        f = None
        tm = TMap(tm.shape, tuple(g for g in tm.factors if dim not in g.axes))
    outs, start = [], 0
    for n in sizes:
        shape = tm.shape[:dim] + (n,) + tm.shape[dim + 1 :]
        fs = [g for g in tm.factors if dim not in g.axes]
        if f is not None and n > 1:
            fs.append(Factor((dim,), f.ids[start : start + n]))
        elif f is not None and n == 1:
            b.fix(f.ids[start : start + 1], "split off a single channel")
        outs.append(TMap(shape, tuple(sorted(fs, key=lambda g: g.axes))))
        start += n
    return tuple(outs)


def _split(b: Builder, node: fx.Node):
    tm = b.tm(node.args[0])
    v = b.val(node)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    dim = arg(node, 2, "dim", 0)
    if node.target in (torch.chunk, "chunk", aten.chunk.default):
        dim = arg(node, 2, "dim", 0)
    _ = name
    sizes = [int(t.shape[dim % tm.ndim]) for t in v]
    return _split_outputs(b, tm, dim, sizes)


def _slim_split(s, node: fx.Node):
    in_tm = s.tm(node.args[0])
    outs = s.tm(node)
    dim = arg(node, 2, "dim", 0) % in_tm.ndim
    new = [s.new_shape(o)[dim] for o in outs]
    old = [o.shape[dim] for o in outs]
    if new == old:
        return
    x = node.args[0]
    if node.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        node.target = aten.split_with_sizes.default
        node.args = (x, new, dim)
    else:
        node.op = "call_function"
        node.target = torch.split
        node.args = (x, new)
        node.kwargs = {"dim": dim}


register(
    torch.split, "method:split", aten.split.Tensor, aten.split_with_sizes.default, torch.chunk,
    "method:chunk", aten.chunk.default, "method:split_with_sizes",
    name="split", slim=_slim_split,
)(_split)


def _unbind(b: Builder, node: fx.Node):
    tm = b.tm(node.args[0])
    dim = arg(node, 1, "dim", 0) % tm.ndim
    return tuple(b.select(tm, dim, i) for i in range(tm.shape[dim]))


register(torch.unbind, "method:unbind", aten.unbind.int, name="unbind")(_unbind)


def _norm_index(idx, nd: int):
    if not isinstance(idx, tuple):
        idx = (idx,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out = []
    for i in idx:
        if i is Ellipsis:
            out.extend([slice(None)] * (nd - n_real))
        else:
            out.append(i)
    while sum(1 for i in out if i is not None) < nd:
        out.append(slice(None))
    return out


def _getitem(b: Builder, node: fx.Node):
    src, idx = node.args[0], node.args[1]
    m = b.tm(src)
    if isinstance(m, (tuple, list)):
        return m[idx]
    if isinstance(m, dict):
        return m.get(idx)
    if not isinstance(m, TMap):
        return None
    items = _norm_index(idx, m.ndim)
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) and not isinstance(b.tm(i), SizeVal)
           for i in items if i is not None):
        if any(isinstance(i, fx.Node) and isinstance(b.tm(i), TMap) for i in items):
            return _unknown(b, node, None, [m] + [b.tm(i) for i in items if isinstance(i, fx.Node)])
    tm = m
    axis = 0
    for it in items:
        if it is None:
            tm = tm.insert_axis(axis)
            axis += 1
        elif isinstance(it, slice):
            tm = _slice_axis(b, tm, axis, it.start, it.stop, it.step)
            axis += 1
        elif isinstance(it, int):
            tm = b.select(tm, axis, it)
        elif isinstance(it, fx.Node):
            f = tm.factor_of(axis)
            if f is not None:
                b.fix(f.ids, "a channel is selected by a computed index")
            tm = b.drop_axis(tm, axis)
        else:
            return _unknown(b, node, None, [m])
    v = b.val(node)
    if tuple(v.shape) != tm.shape:
        return _unknown(b, node, None, [m])
    return tm


def _int_or_none(b: Builder, x):
    if isinstance(x, fx.Node):
        sv = b.tm(x)
        return sv.value if isinstance(sv, SizeVal) else x.meta.get("val")
    return x


def _slice_axis(b: Builder, tm: TMap, axis: int, start, stop, step) -> TMap:
    n = tm.shape[axis]
    st, sp, stp = slice(_int_or_none(b, start), _int_or_none(b, stop),
                        _int_or_none(b, step)).indices(n)
    length = len(range(st, sp, stp))
    shape = tm.shape[:axis] + (length,) + tm.shape[axis + 1 :]
    f = tm.factor_of(axis)
    if f is None or (st, sp, stp) == (0, n, 1):
        return TMap(shape, tm.factors) if f is None else tm
    if len(f.axes) > 1 or stp != 1 or any(isinstance(x, fx.Node) for x in (start, stop)):
        b.fix(f.ids, "strided or dynamic slice of a channel axis")
        return TMap(shape, tuple(g for g in tm.factors if g is not f))
    fs = [g for g in tm.factors if g is not f]
    if length > 1:
        fs.append(Factor((axis,), f.ids[st:sp]))
    elif length == 1:
        b.fix(f.ids[st:sp], "slice keeps one channel")
    return TMap(shape, tuple(sorted(fs, key=lambda g: g.axes)))


def _new_bounds(s, ids: np.ndarray, start, stop):
    n = len(ids)
    st, sp, _ = slice(start, stop).indices(n)
    alive = s.alive(ids)
    nst = int(alive[:st].sum())
    nsp = nst + int(alive[st:sp].sum())
    return nst, nsp


def _slim_getitem(s, node: fx.Node):
    m = s.tm(node.args[0])
    if not isinstance(m, TMap):
        return
    items = _norm_index(node.args[1], m.ndim)
    axis, changed, new_items = 0, False, []
    for it in items:
        if isinstance(it, slice) and axis < m.ndim:
            f = m.factor_of(axis)
            if f is not None and len(f.axes) == 1 and not s.alive(f.ids).all():
                a, c = _new_bounds(s, f.ids, it.start, it.stop)
                it = slice(a, c, None)
                changed = True
            new_items.append(it)
            axis += 1
        else:
            new_items.append(it)
            if it is not None:
                axis += 1
    if changed:
        node.args = (node.args[0], tuple(new_items))


register(operator.getitem, name="getitem", slim=_slim_getitem, shape_args=True)(_getitem)


def _aten_slice(b: Builder, node: fx.Node):
    tm = b.tm(node.args[0])
    dim = arg(node, 1, "dim", 0) % tm.ndim
    start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
    if isinstance(end, int) and end > 2**62:
        end = None
    return _slice_axis(b, tm, dim, start, end, step)


def _slim_aten_slice(s, node: fx.Node):
    tm = s.tm(node.args[0])
    dim = arg(node, 1, "dim", 0) % tm.ndim
    f = tm.factor_of(dim)
    if f is None or len(f.axes) != 1 or s.alive(f.ids).all():
        return
    start, end = arg(node, 2, "start"), arg(node, 3, "end")
    if isinstance(end, int) and end > 2**62:
        end = None
    a, c = _new_bounds(s, f.ids, start, end)
    node.args = (node.args[0], dim, a, c, 1)


register(aten.slice.Tensor, name="aten_slice", slim=_slim_aten_slice, shape_args=True)(_aten_slice)


def _narrow(b: Builder, node: fx.Node):
    tm = b.tm(node.args[0])
    dim = arg(node, 1, "dim") % tm.ndim
    start, length = arg(node, 2, "start"), arg(node, 3, "length")
    return _slice_axis(b, tm, dim, start, start + length, 1)


def _slim_narrow(s, node: fx.Node):
    tm = s.tm(node.args[0])
    dim = arg(node, 1, "dim") % tm.ndim
    f = tm.factor_of(dim)
    if f is None or len(f.axes) != 1 or s.alive(f.ids).all():
        return
    start, length = arg(node, 2, "start"), arg(node, 3, "length")
    a, c = _new_bounds(s, f.ids, start, start + length)
    node.args = (node.args[0], dim, a, c - a)


register(torch.narrow, "method:narrow", aten.narrow.default, name="narrow", slim=_slim_narrow,
         shape_args=True)(_narrow)


def _select(b: Builder, node: fx.Node):
    tm = b.tm(node.args[0])
    dim = arg(node, 1, "dim") % tm.ndim
    index = arg(node, 2, "index")
    if not isinstance(index, int):
        f = tm.factor_of(dim)
        if f is not None:
            b.fix(f.ids, "a channel is selected by a computed index")
        return b.drop_axis(tm, dim)
    return b.select(tm, dim, index % tm.shape[dim])


register(aten.select.int, torch.select, "method:select", name="select")(_select)


# --------------------------------------------------------------------------------------------
# reductions


def _reduce_dims(node: fx.Node, nd: int):
    d = arg(node, 1, "dim")
    if d is None and node.target in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default):
        d = arg(node, 1, "dim")
    if d is None:
        return list(range(nd))
    if isinstance(d, (list, tuple)):
        return sorted(int(x) % nd for x in d) if len(d) else list(range(nd))
    return [int(d) % nd]


def _keepdim(node: fx.Node) -> bool:
    return bool(arg(node, 2, "keepdim", False))


def _reduce(b: Builder, node: fx.Node, order_sensitive=False):
    tm = b.tm(node.args[0])
    if not isinstance(tm, TMap):
        return rigid_from_val(b.val(node))
    dims = _reduce_dims(node, tm.ndim)
    if order_sensitive:
        for d in dims:
            f = tm.factor_of(d)
            if f is not None:
                b.fix(f.ids, "reduction result depends on channel positions")
    out = tm
    if _keepdim(node):
        for d in dims:
            f = out.factor_of(d)
            if f is not None:
                out = b.drop_axis(out, d).insert_axis(d)
        shape = list(tm.shape)
        for d in dims:
            shape[d] = 1
        res = TMap(tuple(shape), out.factors)
    else:
        for d in sorted(dims, reverse=True):
            out = b.drop_axis(out, d)
        res = out
    v = b.val(node)
    if isinstance(v, (tuple, list)):  # max/min with dim -> (values, indices)
        return (res, res)
    return res


def _reduce_oracle(kind: str):
    def hook(o, node: fx.Node):
        tm = o.tm(node.args[0])
        dims = _reduce_dims(node, tm.ndim)
        if not any(tm.factor_of(d) is not None for d in dims) or not o.dead(tm):
            return
        mask = o.const(o.mask(tm))
        from . import oracle_ops

        fn = {
            "mean": oracle_ops.masked_mean, "var": oracle_ops.masked_var,
            "std": oracle_ops.masked_std, "amax": oracle_ops.masked_amax,
            "amin": oracle_ops.masked_amin, "logsumexp": oracle_ops.masked_logsumexp,
        }[kind]
        unbiased = kind in ("var", "std")
        corr = 1
        if unbiased:
            corr = node.kwargs.get("correction", None)
            ub = node.kwargs.get("unbiased", None)
            if corr is None:
                corr = 1 if ub is None else int(bool(ub))
        o.replace(node, fn, (node.args[0], mask, tuple(dims), _keepdim(node), corr))

    return hook


register("method:sum", torch.sum, aten.sum.dim_IntList, "method:norm", torch.norm,
         aten.linalg_vector_norm.default, name="sum")(_reduce)
register("method:mean", torch.mean, aten.mean.dim, name="mean",
         oracle=_reduce_oracle("mean"))(_reduce)
register("method:var", torch.var, aten.var.correction, name="var",
         oracle=_reduce_oracle("var"))(_reduce)
register("method:std", torch.std, aten.std.correction, name="std",
         oracle=_reduce_oracle("std"))(_reduce)
register("method:amax", torch.amax, aten.amax.default, name="amax",
         oracle=_reduce_oracle("amax"))(_reduce)
register("method:amin", torch.amin, aten.amin.default, name="amin",
         oracle=_reduce_oracle("amin"))(_reduce)
register("method:logsumexp", torch.logsumexp, aten.logsumexp.default, name="logsumexp",
         oracle=_reduce_oracle("logsumexp"))(_reduce)


def _maxmin(b: Builder, node: fx.Node):
    if arg(node, 1, "dim") is None or isinstance(arg(node, 1, "dim"), fx.Node):
        if isinstance(arg(node, 1, "dim"), fx.Node):  # max(a, b) elementwise
            return _elementwise(b, node)
        return _reduce(b, node)
    return _reduce(b, node, order_sensitive=True)


register("method:max", "method:min", torch.max, torch.min, "method:argmax", "method:argmin",
         torch.argmax, torch.argmin, name="maxmin")(_maxmin)


def _softmax(b: Builder, node: fx.Node):
    return _first(b, node)


def _softmax_dim(node: fx.Node, nd: int) -> int:
    if node.op == "call_module":
        return None
    return int(arg(node, 1, "dim")) % nd


def _softmax_oracle(log: bool):
    def hook(o, node: fx.Node):
        tm = o.tm(node.args[0])
        if node.op == "call_module":
            dim = o.module(node).dim
        else:
            dim = arg(node, 1, "dim")
        dim = int(dim) % tm.ndim
        if tm.factor_of(dim) is None or not o.dead(tm):
            return
        from . import oracle_ops

        mask = o.const(o.mask(tm))
        o.replace(node, oracle_ops.masked_softmax, (node.args[0], mask, dim, log))

    return hook


register(F.softmax, torch.softmax, "method:softmax", aten.softmax.int, aten._softmax.default,
         nn.Softmax, name="softmax", oracle=_softmax_oracle(False))(_softmax)
register(F.log_softmax, torch.log_softmax, "method:log_softmax", aten.log_softmax.int,
         aten._log_softmax.default, nn.LogSoftmax, name="log_softmax",
         oracle=_softmax_oracle(True))(_softmax)


def _normalize(b: Builder, node: fx.Node):
    return _first(b, node)


register(F.normalize, name="normalize")(_normalize)


def _order_sensitive(b: Builder, node: fx.Node):
    """cumsum/flip/roll/sort along a channel axis: positions matter, so fix that axis."""
    tm = b.tm(node.args[0])
    if node.target in ("roll", torch.roll, aten.roll.default):
        dim = arg(node, 2, "dims")
    elif node.target in ("flip", torch.flip, aten.flip.default):
        dim = arg(node, 1, "dims")
    else:
        dim = arg(node, 1, "dim")
    dims = dim if isinstance(dim, (list, tuple)) else [dim] if dim is not None else range(tm.ndim)
    for d in dims:
        f = tm.factor_of(int(d) % tm.ndim)
        if f is not None:
            b.fix(f.ids, "op depends on channel positions")
    v = b.val(node)
    return tm if isinstance(v, torch.Tensor) and tuple(v.shape) == tm.shape else rigid_from_val(v)


register("method:cumsum", torch.cumsum, "method:flip", torch.flip, "method:roll", torch.roll,
         "method:cumprod", torch.cumprod, aten.cumsum.default, aten.roll.default,
         aten.flip.default, name="order_sensitive")(
    _order_sensitive
)


# --------------------------------------------------------------------------------------------
# creation ops with sizes


def _creation(start: int):
    def rule(b: Builder, node: fx.Node):
        v = b.val(node)
        shape = tuple(int(s) for s in v.shape)
        items, _ = _size_items(node, start)
        fs = []
        if items is not None and len(items) == len(shape):
            for a, it in enumerate(items):
                if shape[a] <= 1:
                    continue
                sv = b.tm(it) if isinstance(it, fx.Node) else None
                if isinstance(sv, SizeVal) and sv.ids is not None and not sv.derived and len(
                    sv.ids
                ) == shape[a]:
                    fs.append(Factor((a,), sv.ids))
                elif isinstance(it, int):
                    fresh = b.fresh(shape[a])
                    b.produce(fresh)
                    fs.append(Factor((a,), fresh))
        return TMap(shape, tuple(fs))

    return rule


for _k, _start in [
    ((torch.zeros, torch.ones, torch.empty, torch.rand, torch.randn, aten.zeros.default,
      aten.ones.default, aten.empty.memory_format), 0),
    (("method:new_zeros", "method:new_ones", "method:new_empty", aten.new_zeros.default,
      aten.new_ones.default, aten.new_empty.default), 1),
]:
    register(*_k, name="creation", slim=_slim_sizes(_start), shape_args=True)(_creation(_start))


def _full(b: Builder, node: fx.Node):
    return _creation(0)(b, node)


register(torch.full, aten.full.default, name="full", slim=_slim_sizes(0), shape_args=True)(_full)
register("method:new_full", aten.new_full.default, name="new_full", slim=_slim_sizes(1),
         shape_args=True)(_creation(1))


def _arange(b: Builder, node: fx.Node):
    return rigid_from_val(b.val(node))


register(torch.arange, aten.arange.default, aten.arange.start, aten.arange.start_step,
         name="arange")(_arange)

_ = math
