"""2:4 on NVIDIA Sparse Tensor Cores, through ``torch.sparse.to_sparse_semi_structured``.

torch's semi-structured kernels (cuSPARSELt, or CUTLASS) take matrix products (mm, addmm,
linear), not convolutions, in fp16 / bf16 on CUDA, with the sparse operand's dims multiples of a
minimum (CUTLASS 32 x 64, cuSPARSELt 16 x 16: we ask for 64 x 64, which both accept). So:

* a linear layer keeps its module and gets the compressed weight;
* a 1x1 conv (groups 1, no padding; any stride) becomes `PointwiseLinear`: the same product over
  channels, ``F.linear`` on the NHWC view (free for channels_last input);
* a kxk conv keeps the pattern as a masked dense weight: an im2col path would materialise kxk
  copies of the input, and the issue asks for it only where a GPU benchmark shows it pays (no GPU
  has been available to measure it).

`why_not_semi_structured` names every reason a layer cannot use the kernels, so the sparsify
report says what to change (device, dtype, shape, kind of layer).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PointwiseLinear", "dense_copy", "is_semi_structured", "semi_structured_weight_ok",
           "to_semi_structured", "weight_why_not", "why_not_semi_structured"]

_DIM = 64  # both dims of a compressed weight: multiples of this (CUTLASS fp16: 32 x 64)
_DEVICE_TYPES = ("cuda",)  # where the kernels run (tests add "cpu" with an emulated tensor)


def _default_convert(w: torch.Tensor) -> torch.Tensor:
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(w)


def is_semi_structured(t) -> bool:
    """`t` is a compressed 2:4 tensor (``torch.sparse.SparseSemiStructuredTensor``)."""
    from torch.sparse import SparseSemiStructuredTensor

    return isinstance(t, SparseSemiStructuredTensor)


def dense_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose compressed 2:4 weights are plain dense tensors (their exact
    decompression), so it can be cast (``.float()``, ``.double()``: semi-structured tensors take
    neither) or run where the kernels do not."""
    out = copy.deepcopy(module)
    for name, p in list(out.named_parameters()):
        if is_semi_structured(p):
            prefix, _, attr = name.rpartition(".")
            owner = out.get_submodule(prefix) if prefix else out
            setattr(owner, attr, nn.Parameter(p.to_dense(), requires_grad=False))
    return out


def weight_why_not(w: torch.Tensor) -> str:
    """'' when the 2:4 kernels take this weight (CUDA, fp16/bf16, 2-D or 1x1, dims multiples of
    64), else every reason they do not. (The module's own conditions: `why_not_semi_structured`.)
    """
    why = []
    kxk = w.ndim == 4 and tuple(w.shape[2:]) != (1, 1)
    if kxk:
        kh, kw = w.shape[2:]
        why.append(f"{kh}x{kw} conv (the kernels take linear / 1x1 conv; no im2col path: "
                   "not shown to pay)")
    elif w.ndim not in (2, 4):
        why.append(f"a {w.ndim}-D weight (the kernels take linear / 1x1 conv)")
    if w.device.type not in _DEVICE_TYPES:
        why.append(f"needs CUDA (weight on {w.device.type})")
    if w.dtype not in (torch.float16, torch.bfloat16):
        why.append(f"needs fp16/bf16 (weight is {str(w.dtype).removeprefix('torch.')})")
    if not kxk and w.ndim >= 2 and (w.shape[0] % _DIM or w.shape[1] % _DIM):
        why.append(f"weight {w.shape[0]}x{w.shape[1]}: dims must be multiples of {_DIM}")
    return "; ".join(why)


def semi_structured_weight_ok(w: torch.Tensor | None) -> bool:
    """The 2:4 kernels take this weight (see `weight_why_not`)."""
    return w is not None and not weight_why_not(w)


def why_not_semi_structured(mod: nn.Module) -> str:
    """'' when `to_semi_structured` applies to this layer, else every reason it does not."""
    w = getattr(mod, "weight", None)
    if not isinstance(mod, (nn.Linear, nn.Conv2d)) or not isinstance(w, torch.Tensor):
        return f"{type(mod).__name__}: the 2:4 kernels take nn.Linear and 1x1 nn.Conv2d"
    why = []
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            why.append(f"grouped conv (groups={mod.groups})")
        pointwise = tuple(mod.kernel_size) == (1, 1)
        if pointwise and (mod.padding_mode != "zeros" or mod.padding not in ((0, 0), "valid")):
            why.append(f"padding={mod.padding!r} (a padded 1x1 conv is not a product)")
    return "; ".join(filter(None, [*why, weight_why_not(w)]))


class PointwiseLinear(nn.Module):
    """A 1x1 conv (groups 1, no padding) as ``F.linear`` over channels, so its weight ``[K, C]``
    can be a semi-structured sparse tensor. Output: NCHW shape, channels_last strides."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 stride: tuple[int, int] = (1, 1)):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.stride = tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        sh, sw = self.stride
        if sh != 1 or sw != 1:  # a 1x1 conv without padding reads every s-th pixel
            x = x[:, :, ::sh, ::sw]
        # (semi-structured linear views its input as 2-D: NHWC must be contiguous)
        y = F.linear(x.permute(0, 2, 3, 1).contiguous(), self.weight, self.bias)
        y = y.permute(0, 3, 1, 2)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        k, c = self.weight.shape
        return f"{c}, {k}, stride={self.stride}, weight={type(self.weight).__name__}"


def to_semi_structured(mod: nn.Module, mask: torch.Tensor,
                       convert: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """A copy of `mod` (nn.Linear or a 1x1 nn.Conv2d, see `why_not_semi_structured`) computing
    with its weight times `mask`, the weight held by `convert` (default
    ``torch.sparse.to_sparse_semi_structured``; tests pass another to check the rewrite where no
    GPU is available)."""
    w = (mod.weight.detach() * mask.to(mod.weight.dtype)).flatten(1).contiguous()
    sw = (convert or _default_convert)(w)
    if is_semi_structured(sw) and not torch.equal(sw.to_dense(), w):
        raise ValueError(f"2:4 compression of a {tuple(w.shape)} weight is not lossless "
                         "(the mask is not 2:4 along the input channels?)")
    bias = None if mod.bias is None else mod.bias.detach().clone()
    if isinstance(mod, nn.Conv2d):
        return PointwiseLinear(sw, bias, mod.stride)
    new = nn.Linear(mod.in_features, mod.out_features, bias=bias is not None,
                    device=w.device, dtype=w.dtype)
    new.weight = nn.Parameter(sw, requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=False)
    return new.train(mod.training)
