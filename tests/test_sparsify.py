"""gp.sparsify: 1xN and 2:4 passes — patterns exact, skips explained, verified, compile/export."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.kernels.masks import is_1xn, is_24
from graphprune.kernels.onexn import Conv2d1xN, Linear1xN
from graphprune.zoo import ZOO


class Net(nn.Module):
    """conv (fits), depthwise (stays dense), conv with 6 outputs (1x4 misfit), linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.b = nn.Conv2d(16, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 8)

    def forward(self, x):
        return self.fc(torch.flatten(self.b(torch.relu(self.dw(torch.relu(self.a(x))))), 1))


def _x():
    return (torch.randn(2, 8, 4, 4),)


def test_1xn_patterns_exact_and_skips_explained():
    s = gp.sparsify(Net().eval(), _x(), pattern="1x4", sparsity=0.75, check_speed=False)
    rep = {r["layer"]: r for r in s.graphprune_report["layers"]}
    assert isinstance(s.a, Conv2d1xN) and isinstance(s.fc, Linear1xN)
    assert is_1xn(s.a.to_dense() != 0, 4) and is_1xn(s.fc.to_dense() != 0, 4)
    assert rep["a"]["kept"] == pytest.approx(0.25)
    assert rep["dw"]["pattern"] == "dense" and "depthwise" in rep["dw"]["why"]
    assert rep["b"]["pattern"] == "dense" and "multiple of N=4" in rep["b"]["why"]
    assert "verified" in s.graphprune_report["verify"]


def test_24_pattern_and_report():
    s = gp.sparsify(Net().eval(), _x(), pattern="2:4")
    rep = {r["layer"]: r for r in s.graphprune_report["layers"]}
    assert is_24(s.a.weight != 0) and is_24(s.fc.weight != 0)
    assert rep["a"]["kept"] == pytest.approx(0.5)
    if not torch.cuda.is_available():
        assert "masked dense weight" in rep["a"]["held_as"]


def test_user_model_untouched_and_prune_then_sparsify():
    m, x = ZOO["resnet18"]()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    slim = gp.prune(m, x, target=gp.Flops(0.5), round_to=8)
    s = gp.sparsify(slim, x, pattern="1x8", sparsity=0.5, check_speed=False)
    assert s.graphprune_report["sparsified"] > 5
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_export_and_compile_of_sparsified_model():
    m = Net().eval()
    s = gp.sparsify(m, _x(), pattern="1x4", sparsity=0.5, check_speed=False)
    x = torch.randn(3, 8, 4, 4)
    ref = s(x)
    ep = torch.export.export(s, (x,))
    assert torch.allclose(ep.module()(x), ref, rtol=1e-5, atol=1e-6)
    c = torch.compile(s, backend="aot_eager")
    assert torch.allclose(c(x), ref, rtol=1e-5, atol=1e-6)


def test_bad_pattern_is_a_clear_error():
    with pytest.raises(gp.GraphpruneError, match="unknown sparsity pattern"):
        gp.sparsify(Net().eval(), _x(), pattern="3:7")


def test_speed_check_keeps_slow_layers_dense():
    """With the per-layer timing on, every layer is either sparsified or says it was slower."""
    s = gp.sparsify(Net().eval(), _x(), pattern="1x4", sparsity=0.5, check_speed=True)
    for r in s.graphprune_report["layers"]:
        assert r["pattern"] == "1x4" or r["why"]


@pytest.mark.gpu
def test_24_semi_structured_on_cuda():
    """On CUDA with fp16, linear weights become semi-structured sparse and still match."""
    m = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).cuda().half().eval()
    x = torch.randn(32, 128, device="cuda", dtype=torch.half)
    s = gp.sparsify(m, (x,), pattern="2:4", verify=False)
    assert "semi_structured" in s.graphprune_report["layers"][0]["held_as"]
    ref = gp.sparsify(m, (x,), pattern="2:4", verify=False)
    assert torch.allclose(s(x).float(), ref(x).float(), rtol=1e-2, atol=1e-2)


def test_permutation_keeps_function_and_raises_kept_magnitude():
    """Coupled channel permutations: the permuted model equals the original; 2:4 keeps more."""
    import numpy as np
    from graphprune.passes.permute import permutable, permute

    from graphprune.permutation import _cols, consumers, kept_24, search_24
    from graphprune.verify import verify_against

    m, x = ZOO["mobilenet_v2"]()
    a = gp.analyze(m, x)
    groups = permutable(a)
    assert groups
    perms = search_24(a, groups, iters=300)
    gm = permute(a, perms)
    verify_against(gm, a.graph, a.traced.args, a.traced.kwargs)
    gains = [kept_24([_cols(w.double()) for w in consumers(a, g)], p) /
             kept_24([_cols(w.double()) for w in consumers(a, g)], np.arange(len(p)))
             for g, p in perms.items()]
    assert min(gains) >= 1.0 and max(gains) > 1.0
    s1 = gp.sparsify(m, x, pattern="2:4", permute=False)
    s2 = gp.sparsify(m, x, pattern="2:4", permute=True)
    assert s2.graphprune_report["kept_magnitude"] > s1.graphprune_report["kept_magnitude"]
    assert "verified" in s2.graphprune_report["permutation"]


def test_keep_first_last_leaves_the_edge_layers_dense():
    """keep_first_last=True (BlockPruner's default) keeps the stem conv and the classifier dense
    and says why; the layers between are sparsified as before."""
    from graphprune.zoo import resnet50

    x = torch.randn(1, 3, 64, 64)
    s = gp.sparsify(resnet50().eval(), (x,), pattern="1x8", sparsity=0.5, check_speed=False,
                    keep_first_last=True)  # fmt: skip
    rep = {r["layer"]: r for r in s.graphprune_report["layers"]}
    assert rep["conv1"]["pattern"] == "dense" and "keep_first_last" in rep["conv1"]["why"]
    assert rep["fc"]["pattern"] == "dense" and "keep_first_last" in rep["fc"]["why"]
    assert rep["layer1.0.conv1"]["pattern"] == "1x8"
    assert s.graphprune_report["sparsified"] == len(rep) - 2


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_sparsifies_and_verifies(name):
    """Every architecture of the zoo (residual, dense, grouped, depthwise, attention, LSTM,
    U-Net, custom op...) takes 1x16 at 75%: each layer is sparsified with an exact pattern or
    left dense with a reason, the result verifies against the masked dense oracle, and it runs
    at another batch size."""
    model, inputs = ZOO[name]()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = gp.sparsify(model, inputs, pattern="1x16", sparsity=0.75, check_speed=False)
    finally:
        torch.set_num_threads(n)
    rep = s.graphprune_report
    assert rep["verify"].startswith("sparse vs masked dense oracle: verified"), rep["verify"]
    assert rep["sparsified"] >= 1
    mods = dict(s.named_modules())
    for layer in rep["layers"]:
        if layer["pattern"] == "dense":
            assert layer["why"], layer
        else:
            assert is_1xn(mods[layer["layer"]].to_dense() != 0, 16)
            assert 0 < layer["kept"] <= 0.5
    x2 = tuple(torch.cat([a, a[:1]]) for a in inputs)
    with torch.no_grad():
        y, ref = s(*x2), model(*x2)
    assert y.shape == ref.shape and torch.isfinite(y).all()


def _hf_names():
    try:
        from graphprune.hf_zoo import HF_ZOO
    except ImportError:  # pragma: no cover - transformers missing
        return []
    return sorted(HF_ZOO)


@pytest.mark.parametrize("name", _hf_names())
def test_hugging_face_models_sparsify_through_export(name):
    """Models plain fx cannot trace (every Hugging Face model of the zoo) are traced with
    torch.export, their aten conv/linear calls become modules, and they sparsify, fuse and
    verify like any other."""
    from graphprune.hf_zoo import HF_ZOO

    model, inputs = HF_ZOO[name]()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = gp.sparsify(model.eval(), inputs, pattern="1x4", sparsity=0.5, check_speed=False)
    finally:
        torch.set_num_threads(n)
    rep = s.graphprune_report
    assert rep["sparsified"] >= 6
    assert rep["verify"].startswith("sparse vs masked dense oracle: verified")
    bn_models = ("resnet", "resnet_model", "mobilenet_v2", "regnet", "mobilevit", "efficientnet")
    if name in bn_models:
        assert rep["fused"] > 0 and "fused vs unfused: verified" in rep["verify"]


def test_same_padding_that_needs_asymmetric_pads_stays_dense_with_a_reason():
    """padding='same' with an even kernel pads asymmetrically, which the 1xN kernel does not take:
    the layer stays dense and the report says why; an odd kernel's 'same' is sparsified."""
    net = nn.Sequential(nn.Conv2d(8, 16, 4, padding="same"), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding="same")).eval()  # fmt: skip
    s = gp.sparsify(net, torch.randn(1, 8, 9, 9), pattern="1x8", sparsity=0.5, check_speed=False)
    rep = {r["layer"]: r for r in s.graphprune_report["layers"]}
    assert rep["0"]["pattern"] == "dense" and "asymmetric" in rep["0"]["why"]
    assert rep["2"]["pattern"] == "1x8"


def test_weights_that_already_hold_1xn_patterns_are_not_permuted():
    """A model trained to 1x16 (or sparsified and baked back to dense) keeps its blocks: the
    filter reordering is skipped (it would mix groups and the new mask would drop kept weights),
    so at the trained sparsity gp.sparsify computes exactly the model's function."""
    from graphprune.kernels.masks import mask_1xn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 32, 1)).eval()
    with torch.no_grad():
        model[2].weight.mul_(mask_1xn(model[2].weight, 16, 0.75))
    x = torch.randn(2, 16, 8, 8)
    fast = gp.sparsify(model, x, "1x16", 0.75, check_speed=False, skip=("0", "4"))
    rep = fast.graphprune_report
    assert rep["permutation"].startswith("skipped: 1 layer(s) already hold 1x16 patterns")
    assert "(first: 2)" in rep["permutation"]
    with torch.no_grad():
        assert float((fast(x) - model(x)).abs().max() / model(x).abs().max()) < 1e-5
    # without the pattern the same call permutes (and so changes which weights survive)
    plain = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 32, 1)).eval()
    rep2 = gp.sparsify(plain, x, "1x16", 0.75, check_speed=False, skip=("0", "4")).graphprune_report
    assert not rep2["permutation"].startswith("skipped")


def test_report_says_which_layers_run_winograd(monkeypatch):
    """A 3x3 stride-1 conv on a small image with enough kept channels is reported as running
    Winograd at the example's shape (with the C++ kernel); the strided one and, with
    GP_1XN_WINO=0, every layer are not; the sparsified model still verifies."""
    from graphprune.kernels import onexn

    if not onexn.available():
        pytest.skip("the 1xN C++ kernel is not available")
    net = nn.Sequential(
        nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(), nn.Conv2d(192, 64, 3, stride=2, padding=1)
    ).eval()
    x = torch.randn(2, 192, 8, 8)

    def held():
        s = gp.sparsify(net, (x,), pattern="1x16", sparsity=0.5, check_speed=False)
        assert "verified" in s.graphprune_report["verify"]
        return ["Winograd" in r.get("held_as", "") for r in s.graphprune_report["layers"]]

    assert held() == [True, False]
    monkeypatch.setenv("GP_1XN_WINO", "0")
    assert held() == [False, False]
