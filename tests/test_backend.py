"""The torch.compile backend: lossless by default (equals eager, slims dead channels, finds 1xN
patterns), lossy on request, parameters snapshotted in rewritten graphs."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.kernels.masks import is_1xn
from graphprune.zoo import ZOO

torch.set_num_threads(1)


def zeroed(name: str, ratio: float = 0.5):
    """A zoo model whose pruned channels are already zero, as after soft-mask training."""
    model, (x,) = ZOO[name]()
    a = gp.analyze(model, x)
    ref = gp.mask(a, gp.plan(a, gp.Uniform(ratio)))
    model.load_state_dict(ref.state_dict(), strict=False)
    return model, x


def compiled(model, x, **opts):
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(model, backend=gp.backend(inner="eager", **opts))(x)
    return y, gp.backend.last_report()


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet", "vit", "convnext"])
def test_lossless_equals_eager_and_slims(name):
    model, x = zeroed(name)
    with torch.no_grad():
        ref = model(x)
    y, rep = compiled(model, x)
    assert rel(y, ref) < 1e-5
    assert rep["action"] == "rewritten", rep.get("reason")
    assert rep["params_after"] < 0.9 * rep["params_before"]
    assert sum(rep["removed_channels"].values()) > 0
    assert "fp64" in rep["verify"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_lossless_on_the_whole_zoo(name):
    """Every zoo architecture: with no structure in the weights the compiled model equals eager;
    with half of every prunable group zeroed it equals eager and channels are removed (unless
    the backend names a reason to pass the graph through)."""
    model, (x,) = ZOO[name]()
    with torch.no_grad():
        ref = model(x)
    y, rep = compiled(model, x, check_speed=False)
    assert rel(y, ref) < 1e-5, rep
    model, x = zeroed(name)
    with torch.no_grad():
        ref = model(x)
    y, rep = compiled(model, x, check_speed=False)
    assert rel(y, ref) < 1e-5, rep
    assert rep["action"] == "rewritten", rep.get("reason")
    assert sum(rep["removed_channels"].values()) > 0, rep


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_lossless_without_zeros_passes_through(name):
    model, (x,) = ZOO[name]()
    with torch.no_grad():
        ref = model(x)
    y, rep = compiled(model, x)
    assert rel(y, ref) < 1e-6
    assert rep["action"] == "passed through"
    assert "nothing to exploit" in rep["reason"]


def test_registered_inductor_string_backend():
    model, x = zeroed("mlp")
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        y = torch.compile(model, backend="graphprune")(x)
    rep = gp.backend.last_report()
    assert rep["action"] == "rewritten"
    assert rel(y, ref) < 1e-5


def test_entry_point_resolves_without_importing_graphprune():
    code = ("import torch, sys; fn = torch._dynamo.lookup_backend('graphprune'); "
            "assert fn.__name__ == 'graphprune_backend', fn; "
            "assert 'graphprune' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_parameters_are_snapshotted_in_rewritten_graphs():
    model, x = zeroed("mlp")
    torch._dynamo.reset()
    with torch.no_grad():
        before = model(x)
        fast = torch.compile(model, backend=gp.backend(inner="eager"))
        assert rel(fast(x), before) < 1e-6
        assert gp.backend.last_report()["action"] == "rewritten"
        for p in model.parameters():
            p.mul_(2.0)
        changed = model(x)
        assert rel(changed, before) > 1e-2
        assert rel(fast(x), before) < 1e-6  # the snapshot, not the new weights
        torch._dynamo.reset()  # recompiling picks the new weights up
        assert rel(torch.compile(model, backend=gp.backend(inner="eager"))(x), changed) < 1e-6


def test_grad_mode_passes_through_and_gradients_reach_the_model():
    model, x = zeroed("mlp")
    torch._dynamo.reset()
    fast = torch.compile(model, backend=gp.backend(inner="eager"))
    fast(x).sum().backward()
    rep = gp.backend.last_report()
    assert rep["action"] == "passed through" and "gradients" in rep["reason"]
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():  # live parameters: a passed-through graph sees the change
        for p in model.parameters():
            p.mul_(2.0)
        assert rel(fast(x), model(x)) < 1e-6


class _TwoParts(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
        self.b = nn.Sequential(nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        y = self.a(x)
        torch._dynamo.graph_break()
        return self.b(y)


def test_graph_breaks_are_handled_per_subgraph():
    m = _TwoParts().eval()
    with torch.no_grad():
        m.a[0].weight[5:9] = 0  # channels 5..8 between a[0] and a[2]: dead
        m.a[2].weight[:, 5:9] = 0
        m.b[3].weight[:, 10:20] = 0  # channels 10..19 between b[1] and b[3]: dead
    x = torch.randn(3, 8)
    gp.backend.clear_reports()  # the log keeps 32 reports: count from empty
    y, _ = compiled(m, x)
    reps = gp.backend.reports()
    assert len(reps) == 2 and all(r["action"] == "rewritten" for r in reps)
    assert [sum(r["removed_channels"].values()) for r in reps] == [4, 10]
    with torch.no_grad():
        assert rel(y, m(x)) < 1e-6


def test_dynamic_false_slims_every_batch_size():
    model, x = zeroed("mlp")
    torch._dynamo.reset()
    gp.backend.clear_reports()
    fast = torch.compile(model, backend=gp.backend(inner="eager"), dynamic=False)
    with torch.no_grad():
        for b in (2, 5):
            xb = torch.randn(b, *x.shape[1:])
            assert rel(fast(xb), model(xb)) < 1e-5
    assert [r["action"] for r in gp.backend.reports()] == ["rewritten", "rewritten"]


def _exact_1x16(cin=64, cout=64, kept=16):
    """Conv weights with a uniform 1x16 pattern in which every input channel is kept somewhere."""
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    mask = torch.zeros(cout // 16, cin, dtype=torch.bool)
    for g in range(cout // 16):
        mask[g, (torch.arange(kept) + g * kept) % cin] = True
    full = mask[:, None, :, None, None].expand(cout // 16, 16, cin, 3, 3).reshape(conv.weight.shape)
    with torch.no_grad():
        conv.weight.mul_(full)
    return conv


def test_lossless_turns_existing_1xn_patterns_into_sparse_ops():
    m = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), _exact_1x16(), nn.ReLU(),
                      nn.Conv2d(64, 8, 1)).eval()
    assert is_1xn(m[2].weight != 0, 16)
    x = torch.randn(2, 3, 8, 8)
    y, rep = compiled(m, x, check_speed=False)
    with torch.no_grad():
        assert rel(y, m(x)) < 1e-5
    assert rep["action"] == "rewritten"
    (hit,) = rep["sparse"]
    assert hit["pattern"] == "1xN" and hit["n"] == 16 and hit["layer"] == "2"
    assert "conv2d_1xn" in hit["applied"]
    assert "graphprune.conv2d_1xn" in rep["graph"].code or any(
        type(mod).__name__ == "Conv2d1xN" for mod in rep["graph"].modules())


def test_lossy_mode_prunes_to_a_target():
    model, (x,) = ZOO["resnet18"]()
    with torch.no_grad():
        ref = model(x)
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(model, backend=gp.backend(gp.Uniform(0.5), inner="eager"))(x)
    rep = gp.backend.last_report()
    assert rep["action"] == "pruned" and rep["mode"] == "lossy"
    assert rep["params_after"] < 0.5 * rep["params_before"]
    assert y.shape == ref.shape and "fp32" in rep["verify"]
    assert gp.Plan.from_json(rep["plan"]).keep


def test_lossy_backend_needs_a_target_for_options():
    with pytest.raises(ValueError, match="target"):
        gp.backend(round_to=8)


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("calls", torch.zeros(()))
        with torch.no_grad():
            self.out.weight[:, 2:4] = 0

    def forward(self, x):
        self.calls += 1
        return self.out(torch.relu(self.lin(x)))


def test_stateful_and_training_graphs_pass_through():
    m = _Counter().eval()
    _, rep = compiled(m, torch.randn(2, 4))
    assert rep["action"] == "passed through" and "mutates model state" in rep["reason"]
    assert m.calls.item() == 1  # the model's own buffer was updated
    drop = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    _, rep = compiled(drop, torch.randn(2, 4))
    assert rep["action"] == "passed through" and "training-mode" in rep["reason"]


def _random_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(bn.num_features)
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
    return bn


class _Residual1x16(nn.Module):
    """conv-BN-ReLU, conv-BN, += identity, ReLU with 1x16 convs: every BN, add and ReLU fuse."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = _exact_1x16(), _random_bn(nn.BatchNorm2d(64))
        self.c2, self.b2 = _exact_1x16(), _random_bn(nn.BatchNorm2d(64))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        y += x
        return torch.relu(y)


def test_lossless_fuses_bn_add_relu_into_found_1xn_layers():
    """Dynamo graphs hold F.batch_norm / iadd / relu: they fold and fuse as in gp.sparsify,
    checked against the unfused sparse graph; fuse=False leaves them."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), _Residual1x16()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
    y, rep = compiled(m, x, check_speed=False)
    assert rel(y, ref) < 1e-5
    assert sorted(rep["fused"].values()) == ["bn+add+relu", "bn+relu"]
    assert rep["verify_fused"].startswith("verified")
    kinds = [type(mod).__name__ for mod in rep["graph"].modules()]
    assert kinds.count("Conv2d1xN") == 2 and "BatchNorm2d" not in kinds
    assert not any("batch_norm" in str(n.target) for n in rep["graph"].graph.nodes)
    y2, rep2 = compiled(m, x, check_speed=False, fuse=False)
    assert rel(y2, ref) < 1e-5 and "fused" not in rep2
    assert sum("batch_norm" in str(n.target) for n in rep2["graph"].graph.nodes) == 2


@pytest.mark.parametrize("dead", [[5], list(range(16, 32))])
def test_lossless_slim_keeps_1xn_blocks_whole(dead):
    """A 1x16 layer's output channel that no consumer reads is removed only with its whole block
    of 16 (one lone row removed would shift every block after it and lose the pattern)."""
    torch.manual_seed(0)
    head = nn.Conv2d(64, 8, 1)
    with torch.no_grad():
        head.weight[:, dead] = 0
    m = nn.Sequential(_exact_1x16(), nn.ReLU(), head).eval()
    x = torch.randn(2, 64, 8, 8)
    y, rep = compiled(m, x, check_speed=False)
    with torch.no_grad():
        assert rel(y, m(x)) < 1e-5
    removed = sum(rep.get("removed_channels", {}).values())
    assert removed == (16 if len(dead) == 16 else 0)
    (hit,) = [e for e in rep["sparse"] if e["layer"] == "0"]
    assert hit["pattern"] == "1xN" and hit["n"] == 16 and "conv2d_1xn" in hit["applied"]


def test_found_1xn_layers_allow_zero_weights_and_prefer_the_tightest_n():
    """An exact zero inside a kept block does not hide the pattern; a 1x16 pattern that is also
    uniform as 1x32 (pairs of groups keep equally many channels together) is read as 1x16."""
    conv = _exact_1x16(64, 64, 16)  # group g keeps channels 16g..16g+15
    with torch.no_grad():
        conv.weight[3, 2, 1, 1] = 0.0  # inside a kept block of group 0
    assert not is_1xn(conv.weight != 0, 16)
    m = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(64, 8, 1)).eval()
    x = torch.randn(2, 64, 8, 8)
    y, rep = compiled(m, x, check_speed=False)
    with torch.no_grad():
        assert rel(y, m(x)) < 1e-5
    (hit,) = rep["sparse"]
    assert (hit["pattern"], hit["n"], hit["kept"]) == ("1xN", 16, 0.25)
    assert "conv2d_1xn" in hit["applied"]


def test_lossless_puts_found_24_layers_on_the_kernels_after_folding_bn(semi24_cpu):
    """A half-precision CNN whose weights hold 2:4 patterns (as after ASP training): the backend
    folds its BatchNorms into the masked convs, then compresses the 1x1 convs and the linear
    (torch's compressed tensor, product done densely on the CPU: tests/semi24_cpu.py); the 3x3
    conv stays dense with its reason; every step verified (the BN fold exactly, on a float64
    rebuild: folded in half precision it missed the fp64 bound and was dropped), the output
    equals eager."""
    from test_sparsify import Bottleneck24
    from torch.sparse import SparseSemiStructuredTensor

    from graphprune.kernels.masks import mask_24
    from graphprune.verify import max_rel_error

    torch.manual_seed(0)
    m = Bottleneck24().half().eval()
    with torch.no_grad():
        for mod in (m.c1, m.c2, m.c3, m.fc):
            mod.weight.mul_(mask_24(mod.weight))
    x = torch.randn(2, 64, 8, 8, dtype=torch.half)
    y, rep = compiled(m, x)
    applied = {e["layer"]: e["applied"] for e in rep["sparse"]}
    assert set(applied) == {"c1", "c2", "c3", "fc"}, applied
    for name in ("c1", "c3", "fc"):
        assert applied[name].startswith("to_sparse_semi_structured"), applied
    assert "3x3 conv" in applied["c2"]
    assert rep["verify_semi_structured"].startswith("verified"), rep
    assert "fp64 check skipped" not in rep["verify_semi_structured"]
    assert sorted(rep["fused"]) == ["c1", "c3"]  # (the dense 3x3 conv stays functional)
    assert float(re.search(r"fp64 (\S+)", rep["verify_fused"]).group(1)) < 1e-9  # folded in fp64
    weights = [p for p in rep["graph"].parameters() if isinstance(p, SparseSemiStructuredTensor)]
    assert len(weights) == 3
    with torch.no_grad():
        ref32 = copy.deepcopy(m).float()(x.float())
        assert max_rel_error(y, ref32) <= 4 * max_rel_error(m(x), ref32) + 2e-3
