"""verify_against: the oracle check holds in fp32 and in half precision, and still catches errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from graphprune.errors import VerificationError
from graphprune.verify import random_like_inputs, verify_against


def _net(dtype):
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]
    m = nn.Sequential(*layers).eval()
    for mod in m.modules():  # non-trivial statistics, so BN is not the identity
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return fx.symbolic_trace(m).to(dtype), (torch.randn(2, 32, 12, 12, dtype=dtype),)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_copy_passes_and_a_wrong_channel_fails(dtype):
    gm, x = _net(dtype)
    same = copy.deepcopy(gm)
    rep = verify_against(same, gm, x, {})
    tag = "bf16" if dtype == torch.bfloat16 else "fp16"
    assert rep.precision == tag and f"max rel err {tag}" in str(rep)
    assert rep.err64 is not None and rep.err64 < 1e-12
    # a model that computes in a different order (fp32 inside, rounded at the end) also passes:
    # the bound is the dense half-precision oracle's own error, not an fp32 tolerance
    class Upcast(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = copy.deepcopy(m).float()

        def forward(self, x):
            return self.m(x.float()).to(x.dtype)

    verify_against(fx.symbolic_trace(Upcast(gm)), gm, x, {})
    # one output channel of the 5th conv lost: within bf16's rounding here, caught in fp64
    wrong = copy.deepcopy(gm)
    with torch.no_grad():
        wrong.get_submodule("12").weight[5].zero_()
    with pytest.raises(VerificationError, match="differs from its oracle"):
        verify_against(wrong, gm, x, {})
    # the first conv's sign flipped: far outside the half-precision bound
    wrong = copy.deepcopy(gm)
    with torch.no_grad():
        wrong.get_submodule("0").weight.neg_()
    with pytest.raises(VerificationError, match=f"{tag} against an fp32 oracle"):
        verify_against(wrong, gm, x, {})


def test_fp32_keeps_its_tolerance():
    gm, x = _net(torch.float32)
    wrong = copy.deepcopy(gm)
    with torch.no_grad():
        wrong.get_submodule("0").weight[0, 0, 0, 0] += 0.5
    with pytest.raises(VerificationError, match=r"\(fp32\)"):
        verify_against(wrong, gm, x, {})
    assert verify_against(copy.deepcopy(gm), gm, x, {}).precision == "fp32"


def test_random_inputs_keep_dtype_device_and_range():
    args = (torch.zeros(3, 4, dtype=torch.bfloat16), torch.tensor([2, 5, 7]), 1.5)
    (a, b, c), _ = random_like_inputs(args, {}, seed=0)
    assert a.dtype == torch.bfloat16 and a.device == args[0].device and a.std() > 0.5
    assert b.dtype == torch.int64 and int(b.min()) >= 2 and int(b.max()) <= 7
    assert c == 1.5
    (a2, _, _), _ = random_like_inputs(args, {}, seed=0)
    assert torch.equal(a, a2)
