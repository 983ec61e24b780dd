"""Masked reference implementations of ops that reduce over channels (used by the oracle).

`mask` is a bool tensor broadcastable to x: True where the channel is kept. Each function equals
the op computed on the kept channels alone, with zeros at removed positions.
"""

from __future__ import annotations

import torch

__all__ = [
    "masked_layer_norm",
    "masked_group_norm",
    "masked_mean",
    "masked_var",
    "masked_std",
    "masked_amax",
    "masked_amin",
    "masked_logsumexp",
    "masked_softmax",
    "keep",
]


def _count(mask: torch.Tensor, x: torch.Tensor, dims, keepdim: bool) -> torch.Tensor:
    m = mask.expand_as(x).to(x.dtype)
    return m.sum(dim=dims, keepdim=keepdim)


def masked_mean(x, mask, dims, keepdim=False, correction=0):
    xm = torch.where(mask, x, torch.zeros((), dtype=x.dtype))
    return xm.sum(dim=dims, keepdim=keepdim) / _count(mask, x, dims, keepdim)


def masked_var(x, mask, dims, keepdim=False, correction=1):
    mu = masked_mean(x, mask, dims, keepdim=True)
    d = torch.where(mask, x - mu, torch.zeros((), dtype=x.dtype))
    n = _count(mask, x, dims, keepdim)
    return (d * d).sum(dim=dims, keepdim=keepdim) / (n - correction)


def masked_std(x, mask, dims, keepdim=False, correction=1):
    return masked_var(x, mask, dims, keepdim, correction).sqrt()


def masked_amax(x, mask, dims, keepdim=False, correction=0):
    return torch.where(mask, x, torch.full((), -torch.inf, dtype=x.dtype)).amax(dims, keepdim)


def masked_amin(x, mask, dims, keepdim=False, correction=0):
    return torch.where(mask, x, torch.full((), torch.inf, dtype=x.dtype)).amin(dims, keepdim)


def masked_logsumexp(x, mask, dims, keepdim=False, correction=0):
    xm = torch.where(mask, x, torch.full((), -torch.inf, dtype=x.dtype))
    return torch.logsumexp(xm, dim=dims, keepdim=keepdim)


def masked_softmax(x, mask, dim, log=False):
    xm = torch.where(mask, x, torch.full((), -torch.inf, dtype=x.dtype))
    y = torch.log_softmax(xm, dim) if log else torch.softmax(xm, dim)
    return torch.where(mask, y, torch.zeros((), dtype=x.dtype))


def masked_layer_norm(x, mask, k, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(x.ndim - k, x.ndim))
    mu = masked_mean(x, mask, dims, keepdim=True)
    var = masked_var(x, mask, dims, keepdim=True, correction=0)
    y = (x - mu) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return torch.where(mask, y, torch.zeros((), dtype=x.dtype))


def masked_group_norm(x, mask, num_groups, weight=None, bias=None, eps=1e-5):
    n, c = x.shape[0], x.shape[1]
    xs = x.reshape(n, num_groups, c // num_groups, *x.shape[2:])
    m = mask.expand_as(x).reshape(n, num_groups, c // num_groups, *x.shape[2:])
    dims = tuple(range(2, xs.ndim))
    mu = masked_mean(xs, m, dims, keepdim=True)
    var = masked_var(xs, m, dims, keepdim=True, correction=0)
    y = ((xs - mu) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return torch.where(mask, y, torch.zeros((), dtype=x.dtype))


def keep(x, mask):
    """x with removed positions zeroed (NaN/inf there are cleared too)."""
    out = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return out.contiguous() if x.is_contiguous() else out
