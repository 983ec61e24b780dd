"""fuse_epilogue pass: BatchNorm folding and residual add + ReLU fused into the 1xN kernels.

Every positive case runs through `gp.sparsify`, which verifies the fused model against the
unfused one (and that against the masked dense oracle); the tests check what was fused, what
was left alone and why, and that the user's model is untouched.
"""

from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from graphprune.passes.fuse_epilogue import fuse_epilogue
from torch import nn

import graphprune as gp
from graphprune import zoo
from graphprune.kernels import onexn
from graphprune.zoo import resnet50

warnings.filterwarnings("ignore", category=DeprecationWarning)


def _random_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so a wrong fold cannot pass by accident."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _sparsify(model, x, **kw):
    return gp.sparsify(model, (x,), pattern="1x16", sparsity=0.5, check_speed=False,
                       permute=False, **kw)  # fmt: skip


def _kinds(gm: fx.GraphModule) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append(type(gm.get_submodule(n.target)).__name__)
        elif n.op in ("call_function", "call_method"):
            out.append(getattr(n.target, "__name__", str(n.target)))
    return out


def test_resnet50_bottlenecks_fuse_completely():
    """Every BN, ReLU and residual add of ResNet-50 is absorbed into the 1xN convs."""
    model = _random_bn(resnet50())
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    s = _sparsify(model, x)
    rep = s.graphprune_report
    kinds = _kinds(s)
    assert "BatchNorm2d" not in kinds and "ReLU" not in kinds and "add" not in kinds
    fused = [r.get("fused") for r in rep["layers"] if r["pattern"] != "dense"]
    assert fused.count("bn+add+relu") == 16  # one per bottleneck
    assert fused.count("bn+relu") == 33 and fused.count("bn") == 4  # downsample convs: bn only
    assert rep["verify"].count("verified") == 2  # vs the oracle, then fused vs unfused
    for k, v in model.state_dict().items():  # the user's model is not modified
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        ref = _sparsify(model, x, fuse=False)(x)
        assert torch.allclose(s(x), ref, rtol=1e-4, atol=1e-5)


class _Block(nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.c1 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 32, 1)
        self.b2 = nn.BatchNorm2d(32)
        self.act6 = nn.ReLU6()

    def forward(self, x):
        v = self.variant
        if v == "two_users":  # the conv output feeds the BN and the add
            a = self.c1(x)
            return torch.relu(self.b1(a)) + a
        h = self.b1(self.c1(x))
        if v == "relu6":
            return self.act6(h)
        h = torch.relu(h)
        y = self.c2(h)
        if v == "broadcast":
            return F.relu(y + h.mean(dim=(2, 3), keepdim=True))
        if v == "alpha":
            return torch.add(y, h, alpha=2.0)
        if v == "inplace_into_residual":
            h.add_(y)  # mutates h: the fused op must not replace this (fx keeps add_;
            return h  # a plain `h += y` on a Proxy traces as a new, non-mutating add)
        if v == "inplace_into_conv":
            return F.relu(y.add_(h))
        if v == "inplace_then_reuse":
            y.add_(h)  # the relu reads y (the conv node) again: two users, left alone
            return F.relu(y)
        if v == "relu_then_add":
            return F.relu(y) + h
        if v == "residual_first":
            return torch.relu(operator.add(h, self.b2(y)))
        raise ValueError(v)


@pytest.mark.parametrize(
    "variant,expect",
    [
        ("two_users", {"c1": None}),  # c1's output feeds the BN and the add
        ("relu6", {"c1": "bn"}),  # ReLU6 is not a ReLU
        ("broadcast", {"c1": "bn+relu", "c2": None}),  # broadcasting add stays
        ("alpha", {"c1": "bn+relu", "c2": None}),  # add with alpha stays
        ("inplace_into_residual", {"c1": "bn+relu", "c2": None}),
        ("inplace_into_conv", {"c1": "bn+relu", "c2": "add+relu"}),
        ("inplace_then_reuse", {"c1": "bn+relu", "c2": None}),
        ("relu_then_add", {"c1": "bn+relu", "c2": "relu"}),  # add after the ReLU stays
        ("residual_first", {"c1": "bn+relu", "c2": "bn+add+relu"}),
    ],
)
def test_fusion_cases(variant, expect):
    """Exactly the supported chains fuse; the rest is left as it was (and still verifies)."""
    model = _random_bn(_Block(variant))
    x = torch.randn(2, 16, 9, 9)
    s = _sparsify(model, x)
    got = {r["layer"]: r.get("fused") for r in s.graphprune_report["layers"]}
    for layer, want in expect.items():
        assert got[layer] == want, (variant, got)
    with torch.no_grad():
        ref = _sparsify(model, x, fuse=False)(x)
        assert torch.allclose(s(x), ref, rtol=1e-4, atol=1e-5)


def test_training_mode_bn_and_shared_modules_are_not_folded():
    """BN in training mode uses batch statistics (no fold); a conv called twice keeps its BN."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(16, 16, 1)
            self.b = nn.BatchNorm2d(16)

        def forward(self, x):
            return self.b(self.c(self.c(x)))

    model = _random_bn(Shared())
    x = torch.randn(2, 16, 5, 5)
    s = _sparsify(model, x)
    assert all("fused" not in r for r in s.graphprune_report["layers"])
    gm = _sparsify(_random_bn(_Block("residual_first")), torch.randn(2, 16, 9, 9), fuse=False)
    gm.get_submodule("b1").train()
    fused_gm, fused = fuse_epilogue(gm)
    assert "c1" not in fused and fused["c2"] == "bn+add+relu"
    assert _kinds(fused_gm).count("BatchNorm2d") == 1


def test_fused_model_exports_and_compiles():
    """torch.export and torch.compile trace through the fused op (residual + relu args)."""
    model = _random_bn(_Block("residual_first"))
    x = torch.randn(2, 16, 9, 9)
    s = _sparsify(model, x)
    assert s.get_submodule("c2").relu
    with torch.no_grad():
        want = s(x)
        ep = torch.export.export(s, (x,))
        assert "graphprune.conv2d_1xn" in str(ep.graph)
        assert torch.allclose(ep.module()(x), want, rtol=1e-5, atol=1e-6)
        for backend in ("aot_eager", "inductor"):
            comp = torch.compile(s, backend=backend)
            assert torch.allclose(comp(x), want, rtol=1e-5, atol=1e-6), backend


def test_reference_path_gives_the_same_numbers():
    """The pure-PyTorch path of the fused ops equals the C++ kernel."""
    model = _random_bn(_Block("residual_first"))
    x = torch.randn(2, 16, 9, 9)
    s = _sparsify(model, x)
    with torch.no_grad():
        y = s(x)
        with onexn.use_reference():
            y_ref = s(x)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_sparsify_with_fusion_verifies(name):
    """Every zoo architecture: 1x4 at 50% + BN folding + epilogues, verified twice (by sparsify:
    unfused vs the masked oracle, fused vs unfused); fused and unfused agree on a fresh input."""
    model, inputs = zoo.ZOO[name]()
    model.eval()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = gp.sparsify(model, inputs, pattern="1x4", sparsity=0.5, check_speed=False)
        plain = gp.sparsify(model, inputs, pattern="1x4", sparsity=0.5, check_speed=False,
                            fuse=False, verify=False)  # fmt: skip
        rep = s.graphprune_report
        assert rep["sparsified"] > 0
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            assert rep["fused"] > 0, "a model with BatchNorm folded nothing"
        x = tuple(torch.randn_like(t) if t.is_floating_point() else t for t in inputs)
        with torch.no_grad():
            a, b = s(*x), plain(*x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(n)


def test_pool_layout_is_exact_and_only_for_large_nchw_pools():
    """Large NCHW max-pools run in channels_last (bit-identical output, NCHW result); small
    pools, pools returning indices and channels_last inputs are left alone."""
    from graphprune.passes.pool_layout import MIN_ELEMENTS, max_pool2d_cl, pool_layout

    from graphprune.trace import trace

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.MaxPool2d(3, 2, 1)
            self.idx = nn.MaxPool2d(2, return_indices=True)

        def forward(self, x):
            a = self.big(x)  # 2*16*64*64 = 131k elements: swapped
            b = F.max_pool2d(a, kernel_size=2, stride=2, ceil_mode=True)  # 32k: kept
            c, i = self.idx(x)  # indices: kept
            return a.sum() + b.sum() + c.sum() + i.sum()

    x = torch.randn(2, 16, 64, 64)
    assert x.numel() >= MIN_ELEMENTS > x.numel() // 4 // 4
    gm = trace(Net(), (x,), method="fx").gm
    out, done = pool_layout(gm)
    assert len(done) == 1
    targets = [n.target for n in out.graph.nodes if n.op in ("call_function", "call_module")]
    assert targets.count(max_pool2d_cl) == 1 and "big" not in targets and "idx" in targets
    with torch.no_grad():
        assert torch.equal(out(x), gm(x))
        y = max_pool2d_cl(x, 3, 2, 1)
        assert torch.equal(y, F.max_pool2d(x, 3, 2, 1)) and y.is_contiguous()
    ep = torch.export.export(out, (x,))  # traceable: the layout copies are plain aten ops
    assert torch.equal(ep.module()(x), gm(x))


def test_resnet50_stem_pool_runs_channels_last():
    s = _sparsify(_random_bn(resnet50()), torch.randn(2, 3, 64, 64))
    assert len(s.graphprune_report["pools_channels_last"]) == 1
    assert "MaxPool2d" not in _kinds(s)


def test_saved_program_fuses_like_the_module(tmp_path):
    """A saved .pt2 (aten batch_norm / add_ / relu_ / max_pool2d, as `graphprune sparsify
    slim.pt2` sees it after `modulize`) folds and fuses exactly like the nn.Module model."""
    from graphprune.backend import modulize
    from graphprune.cli import _from_pt2

    model = _random_bn(resnet50())
    x = torch.randn(1, 3, 64, 64)
    gp.save(model, tmp_path / "r50.pt2", (x,))
    gm, _ = _from_pt2(str(tmp_path / "r50.pt2"))
    s = _sparsify(modulize(gm), x)
    rep = s.graphprune_report
    kinds = _kinds(s)
    assert rep["fused"] == 53 and len(rep["pools_channels_last"]) == 1
    assert not any(k.startswith(("batch_norm", "relu", "add", "max_pool2d.")) for k in kinds), \
        set(kinds)
    with torch.no_grad():
        ref = _sparsify(model, x)(x)
        torch.testing.assert_close(s(x), ref, rtol=1e-4, atol=1e-5)
