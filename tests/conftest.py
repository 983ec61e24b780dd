"""Shared test helpers: the `check_pass`-style oracle check used by every pruning test."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", category=FutureWarning)

import graphprune as gp  # noqa: E402


def check_prune(model, inputs, ratio=0.5, method="auto", importance="l1", expect_pruned=True):
    """Analyze, plan, apply (verified), then assert the slimmed model is really smaller and the
    user's model is untouched. Returns (analysis, plan, slim)."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = gp.analyze(model, inputs, method=method)
    p = gp.plan(a, gp.Uniform(ratio), importance)
    slim = gp.apply(a, p)
    rep = slim.graphprune_report
    assert rep["max_rel_err_fp32"] < 1e-4
    assert rep["max_rel_err_fp64"] is None or rep["max_rel_err_fp64"] < 1e-9
    if expect_pruned:
        assert p.keep, "nothing was pruned"
        n0 = sum(t.numel() for t in model.parameters())
        n1 = sum(t.numel() for t in slim.parameters())
        assert n1 < n0
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"user's model changed at {k}"
    return a, p, slim


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
