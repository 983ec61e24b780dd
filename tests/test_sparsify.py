"""gp.sparsify: 1xN and 2:4 passes — patterns exact, skips explained, verified, compile/export."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.kernels.masks import is_1xn, is_24, mask_24
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


class Net24(nn.Module):
    """A 3x3 conv (2:4 held as a masked dense weight), a strided 1x1 conv and a linear (both
    taken by the 2:4 kernels on CUDA in fp16 / bf16)."""

    def __init__(self):
        super().__init__()
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.pw = nn.Conv2d(64, 128, 1, stride=2)
        self.fc = nn.Linear(128, 64)

    def forward(self, x):
        y = torch.relu(self.pw(torch.relu(self.conv3(x))))
        return self.fc(y.mean((2, 3)))


def _check_24_kernel_path(device: str, dtype: torch.dtype):
    """Net24 in `dtype` on `device`: the linear and the 1x1 conv hold semi-structured weights,
    the 3x3 conv a masked dense one (the report says why); sparsify's own checks pass (fp64
    included: the compressed weights are decompressed for it), and so does one by hand."""
    from torch.sparse import SparseSemiStructuredTensor

    from graphprune.kernels.semi24 import PointwiseLinear
    from graphprune.verify import max_rel_error

    torch.manual_seed(0)
    m = Net24().to(device, dtype).eval()
    x = torch.randn(8, 64, 16, 16, device=device, dtype=dtype)
    s = gp.sparsify(m, (x,), pattern="2:4", permute=False)
    rep = {r["layer"]: r for r in s.graphprune_report["layers"]}
    assert "semi_structured" in rep["fc"]["held_as"] and "semi_structured" in rep["pw"]["held_as"]
    assert "masked dense" in rep["conv3"]["held_as"] and "3x3 conv" in rep["conv3"]["held_as"]
    assert isinstance(s.pw, PointwiseLinear)
    assert isinstance(s.pw.weight, SparseSemiStructuredTensor)
    assert isinstance(s.fc.weight, SparseSemiStructuredTensor)
    v = s.graphprune_report["verify"]
    assert "2:4 kernels vs masked dense: verified" in v and "fp64 check skipped" not in v, v
    oracle = Net24().to(device, dtype).eval()
    oracle.load_state_dict(m.state_dict())
    with torch.no_grad():
        for name in ("conv3", "pw", "fc"):
            w = getattr(oracle, name).weight
            w.mul_(mask_24(w))
        assert torch.equal(s.fc.weight.to_dense(), oracle.fc.weight)  # compression is lossless
        ref32 = copy.deepcopy(oracle).float()(x.float())
        err, err_dense = max_rel_error(s(x), ref32), max_rel_error(oracle(x), ref32)
    assert err <= 4 * err_dense + 2 * torch.finfo(dtype).eps


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_24_semi_structured_on_cuda(dtype):
    """On CUDA in fp16 / bf16, on torch's Sparse Tensor Core kernels."""
    _check_24_kernel_path("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_24_kernel_path_on_cpu(semi24_cpu, dtype):
    """The same on the CPU with torch's own compressed tensor, its product done densely
    (tests/semi24_cpu.py): everything around the CUDA kernel."""
    _check_24_kernel_path("cpu", dtype)


class Bottleneck24(nn.Module):
    """A ResNet bottleneck with BatchNorms and a linear head, every channel count a multiple of
    64 (what the 2:4 kernels take)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128)
        self.c2, self.b2 = nn.Conv2d(128, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128)
        self.c3, self.b3 = nn.Conv2d(128, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 64)
        for bn in (self.b1, self.b2, self.b3):  # eval statistics that are not the identity
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.5, 0.5)
            nn.init.uniform_(bn.running_mean, -0.5, 0.5)
            nn.init.uniform_(bn.running_var, 0.5, 1.5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)))
        y = torch.relu(self.b3(self.c3(y)) + x)
        return self.fc(y.mean((2, 3)))


def test_24_folds_batchnorm_before_compressing(semi24_cpu):
    """A CNN with BatchNorm, in fp16 on the 2:4 path: BN folds into the masked convs first, then
    the 1x1 convs are compressed (a compressed weight takes neither a fold nor the cast the
    verification makes: this raised before); every step verifies, fp64 included."""
    from torch.sparse import SparseSemiStructuredTensor

    from graphprune.kernels.semi24 import PointwiseLinear

    torch.manual_seed(0)
    m = Bottleneck24().half().eval()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 64, 8, 8, dtype=torch.half)
    s = gp.sparsify(m, (x,), pattern="2:4")
    rep = s.graphprune_report
    assert rep["fused"] == 3 and not any(isinstance(t, nn.BatchNorm2d) for t in s.modules())
    for name in ("c1", "c3"):
        mod = s.get_submodule(name)
        assert isinstance(mod, PointwiseLinear) and isinstance(mod.weight, SparseSemiStructuredTensor)
        assert mod.bias is not None  # the folded BN's shift
    assert isinstance(s.fc.weight, SparseSemiStructuredTensor)
    assert type(s.c2) is nn.Conv2d and is_24(s.c2.weight != 0)
    v = rep["verify"]
    for step in ("sparse vs masked dense oracle", "fused vs unfused", "2:4 kernels vs masked dense"):
        assert f"{step}: verified" in v, v
    assert "fp64 check skipped" not in v, v
    assert all(torch.equal(before[k], t) for k, t in m.state_dict().items())  # user's model kept


def test_24_compression_must_be_lossless(semi24_cpu):
    """A weight that is not 2:4 along its input channels would lose weights when compressed:
    `to_semi_structured` refuses it instead."""
    from graphprune.kernels.semi24 import to_semi_structured

    lin = nn.Linear(64, 64).half()
    with pytest.raises(ValueError, match="not lossless"):
        to_semi_structured(lin, torch.ones_like(lin.weight, dtype=torch.bool))
    ok = to_semi_structured(lin, mask_24(lin.weight.detach()))
    assert torch.equal(ok.weight.to_dense(), lin.weight.detach() * mask_24(lin.weight.detach()))


@pytest.mark.parametrize("stride", [(1, 1), (2, 2), (2, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "unbatched"])
def test_24_rewrite_of_1x1_conv_and_linear(stride, bias, layout):
    """The structural half of the 2:4 rewrite, checked where no GPU is: a 1x1 conv becomes
    `PointwiseLinear` (F.linear over channels) equal to the masked conv, a linear stays a linear
    with the masked weight (the weight held as is instead of compressed)."""
    from graphprune.kernels.semi24 import PointwiseLinear, to_semi_structured

    torch.manual_seed(0)
    conv = nn.Conv2d(32, 24, 1, stride=stride, bias=bias)
    mask = mask_24(conv.weight.detach())
    new = to_semi_structured(conv, mask, convert=lambda w: w)
    assert isinstance(new, PointwiseLinear) and new.weight.shape == (24, 32)
    x = torch.randn(3, 32, 9, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "unbatched":
        x = x[0]
    ref = F.conv2d(x, conv.weight * mask, conv.bias, stride)
    assert torch.allclose(new(x), ref, rtol=1e-5, atol=1e-6)
    lin = nn.Linear(32, 24, bias=bias)
    lmask = mask_24(lin.weight.detach())
    newl = to_semi_structured(lin, lmask, convert=lambda w: w)
    z = torch.randn(5, 4, 32)
    assert type(newl) is nn.Linear
    assert torch.allclose(newl(z), F.linear(z, lin.weight * lmask, lin.bias), rtol=1e-5, atol=1e-6)
    assert torch.equal(conv.weight.detach() != 0, torch.ones_like(mask))  # original untouched


def test_24_report_names_every_reason():
    """Where the 2:4 kernels do not apply, the report says every reason (device, dtype, kind of
    layer, shape), and the layer keeps the pattern as a masked dense weight."""
    from graphprune.kernels.semi24 import why_not_semi_structured

    s = gp.sparsify(Net24().eval(), (torch.randn(2, 64, 8, 8),), pattern="2:4")
    rep = {r["layer"]: r["held_as"] for r in s.graphprune_report["layers"]}
    assert all(h.startswith("masked dense weight") for h in rep.values())
    assert all("needs CUDA" in h and "needs fp16/bf16 (weight is float32)" in h
               for h in rep.values())
    assert "3x3 conv" in rep["conv3"] and "3x3" not in rep["pw"]
    assert "padding" not in rep["conv3"]  # (a 3x3 conv's reason is its size, not its padding)
    odd = nn.Conv2d(48, 64, 1, groups=2, padding=1).to(torch.bfloat16)
    why = why_not_semi_structured(odd)
    for part in ("groups=2", "padding=(1, 1)", "needs CUDA", "weight 64x24"):
        assert part in why, (part, why)
    assert "fp16/bf16" not in why
    assert "the 2:4 kernels take" in why_not_semi_structured(nn.LayerNorm(64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["2:4", "1x16"])
def test_sparsify_half_precision_model(dtype, pattern):
    """An fp16 / bf16 model sparsifies and verifies: against an fp32 oracle, to the error its own
    dense half-precision copy has (before, every check demanded 1e-4 and failed), and exactly in
    fp64; the BN fold is checked on a float64 rebuild."""
    m, x = ZOO["resnet18"]()
    m = m.to(dtype).eval()
    x = tuple(t.to(dtype) for t in x)
    s = gp.sparsify(m, x, pattern=pattern, check_speed=False)
    v = s.graphprune_report["verify"]
    tag = "bf16" if dtype == torch.bfloat16 else "fp16"
    assert v.count("verified") == 2 and f"max rel err {tag}" in v, v
    assert s(*x).dtype == dtype
    assert "verified equal" in s.graphprune_report["permutation"]
    held = [r["held_as"] for r in s.graphprune_report["layers"] if "held_as" in r]
    assert held and all(("reference path" in h) == (pattern == "1x16") for h in held)


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


def test_hugging_face_bert_on_the_24_kernel_path(semi24_cpu):
    """An fp16 Hugging Face BERT (traced with torch.export, aten linears made modules) puts every
    linear on the 2:4 kernel path (tests/semi24_cpu.py) and verifies, fp64 included."""
    pytest.importorskip("transformers")
    from torch.sparse import SparseSemiStructuredTensor

    from graphprune.hf_zoo import hf_bert_model

    model, inputs = hf_bert_model()
    s = gp.sparsify(model.half().eval(), inputs, pattern="2:4")
    rep = s.graphprune_report
    held = [r["held_as"] for r in rep["layers"]]
    assert len(held) == 7 and all(h.startswith("to_sparse_semi_structured") for h in held), held
    assert sum(isinstance(p, SparseSemiStructuredTensor) for p in s.parameters()) == 7
    assert "2:4 kernels vs masked dense: verified" in rep["verify"]
    assert "fp64 check skipped" not in rep["verify"]


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


def test_weights_that_already_hold_24_patterns_are_not_permuted():
    """After 2:4 training the weights hold the pattern already: the channel search is skipped
    (nothing can keep more than all of them), the mask keeps every weight, and the sparsified
    model computes the model's own function."""
    torch.manual_seed(0)
    model = Net24().eval()
    with torch.no_grad():
        for mod in (model.conv3, model.pw, model.fc):
            mod.weight.mul_(mask_24(mod.weight))
    x = torch.randn(2, 64, 8, 8)
    s = gp.sparsify(model, x, pattern="2:4")
    rep = s.graphprune_report
    assert rep["permutation"].startswith("skipped: 3 layer(s) already hold 2:4 patterns"), rep
    assert rep["kept_magnitude"] == 1.0
    with torch.no_grad():
        assert float((s(x) - model(x)).abs().max() / model(x).abs().max()) < 1e-5
    plain = gp.sparsify(Net24().eval(), x, pattern="2:4").graphprune_report
    assert not plain["permutation"].startswith("skipped")


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
