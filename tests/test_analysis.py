"""Analysis + slim + oracle on one tiny model per op-table row, through both tracing paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import check_prune
from ops_models import MODELS

import graphprune as gp


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_ops_verify(name, method, ratio):
    """Every op-row model prunes at several ratios and equals its oracle."""
    cls, mk = MODELS[name]
    check_prune(cls().eval(), mk(), ratio=ratio, method=method)


def test_oracle_differs_from_dense():
    """The oracle really removes channels: its output differs from the dense model's."""
    cls, mk = MODELS["residual"]
    m, x = cls().eval(), mk()
    a = gp.analyze(m, x)
    ref = gp.mask(a, gp.plan(a, gp.Uniform(0.5)))
    assert not torch.allclose(ref(*x), m(*x))


def test_residual_groups_couple_adds():
    """stem, c2 and the residual add are one group; c1's output is another."""
    m = MODELS["residual"][0]().eval()
    a = gp.analyze(m, MODELS["residual"][1]())
    by_member = {mem: g for g in a.groups for mem in g.members}
    stem = by_member["stem.weight[0]"]
    assert stem is by_member["c2.weight[0]"] is by_member["b2.weight[0]"]
    assert stem is by_member["c1.weight[1]"] is by_member["head.weight[1]"]  # consumers
    assert by_member["c1.weight[0]"] is not stem
    assert by_member["head.weight[0]"].prunable is False  # graph output
    assert "graph output" in by_member["head.weight[0]"].reason


def test_grouped_conv_rows_and_depthwise():
    """Grouped conv input keeps equal counts per group; depthwise couples in and out."""
    m = MODELS["grouped"][0]().eval()
    a = gp.analyze(m, MODELS["grouped"][1]())
    g_a = next(g for g in a.groups if "a.weight[0]" in g.members)
    assert g_a.rows is not None and g_a.rows.shape == (4, 4)
    p = gp.plan(a, gp.Uniform(0.5))
    slim = gp.apply(a, p)
    assert slim.g.groups == 4 and slim.g.in_channels == 8 and slim.dw.groups == 8


def test_shuffle_couples_branches():
    """Channel shuffle couples column j of every shuffle group."""
    m = MODELS["shuffle"][0]().eval()
    a = gp.analyze(m, MODELS["shuffle"][1]())
    g = next(g for g in a.groups if "a.weight[0]" in g.members)
    # a's first half is coupled column-wise with b's outputs by the shuffle; its second half feeds b
    assert g.prunable and g.size == 16 and "b.weight[0]" in g.members


def test_attention_heads_keep_equal_dims():
    """q/k/v dims are pruned per head: every head keeps the same head_dim."""
    m = MODELS["sdpa"][0]().eval()
    a = gp.analyze(m, MODELS["sdpa"][1]())
    qk = next(g for g in a.groups if "q.weight[0]" in g.members)
    assert "k.weight[0]" in qk.members and "v.weight[0]" not in qk.members
    assert qk.rows is not None and qk.rows.shape == (4, 4)
    p = gp.plan(a, gp.Uniform(0.5))
    kept = set(p.keep[qk.id])
    assert {sum(int(i) in kept for i in r) for r in qk.rows} == {2}


def test_unknown_op_is_unprunable_and_named():
    """An op without a rule (nn.LSTM) pins the channels it touches; the reason names it."""
    from ops_models import Unknown

    m = Unknown().eval()
    a = gp.analyze(m, torch.randn(2, 3, 4), method="fx")
    g = next(g for g in a.groups if "a.weight[0]" in g.members)
    assert not g.prunable and "LSTM" in g.reason and "lstm" in g.reason
    g2 = next(g for g in a.groups if "b.weight[0]" in g.members)
    assert g2.prunable
    check_prune(m, torch.randn(2, 3, 4), method="fx")


def test_graph_output_group_refused():
    """A plan that prunes a group reaching the output is refused with the reason."""
    m = MODELS["residual"][0]().eval()
    a = gp.analyze(m, MODELS["residual"][1]())
    out = next(g for g in a.groups if not g.prunable)
    bad = gp.Plan({out.id: (0,)}, {g.id: g.size for g in a.groups})
    with pytest.raises(gp.PlanError, match="not prunable"):
        gp.apply(a, bad)


def test_empty_layer_refused():
    """Removing every channel of a group is refused; Uniform(1.0) is refused too."""
    m = MODELS["residual"][0]().eval()
    a = gp.analyze(m, MODELS["residual"][1]())
    g = a.prunable_groups[0]
    with pytest.raises(gp.PlanError, match="empty"):
        gp.apply(a, gp.Plan({g.id: ()}, {x.id: x.size for x in a.groups}))
    with pytest.raises(gp.PlanError, match="empty"):
        gp.Uniform(1.0)


def test_untraceable_model_error_names_line():
    """A model neither path can trace gets an error naming the module and source line."""

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.c(x)
            return self.c(x).relu()

    with pytest.raises(gp.TraceError) as e:
        gp.analyze(Bad(), torch.randn(2, 4))
    msg = str(e.value)
    assert "Bad" in msg and "test_analysis.py" in msg and "x.sum() > 0" in msg


def test_dict_and_multiple_inputs_structure_kept():
    """Several inputs and a dict output: the slimmed model returns the same structure."""
    cls, mk = MODELS["dictout"]
    m, x = cls().eval(), mk()
    _, _, slim = check_prune(m, x)
    out = slim(*x)
    assert isinstance(out, dict) and set(out) == {"logits", "aux"}


def test_plan_json_roundtrip():
    m = MODELS["attention"][0]().eval()
    a = gp.analyze(m, MODELS["attention"][1]())
    p = gp.plan(a, gp.Uniform(0.5))
    q = gp.Plan.from_json(p.to_json())
    assert dict(q.keep) == dict(p.keep) and dict(q.sizes) == dict(p.sizes)
    assert np.array_equal(q.alive(a), p.alive(a))


def test_l1_importance_hand_made():
    """L1 group importance sums |w| of every member (producer rows + consumer columns)."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 3, bias=False)
            self.b = nn.Linear(3, 1, bias=False)

        def forward(self, x):
            return self.b(self.a(x))

    m = Two()
    with torch.no_grad():
        m.a.weight.copy_(torch.tensor([[1.0, -1.0], [0.1, 0.1], [3.0, 0.0]]))
        m.b.weight.copy_(torch.tensor([[0.5, -2.0, 0.0]]))
    a = gp.analyze(m, torch.randn(4, 2))
    from graphprune.importance import score

    g = next(g for g in a.groups if "a.weight[0]" in g.members)
    s = score(a, "l1")[g.id]
    assert np.allclose(s, [2.0 + 0.5, 0.2 + 2.0, 3.0 + 0.0])
    p = gp.plan(a, gp.Uniform(0.34))
    assert p.keep[g.id] == (0, 2)  # channel 1 has the smallest group L1
