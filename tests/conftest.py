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

torch.set_num_threads(1)  # tests check numbers, not speed; one thread is faster on a busy 2-core box


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


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip without CUDA; `slow` sweeps run in CI (CI=true) or with GRAPHPRUNE_SLOW=1."""
    run_slow = os.environ.get("GRAPHPRUNE_SLOW") == "1" or os.environ.get("CI") == "true"
    no_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    no_slow = pytest.mark.skip(reason="slow sweep: set GRAPHPRUNE_SLOW=1 (CI runs it)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(no_slow)


@pytest.fixture
def semi24_cpu(monkeypatch):
    """The 2:4 kernel path on the CPU with torch's compressed tensor (see tests/semi24_cpu.py)."""
    import warnings

    from semi24_cpu import install

    install(monkeypatch)
    with warnings.catch_warnings():  # (torch: "prototype stage" on every compressed tensor)
        warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*")
        yield
