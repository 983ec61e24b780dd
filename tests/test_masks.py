"""Sparse masks: 1xN blocks and 2:4 hold their pattern exactly, with exact kept counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphprune.kernels.masks import (
    block_cover_1xn,
    block_scores_1xn,
    groups_differ_1xn,
    is_1xn,
    is_24,
    kept_1xn,
    mask_1xn,
    mask_24,
)

SETTINGS = settings(max_examples=50, deadline=None)


def _weight(k: int, c: int, r: int | None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (k, c) if r is None else (k, c, r, r)
    return torch.randn(shape, generator=g)


@SETTINGS
@given(
    groups=st.integers(1, 4),
    n=st.sampled_from([1, 2, 4, 8, 16]),
    c=st.integers(1, 40),
    r=st.sampled_from([None, 1, 3]),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_mask_1xn_pattern_and_counts(groups, n, c, r, sparsity, seed):
    """mask_1xn is a uniform 1xN pattern keeping exactly C - round(s*C) (>= 1) per group."""
    w = _weight(groups * n, c, r, seed)
    m = mask_1xn(w, n, sparsity)
    assert m.shape == w.shape and m.dtype == torch.bool
    assert is_1xn(m, n)
    kept = max(1, c - int(round(sparsity * c)))
    assert kept_1xn(c, sparsity) == kept
    per_group = m.reshape(groups, n, c, -1)[:, 0, :, 0].sum(dim=1)
    assert torch.equal(per_group, torch.full((groups,), kept))


def test_mask_1xn_keeps_highest_l1_blocks():
    """Default ranking is the block L1 norm: the heaviest input channels survive."""
    w = torch.ones(8, 6, 3, 3) * 0.01
    w[:4, 2] = 5.0  # group 0 favours channel 2
    w[4:, 5] = -7.0  # group 1 favours channel 5 (sign does not matter)
    m = mask_1xn(w, 4, 5 / 6)
    assert m[:4, 2].all() and m[:4].sum() == 4 * 9
    assert m[4:, 5].all() and m[4:].sum() == 4 * 9
    assert torch.allclose(block_scores_1xn(w, 4)[0, 2], torch.tensor(4 * 9 * 5.0))


def test_mask_1xn_uses_given_score():
    """A score [K/N, C] overrides the L1 ranking."""
    w = _weight(4, 5, 3)
    score = torch.tensor([[0.0, 9.0, 0.0, 8.0, 0.0]])
    m = mask_1xn(w, 4, 0.6, score=score)
    assert m[:, [1, 3]].all() and not m[:, [0, 2, 4]].any()
    with pytest.raises(ValueError, match="score must have shape"):
        mask_1xn(w, 4, 0.5, score=torch.zeros(2, 5))


def test_mask_1xn_errors():
    """Non-divisible K, a bad sparsity or a bad weight rank raise ValueError naming the problem."""
    with pytest.raises(ValueError, match=r"K=10 .*N=4"):
        mask_1xn(torch.randn(10, 8), 4, 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        mask_1xn(torch.randn(8, 8), 4, 1.5)
    with pytest.raises(ValueError, match="weight"):
        mask_1xn(torch.randn(8, 8, 3), 4, 0.5)


def test_is_1xn_rejects_broken_patterns():
    """Partial blocks, uneven groups and indivisible K are not 1xN."""
    m = mask_1xn(_weight(8, 6, 3), 4, 0.5)
    assert is_1xn(m, 4)
    assert not is_1xn(m, 3)  # K=8 not divisible by 3
    partial = m.clone()
    partial[0, m[0, :, 0, 0].nonzero()[0, 0], 1, 1] = False
    assert not is_1xn(partial, 4)
    uneven = m.clone()
    uneven[4:] = False
    uneven[4:, 0] = True
    uneven[4:, 1] = True
    uneven[4:, 2] = True
    uneven[4:, 3] = True  # group 1 keeps 4 channels, group 0 keeps 3
    assert not is_1xn(uneven, 4)
    assert is_1xn(torch.ones(8, 6, dtype=torch.bool), 4)


def test_block_cover_1xn_tolerates_zeros_inside_kept_blocks():
    """A trained 1xN weight may hold exact zeros in its kept blocks: `weight != 0` is then not
    1xN, but its block cover is the original mask; uneven groups and indivisible K give None."""
    w = _weight(8, 6, 3)
    m = mask_1xn(w, 4, 0.5)
    nz = (w * m) != 0
    c = int(m[0, :, 0, 0].nonzero()[0, 0])
    nz[1, c, 2, 0] = False  # an exactly-zero weight inside a kept block
    assert not is_1xn(nz, 4)
    cover = block_cover_1xn(nz, 4)
    assert cover is not None and torch.equal(cover, m) and is_1xn(cover, 4)
    assert block_cover_1xn(nz, 3) is None  # K=8 not divisible by 3
    uneven = m.clone()
    uneven[4:, :] = True  # group 1 keeps every channel, group 0 half of them
    assert block_cover_1xn(uneven, 4) is None
    dense = torch.ones(8, 6, 3, 3, dtype=torch.bool)
    assert torch.equal(block_cover_1xn(dense, 4), dense)
    # a real pattern (groups keep different channels) vs plain input-channel pruning
    assert not torch.equal(m[0], m[4]) and groups_differ_1xn(nz, 4)
    same = torch.zeros(8, 6, 3, 3, dtype=torch.bool)
    same[:, :3] = True  # both groups keep channels 0..2
    assert block_cover_1xn(same, 4) is not None and not groups_differ_1xn(same, 4)
    assert not groups_differ_1xn(dense, 4) and not groups_differ_1xn(uneven, 4)


@SETTINGS
@given(
    k=st.integers(1, 12),
    c4=st.integers(1, 10),
    r=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 1000),
)
def test_mask_24_pattern(k, c4, r, seed):
    """mask_24 keeps exactly 2 of every 4 along C, the 2 largest magnitudes."""
    w = _weight(k, 4 * c4, r, seed)
    m = mask_24(w)
    assert m.shape == w.shape and is_24(m)
    flat = (w.permute(0, 2, 3, 1) if w.dim() == 4 else w).reshape(-1, 4)
    mf = (m.permute(0, 2, 3, 1) if m.dim() == 4 else m).reshape(-1, 4)
    assert torch.equal(mf.sum(dim=1), torch.full((flat.shape[0],), 2))
    kept_min = torch.where(mf, flat.abs(), torch.inf).min(dim=1).values
    dropped_max = torch.where(mf, -torch.inf, flat.abs()).max(dim=1).values
    assert (kept_min >= dropped_max).all()


def test_mask_24_groups_run_along_input_channels():
    """For conv the groups of 4 are (k, r, s, c..c+3), not consecutive taps."""
    w = torch.zeros(1, 4, 2, 2)
    w[0, 1] = 3.0
    w[0, 3] = -2.0
    m = mask_24(w)
    assert m[0, 1].all() and m[0, 3].all() and not m[0, 0].any() and not m[0, 2].any()


def test_mask_24_errors_and_checker():
    """C % 4 != 0 raises; is_24 rejects 3 of 4 and accepts fewer than 2."""
    with pytest.raises(ValueError, match=r"C=6 .*divisible by 4"):
        mask_24(torch.randn(4, 6, 3, 3))
    assert not is_24(torch.ones(2, 6, dtype=torch.bool))
    m = torch.tensor([[True, True, False, False, True, False, False, False]])
    assert is_24(m)
    m[0, 2] = True
    assert not is_24(m)
