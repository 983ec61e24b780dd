"""Every zoo architecture is analysed, pruned at several ratios and verified against its oracle;
exact parameter counts after pruning match hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import check_prune

import graphprune as gp
from graphprune.zoo import ZOO

NEGATIVE = {"lstm", "custom_op"}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_prunes_and_verifies(name):
    """fx path at 50%: the model shrinks and equals its oracle."""
    m, x = ZOO[name]()
    check_prune(m, x, ratio=0.5, method="fx")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_export_path(name):
    """export path at 70%."""
    m, x = ZOO[name]()
    check_prune(m, x, ratio=0.7, method="export")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("ratio", [0.2, 0.9])
@pytest.mark.parametrize("method", ["fx", "export"])
def test_zoo_ratio_sweep(name, ratio, method):
    """slow sweep: both paths at the extremes."""
    m, x = ZOO[name]()
    check_prune(m, x, ratio=ratio, method=method)


@pytest.mark.parametrize("name", ["lstm", "custom_op"])
def test_negative_models_name_the_op(name):
    """Models with ops no rule knows: the touched groups are unprunable and say which node."""
    m, x = ZOO[name]()
    a = gp.analyze(m, x, method="fx")
    pinned = [g for g in a.groups if not g.prunable and "no rule" in g.reason]
    assert pinned, a.summary()
    assert all("node `" in g.reason for g in pinned)


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_exact_params_mlp():
    """Linear 16->32->24->5 at 50%: hidden 32->16, 24->12; hand count."""
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))
    _, _, slim = check_prune(m.eval(), (torch.randn(2, 16),), ratio=0.5)
    assert _count(slim) == (16 * 16 + 16) + (16 * 12 + 12) + (12 * 5 + 5)


def test_exact_params_residual_bottleneck():
    """conv-bn stem + bottleneck with identity residual + head, 50% of every group."""

    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16)
            self.c1, self.b1 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c3, self.b3 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            x = torch.relu(self.bn(self.stem(x)))
            y = torch.relu(self.b1(self.c1(x)))
            y = torch.relu(self.b2(self.c2(y)))
            x = torch.relu(x + self.b3(self.c3(y)))
            return self.fc(x.mean((2, 3)))

    _, _, slim = check_prune(B().eval(), (torch.randn(2, 3, 8, 8),), ratio=0.5)
    s, h = 8, 4  # stream 16 -> 8, bottleneck 8 -> 4
    expect = (3 * 9 * s + 2 * s) + (s * h + 2 * h) + (h * h * 9 + 2 * h) + (h * s + 2 * s)
    expect += s * 4 + 4
    assert _count(slim) == expect


def test_exact_params_depthwise_se():
    """MobileNet-style: expand 1x1, depthwise 3x3, SE (reduce 4), project; expand group at 50%."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Conv2d(4, 16, 1)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.s1, self.s2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
            self.p = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            y = torch.relu(self.dw(torch.relu(self.e(x))))
            y = y * torch.sigmoid(self.s2(torch.relu(self.s1(y.mean((2, 3), keepdim=True)))))
            return self.p(y)

    _, _, slim = check_prune(M().eval(), (torch.randn(2, 4, 6, 6),), ratio=0.5)
    c, r = 8, 2  # expand/depthwise/SE-scale group 16 -> 8, SE reduce 4 -> 2
    expect = (4 * c + c) + (c * 9 + c) + (c * r + r) + (r * c + c) + (c * 4 + 4)
    assert _count(slim) == expect
