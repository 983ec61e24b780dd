"""Sparse weight masks: uniform 1xN blocks (SUBP) and 2:4 (NVIDIA Sparse Tensor Cores).

Weights are conv ``[K, C, R, S]`` or linear ``[K, C]`` (K outputs, C inputs). Every mask is a
bool tensor of the weight's shape, True where a weight is kept.

* 1xN: a block is N consecutive output channels x one input channel x all kernel taps. Every
  group of N outputs keeps the same number of input channels (uniform), chosen by block score
  (L1 of the block unless a score is given).
* 2:4: along the reduction axis, flattened as (K, R, S, C) for conv so that groups of 4 run
  along C, keep the 2 weights of largest magnitude in every group of 4.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "block_cover_1xn",
    "block_scores_1xn",
    "groups_differ_1xn",
    "kept_1xn",
    "mask_1xn",
    "mask_24",
    "is_1xn",
    "is_24",
]


def _check_weight(weight: Tensor, what: str) -> None:
    if weight.dim() not in (2, 4):
        raise ValueError(
            f"{what}: expected a linear [K, C] or conv [K, C, R, S] weight, got shape "
            f"{tuple(weight.shape)}"
        )


def _check_groups(k: int, n: int, what: str) -> None:
    if n < 1:
        raise ValueError(f"{what}: block size N must be >= 1, got {n}")
    if k % n != 0:
        raise ValueError(
            f"{what}: output channels K={k} are not divisible by the block size N={n} "
            f"(1xN needs K % N == 0)"
        )


def kept_1xn(in_channels: int, sparsity: float) -> int:
    """Input channels kept per output group: ``C - round(sparsity * C)``, at least 1."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return max(1, in_channels - int(round(sparsity * in_channels)))


def block_scores_1xn(weight: Tensor, n: int) -> Tensor:
    """L1 norm of every 1xN block: ``[K / N, C]`` (float32)."""
    _check_weight(weight, "block_scores_1xn")
    k, c = weight.shape[:2]
    _check_groups(k, n, "block_scores_1xn")
    w = weight.detach().abs().float().reshape(k // n, n, c, -1)
    return w.sum(dim=(1, 3))


def _expand_blocks(block_mask: Tensor, weight: Tensor, n: int) -> Tensor:
    """[G, C] block mask -> bool mask of the weight's shape."""
    k, c = weight.shape[:2]
    taps = weight[0, 0].numel()
    m = block_mask[:, None, :, None].expand(k // n, n, c, taps)
    return m.reshape(weight.shape).clone()


def mask_1xn(weight: Tensor, n: int, sparsity: float, score: Tensor | None = None) -> Tensor:
    """Uniform 1xN mask: every group of N outputs keeps the same top-scoring input channels count.

    Each group keeps ``C - round(sparsity * C)`` (at least 1) input channels, ranked by ``score``
    ``[K / N, C]`` when given, else by block L1. Ties keep the lower channel index.
    Raises ValueError when ``K % n != 0``.
    """
    _check_weight(weight, "mask_1xn")
    k, c = weight.shape[:2]
    _check_groups(k, n, "mask_1xn")
    kept = kept_1xn(c, sparsity)
    if score is None:
        score = block_scores_1xn(weight, n)
    elif tuple(score.shape) != (k // n, c):
        raise ValueError(
            f"mask_1xn: score must have shape [K/N, C] = {(k // n, c)}, got {tuple(score.shape)}"
        )
    order = torch.sort(score.detach().float(), dim=1, descending=True, stable=True).indices
    block = torch.zeros(k // n, c, dtype=torch.bool, device=weight.device)
    block.scatter_(1, order[:, :kept].to(weight.device), True)
    return _expand_blocks(block, weight, n)


def _to_kgc4(t: Tensor, what: str) -> tuple[Tensor, tuple[int, ...]]:
    """Flatten to [..., C/4, 4] along the reduction axis (C last); return the permuted shape."""
    c = t.shape[1]
    if c % 4 != 0:
        raise ValueError(
            f"{what}: input channels C={c} are not divisible by 4 (2:4 needs C % 4 == 0)"
        )
    p = t.permute(0, 2, 3, 1) if t.dim() == 4 else t
    return p.reshape(-1, c // 4, 4), tuple(p.shape)


def mask_24(weight: Tensor) -> Tensor:
    """2:4 mask: keep the 2 largest |w| of every 4 consecutive weights along C.

    Conv weights are flattened as (K, R, S, C) so the groups of 4 run along input channels.
    Raises ValueError when ``C % 4 != 0``. Ties keep the lower channel index.
    """
    _check_weight(weight, "mask_24")
    g, pshape = _to_kgc4(weight.detach().abs().float(), "mask_24")
    # stable descending sort keeps the lower index among equal magnitudes
    top = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :2]
    m = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True).reshape(pshape)
    return (m.permute(0, 3, 1, 2) if weight.dim() == 4 else m).contiguous()


def is_1xn(mask: Tensor, n: int) -> bool:
    """True when ``mask`` is exactly a uniform 1xN pattern.

    Every block (N outputs x 1 input x all taps) is all-True or all-False, and every group of N
    outputs keeps the same number of blocks. False (never an error) for K % n != 0. For weights,
    pass ``weight != 0`` (a kept weight that is exactly zero breaks the all-or-nothing rule).
    """
    blocks = _cover_blocks(mask, n)  # the blocks holding any True, if as many in every group
    if blocks is None:
        return False
    k, c = mask.shape[:2]
    return torch.equal(mask.bool().reshape(k // n, n, c, -1).all(dim=3).all(dim=1), blocks)


def _cover_blocks(nonzero: Tensor, n: int) -> Tensor | None:
    """[K / N, C]: which blocks hold a nonzero; None unless every group holds as many."""
    if nonzero.dim() not in (2, 4) or n < 1 or nonzero.shape[0] % n != 0:
        return None
    k, c = nonzero.shape[:2]
    blocks = nonzero.bool().reshape(k // n, n, c, -1).any(dim=3).any(dim=1)
    counts = blocks.sum(dim=1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        return None
    return blocks


def block_cover_1xn(nonzero: Tensor, n: int) -> Tensor | None:
    """The uniform 1xN mask of the blocks that hold a nonzero weight (pass ``weight != 0``), or
    None when groups of N outputs hold different numbers of such blocks or ``K % n != 0``.

    Unlike :func:`is_1xn` a kept block may contain exact zeros (a trained weight can be exactly
    zero): the sparse op stores them as values, so it still computes exactly the weight's conv.
    """
    blocks = _cover_blocks(nonzero, n)
    return None if blocks is None else _expand_blocks(blocks, nonzero, n)


def groups_differ_1xn(nonzero: Tensor, n: int) -> bool:
    """True when ``nonzero`` (``weight != 0``) has a uniform 1xN block cover whose groups keep
    different input channels: a pattern only a 1xN op exploits. (Groups that all keep the same
    channels are plain input-channel pruning, which slimming removes.)"""
    blocks = _cover_blocks(nonzero, n)
    return blocks is not None and not bool((blocks == blocks[0]).all())


def is_24(mask: Tensor) -> bool:
    """True when at most 2 of every 4 consecutive entries along C (conv: (K, R, S, C)) are set.

    A mask made by ``mask_24`` has exactly 2 of 4; ``weight != 0`` of a 2:4 weight may have
    fewer. False (never an error) for C % 4 != 0.
    """
    if mask.dim() not in (2, 4) or mask.shape[1] % 4 != 0:
        return False
    g, _ = _to_kgc4(mask.bool(), "is_24")
    return bool((g.sum(dim=-1) <= 2).all())
