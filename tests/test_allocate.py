"""Cost-constrained allocation: budgets, round_to, min_channels, ignore, infeasible targets,
and the importance criteria on hand-made weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import check_prune

import graphprune as gp
from graphprune.allocate import cost_layers
from graphprune.importance import score
from graphprune.report import count_macs
from graphprune.zoo import ZOO


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "densenet", "shufflenet_v2", "vit"])
@pytest.mark.parametrize("frac", [0.3, 0.6])
def test_flops_budget_respected(name, frac):
    """Predicted conv/linear FLOPs stay within budget; measured MACs of CNNs follow."""
    m, x = ZOO[name]()
    a = gp.analyze(m, x)
    p = gp.plan(a, gp.Flops(frac), round_to=4)
    assert p.meta["predicted_cost"] <= p.meta["budget"] * (1 + 1e-9)
    slim = gp.apply(a, p)
    ratio = count_macs(slim, x) / count_macs(m, x)  # attention matmuls are costed too
    assert ratio <= frac * 1.02, ratio


def test_params_budget_and_proven_gap():
    m, x = ZOO["resnet18"]()
    a = gp.analyze(m, x)
    p = gp.plan(a, gp.Params(0.4), round_to=8)
    assert p.meta["solver_status"] in ("OPTIMAL", "FEASIBLE")
    assert p.meta["proven_gap"] <= 1e-3
    slim = gp.apply(a, p)
    n0 = sum(t.numel() for t in m.parameters())
    n1 = sum(t.numel() for t in slim.parameters())
    assert n1 / n0 <= 0.42  # conv/linear params are budgeted; BN adds a little


def test_round_to_and_min_channels_hold():
    m, x = ZOO["resnet18"]()
    a = gp.analyze(m, x)
    p = gp.plan(a, gp.Flops(0.6), round_to=8, min_channels=16)
    for gid, kept in p.keep.items():
        g = a.groups[gid]
        assert len(kept) % 8 == 0 or len(kept) == g.size
        assert len(kept) >= min(16, g.size)


def test_ignore_keeps_module_groups_whole():
    m, x = ZOO["resnet18"]()
    a = gp.analyze(m, x)
    p = gp.plan(a, gp.Flops(0.5), ignore=["layer1"])
    for gid in p.keep:
        assert not any(mem.startswith("layer1.") for mem in a.groups[gid].members)


def test_unprunable_groups_untouched():
    m, x = ZOO["vit"]()
    a = gp.analyze(m, x)
    p = gp.plan(a, gp.Flops(0.5))
    pinned = {g.id for g in a.groups if not g.prunable}
    assert pinned and not (pinned & set(p.keep))


def test_infeasible_target_states_smallest_cost():
    m, x = ZOO["resnet18"]()
    a = gp.analyze(m, x)
    with pytest.raises(gp.PlanError, match="smallest achievable cost"):
        gp.plan(a, gp.Flops(0.001))


def test_cost_layers_concat_terms():
    """DenseNet layers see concatenations: c_in is a sum of group counts."""
    m, x = ZOO["densenet"]()
    a = gp.analyze(m, x)
    multi = [L for L in cost_layers(a) if len(L.in_terms) > 1]
    assert multi, "expected concat inputs"
    for L in multi:
        assert L.in_const + sum(a.groups[g].size * k for g, k in L.in_terms) == L.c_in


def test_flops_target_verifies_and_meta_summary():
    m, x = ZOO["mobilenet_v2"]()
    _, p, _ = (lambda a: (a, gp.plan(a, gp.Flops(0.5)), None))(gp.analyze(m, x))
    text = p.summary()
    assert "solver_status" in text and "proven_gap" in text
    check_prune(m, x, ratio=0.5)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.o = nn.Conv2d(3, 1, 1, bias=False)

    def forward(self, x):
        return self.o(torch.relu(self.bn(self.c(x))))


def _tiny():
    m = _Tiny().eval()
    with torch.no_grad():
        m.c.weight.copy_(torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 0.5]).reshape(3, 2, 1, 1))
        m.bn.weight.copy_(torch.tensor([0.1, -3.0, 1.0]))
        m.bn.bias.zero_()
        m.o.weight.copy_(torch.tensor([2.0, 1.0, -4.0]).reshape(1, 3, 1, 1))
    return m


def _group(a):
    return next(g for g in a.groups if "c.weight[0]" in g.members)


def test_bn_scale_hand_made():
    m = _tiny()
    a = gp.analyze(m, torch.randn(2, 2, 1, 1))
    assert np.allclose(score(a, "bn_scale")[_group(a).id], [0.1, 3.0, 1.0])


def test_output_l1_hand_made():
    """Mean |activation| at the conv output: x = ones -> channel sums of c.weight."""
    m = _tiny()
    a = gp.analyze(m, torch.randn(2, 2, 1, 1))
    s = score(a, "output_l1", data=[torch.ones(4, 2, 1, 1)])
    assert np.allclose(s[_group(a).id], [1.0, 1.0, 1.0])


def test_taylor_hand_made():
    """|sum w*dL/dw| at the consumer's input channels equals |w_o,c * act_c| for L = out."""
    m = _tiny()
    x = torch.ones(1, 2, 1, 1)
    a = gp.analyze(m, x)
    s = score(a, "taylor", data=[x], loss_fn=lambda out: out.sum())
    with torch.no_grad():
        act = torch.relu(m.bn(m.c(x))).flatten()
    expect = (m.o.weight.detach().flatten() * act).abs().double().numpy()
    assert np.allclose(s[_group(a).id], expect)


def test_user_callable_importance():
    m, x = ZOO["resnet18"]()
    a = gp.analyze(m, x)
    p = gp.plan(a, gp.Uniform(0.5), importance=lambda an: {g.id: np.arange(g.size, dtype=float)
                                                          for g in an.groups})
    for gid, kept in p.keep.items():
        n = a.groups[gid].size
        assert kept == tuple(range(n - len(kept), n))


def test_random_importance_is_seeded():
    m, x = ZOO["resnet18"]()
    a = gp.analyze(m, x)
    p1 = gp.plan(a, gp.Uniform(0.5), importance="random", seed=1)
    p2 = gp.plan(a, gp.Uniform(0.5), importance="random", seed=1)
    assert dict(p1.keep) == dict(p2.keep)


def test_taylor_prune_end_to_end():
    m, x = ZOO["resnet18"]()
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    slim = gp.prune(m, x, target=gp.Flops(0.5), importance="taylor", data=data,
                    loss_fn=F.cross_entropy, round_to=4)
    assert slim.graphprune_report["max_rel_err_fp32"] < 1e-4


def test_transformer_flops_include_attention_and_verify():
    """Attention matmuls are costed: measured MACs follow the target; aggressive Swin verifies."""
    for name, frac in (("vit", 0.3), ("swin", 0.25)):
        m, x = ZOO[name]()
        a = gp.analyze(m, x)
        p = gp.plan(a, gp.Flops(frac))
        slim = gp.apply(a, p)
        assert count_macs(slim, x) / count_macs(m, x) <= frac * 1.01


def test_min_fraction_floor():
    m, x = ZOO["swin"]()
    a = gp.analyze(m, x)
    p = gp.plan(a, gp.Flops(0.25), min_fraction=0.25)
    for gid, kept in p.keep.items():
        assert len(kept) >= 0.25 * a.groups[gid].size


def test_slimmed_model_deepcopies_and_pickles():
    import copy
    import pickle

    m, x = ZOO["resnet18"]()
    slim = gp.prune(m, x, target=gp.Flops(0.5), round_to=8)
    c = copy.deepcopy(slim)
    assert torch.equal(c(*x), slim(*x))
    q = pickle.loads(pickle.dumps(slim.graphprune_plan))
    assert dict(q.keep) == dict(slim.graphprune_plan.keep)


# ----------------------------------------------------------------------------- latency targets
def _latency_table(a, x, context=None):
    """A latency table from an analytic timer (no timing) with linear op-overhead curves."""
    from graphprune import cost as C

    reqs = {}
    for L in cost_layers(a):
        ci, co = reqs.get(L.sig, (0, 0))
        reqs[L.sig] = (max(ci, L.c_in), max(co, L.c_out))

    def timer(sig, ci, co):  # a staircase in c_in, like a real kernel
        return 0.002 + C.macs(sig, 8 * -(-ci // 8), co) / 2e7

    t = C.LatencyTable.measure(reqs, progress=False, timer=timer, overheads=False)
    t.overheads = {k: {"bytes": [0.0, 1e5], "ms": [0.0005, 0.0505]} for k in C.OVERHEAD_KINDS}
    t.overheads["module_call"] = {"bytes": [0.0], "ms": [0.0002]}
    if context:
        t.context = context
    return t


def test_overhead_terms_follow_the_kept_channels():
    from graphprune.allocate import overhead_terms

    m, x = ZOO["resnet18"]()
    a = gp.analyze(m, x)
    table = _latency_table(a, x)
    terms = {t.node: t for t in overhead_terms(a, table)}
    kinds = sorted({t.kind for t in terms.values()})
    assert kinds == ["add", "avg_pool2d", "batch_norm", "max_pool2d", "relu_"]
    # the first BN reads the stem conv's output: its bytes follow the stem group's kept count
    bn = terms["bn1"]
    stem = next(L for L in cost_layers(a) if L.node == "conv1")
    assert bn.in_terms == ((stem.out_group, 1),) and bn.in_const == 0
    assert bn.channels == stem.c_out
    shape = next(n for n in a.graph.graph.nodes if n.name == "conv1").meta["val"].shape
    assert bn.bytes_per_channel == pytest.approx(4 * shape[0] * shape[2] * shape[3])


@pytest.mark.parametrize("frac", [0.5, 0.75])
def test_latency_allocation_predicts_the_slimmed_model(frac):
    """The solver costs layers *and* the ops between them (with the table's in-model context),
    so its predicted cost is exactly estimate_model_latency of the slimmed model, and the
    budget is a fraction of the whole dense model's predicted latency."""
    from graphprune import cost as C

    m, x = ZOO["resnet18"]()
    a = gp.analyze(m, x)
    sigs = {L.sig for L in cost_layers(a)}
    ctx = {"layers": {s: 1.0 + 0.05 * i for i, s in enumerate(sorted(sigs, key=str))},
           "layer_default": 1.0, "ops": {"batch_norm": (1.5, 0.001), "relu_": (2.0, 0.0004)}}
    table = _latency_table(a, x, ctx)
    p = gp.plan(a, gp.Latency(frac, table=table), round_to=8)
    dense, _ = C.estimate_model_latency(a.graph, x, table)
    assert p.meta["full_cost"] == pytest.approx(dense, rel=1e-9)
    assert p.meta["predicted_cost"] <= frac * dense * (1 + 1e-9)
    slim = gp.apply(a, p)
    pred, items = C.estimate_model_latency(slim, x, table)
    assert p.meta["predicted_cost"] == pytest.approx(pred, rel=1e-9)
    ops = sum(it.ms for it in items if it.kind not in ("layer", "free", "unknown"))
    assert ops > 0.1 * pred  # the overheads are a real part of what was budgeted


def test_attention_products_found_through_the_op_table():
    """Activation x activation products are found by the op table's `mixes` flag, in every
    spelling (method `.matmul`, `@`, `torch.mm`): their FLOPs enter the allocation and the
    soft-mask pruner treats their channel groups as unsafe to mask by weights alone."""
    from graphprune.allocate import matmul_terms
    from graphprune.training.soft_mask import unsafe_groups

    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(8, 16) for _ in range(3))
            self.o = nn.Linear(16, 8)
            self.w = nn.Linear(8, 8)

        def forward(self, x):  # x [T, 8]
            s = self.q(x).matmul(self.k(x).transpose(0, 1)).softmax(-1)  # method form
            h = self.o(s @ self.v(x))  # operator form
            return torch.mm(h, self.w(h).t())  # torch.mm

    t = 5
    a = gp.analyze(Att(), (torch.randn(t, 8),))
    free = {g.id for g in a.prunable_groups}
    terms = matmul_terms(a, free)
    assert sorted(f for _, f in terms) == sorted([2.0 * t * 16 * t, 2.0 * t * t * 16,
                                                   2.0 * t * 8 * t])
    qk = next(g.id for g in a.groups if any(m.startswith("q.") for m in g.members))
    assert any(gid == qk for gid, _ in terms)
    assert qk in unsafe_groups(a)
