"""Op-table rules for layers: conv, linear, embedding, norms, pooling, matmul and attention.

Modules and their functional/aten forms share one implementation: a module rule fetches its
parameters' channel maps by qualified name and calls the functional rule.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .analysis import Builder
from .optable import register
from .rules import _first, arg, rigid_from_val
from .tmap import Factor, TMap

__all__: list[str] = []

aten = torch.ops.aten


def _pmap(b: Builder, x):
    """Channel map of a parameter argument (get_attr node or computed tensor)."""
    if x is None:
        return None
    return b.tm(x) if isinstance(x, fx.Node) else None


def _mparam(b: Builder, node: fx.Node, name: str):
    mod = b.module(node)
    if getattr(mod, name, None) is None:
        return None
    return b.param(f"{node.target}.{name}")


def _tie(b: Builder, ids: np.ndarray | None, target: np.ndarray | None, why: str):
    """Make `ids` the same channels as `target` (or fix them when target is rigid)."""
    if ids is None:
        return
    if target is None:
        b.fix(ids, why)
    else:
        b.unify(ids, target)


def _chan_ids(b: Builder, tm: TMap, axis: int):
    """1-D ids on a channel axis, or None (rigid). A split axis is pinned and treated as rigid."""
    f = tm.factor_of(axis)
    if f is None:
        return None
    if len(f.axes) > 1:
        b.no_shrink(f, axis % tm.ndim)
        return None
    return f.ids


def _ids0(tm: TMap | None, axis: int):
    if tm is None:
        return None
    f = tm.factor_of(axis)
    return None if f is None else f.ids


def _with_channel(shape, cax: int, ids) -> TMap:
    fs = ()
    if ids is not None and shape[cax] > 1:
        fs = (Factor((cax,), ids),)
    return TMap(tuple(int(s) for s in shape), fs)


# --------------------------------------------------------------------------------------------
# convolution


def _conv(b: Builder, node, x: TMap, w: TMap, bias: TMap | None, groups: int, wkey,
          transposed: bool = False) -> TMap:
    out_shape = tuple(b.val(node).shape)
    cax = 1 if x.ndim == w.ndim else 0
    X = _chan_ids(b, x, cax)
    w0, w1 = _ids0(w, 0), _ids0(w, 1)
    c_in = x.shape[cax]
    if transposed:
        if groups != 1:
            b.fix_map(x, "grouped transposed conv")
            b.fix_map(w, "grouped transposed conv")
            return rigid_from_val(b.val(node))
        _tie(b, w0, X, "input channels cannot change")
        out_ids = w1
    elif groups == 1:
        _tie(b, w1, X, "input channels cannot change")
        out_ids = w0
    elif w.shape[1] == 1:  # depthwise, channel multiplier m
        m = w.shape[0] // c_in
        _tie(b, w0, None if X is None else np.repeat(X, m), "depthwise input cannot change")
        out_ids = w0
        b.note(depthwise=True)
    else:  # grouped
        if X is None or w0 is None or wkey is None:
            if X is not None:
                b.fix(X, "grouped conv whose weight is computed")
            if w0 is not None:
                b.fix(w0, "grouped conv whose weight is computed")
            out_ids = w0
        else:
            b.arrange(X.reshape(groups, -1))
            b.arrange(w0.reshape(groups, -1))
            b.params[wkey]["grouped_in"] = X.reshape(groups, -1)
            out_ids = w0
    if bias is not None:
        _tie(b, _ids0(bias, 0), out_ids, "output channels cannot change")
    b.produce(out_ids)
    return _with_channel(out_shape, cax, out_ids)


def _conv_module(b: Builder, node: fx.Node):
    mod = b.module(node)
    x = b.tm(node.args[0])
    w = _mparam(b, node, "weight")
    bias = _mparam(b, node, "bias")
    transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
    return _conv(b, node, x, w, bias, mod.groups, id(mod.weight), transposed)


def _slim_conv_module(s, node: fx.Node):
    mod = s.module(node)
    x_tm = s.tm(node.args[0])
    cax = 1 if x_tm.ndim == mod.weight.ndim else 0
    c_in = s.new_shape(x_tm)[cax]
    if s.note(node).get("depthwise"):
        mod.groups = c_in
    mod.in_channels = c_in
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        mod.out_channels = mod.weight.shape[1] * mod.groups
    else:
        mod.out_channels = mod.weight.shape[0]


register(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
         nn.ConvTranspose3d, name="conv", slim=_slim_conv_module)(_conv_module)


def _conv_fn_args(node: fx.Node):
    t = node.target
    if t is aten.convolution.default:
        return arg(node, 1), arg(node, 2), arg(node, 8), bool(arg(node, 6)), 8
    if t in (aten.conv_transpose1d.default, aten.conv_transpose2d.input,
             aten.conv_transpose3d.input, F.conv_transpose1d, F.conv_transpose2d,
             F.conv_transpose3d):
        return arg(node, 1, "weight"), arg(node, 2, "bias"), arg(node, 6, "groups", 1), True, 6
    return arg(node, 1, "weight"), arg(node, 2, "bias"), arg(node, 6, "groups", 1), False, 6


def _conv_fn(b: Builder, node: fx.Node):
    w_node, b_node, groups, transposed, _ = _conv_fn_args(node)
    x = b.tm(node.args[0])
    w = _pmap(b, w_node)
    if w is None or not isinstance(x, TMap):
        b.fix_map(x, "conv with unknown weight")
        return rigid_from_val(b.val(node))
    return _conv(b, node, x, w, _pmap(b, b_node), int(groups), b.param_key(w_node), transposed)


def _slim_conv_fn(s, node: fx.Node):
    if not s.note(node).get("depthwise"):
        return
    x_tm = s.tm(node.args[0])
    _, _, _, _, gi = _conv_fn_args(node)
    cax = 1 if x_tm.ndim == s.tm(node.args[1]).ndim else 0
    c_in = s.new_shape(x_tm)[cax]
    args = list(node.args)
    if len(args) > gi:
        args[gi] = c_in
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "groups": c_in}


register(F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
         F.conv_transpose3d, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
         aten.convolution.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
         aten.conv_transpose3d.input, name="conv_fn", slim=_slim_conv_fn)(_conv_fn)


# --------------------------------------------------------------------------------------------
# linear, embedding


def _linear(b: Builder, node, x: TMap, w: TMap, bias: TMap | None) -> TMap:
    out_shape = tuple(b.val(node).shape)
    nd = len(out_shape)
    X = _chan_ids(b, x, x.ndim - 1)
    _tie(b, _ids0(w, 1), X, "input features cannot change")
    out_ids = _ids0(w, 0)
    if bias is not None:
        _tie(b, _ids0(bias, 0), out_ids, "output features cannot change")
    fs = [f for f in x.factors if (x.ndim - 1) not in f.axes]
    b.produce(out_ids)
    if out_ids is not None and out_shape[-1] > 1:
        fs.append(Factor((nd - 1,), out_ids))
    return TMap(out_shape, tuple(fs))


def _linear_module(b: Builder, node: fx.Node):
    return _linear(b, node, b.tm(node.args[0]), _mparam(b, node, "weight"),
                   _mparam(b, node, "bias"))


def _slim_linear_module(s, node: fx.Node):
    mod = s.module(node)
    mod.in_features = mod.weight.shape[1]
    mod.out_features = mod.weight.shape[0]


register(nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear, name="linear",
         slim=_slim_linear_module)(_linear_module)


def _linear_fn(b: Builder, node: fx.Node):
    w = _pmap(b, arg(node, 1, "weight"))
    x = b.tm(node.args[0])
    if w is None:
        b.fix_map(x, "linear with unknown weight")
        return rigid_from_val(b.val(node))
    return _linear(b, node, x, w, _pmap(b, arg(node, 2, "bias")))


register(F.linear, aten.linear.default, name="linear_fn")(_linear_fn)


def _embedding(b: Builder, node, w: TMap) -> TMap:
    out_shape = tuple(b.val(node).shape)
    b.produce(_ids0(w, 1))
    return _with_channel(out_shape, len(out_shape) - 1, _ids0(w, 1))


def _embedding_module(b: Builder, node: fx.Node):
    return _embedding(b, node, _mparam(b, node, "weight"))


def _slim_embedding(s, node: fx.Node):
    mod = s.module(node)
    mod.embedding_dim = mod.weight.shape[1]


register(nn.Embedding, name="embedding", slim=_slim_embedding)(_embedding_module)


def _embedding_fn(b: Builder, node: fx.Node):
    wn = node.args[0] if node.target is aten.embedding.default else arg(node, 1, "weight")
    w = _pmap(b, wn)
    if w is None:
        return rigid_from_val(b.val(node))
    return _embedding(b, node, w)


register(F.embedding, aten.embedding.default, name="embedding_fn")(_embedding_fn)


# --------------------------------------------------------------------------------------------
# normalisation


def _per_channel(b: Builder, x: TMap, cax: int, params) -> TMap:
    X = _chan_ids(b, x, cax) if x.ndim > cax else None
    for p in params:
        if p is not None:
            _tie(b, _ids0(p, 0), X, "normalised channels cannot change")
    return x


def _bn_module(b: Builder, node: fx.Node):
    x = b.tm(node.args[0])
    ps = [_mparam(b, node, n) for n in ("weight", "bias", "running_mean", "running_var")]
    cax = 1 if x.ndim >= 2 else 0
    return _per_channel(b, x, cax, ps)


def _slim_bn(s, node: fx.Node):
    mod = s.module(node)
    x_tm = s.tm(node.args[0])
    mod.num_features = s.new_shape(x_tm)[1 if x_tm.ndim >= 2 else 0]


register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
         nn.InstanceNorm2d, nn.InstanceNorm3d, name="batchnorm", slim=_slim_bn)(_bn_module)


def _bn_fn(b: Builder, node: fx.Node):
    x = b.tm(node.args[0])
    t = node.target
    if t is F.batch_norm:
        names = [arg(node, i, n) for i, n in ((1, "running_mean"), (2, "running_var"),
                                              (3, "weight"), (4, "bias"))]
    elif t is F.instance_norm:
        names = [arg(node, i, n) for i, n in ((1, "running_mean"), (2, "running_var"),
                                              (3, "weight"), (4, "bias"))]
    else:  # aten.batch_norm / _native_batch_norm_legit_no_training: (x, w, b, rm, rv, ...)
        names = [arg(node, i) for i in (1, 2, 3, 4)]
    out = _per_channel(b, x, 1, [_pmap(b, n) for n in names])
    v = b.val(node)
    if isinstance(v, (tuple, list)):
        return (out,) + tuple(rigid_from_val(t) for t in v[1:])
    return out


register(F.batch_norm, F.instance_norm, aten.batch_norm.default,
         aten._native_batch_norm_legit_no_training.default, aten.instance_norm.default,
         name="batchnorm_fn")(_bn_fn)


def _ln(b: Builder, node, x: TMap, k: int, w: TMap | None, bias: TMap | None) -> TMap:
    maps = [x] + [b.align(p, x.ndim) for p in (w, bias) if p is not None]
    return b.merge(maps, x.shape)


def _ln_module(b: Builder, node: fx.Node):
    mod = b.module(node)
    x = b.tm(node.args[0])
    return _ln(b, node, x, len(mod.normalized_shape), _mparam(b, node, "weight"),
               _mparam(b, node, "bias"))


def _slim_ln_module(s, node: fx.Node):
    mod = s.module(node)
    x_tm = s.tm(node.args[0])
    k = len(mod.normalized_shape)
    mod.normalized_shape = tuple(s.new_shape(x_tm)[-k:])


def _ln_dead(o, x_tm: TMap, k: int) -> bool:
    return any(x_tm.factor_of(a) is not None for a in range(x_tm.ndim - k, x_tm.ndim)) and o.dead(
        x_tm
    )


def _oracle_ln_module(o, node: fx.Node):
    mod = o.module(node)
    x_tm = o.tm(node.args[0])
    k = len(mod.normalized_shape)
    if not _ln_dead(o, x_tm, k):
        return
    from . import oracle_ops

    mask = o.const(o.mask(x_tm))
    w = o.const(mod.weight) if mod.weight is not None else None
    bb = o.const(mod.bias) if getattr(mod, "bias", None) is not None else None
    o.replace(node, oracle_ops.masked_layer_norm, (node.args[0], mask, k, w, bb, mod.eps))


register(nn.LayerNorm, name="layernorm", slim=_slim_ln_module, oracle=_oracle_ln_module)(
    _ln_module
)


def _ln_fn_args(node: fx.Node):
    shape = arg(node, 1, "normalized_shape")
    return shape, arg(node, 2, "weight"), arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5)


def _ln_fn(b: Builder, node: fx.Node):
    shape, w, bias, _ = _ln_fn_args(node)
    x = b.tm(node.args[0])
    out = _ln(b, node, x, len(shape), _pmap(b, w), _pmap(b, bias))
    v = b.val(node)
    if isinstance(v, (tuple, list)):
        return (out,) + tuple(rigid_from_val(t) for t in v[1:])
    return out


def _slim_ln_fn(s, node: fx.Node):
    shape = arg(node, 1, "normalized_shape")
    x_tm = s.tm(node.args[0])
    new = list(s.new_shape(x_tm)[-len(shape):])
    if new != list(shape):
        args = list(node.args)
        args[1] = new
        node.args = tuple(args)


def _oracle_ln_fn(o, node: fx.Node):
    shape, w, bias, eps = _ln_fn_args(node)
    x_tm = o.tm(node.args[0])
    if not _ln_dead(o, x_tm, len(shape)):
        return
    from . import oracle_ops

    mask = o.const(o.mask(x_tm))
    o.replace(node, oracle_ops.masked_layer_norm, (node.args[0], mask, len(shape), w, bias, eps))


register(F.layer_norm, aten.layer_norm.default, name="layernorm_fn", slim=_slim_ln_fn,
         oracle=_oracle_ln_fn)(_ln_fn)


def _gn(b: Builder, node, x: TMap, groups: int, w, bias) -> TMap:
    X = _chan_ids(b, x, 1)
    if X is not None:
        b.arrange(X.reshape(groups, -1))
    for p in (w, bias):
        if p is not None:
            _tie(b, _ids0(p, 0), X, "normalised channels cannot change")
    return x


def _gn_module(b: Builder, node: fx.Node):
    mod = b.module(node)
    return _gn(b, node, b.tm(node.args[0]), mod.num_groups, _mparam(b, node, "weight"),
               _mparam(b, node, "bias"))


def _slim_gn_module(s, node: fx.Node):
    mod = s.module(node)
    mod.num_channels = s.new_shape(s.tm(node.args[0]))[1]


def _oracle_gn_module(o, node: fx.Node):
    mod = o.module(node)
    x_tm = o.tm(node.args[0])
    if x_tm.factor_of(1) is None or not o.dead(x_tm):
        return
    from . import oracle_ops

    mask = o.const(o.mask(x_tm))
    w = o.const(mod.weight) if mod.weight is not None else None
    bb = o.const(mod.bias) if mod.bias is not None else None
    o.replace(node, oracle_ops.masked_group_norm, (node.args[0], mask, mod.num_groups, w, bb,
                                                   mod.eps))


register(nn.GroupNorm, name="groupnorm", slim=_slim_gn_module, oracle=_oracle_gn_module)(
    _gn_module
)


def _gn_fn(b: Builder, node: fx.Node):
    g = arg(node, 1, "num_groups")
    out = _gn(b, node, b.tm(node.args[0]), int(g), _pmap(b, arg(node, 2, "weight")),
              _pmap(b, arg(node, 3, "bias")))
    return out


def _oracle_gn_fn(o, node: fx.Node):
    x_tm = o.tm(node.args[0])
    if x_tm.factor_of(1) is None or not o.dead(x_tm):
        return
    from . import oracle_ops

    mask = o.const(o.mask(x_tm))
    o.replace(node, oracle_ops.masked_group_norm,
              (node.args[0], mask, arg(node, 1, "num_groups"), arg(node, 2, "weight"),
               arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5)))


register(F.group_norm, aten.group_norm.default, name="groupnorm_fn", oracle=_oracle_gn_fn)(_gn_fn)


def _prelu_module(b: Builder, node: fx.Node):
    x = b.tm(node.args[0])
    w = _mparam(b, node, "weight")
    return _per_channel(b, x, 1 if x.ndim >= 2 else 0, [w])


def _slim_prelu(s, node: fx.Node):
    mod = s.module(node)
    mod.num_parameters = mod.weight.numel()


register(nn.PReLU, name="prelu", slim=_slim_prelu)(_prelu_module)


# --------------------------------------------------------------------------------------------
# spatial ops: pooling, interpolation, padding


def _spatial(nsp_of):
    def rule(b: Builder, node: fx.Node):
        x = b.tm(node.args[0])
        v = b.val(node)
        outs = v if isinstance(v, (tuple, list)) else (v,)
        shape = tuple(outs[0].shape)
        nsp = nsp_of(b, node, x)
        keep = []
        for f in x.factors:
            if all(a < x.ndim - nsp and x.shape[a] == shape[a] for a in f.axes):
                keep.append(f)
            else:
                b.fix(f.ids, "pooling/padding over a channel axis")
        out = TMap(shape, tuple(keep))
        return tuple(out for _ in outs) if isinstance(v, (tuple, list)) else out

    return rule


def _nsp_from_name(b, node, x):
    name = type(b.module(node)).__name__ if node.op == "call_module" else str(
        getattr(node.target, "__name__", node.target)
    )
    for d in ("1d", "2d", "3d"):
        if d in name:
            return int(d[0])
    return max(x.ndim - 2, 1)


_POOL_MODULES = [
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.LPPool2d, nn.PixelShuffle if False else None,
]
_POOL_FUNCS = [
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample, F.lp_pool2d,
    aten.max_pool2d.default, aten.max_pool1d.default, aten.avg_pool2d.default,
    aten.avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default,
    aten._adaptive_avg_pool2d.default, aten.adaptive_max_pool2d.default,
    aten.max_pool2d_with_indices.default, aten.upsample_nearest2d.vec,
    aten.upsample_bilinear2d.vec, aten.upsample_nearest2d.default,
    aten.upsample_bilinear2d.default, F.max_pool2d_with_indices,
]
register(*_POOL_MODULES, *_POOL_FUNCS, name="spatial")(_spatial(_nsp_from_name))
def _pad(b: Builder, node: fx.Node):
    """Padding: axes whose pad pair is (0, 0) keep their channels; padded channel axes pin."""
    x = b.tm(node.args[0])
    shape = tuple(b.val(node).shape)
    pad = b.module(node).padding if node.op == "call_module" else arg(node, 1, "pad")
    if isinstance(pad, int):
        pad = (pad,) * (2 * (x.ndim - 2))
    padded = {x.ndim - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}
    keep = []
    for f in x.factors:
        if any(a in padded for a in f.axes):
            b.fix(f.ids, "padding of a channel axis")
        else:
            keep.append(f)
    return TMap(shape, tuple(keep))


register(nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
         nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d, F.pad, aten.pad.default,
         aten.constant_pad_nd.default, name="pad")(_pad)


# --------------------------------------------------------------------------------------------
# matmul and attention


def _matmul_maps(b: Builder, a: TMap, c: TMap, out_shape) -> TMap:
    a1, c1 = a.ndim == 1, c.ndim == 1
    if a1:
        a = a.insert_axis(0)
    if c1:
        c = c.insert_axis(1)
    nb = max(a.ndim, c.ndim) - 2
    a = b.align(a, nb + 2)
    c = b.align(c, nb + 2)
    batch = tuple(max(x, y) for x, y in zip(a.shape[:nb], c.shape[:nb]))
    n, k, m = a.shape[-2], a.shape[-1], c.shape[-1]
    af = a.insert_axis(nb + 2)  # [..., n, k, 1]
    cf = c.insert_axis(nb)  # [..., 1, k, m]
    merged = b.merge([af, cf], batch + (n, k, m))
    out = b.drop_axis(merged, nb + 1)
    if c1:
        out = b.drop_axis(out, out.ndim - 1) if out.shape[-1] == 1 else out
    if a1:
        out = b.drop_axis(out, out.ndim - 2) if out.shape[-2] == 1 else out
    if tuple(out.shape) != tuple(out_shape):
        out = b.reshape(out, out_shape)
    return out


def _matmul(b: Builder, node: fx.Node):
    a, c = b.tm(node.args[0]), b.tm(node.args[1])
    if not isinstance(a, TMap) or not isinstance(c, TMap):
        return rigid_from_val(b.val(node))
    return _matmul_maps(b, a, c, tuple(b.val(node).shape))


register(torch.matmul, "method:matmul", torch.bmm, "method:bmm", aten.matmul.default,
         aten.bmm.default, aten.mm.default, torch.mm, name="matmul", mixes=True)(_matmul)
register(__import__("operator").matmul, name="matmul_op", mixes=True)(_matmul)


def _sdpa(b: Builder, node: fx.Node):
    q, k, v = (b.tm(node.args[i]) for i in range(3))
    out_shape = tuple(b.val(node).shape)
    kt = k.permute(list(range(k.ndim - 2)) + [k.ndim - 1, k.ndim - 2])
    qs = list(q.shape[:-1]) + [k.shape[-2]]
    nb = max(q.ndim, k.ndim) - 2
    sb = [max(x, y) for x, y in zip(b.align(q, nb + 2).shape[:nb], b.align(kt, nb + 2).shape[:nb])]
    scores = _matmul_maps(b, q, kt, tuple(sb) + tuple(qs[-2:]))
    mask = arg(node, 3, "attn_mask")
    mtm = b.tm(mask) if isinstance(mask, fx.Node) else None
    if isinstance(mtm, TMap):
        scores = b.merge([b.align(scores, scores.ndim), b.align(mtm, scores.ndim)], scores.shape)
    return _matmul_maps(b, scores, v, out_shape)


def _slim_sdpa(s, node: fx.Node):
    if arg(node, 6, "scale") is not None or len(node.args) > 6:
        return
    q_tm = s.tm(node.args[0])
    e = q_tm.shape[-1]
    if s.new_shape(q_tm)[-1] != e:
        node.kwargs = {**node.kwargs, "scale": 1.0 / float(np.sqrt(e))}


register(F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default,
         name="sdpa", slim=_slim_sdpa, mixes=True)(_sdpa)


def _mha(b: Builder, node: fx.Node):
    """nn.MultiheadAttention: embed dims of q/k/v/out tied to the query's channels, per head."""
    mod: nn.MultiheadAttention = b.module(node)
    q = b.tm(arg(node, 0, "query"))
    k = b.tm(arg(node, 1, "key"))
    v = b.tm(arg(node, 2, "value"))
    E = _chan_ids(b, q, q.ndim - 1)
    v_out = b.val(node)
    if not mod._qkv_same_embed_dim or E is None or mod.bias_k is not None:
        for t in (q, k, v):
            b.fix_map(t, "nn.MultiheadAttention with separate/added k,v dims")
        return rigid_from_val(v_out)
    for t in (k, v):
        _tie(b, _chan_ids(b, t, t.ndim - 1), E, "attention embed dim")
    w_in = _mparam(b, node, "in_proj_weight")
    _tie(b, _ids0(w_in, 1), E, "attention embed dim")
    _tie(b, _ids0(w_in, 0), np.tile(E, 3), "attention embed dim")
    if mod.in_proj_bias is not None:
        _tie(b, _ids0(_mparam(b, node, "in_proj_bias"), 0), np.tile(E, 3), "attention embed dim")
    ow = b.param(f"{node.target}.out_proj.weight")
    _tie(b, _ids0(ow, 0), E, "attention embed dim")
    _tie(b, _ids0(ow, 1), E, "attention embed dim")
    if mod.out_proj.bias is not None:
        _tie(b, _ids0(b.param(f"{node.target}.out_proj.bias"), 0), E, "attention embed dim")
    b.arrange(E.reshape(mod.num_heads, -1))
    b.produce(E)
    out = q if tuple(v_out[0].shape) == q.shape else rigid_from_val(v_out[0])
    return (out, rigid_from_val(v_out[1]))


def _slim_mha(s, node: fx.Node):
    mod: nn.MultiheadAttention = s.module(node)
    e = mod.out_proj.weight.shape[0]
    e0 = mod.embed_dim
    if e != e0:  # MHA scales q by 1/sqrt(head_dim): keep the original scale
        f = float(np.sqrt(e / e0))
        with torch.no_grad():
            mod.in_proj_weight[:e].mul_(f)
            if mod.in_proj_bias is not None:
                mod.in_proj_bias[:e].mul_(f)
    mod.embed_dim = mod.kdim = mod.vdim = e
    mod.head_dim = e // mod.num_heads
    mod.out_proj.in_features = mod.out_proj.out_features = e


register(nn.MultiheadAttention, name="mha", slim=_slim_mha)(_mha)


def _channel_shuffle_module(b: Builder, node: fx.Node):
    mod = b.module(node)
    x = b.tm(node.args[0])
    g = mod.groups
    n, c = x.shape[0], x.shape[1]
    rest = x.shape[2:]
    y = b.reshape(x, (n, g, c // g) + rest)
    y = y.permute([0, 2, 1] + list(range(3, y.ndim)))
    return b.reshape(y, (n, c) + rest)


register(nn.ChannelShuffle, name="channel_shuffle")(_channel_shuffle_module)
register(F.pixel_shuffle if False else None, name="none")(_first)
