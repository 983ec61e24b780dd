"""1xN block-sparse conv/linear: C++ kernel and reference equal the dense masked op; modules
trace, compile, export, pickle and train."""

from __future__ import annotations

import copy
import io
import os
import pickle
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from graphprune.kernels import onexn
from graphprune.kernels.masks import is_1xn, mask_1xn

CPP = onexn.available()
PATHS = ["cpp", "cpp-avx2", "reference"]
# + the C++ kernel with the masked in-place mode forced on every stride-1 padded NCHW conv
# (GP_1XN_MASKED=2; by default it runs on single images and where its 3x3 fast path covers
# most of the image) and forced off (GP_1XN_MASKED=0: the zero-padded copy). The 3x3 stride-1
# convs of these paths, and of "cpp-direct", skip the Winograd kernel (GP_1XN_WINO=0; by default
# it runs the 3x3 stride-1 NCHW convs with at most 16x16 outputs in at least 32 2x2 tiles and at
# least 96 kept channels); "cpp-wino" runs it on every 3x3 stride-1 NCHW conv (GP_1XN_WINO=2).
CONV_PATHS = [*PATHS, "cpp-masked", "cpp-avx2-masked", "cpp-planes", "cpp-direct", "cpp-wino"]
# + the C++ kernel with the channel-blocked ov mode forced on every linear (GP_1XN_OVB=2; by
# default it runs only where a tile's rows of all input channels would not stay in L1)
LINEAR_PATHS = [*PATHS, "cpp-ovb", "cpp-avx2-ovb"]
FORCED = {
    "-masked": {"GP_1XN_MASKED": "2", "GP_1XN_WINO": "0"},
    "-planes": {"GP_1XN_MASKED": "0", "GP_1XN_WINO": "0"},
    "-direct": {"GP_1XN_WINO": "0"},
    "-wino": {"GP_1XN_WINO": "2"},
    "-ovb": {"GP_1XN_OVB": "2"},
}
SETTINGS = settings(max_examples=50, deadline=None)


def _run_path(path: str, fn):
    """Run fn() on the C++ kernel (default ISA or AVX2) or on the reference path."""
    if path == "reference":
        with onexn.use_reference():
            return fn()
    if not CPP:
        pytest.skip("the 1xN C++ kernel is not available")
    for suffix, env in FORCED.items():
        if path.endswith(suffix):
            with mock.patch.dict(os.environ, env):
                return _run_path(path.removesuffix(suffix), fn)
    if path == "cpp-avx2":
        with onexn.use_isa("avx2"):
            return fn()
    return fn()


def _rel_err(y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Max error relative to the largest |ref| (or to `scale`: the magnitude of the terms
    summed, when an epilogue's residual can cancel the sum down to a few tiny outputs)."""
    s = ref.abs().max() if scale is None else scale
    return float((y.double() - ref.double()).abs().max() / s.double().clamp_min(1e-12))


def _epi_ref(ref: torch.Tensor, res: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """The fused epilogue on the dense reference: relu(ref + res)."""
    out = ref if res is None else ref + res.to(ref.dtype)
    return out.clamp_min(0) if relu else out


def _epi_scale(pre: torch.Tensor, res: torch.Tensor | None) -> torch.Tensor:
    """The size of what the epilogue sums (max |pre|, |res|): the residual may cancel the sum
    down to a few tiny outputs, so errors are measured against this, not the output."""
    return pre.abs().max() if res is None else torch.maximum(pre.abs().max(), res.abs().max())


def _sparse_conv(c, k, n, sp, seed, bias=True, **kw):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, k, bias=bias, **kw)
    mask = mask_1xn(conv.weight, n, sp)
    return conv, mask, onexn.Conv2d1xN.from_dense(conv, mask, n)


# the conv sweeps' common draws: batch, input channels, N, output groups of N
CONV_SIZES = dict(
    batch=st.integers(1, 3),
    c=st.integers(1, 20),
    n=st.sampled_from([4, 8, 16, 32]),
    groups=st.integers(1, 3),
)


@pytest.mark.parametrize("path", CONV_PATHS)
@SETTINGS
@given(
    **CONV_SIZES,
    hw=st.tuples(st.integers(1, 13), st.integers(1, 13)),
    ks=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.9]),
    bias=st.booleans(),
    channels_last=st.booleans(),
    epilogue=st.sampled_from(["", "relu", "res", "res+relu", "res_cl+relu"]),
    seed=st.integers(0, 10_000),
)
def test_conv_matches_dense_masked(
    path, batch, c, n, groups, hw, ks, stride, padding, dilation, sparsity, bias,
    channels_last, epilogue, seed,
):  # fmt: skip
    """conv2d_1xn == F.conv2d with the masked dense weight (rel. err < 1e-5), same layout; with
    the fused epilogue == relu(conv + residual) (a residual in the other layout is copied)."""
    out_hw = [(hw[i] + 2 * padding[i] - dilation[i] * (ks[i] - 1) - 1) // stride[i] + 1
              for i in range(2)]  # fmt: skip
    assume(min(out_hw) >= 1)
    conv, mask, sp = _sparse_conv(
        c, n * groups, n, sparsity, seed, bias=bias, kernel_size=ks, stride=stride,
        padding=padding, dilation=dilation,
    )  # fmt: skip
    x = torch.randn(batch, c, *hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    res = torch.randn(batch, n * groups, *out_hw) if "res" in epilogue else None
    if "res_cl" in epilogue:
        res = res.contiguous(memory_format=torch.channels_last)
    sp.relu = "relu" in epilogue
    with torch.no_grad():
        # float64 NCHW reference: oneDNN's fp32 channels_last conv crashes on some odd shapes
        w64, b64 = (conv.weight * mask).double(), None if conv.bias is None else conv.bias.double()
        pre = F.conv2d(x.double().contiguous(), w64, b64, stride, padding, dilation)
        ref, scale = _epi_ref(pre, res, sp.relu), _epi_scale(pre, res)
        y = _run_path(path, lambda: sp(x, res))
    assert y.shape == ref.shape
    assert _rel_err(y, ref, scale) < 1e-5
    if channels_last and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()


@pytest.mark.parametrize("path", ["cpp-wino", "cpp-avx2-wino"])
@SETTINGS
@given(
    **CONV_SIZES,
    hw=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    sparsity=st.sampled_from([0.0, 0.5, 0.75, 0.9]),
    bias=st.booleans(),
    epilogue=st.sampled_from(["", "relu", "res", "res+relu"]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_wino_matches_dense_masked(
    path, batch, c, n, groups, hw, padding, sparsity, bias, epilogue, threads, seed
):
    """The Winograd F(2x2, 3x3) kernel (3x3 stride-1 NCHW convs; odd sizes, images wider than
    one vector of tiles, any padding) == F.conv2d with the masked dense weight (rel. err <
    1e-5), epilogue included; with AVX2 the transforms take the generic path."""
    out_hw = [hw[i] + 2 * padding[i] - 2 for i in range(2)]
    assume(min(out_hw) >= 1)
    conv, mask, sp = _sparse_conv(
        c, n * groups, n, sparsity, seed, bias=bias, kernel_size=3, padding=padding
    )
    x = torch.randn(batch, c, *hw)
    res = torch.randn(batch, n * groups, *out_hw) if "res" in epilogue else None
    sp.relu = "relu" in epilogue
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            b64 = None if conv.bias is None else conv.bias.double()
            pre = F.conv2d(x.double(), (conv.weight * mask).double(), b64, 1, padding)
            ref, scale = _epi_ref(pre, res, sp.relu), _epi_scale(pre, res)
            y = _run_path(path, lambda: sp(x, res))
    finally:
        torch.set_num_threads(old)
    assert _ran_wino(sp)
    assert y.shape == ref.shape and y.is_contiguous()
    assert _rel_err(y, ref, scale) < 1e-5


def _ran_wino(sp: onexn.Conv2d1xN) -> bool:
    """Whether the Winograd kernels of ``sp.values`` were computed (and are cached)."""
    return id(sp.values) in onexn._WINO_CACHE


def test_wino_default_choice_and_cache():
    """By default Winograd runs the 3x3 stride-1 convs with at most 16x16 outputs in at least 32
    tiles and at least 96 kept channels (not 56x56, not one 7x7 image: 16 tiles, not
    channels_last input, not 48 kept unless GP_1XN_WINO_KEPT allows it); its transformed kernels
    follow in-place changes of ``values``."""
    if not CPP:
        pytest.skip("the 1xN C++ kernel is not available")
    _, _, few = _sparse_conv(192, 32, 16, 0.75, 0, bias=False, kernel_size=3, padding=1)
    _, _, sp = _sparse_conv(192, 32, 16, 0.5, 0, bias=False, kernel_size=3, padding=1)
    x = torch.randn(2, 192, 7, 7)
    with torch.no_grad():
        few(x)
        assert few.kept == 48 and not _ran_wino(few)
        sp(x.contiguous(memory_format=torch.channels_last))
        sp(torch.randn(1, 192, 56, 56))
        sp(torch.randn(1, 192, 7, 7))
        assert sp.kept == 96 and not _ran_wino(sp)
        y = sp(x)
        assert _ran_wino(sp)
        with mock.patch.dict(os.environ, {"GP_1XN_WINO_KEPT": "48"}):
            few(x)
        assert _ran_wino(few)
        sp.values.mul_(2)
        y2 = sp(x)
        ref2 = F.conv2d(x.double(), sp.to_dense().double(), None, 1, 1)
    assert _rel_err(y2, ref2) < 1e-5 and _rel_err(y2, 2 * y) < 1e-5


def test_wino_through_the_custom_op(monkeypatch):
    """The custom op (torch.compile, autograd) picks Winograd too, computes the transformed
    kernels once per ``values`` state, and drops them with the tensor."""
    if not CPP:
        pytest.skip("the 1xN C++ kernel is not available")
    calls = []
    real = onexn.wino_values
    monkeypatch.setattr(onexn, "wino_values", lambda v, n: calls.append(1) or real(v, n))
    _, _, sp = _sparse_conv(128, 32, 16, 0.25, 1, kernel_size=3, padding=1)
    x = torch.randn(2, 128, 9, 9)
    with torch.no_grad():
        ref = F.conv2d(x.double(), sp.to_dense().double(), sp.bias.double(), 1, 1)
    compiled = torch.compile(sp, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        ys = [compiled(x) for _ in range(3)]
    assert len(calls) == 1 and _ran_wino(sp)
    assert all(_rel_err(y, ref) < 1e-5 for y in ys)
    # autograd: forward by Winograd, gradients of the direct conv
    xg = x.clone().requires_grad_()
    sp(xg).square().sum().backward()
    xr = x.double().requires_grad_()
    F.conv2d(xr, sp.to_dense().double(), sp.bias.detach().double(), 1, 1).square().sum().backward()
    assert len(calls) == 1 and _rel_err(xg.grad, xr.grad) < 1e-5
    key = id(sp.values)
    del compiled, sp
    import gc

    gc.collect()
    assert key not in onexn._WINO_CACHE


@pytest.mark.parametrize("path", LINEAR_PATHS)
@SETTINGS
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    c=st.integers(1, 40),
    n=st.sampled_from([4, 8, 16, 32]),
    groups=st.integers(1, 3),
    sparsity=st.sampled_from([0.0, 0.5, 0.75, 0.9]),
    bias=st.booleans(),
    residual=st.booleans(),
    relu=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_linear_matches_dense_masked(path, lead, c, n, groups, sparsity, bias, residual, relu,
                                     seed):  # fmt: skip
    """linear_1xn == F.linear with the masked dense weight over any leading dims (and the fused
    epilogue == relu(linear + residual))."""
    torch.manual_seed(seed)
    lin = nn.Linear(c, n * groups, bias=bias)
    mask = mask_1xn(lin.weight, n, sparsity)
    sp = onexn.Linear1xN.from_dense(lin, mask, n)
    sp.relu = relu
    x = torch.randn(*lead, c)
    res = torch.randn(*lead, n * groups) if residual else None
    with torch.no_grad():
        b = None if lin.bias is None else lin.bias.double()
        pre = F.linear(x.double(), (lin.weight * mask).double(), b)
        ref, scale = _epi_ref(pre, res, relu), _epi_scale(pre, res)
        y = _run_path(path, lambda: sp(x, res))
        y_op = _run_path(
            path,
            lambda: torch.ops.graphprune.linear_1xn(x, sp.values, sp.indices, sp.bias, n, res,
                                                    relu),
        )  # fmt: skip
    assert y.shape == ref.shape and _rel_err(y, ref, scale) < 1e-5
    assert torch.equal(y, y_op)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"GP_1XN_OVB": "0"},
        {"GP_1XN_OVB_WKB": "64", "GP_1XN_OVB_ROWS": "30"},
        {"GP_1XN_AFFINE": "2", "GP_1XN_OVB_ROWS": "30"},
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "m,c,k,n,sparsity",
    [
        (200, 768, 256, 16, 0.75),
        (37, 1000, 96, 32, 0.5),
        (50, 600, 128, 64, 0.875),
        (3, 513, 48, 16, 0.5),
    ],
)
def test_linear_channel_blocked(monkeypatch, env, threads, m, c, k, n, sparsity):
    """Linear layers with many input channels (the channel-blocked ov mode by default: several
    256-channel blocks, a ragged last one, blocks where a group keeps nothing, 24-row tiles with
    ragged ends, group blocks) match dense masked, with and without the fused epilogue."""
    if not CPP:
        pytest.skip("the 1xN C++ kernel is not available")
    for key, val in env.items():
        monkeypatch.setenv(key, val)
    torch.manual_seed(m + c)
    lin = nn.Linear(c, k)
    with torch.no_grad():  # channels >= 256 of group 0 are all pruned: empty blocks
        lin.weight[:n, 256:] *= 1e-3
    mask = mask_1xn(lin.weight, n, sparsity)
    sp = onexn.Linear1xN.from_dense(lin, mask, n)
    x, res = torch.randn(m, c), torch.randn(m, k)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            ref = F.linear(x.double(), (lin.weight * mask).double(), lin.bias.double())
            y = sp(x)
            sp.relu = True
            y_epi = sp(x, res)
            y_avx2 = _run_path("cpp-avx2", lambda: sp(x, res))
    finally:
        torch.set_num_threads(old)
    assert _rel_err(y, ref.float()) < 1e-5
    ref_epi = _epi_ref(ref, res, True).float()
    assert _rel_err(y_epi, ref_epi) < 1e-5 and _rel_err(y_avx2, ref_epi) < 1e-5


@pytest.mark.parametrize("l1_kb", [None, "1"])
@pytest.mark.parametrize(
    "c,k,hw,ks,stride,pad",
    [(64, 64, 56, 3, 1, 1), (256, 64, 28, 1, 1, 0), (96, 128, 15, 3, 2, 1), (256, 32, 14, 3, 1, 1)],
)
def test_conv_realistic_shapes(monkeypatch, l1_kb, c, k, hw, ks, stride, pad):
    """ResNet-like shapes (many tiles and macro tiles, 2 threads, channel blocks) match dense.

    GP_1XN_L1_KB=1 forces the smallest channel blocks, exercising partial-sum accumulation.
    The 3x3 pad-1 layer at 56x56 takes the masked in-place mode's 3x3 fast path on most tiles;
    the 14x14 one (batch 2) Winograd by default, the stacked mode with Winograd off, in-place
    with the masked mode forced on.
    """
    if l1_kb:
        monkeypatch.setenv("GP_1XN_L1_KB", l1_kb)
    _, mask, sp = _sparse_conv(c, k, 16, 0.75, 0, kernel_size=ks, stride=stride, padding=pad)
    x = torch.randn(2, c, hw, hw)
    with torch.no_grad():
        ref = F.conv2d(x, sp.to_dense(), sp.bias, stride, pad)
        for path in ("cpp", "cpp-masked", "cpp-planes", "cpp-direct", "cpp-wino", "cpp-avx2",
                     "reference"):  # fmt: skip
            assert _rel_err(_run_path(path, lambda: sp(x)), ref) < 1e-5


# Tiling knobs: GP_1XN_FUSE_KB=0 packs every padded/strided NCHW input per block of rows in
# the thread that uses it (row-block mode); GP_1XN_L2_KB=16 (with GP_1XN_SMALL_KB=0: even small
# inputs count as too big for L2) makes units (tile runs / row blocks) as small as they get, so
# images split into many units with ragged ends; GP_1XN_PF=1 / GP_1XN_PFD turn the next-unit
# (L2) prefetch on / set the next-rows (L1) prefetch distance. GP_1XN_MASKED=2 reads every
# stride-1 padded NCHW input in place through lane masks, =0 never (packed planes instead);
# GP_1XN_STACK=2 copies a batch of same-size convs with its images side by side (tiles and
# vectors across image boundaries; with small units, units too), =0 never. GP_1XN_PF2 sets the
# L2 prefetch of 1x1 rows (tiles ahead; by default on only for activations over 2 MB);
# GP_1XN_WPFD=0 turns off the masked loop's weight prefetch (on by default). GP_1XN_AFFINE=0
# hands out every item from one shared counter instead of one range per thread (with stealing;
# by default for pv jobs only), =2 gives the ov jobs (channels_last input) ranges too.
TILING = [
    {},
    {"GP_1XN_FUSE_KB": "0", "GP_1XN_RB_WKB": "100000"},
    {"GP_1XN_FUSE_KB": "0", "GP_1XN_RB_WKB": "100000", "GP_1XN_L2_KB": "16", "GP_1XN_PFD": "3"},
    {"GP_1XN_SMALL_KB": "0", "GP_1XN_L2_KB": "16", "GP_1XN_PF": "1"},
    {"GP_1XN_SMALL_KB": "0", "GP_1XN_L2_KB": "16", "GP_1XN_PFD": "0", "GP_1XN_ORDER": "0"},
    {"GP_1XN_FUSE_KB": "100000", "GP_1XN_ORDER": "1", "GP_1XN_PFD": "48"},
    {"GP_1XN_MASKED": "2", "GP_1XN_SMALL_KB": "0", "GP_1XN_L2_KB": "16"},
    {"GP_1XN_MASKED": "0"},
    {"GP_1XN_STACK": "2"},
    {"GP_1XN_STACK": "2", "GP_1XN_SMALL_KB": "0", "GP_1XN_L2_KB": "16"},
    {"GP_1XN_STACK": "0"},
    {"GP_1XN_OVB": "2"},
    {"GP_1XN_OVB": "2", "GP_1XN_OVB_ROWS": "1", "GP_1XN_OVB_WKB": "64"},
    {"GP_1XN_OVB": "0"},
    {"GP_1XN_PF2": "1"},
    {"GP_1XN_PF2": "3", "GP_1XN_PF": "1"},
    {"GP_1XN_WPFD": "0", "GP_1XN_STACK": "2"},
    {"GP_1XN_AFFINE": "0"},
    {"GP_1XN_AFFINE": "2"},
]


@pytest.mark.parametrize(
    "env", TILING, ids=lambda e: ",".join(f"{k[7:]}={v}" for k, v in e.items())
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "batch,c,k,hw,ks,stride,pad,dil",
    [
        (1, 32, 32, 23, 3, 1, 1, 1),  # 23*23 pixels: no tile multiple, tail pixels
        (8, 24, 48, 17, 3, 1, 1, 1),  # batch 8, row blocks shorter than an image
        (9, 16, 32, 13, 3, 2, 1, 1),  # stride 2: phase planes
        (3, 40, 16, 19, 3, 1, 2, 2),  # dilation 2, padding 2
        (8, 64, 32, 7, 1, 1, 0, 1),  # 1x1 in place, 49 pixels per image
        (2, 48, 64, 31, 1, 2, 0, 1),  # 1x1 stride 2 (planar copy)
        (8, 72, 16, 9, (1, 3), (2, 1), (0, 1), 1),  # non-square kernel, stride, padding
    ],
)
def test_conv_tiling_edge_cases(monkeypatch, env, threads, batch, c, k, hw, ks, stride, pad, dil):
    """Every tiling mode (row blocks, small units, prefetch, item order) matches dense masked."""
    if not CPP:
        pytest.skip("the 1xN C++ kernel is not available")
    for key, val in env.items():
        monkeypatch.setenv(key, val)
    _, mask, sp = _sparse_conv(
        c, k, 16, 0.75, 3, kernel_size=ks, stride=stride, padding=pad, dilation=dil
    )
    x = torch.randn(batch, c, hw, hw + 2)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            ref = F.conv2d(x.double(), sp.to_dense().double(), sp.bias.double(), stride, pad, dil)
            y = sp(x)
            y_cl = sp(x.contiguous(memory_format=torch.channels_last))
            # fused epilogue (residual + ReLU): in every tiling mode it must run exactly once,
            # after the last block of kept channels
            res = torch.randn(ref.shape)
            sp.relu = True
            y_epi = sp(x, res)
            y_epi_cl = sp(x.contiguous(memory_format=torch.channels_last), res)
    finally:
        torch.set_num_threads(old)
    assert y.shape == ref.shape and y.is_contiguous()
    assert _rel_err(y, ref.float()) < 1e-5
    assert _rel_err(y_cl, ref.float()) < 1e-5
    ref_epi = _epi_ref(ref, res, True).float()
    assert _rel_err(y_epi, ref_epi) < 1e-5 and _rel_err(y_epi_cl, ref_epi) < 1e-5


@pytest.mark.parametrize("threads", [3, 5])
@pytest.mark.parametrize("affine", ["1", "0", "2"])
def test_items_run_once_with_more_threads_than_cores(monkeypatch, threads, affine):
    """Each thread's range of items, and the items taken from the other ranges, run exactly once.

    Three or five threads on this two-core machine: threads get descheduled mid-range and the
    others take their items over (a lost or doubled item would leave a wrong output block).
    """
    if not CPP:
        pytest.skip("the 1xN C++ kernel is not available")
    monkeypatch.setenv("GP_1XN_AFFINE", affine)
    monkeypatch.setenv("GP_1XN_SMALL_KB", "0")
    monkeypatch.setenv("GP_1XN_L2_KB", "16")  # many small units: many items
    _, _, sp = _sparse_conv(48, 64, 16, 0.75, 5, kernel_size=3, padding=1)
    x = torch.randn(5, 48, 15, 17)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            ref = F.conv2d(x.double(), sp.to_dense().double(), sp.bias.double(), 1, 1)
            xc = x.contiguous(memory_format=torch.channels_last)  # ov jobs
            ys = [sp(x) for _ in range(3)] + [sp(xc) for _ in range(3)]
    finally:
        torch.set_num_threads(old)
    for y in ys:
        assert _rel_err(y, ref.float()) < 1e-5


def test_float64_and_no_cpp_env_use_reference(monkeypatch):
    """Non-fp32 inputs and GRAPHPRUNE_NO_CPP=1 run the reference path with the same numbers."""
    conv, mask, sp = _sparse_conv(8, 16, 8, 0.5, 1, kernel_size=3, padding=1)
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        y = sp(x)
        y64 = sp.double()(x.double())
        ref64 = F.conv2d(x.double(), conv.weight.double() * mask, conv.bias.double(), 1, 1)
        assert (y64 - ref64).abs().max() < 1e-12
        monkeypatch.setenv("GRAPHPRUNE_NO_CPP", "1")
        y_ref = sp.float()(x)
    assert _rel_err(y_ref, y) < 1e-5


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    """A failing C++ build warns once and the ops still work through the reference path."""
    monkeypatch.delenv("GRAPHPRUNE_NO_CPP", raising=False)
    state = (onexn._EXT.tried, onexn._EXT.module)

    def boom():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(onexn, "_build", boom)
    onexn._EXT.tried, onexn._EXT.module = False, None
    try:
        with pytest.warns(RuntimeWarning, match="no compiler here"):
            assert not onexn.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not onexn.available()
            _, mask, sp = _sparse_conv(4, 8, 4, 0.5, 0, kernel_size=1)
            x = torch.randn(1, 4, 3, 3)
            with torch.no_grad():
                assert _rel_err(sp(x), F.conv2d(x, sp.to_dense(), sp.bias)) < 1e-5
    finally:
        onexn._EXT.tried, onexn._EXT.module = state


def test_module_round_trips():
    """to_dense equals the masked weight; pickle, deepcopy and state_dict round-trip."""
    conv, mask, sp = _sparse_conv(12, 32, 16, 0.5, 3, kernel_size=3, padding=1)
    assert torch.equal(sp.to_dense(), (conv.weight * mask).detach())
    assert is_1xn(sp.to_dense() != 0, 16)
    x = torch.randn(2, 12, 6, 6)
    with torch.no_grad():
        y = sp(x)
        for other in (pickle.loads(pickle.dumps(sp)), copy.deepcopy(sp)):
            assert torch.equal(other(x), y)
        buf = io.BytesIO()
        torch.save(sp.state_dict(), buf)
        fresh = onexn.Conv2d1xN(12, 32, 3, 16, sp.kept, padding=1)
        fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
        assert torch.equal(fresh(x), y)
    lin = nn.Linear(20, 8)
    sl = onexn.Linear1xN.from_dense(lin, mask_1xn(lin.weight, 4, 0.5), 4)
    assert torch.equal(sl.to_dense(), (lin.weight * mask_1xn(lin.weight, 4, 0.5)).detach())
    assert "kept=10" in repr(sl) and "kept=6" in repr(sp)


def test_from_dense_errors():
    """Bad masks and unsupported convs raise ValueError naming the problem."""
    conv = nn.Conv2d(8, 16, 3)
    bad = mask_1xn(conv.weight, 8, 0.5)
    bad[0, :, 0, 0] = ~bad[0, :, 0, 0]
    with pytest.raises(ValueError, match="not a uniform 1x8"):
        onexn.Conv2d1xN.from_dense(conv, bad, 8)
    with pytest.raises(ValueError, match="groups=2"):
        g = nn.Conv2d(8, 16, 3, groups=2)
        onexn.Conv2d1xN.from_dense(g, torch.ones_like(g.weight, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="not divisible"):
        onexn.Conv2d1xN(8, 12, 3, 8, 4)
    same = nn.Conv2d(8, 16, 3, padding="same")
    sp = onexn.Conv2d1xN.from_dense(same, mask_1xn(same.weight, 8, 0.5), 8)
    assert sp.padding == (1, 1)


class _Net(nn.Module):
    """Conv1xN -> relu -> Conv1xN (stride 2) -> pool -> Linear1xN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        c1, c2, fc = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 32, 3, 2, 1), nn.Linear(32, 16)
        self.c1 = onexn.Conv2d1xN.from_dense(c1, mask_1xn(c1.weight, 8, 0.5), 8)
        self.c2 = onexn.Conv2d1xN.from_dense(c2, mask_1xn(c2.weight, 16, 0.75), 16)
        self.fc = onexn.Linear1xN.from_dense(fc, mask_1xn(fc.weight, 16, 0.5), 16)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = self.c2(x).mean(dim=(2, 3))
        return self.fc(x)


def test_fx_symbolic_trace():
    """symbolic_trace records the custom ops and the traced module matches eager."""
    net = _Net().eval()
    gm = torch.fx.symbolic_trace(net)
    targets = {str(nd.target) for nd in gm.graph.nodes if nd.op == "call_function"}
    assert any("conv2d_1xn" in t for t in targets) and any("linear_1xn" in t for t in targets)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        assert torch.allclose(gm(x), net(x), rtol=1e-5, atol=1e-6)


def test_fake_matches_real_layout():
    """register_fake gives the same shape and strides as the kernel (NCHW and channels_last)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sp = _sparse_conv(8, 16, 8, 0.5, 0, kernel_size=3, stride=2, padding=1)[2]
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 8, 9, 9).contiguous(memory_format=fmt)
        args = (sp.values, sp.indices, sp.bias, [2, 2], [1, 1], [1, 1], 8, [3, 3])
        with torch.no_grad():
            real = torch.ops.graphprune.conv2d_1xn(x, *args)
        with FakeTensorMode() as mode:
            fx = mode.from_tensor(x)
            fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = torch.ops.graphprune.conv2d_1xn(fx, *fargs)
        assert fake.shape == real.shape and fake.stride() == real.stride()


def test_torch_compile_aot_eager():
    """torch.compile(backend='aot_eager') runs the custom ops and matches eager."""
    net = _Net().eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = net(x)
        out = torch.compile(net, backend="aot_eager", fullgraph=True)(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_torch_compile_inductor():
    """torch.compile with inductor (the default backend) matches eager.

    The model has no pointwise ops, so inductor emits only extern calls (fast to compile).
    """
    net = nn.Sequential(_Net().c1, nn.Flatten(), onexn.Linear1xN(8 * 81, 16, 16, 100)).eval()
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        ref = net(x)
        out = torch.compile(net, fullgraph=True)(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_torch_export():
    """torch.export.export traces through the ops; the exported program matches eager."""
    net = _Net().eval()
    x = torch.randn(2, 8, 9, 9)
    ep = torch.export.export(net, (x,))
    assert "graphprune.conv2d_1xn" in str(ep.graph)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), net(x), rtol=1e-5, atol=1e-6)


def test_backward_matches_dense_masked():
    """Gradients of x, values and bias equal those of the dense masked op."""
    conv, mask, sp = _sparse_conv(6, 16, 8, 0.5, 2, kernel_size=3, stride=2, padding=1)
    lin = nn.Linear(16, 8)
    lmask = mask_1xn(lin.weight, 8, 0.5)
    sl = onexn.Linear1xN.from_dense(lin, lmask, 8)
    x = torch.randn(2, 6, 7, 7, requires_grad=True)
    sl(sp(x).mean(dim=(2, 3))).square().sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    wd = (conv.weight * mask).detach().requires_grad_(True)
    lw = (lin.weight * lmask).detach().requires_grad_(True)
    hidden = F.conv2d(xd, wd, conv.bias, 2, 1).mean(dim=(2, 3))
    F.linear(hidden, lw, lin.bias).square().sum().backward()
    assert torch.allclose(x.grad, xd.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(sp.to_dense(), wd.detach())
    packed = onexn.pack_1xn(wd.grad, sp.indices, 8)
    assert torch.allclose(sp.values.grad, packed, rtol=1e-4, atol=1e-6)
    assert torch.allclose(sl.values.grad, onexn.pack_1xn(lw.grad, sl.indices, 8), atol=1e-5)


def test_faster_than_dense_smoke():
    """faster_than_dense returns (bool, sparse_ms, dense_ms) with positive times."""
    fast, s_ms, d_ms = onexn.faster_than_dense(
        nn.Conv2d(32, 32, 1), (1, 32, 8, 8), 16, 0.75, threads=1, repeats=3
    )
    assert isinstance(fast, bool) and s_ms > 0 and d_ms > 0
    fast, s_ms, d_ms = onexn.faster_than_dense(
        (32, 16, 3, 3), (1, 16, 8, 8), 16, 0.5, padding=1, repeats=3
    )
    assert isinstance(fast, bool) and s_ms > 0 and d_ms > 0
    with pytest.raises(ValueError, match="weight shape"):
        onexn.faster_than_dense((32, 16, 3), (1, 16, 8), 16, 0.5)


def test_backward_through_fused_epilogue():
    """With residual + ReLU fused, gradients of x, values, bias and the residual equal those of
    relu(conv + residual) / relu(linear + residual) on the dense masked weights."""
    conv, mask, sp = _sparse_conv(6, 16, 8, 0.5, 4, kernel_size=3, padding=1)
    sp.relu = True
    lin = nn.Linear(16, 8)
    sl = onexn.Linear1xN.from_dense(lin, mask_1xn(lin.weight, 8, 0.5), 8)
    sl.relu = True
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    r = torch.randn(2, 16, 5, 5, requires_grad=True)
    r2 = torch.randn(2, 8, requires_grad=True)
    sl(sp(x, r).mean(dim=(2, 3)), r2).square().sum().backward()
    xd, rd, r2d = (t.detach().clone().requires_grad_(True) for t in (x, r, r2))
    wd = sp.to_dense().requires_grad_(True)
    h = torch.relu(F.conv2d(xd, wd, conv.bias, 1, 1) + rd).mean(dim=(2, 3))
    torch.relu(F.linear(h, sl.to_dense(), lin.bias) + r2d).square().sum().backward()
    assert torch.allclose(x.grad, xd.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(r.grad, rd.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(r2.grad, r2d.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(sp.values.grad, onexn.pack_1xn(wd.grad, sp.indices, 8), atol=1e-5)
    assert r.grad.abs().sum() > 0 and (r.grad == 0).any()  # the ReLU really masked some


def test_time_rounds_order_and_counts():
    """Plain rounds keep the order; shuffled rounds vary it (seeded) and still file every time
    under its own function; `warm` adds one untimed call before each timed one."""
    calls: list[int] = []
    fns = [lambda i=i: calls.append(i) for i in range(4)]
    t = onexn.time_rounds(fns, warmup=1, repeats=6)
    assert [len(ts) for ts in t] == [6] * 4 and calls == list(range(4)) * 7
    calls.clear()
    t = onexn.time_rounds(fns, warmup=0, repeats=6, shuffle=True, warm=True)
    assert [len(ts) for ts in t] == [6] * 4 and len(calls) == 48
    rounds = [tuple(calls[k:k + 8:2]) for k in range(0, 48, 8)]
    assert all(sorted(r) == [0, 1, 2, 3] for r in rounds) and len(set(rounds)) > 1
    assert all(calls[k] == calls[k + 1] for k in range(0, 48, 2))  # warm call, then timed call
    calls.clear()
    onexn.time_rounds(fns, warmup=0, repeats=6, shuffle=True, warm=True)
    assert [tuple(calls[k:k + 8:2]) for k in range(0, 48, 8)] == rounds  # seeded


def test_with_env_sets_and_restores(monkeypatch):
    """onexn.with_env: the variable holds the value during the call, its old state after."""
    seen = []
    monkeypatch.delenv("GP_TEST_KNOB", raising=False)
    onexn.with_env(lambda: seen.append(os.environ.get("GP_TEST_KNOB")), "GP_TEST_KNOB", "2")()
    assert seen == ["2"] and "GP_TEST_KNOB" not in os.environ
    monkeypatch.setenv("GP_TEST_KNOB", "1")
    with pytest.raises(ZeroDivisionError):
        onexn.with_env(lambda: 1 / 0, "GP_TEST_KNOB", "0")()
    assert os.environ["GP_TEST_KNOB"] == "1"
