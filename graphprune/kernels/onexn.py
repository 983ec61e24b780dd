"""Uniform 1xN block-sparse conv2d / linear for CPU: custom ops, modules and a reference path.

Packed weight layout (what the C++ kernel reads, see ``onexn.cpp``):

* ``values``  ``[K/N, kept, R*S*N]`` float32: element ``(g, j, (r*S + s)*N + n)`` is
  ``weight[g*N + n, indices[g, j], r, s]``;
* ``indices`` ``[K/N, kept]`` int32, the input channels kept by output group g, sorted.

``torch.ops.graphprune.conv2d_1xn`` and ``torch.ops.graphprune.linear_1xn`` run the OpenMP C++
kernel (AVX-512 or AVX2, chosen at run time, ``torch.get_num_threads()`` threads) when it builds,
else a pure-PyTorch reference that gives the same numbers. The extension is JIT-built with
``torch.utils.cpp_extension.load`` on first use and cached; a failed build warns once and falls
back. ``GRAPHPRUNE_NO_CPP=1`` or ``use_reference()`` force the reference path.

Conv input is NCHW float32 (any stride/padding/dilation, batch >= 1); a channels_last input is
read without a layout copy where possible and gives a channels_last output.

3x3 stride-1 dilation-1 convs on NCHW input with at most 16x16 outputs, at least 32 output
tiles of 2x2 and at least 96 kept input channels per group (ResNet-50: the 14x14 stage at 50%,
the 7x7 stage from batch 2 at 50% and 75%) run by Winograd F(2x2, 3x3) instead (``wino_wanted``;
``GP_1XN_WINO``: 0 never, 2 on every such conv): the 16 taps of the transformed tiles are 16
block-sparse 1x1 convs with the layer's block pattern (a pruned block stays zero under the kernel
transform), 2.25x fewer multiplies than direct. The transformed kernels (``wino_values``) are
cached per ``values`` tensor (``wino_cached``) and follow its in-place changes. ``Conv2d1xN`` and
the custom op make the same choice, so eager calls, torch.compile / torch.export graphs and
training forwards all run it (the backward is the direct conv's).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import statistics
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import is_1xn, mask_1xn

__all__ = [
    "available",
    "use_reference",
    "use_isa",
    "isa",
    "pack_1xn",
    "unpack_1xn",
    "wino_values",
    "wino_cached",
    "wino_wanted",
    "conv2d_1xn_reference",
    "linear_1xn_reference",
    "conv2d_1xn",
    "linear_1xn",
    "Conv2d1xN",
    "Linear1xN",
    "time_ms",
    "time_many",
    "time_rounds",
    "with_env",
    "faster_than_dense",
]

_SRC = Path(__file__).with_name("onexn.cpp")


class _Ext:
    """Lazily built C++ extension (one per process); ``module`` is None when unavailable."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tried = False
        self.module = None
        self.force_reference = 0


_EXT = _Ext()


def _cpu_tag() -> str:
    """A short hash of the CPU flags, so a cache built for another CPU is not reused."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _build():
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=f"graphprune_onexn_{_cpu_tag()}",
        sources=[str(_SRC)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _ext():
    """The loaded extension, building it once; None (with one warning) when it cannot build."""
    if os.environ.get("GRAPHPRUNE_NO_CPP", "") not in ("", "0"):
        return None
    if not _EXT.tried:
        with _EXT.lock:
            if not _EXT.tried:
                try:
                    mod = _build()
                    if mod.get_isa() == "none":
                        raise RuntimeError("CPU lacks AVX2/FMA")
                    _EXT.module = mod
                except Exception as e:  # noqa: BLE001 - any build failure means fall back
                    warnings.warn(
                        f"graphprune: 1xN C++ kernel unavailable ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); "
                        "using the slower PyTorch reference path",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                _EXT.tried = True
    return _EXT.module


def available() -> bool:
    """True when the C++ kernel is built and usable (builds it on first call)."""
    return _ext() is not None


@contextlib.contextmanager
def use_reference() -> Iterator[None]:
    """Within this block the 1xN ops run the pure-PyTorch reference path."""
    with _EXT.lock:
        _EXT.force_reference += 1
    try:
        yield
    finally:
        with _EXT.lock:
            _EXT.force_reference -= 1


def isa() -> str:
    """Instruction set the C++ kernel uses ('avx512', 'avx2'), or 'reference'."""
    mod = _ext()
    return mod.get_isa() if mod is not None else "reference"


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Within this block the C++ kernel uses ISA ``name`` ('avx512', 'avx2' or 'auto')."""
    mod = _ext()
    if mod is None:
        raise RuntimeError("graphprune: the 1xN C++ kernel is not available")
    old = mod.get_isa()
    mod.set_isa(name)
    try:
        yield
    finally:
        mod.set_isa(old)


def _cpp_for(x: Tensor, *tensors: Tensor | None):
    """The extension if it should run on these tensors, else None. (Called on every eager
    forward: `is_cpu` and an identity test on the dtype cost a tenth of `device.type !=`.)"""
    if _EXT.force_reference or not x.is_cpu or x.dtype is not torch.float32:
        return None
    for t in tensors:
        if t is not None and (not t.is_cpu or t.dtype is not torch.float32):
            return None
    return _ext()


# ---------------------------------------------------------------- packing


def _num_groups(weight_k: int, n: int) -> int:
    if n < 1 or weight_k % n != 0:
        raise ValueError(f"1xN: output channels K={weight_k} are not divisible by N={n}")
    return weight_k // n


def pack_1xn(weight: Tensor, indices: Tensor, n: int) -> Tensor:
    """Gather the kept blocks of a dense ``[K, C(, R, S)]`` weight into ``[K/N, kept, R*S*N]``."""
    k, c = weight.shape[:2]
    g = _num_groups(k, n)
    kept = indices.shape[1]
    w = weight.reshape(g, n, c, -1)
    taps = w.shape[3]
    idx = indices.long()[:, None, :, None].expand(g, n, kept, taps)
    v = torch.gather(w, 2, idx)  # [G, N, kept, taps]
    return v.permute(0, 2, 3, 1).reshape(g, kept, taps * n).contiguous()


def unpack_1xn(
    values: Tensor, indices: Tensor, n: int, in_channels: int, kernel_size: Sequence[int] = ()
) -> Tensor:
    """Dense weight ``[K, C, *kernel_size]`` with the packed blocks in place and zeros elsewhere."""
    g, kept, tn = values.shape
    taps = tn // n
    v = values.reshape(g, kept, taps, n).permute(0, 3, 1, 2)  # [G, N, kept, taps]
    idx = indices.long()[:, None, :, None].expand(g, n, kept, taps)
    w = values.new_zeros(g, n, in_channels, taps).scatter(2, idx, v)
    return w.reshape(g * n, in_channels, *kernel_size)


# ---------------------------------------------------------------- reference path


def _channels_last(x: Tensor) -> bool:
    """True when x is channels_last in memory (and not also plain contiguous)."""
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _like_input(y: Tensor, x: Tensor) -> Tensor:
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


def conv2d_1xn_reference(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    n: int,
    kernel_size: Sequence[int],
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """Pure-PyTorch 1xN conv2d: dense conv with the unpacked weight (same memory format as x),
    then the epilogue ``relu(y + residual)`` (each part optional)."""
    w = unpack_1xn(values, indices, n, x.shape[1], kernel_size).to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    # NCHW: oneDNN's channels_last conv crashes on some odd shapes (padding wider than the input)
    y = F.conv2d(x.contiguous(), w, b, tuple(stride), tuple(padding), tuple(dilation))
    return _like_input(_epilogue(y, residual, relu), x)


def linear_1xn_reference(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    bias: Tensor | None,
    n: int,
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """Pure-PyTorch 1xN linear: ``F.linear`` with the unpacked weight, then the epilogue."""
    w = unpack_1xn(values, indices, n, x.shape[-1]).to(x.dtype)
    y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return _epilogue(y, residual, relu)


def _epilogue(y: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    if residual is not None:
        _check_residual(y.shape, residual)
        y = y + residual.to(y.dtype)
    return torch.relu(y) if relu else y


def _check_residual(shape, residual: Tensor | None) -> None:
    if residual is not None and tuple(residual.shape) != tuple(shape):
        raise ValueError(
            f"graphprune 1xN: residual must have the output's shape {tuple(shape)}, got "
            f"{tuple(residual.shape)} (no broadcasting in the fused epilogue)"
        )


# ---------------------------------------------------------------- custom ops


def _out_size(size, k: int, s: int, p: int, d: int):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_conv_args(x: Tensor, values: Tensor, n: int, kernel_size: Sequence[int]) -> None:
    if x.dim() != 4:
        raise ValueError(f"graphprune::conv2d_1xn: x must be [B, C, H, W], got {tuple(x.shape)}")
    if values.dim() != 3 or values.shape[2] != n * kernel_size[0] * kernel_size[1]:
        raise ValueError(
            f"graphprune::conv2d_1xn: values must be [K/N, kept, R*S*N] with R*S*N = "
            f"{n * kernel_size[0] * kernel_size[1]}, got {tuple(values.shape)}"
        )


@torch.library.custom_op("graphprune::conv2d_1xn", mutates_args=())
def conv2d_1xn(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    n: int,
    kernel_size: Sequence[int],
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """1xN block-sparse conv2d (see module docstring for the weight layout), with the fused
    epilogue ``relu(conv + bias + residual)`` (residual: the output's shape; both optional)."""
    _check_conv_args(x, values, n, kernel_size)
    mod = _cpp_for(x, values, bias, residual)
    if mod is None:
        return conv2d_1xn_reference(
            x, values, indices, bias, stride, padding, dilation, n, kernel_size, residual, relu
        )
    return _conv_ext(
        mod, x, values.contiguous(), indices.to(torch.int32).contiguous(),
        None if bias is None else bias.contiguous(), stride, padding, dilation, n, kernel_size,
        residual, relu,
    )  # fmt: skip


def _conv_ext(mod, x, values, indices, bias, stride, padding, dilation, n, kernel_size, residual,
              relu) -> Tensor:  # fmt: skip
    """The extension's conv (weights already contiguous, indices int32): Winograd where
    ``_wino_fits``, else the direct kernel."""
    if _wino_fits(x, values, stride, padding, dilation, kernel_size):
        return mod.conv2d_1xn_wino(
            x, wino_cached(values, n), indices, bias, padding[0], padding[1], n, residual, relu
        )
    return mod.conv2d_1xn(
        x, values, indices, bias, stride[0], stride[1], padding[0], padding[1], dilation[0],
        dilation[1], n, kernel_size[0], kernel_size[1], residual, relu,
    )  # fmt: skip


@conv2d_1xn.register_fake
def _conv2d_1xn_fake(x, values, indices, bias, stride, padding, dilation, n, kernel_size,
                     residual=None, relu=False):  # fmt: skip
    _check_conv_args(x, values, n, kernel_size)
    ho = _out_size(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0])
    wo = _out_size(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1])
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    shape = (x.shape[0], values.shape[0] * n, ho, wo)
    _check_residual(shape, residual)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("graphprune::linear_1xn", mutates_args=())
def linear_1xn(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    bias: Tensor | None,
    n: int,
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """1xN block-sparse linear over the last dim of x: ``[*, C] -> [*, K]``, with the fused
    epilogue ``relu(y + residual)`` (both optional)."""
    mod = _cpp_for(x, values, bias, residual)
    if mod is None:
        return linear_1xn_reference(x, values, indices, bias, n, residual, relu)
    return _linear_ext(
        mod, x, values.contiguous(), indices.to(torch.int32).contiguous(),
        None if bias is None else bias.contiguous(), n, residual, relu,
    )  # fmt: skip


def _linear_ext(mod, x, values, indices, bias, n, residual, relu) -> Tensor:
    """The extension's 2-D linear over the last dim of x, any leading dims (weights already
    contiguous, indices int32)."""
    k = values.shape[0] * n
    _check_residual((*x.shape[:-1], k), residual)
    r = None if residual is None else residual.reshape(-1, k)
    y = mod.linear_1xn(x.reshape(-1, x.shape[-1]), values, indices, bias, n, r, relu)
    return y.reshape(*x.shape[:-1], k)


@linear_1xn.register_fake
def _linear_1xn_fake(x, values, indices, bias, n, residual=None, relu=False):
    shape = (*x.shape[:-1], values.shape[0] * n)
    _check_residual(shape, residual)
    return x.new_empty(shape)


def _epilogue_grad(ctx, grad: Tensor) -> Tensor:
    """The gradient at the conv/linear output, through the fused ReLU."""
    return grad * (ctx.saved_tensors[3] > 0).to(grad.dtype) if ctx.relu else grad


def _conv_backward(ctx, grad: Tensor):
    x, values, indices = ctx.saved_tensors[:3]
    grad = _epilogue_grad(ctx, grad)
    a = ctx.args
    w = unpack_1xn(values, indices, a["n"], x.shape[1], a["kernel_size"])
    conv = dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"])
    gx = gv = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.nn.grad.conv2d_input(x.shape, w, grad, **conv)
    if ctx.needs_input_grad[1]:
        gw = torch.nn.grad.conv2d_weight(x, w.shape, grad, **conv)
        gv = pack_1xn(gw, indices, a["n"])
    if ctx.needs_input_grad[3]:
        gb = grad.sum(dim=(0, 2, 3))
    return _with_residual_grad(ctx, grad, (gx, gv, None, gb, None, None, None, None, None))


def _with_residual_grad(ctx, grad: Tensor, grads: tuple) -> tuple:
    """Append the residual's gradient (``grad``, already through the ReLU: the residual is added
    before it) and None for ``relu`` — when the caller passed them: unlike the inputs of the
    setup, ``needs_input_grad`` covers only the arguments given (9 of 11 for a plain conv)."""
    extra = len(ctx.needs_input_grad) - len(grads)
    if extra <= 0:
        return grads
    gr = grad if ctx.needs_input_grad[len(grads)] else None
    return (*grads, gr, *([None] * (extra - 1)))


def _save_epilogue(ctx, x, values, indices, output, relu: bool) -> None:
    ctx.relu = relu
    if relu:
        ctx.save_for_backward(x, values, indices, output)
    else:
        ctx.save_for_backward(x, values, indices)


def _conv_setup(ctx, inputs, output):
    # (defaults are bound: inputs always hold residual and relu)
    x, values, indices, _bias, stride, padding, dilation, n, kernel_size, _res, relu = inputs
    _save_epilogue(ctx, x, values, indices, output, relu)
    ctx.args = dict(
        stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), n=n,
        kernel_size=tuple(kernel_size),
    )  # fmt: skip


def _linear_backward(ctx, grad: Tensor):
    x, values, indices = ctx.saved_tensors[:3]
    grad = _epilogue_grad(ctx, grad)
    n = ctx.n
    w = unpack_1xn(values, indices, n, x.shape[-1])
    gx = gv = gb = None
    if ctx.needs_input_grad[0]:
        gx = grad @ w
    if ctx.needs_input_grad[1]:
        g2 = grad.reshape(-1, grad.shape[-1])
        gv = pack_1xn(g2.t() @ x.reshape(-1, x.shape[-1]), indices, n)
    if ctx.needs_input_grad[3]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(dim=0)
    return _with_residual_grad(ctx, grad, (gx, gv, None, gb, None))


def _linear_setup(ctx, inputs, output):
    x, values, indices, _bias, n, _res, relu = inputs
    _save_epilogue(ctx, x, values, indices, output, relu)
    ctx.n = n


conv2d_1xn.register_autograd(_conv_backward, setup_context=_conv_setup)
linear_1xn.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---------------------------------------------------------------- modules


def _eager_ext(x: Tensor, values: Tensor, bias: Tensor | None, residual: Tensor | None = None):
    """The extension when a module may call it directly (skipping the custom-op dispatch, ~30 us).

    Only for plain eager CPU float32 tensors with no autograd to record; under torch.compile,
    torch.export, fx tracing or fake tensors the custom op runs instead.
    """
    if type(x) is not torch.Tensor or torch.compiler.is_compiling():
        return None
    if residual is not None and type(residual) is not torch.Tensor:
        return None
    if not values.is_contiguous():
        return None
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, values, bias, residual)
    ):
        return None
    return _cpp_for(x, values, bias, residual)


# Winograd F(2x2, 3x3) kernel transform G (4x3): U = G w G^T
_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def wino_values(values: Tensor, n: int) -> Tensor:
    """Winograd F(2x2, 3x3) kernels of packed 3x3 ``values`` ``[G, kept, 9*N]`` as
    ``[16, G, kept, N]``: element ``(xi, g, j, n)`` is tap ``xi`` of ``G w G^T`` for the kernel
    of output ``g*N + n``, input ``indices[g, j]`` (a pruned block stays pruned). Computed in
    float64, stored in ``values``' dtype."""
    g, kept = values.shape[:2]
    w = values.detach().to(torch.float64).reshape(g, kept, 3, 3, n)
    gm = torch.tensor(_WINO_G, dtype=torch.float64, device=values.device)
    u = torch.einsum("ar,gjrsn,bs->abgjn", gm, w, gm)
    return u.reshape(16, g, kept, n).to(values.dtype).contiguous()


# id(values) -> ((data_ptr, version, shape, n), Winograd kernels); an entry goes with its tensor
_WINO_CACHE: dict[int, tuple[tuple, Tensor]] = {}


def wino_cached(values: Tensor, n: int) -> Tensor:
    """``wino_values(values, n)``, kept until ``values`` changes (in place, as an optimizer step
    or ``load_state_dict`` does: its version counter moves) or is freed."""
    key = id(values)
    stamp = (values.data_ptr(), values._version, tuple(values.shape), n)
    hit = _WINO_CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    if hit is None:
        weakref.finalize(values, _WINO_CACHE.pop, key, None)
    u = wino_values(values, n)
    _WINO_CACHE[key] = (stamp, u)
    return u


def _wino_shape(shape, kept: int, stride, padding, dilation, kernel_size) -> bool:
    """Whether a conv of this geometry runs by Winograd on NCHW input of ``shape``: 3x3, stride 1,
    dilation 1, and ``wino_wanted``."""
    if tuple(kernel_size) != (3, 3) or tuple(stride) != (1, 1) or tuple(dilation) != (1, 1):
        return False
    if len(shape) != 4:
        return False
    ho, wo = shape[2] + 2 * padding[0] - 2, shape[3] + 2 * padding[1] - 2
    return wino_wanted(shape[0], ho, wo, kept)


def _wino_fits(x: Tensor, values: Tensor, stride, padding, dilation, kernel_size) -> bool:
    """Whether this call runs by Winograd: ``_wino_shape`` and NCHW-contiguous input."""
    return x.is_contiguous() and _wino_shape(
        x.shape, values.shape[1], stride, padding, dilation, kernel_size
    )


def wino_wanted(batch: int, ho: int, wo: int, kept: int) -> bool:
    """Whether a 3x3 / stride-1 / dilation-1 NCHW conv with ``batch x ho x wo`` outputs and
    ``kept`` input channels per group runs by Winograd. ``GP_1XN_WINO``: 0 never, 2 always, 1
    (default) for outputs of at most 16x16 pixels in at least 32 tiles of 2x2 with at least
    ``GP_1XN_WINO_KEPT`` (96) kept channels: the transforms cost per input channel and tile, the
    savings come per kept channel. Measured against the direct kernel (RESULTS_kernels.md,
    session 11): faster on the 14x14 stage (batch 1 and 8) and the 7x7 stage at batch 8 with 128
    or more kept channels; slower with 64 kept at batch 8, on a single 7x7 image (16 tiles) and
    on 28x28 / 56x56."""
    mode = os.environ.get("GP_1XN_WINO", "1")
    tiles = batch * ((ho + 1) // 2) * ((wo + 1) // 2)
    min_kept = int(os.environ.get("GP_1XN_WINO_KEPT", "96"))
    return mode == "2" or (mode != "0" and ho * wo <= 256 and tiles >= 32 and kept >= min_kept)


def _fast_attrs(m: nn.Module) -> tuple[Tensor, Tensor | None, Tensor]:
    """(values, bias, indices) of a 1xN module, read from its dicts: `nn.Module.__getattr__`
    costs ~0.5 us a lookup, and forward runs once per layer per call (a batch-1 layer's kernel
    takes 0.1-0.5 ms). `bias=None` is a plain attribute, not a parameter."""
    p = m._parameters
    return p["values"], p["bias"] if "bias" in p else m.bias, m._buffers["indices"]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _explicit_padding(module: nn.Conv2d) -> tuple[int, int]:
    """Turn 'valid' / 'same' / ints into symmetric integer padding (error if impossible)."""
    p = module.padding
    if p == "valid":
        return (0, 0)
    if p == "same":
        tot = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
        if any(t % 2 for t in tot) or module.stride != (1, 1):
            raise ValueError(
                f"Conv2d1xN: padding='same' with kernel {module.kernel_size}, dilation "
                f"{module.dilation}, stride {module.stride} needs asymmetric padding"
            )
        return (tot[0] // 2, tot[1] // 2)
    return _pair(p)


def _block_indices(mask: Tensor, n: int, what: str) -> Tensor:
    """[K/N, kept] int32 kept input channels of every group of a uniform 1xN mask."""
    if not is_1xn(mask, n):
        raise ValueError(
            f"{what}: mask is not a uniform 1x{n} pattern (every block of {n} outputs x 1 input "
            f"must be all kept or all pruned, with the same kept count per group); "
            f"build it with graphprune.kernels.masks.mask_1xn"
        )
    k, c = mask.shape[:2]
    block = mask.reshape(k // n, n, c, -1)[:, 0, :, 0]
    kept = int(block[0].sum()) if block.shape[0] else 0
    idx = torch.nonzero(block, as_tuple=False)[:, 1].reshape(k // n, kept)
    return idx.to(torch.int32).contiguous()


class Conv2d1xN(nn.Module):
    """Conv2d whose weight is uniform 1xN block-sparse; forward runs ``graphprune::conv2d_1xn``.

    ``forward(x, residual=None)`` returns ``act(conv(x) + bias + residual)``: with ``relu=True``
    the ReLU, and a residual (the output's shape) added before it, are fused into the kernel's
    stores (what the ``fuse_epilogue`` pass sets up after folding BatchNorm into ``values``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        n: int,
        kept: int,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        relu: bool = False,
    ) -> None:
        super().__init__()
        g = _num_groups(out_channels, n)
        self.in_channels, self.out_channels, self.n = in_channels, out_channels, n
        self.relu = relu
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.values = nn.Parameter(torch.zeros(g, kept, taps * n, dtype=dtype))
        self.register_buffer("indices", torch.arange(kept, dtype=torch.int32).repeat(g, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype)) if bias else None

    @property
    def kept(self) -> int:
        """Input channels kept per group of N outputs."""
        return self.values.shape[1]

    @classmethod
    def from_dense(cls, module: nn.Conv2d, mask: Tensor, n: int) -> Conv2d1xN:
        """Pack ``module.weight`` under a uniform 1xN ``mask`` (from ``mask_1xn``)."""
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError(
                f"Conv2d1xN.from_dense: only groups=1 and padding_mode='zeros' are supported, "
                f"got groups={module.groups}, padding_mode={module.padding_mode!r}"
            )
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"Conv2d1xN.from_dense: mask shape {tuple(mask.shape)} != weight shape "
                f"{tuple(module.weight.shape)}"
            )
        idx = _block_indices(mask, n, "Conv2d1xN.from_dense")
        w = module.weight.detach()
        new = cls(
            module.in_channels, module.out_channels, module.kernel_size, n, idx.shape[1],
            module.stride, _explicit_padding(module), module.dilation,
            bias=module.bias is not None, dtype=w.dtype,
        )  # fmt: skip
        new.to(w.device)
        with torch.no_grad():
            new.indices.copy_(idx)
            new.values.copy_(pack_1xn(w, idx, n))
            if module.bias is not None:
                new.bias.copy_(module.bias.detach())
        return new

    def to_dense(self) -> Tensor:
        """The equivalent masked dense weight ``[K, C, R, S]``."""
        return unpack_1xn(
            self.values.detach(), self.indices, self.n, self.in_channels, self.kernel_size
        )

    def uses_winograd(self, input_shape: Sequence[int]) -> bool:
        """Whether an NCHW-contiguous float32 input of ``input_shape`` runs by Winograd
        F(2x2, 3x3) (``wino_wanted``, with the C++ kernel available)."""
        return available() and _wino_shape(
            tuple(input_shape), self.kept, self.stride, self.padding, self.dilation,
            self.kernel_size,
        )  # fmt: skip

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        values, bias, indices = _fast_attrs(self)
        mod = _eager_ext(x, values, bias, residual)
        if mod is not None and x.dim() == 4 and indices.dtype is torch.int32:
            return _conv_ext(
                mod, x, values, indices, bias, self.stride, self.padding, self.dilation, self.n,
                self.kernel_size, residual, self.relu,
            )  # fmt: skip
        return torch.ops.graphprune.conv2d_1xn(
            x, values, indices, bias, list(self.stride), list(self.padding),
            list(self.dilation), self.n, list(self.kernel_size), residual, self.relu,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"n={self.n}, kept={self.kept}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, bias={self.bias is not None}"
            + (", relu=True" if self.relu else "")
        )


class Linear1xN(nn.Module):
    """Linear whose weight is uniform 1xN block-sparse; forward runs ``graphprune::linear_1xn``.

    ``forward(x, residual=None)``: ``act(x @ W.T + bias + residual)`` as for :class:`Conv2d1xN`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int,
        kept: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        relu: bool = False,
    ) -> None:
        super().__init__()
        g = _num_groups(out_features, n)
        self.in_features, self.out_features, self.n = in_features, out_features, n
        self.relu = relu
        self.values = nn.Parameter(torch.zeros(g, kept, n, dtype=dtype))
        self.register_buffer("indices", torch.arange(kept, dtype=torch.int32).repeat(g, 1))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @property
    def kept(self) -> int:
        """Input features kept per group of N outputs."""
        return self.values.shape[1]

    @classmethod
    def from_dense(cls, module: nn.Linear, mask: Tensor, n: int) -> Linear1xN:
        """Pack ``module.weight`` under a uniform 1xN ``mask`` (from ``mask_1xn``)."""
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"Linear1xN.from_dense: mask shape {tuple(mask.shape)} != weight shape "
                f"{tuple(module.weight.shape)}"
            )
        idx = _block_indices(mask, n, "Linear1xN.from_dense")
        w = module.weight.detach()
        new = cls(
            module.in_features, module.out_features, n, idx.shape[1],
            bias=module.bias is not None, dtype=w.dtype,
        )  # fmt: skip
        new.to(w.device)
        with torch.no_grad():
            new.indices.copy_(idx)
            new.values.copy_(pack_1xn(w, idx, n))
            if module.bias is not None:
                new.bias.copy_(module.bias.detach())
        return new

    def to_dense(self) -> Tensor:
        """The equivalent masked dense weight ``[K, C]``."""
        return unpack_1xn(self.values.detach(), self.indices, self.n, self.in_features)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        values, bias, indices = _fast_attrs(self)
        mod = _eager_ext(x, values, bias, residual)
        if mod is not None and x.dim() >= 1 and indices.dtype is torch.int32:
            return _linear_ext(mod, x, values, indices, bias, self.n, residual, self.relu)
        return torch.ops.graphprune.linear_1xn(x, values, indices, bias, self.n, residual,
                                               self.relu)  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, n={self.n}, "
            f"kept={self.kept}, bias={self.bias is not None}"
            + (", relu=True" if self.relu else "")
        )


# ---------------------------------------------------------------- timing


def time_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 15) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` calls."""
    return time_many([fn], warmup, repeats)[0]


def time_rounds(
    fns: Sequence[Callable[[], object]],
    warmup: int = 3,
    repeats: int = 15,
    warm: bool = False,
    shuffle: bool = False,
) -> list[list[float]]:
    """Wall times (ms) of each function over ``repeats`` rounds; every round runs each once.

    Alternating the functions makes them all see the same machine load, so per-round ratios
    stay meaningful on a shared machine. ``warm``: every timed call comes right after an
    untimed call of the same function, so each finds its own input (and weights) as warm in
    the caches as a layer does after the previous layer wrote its input; plain rounds instead
    favour whichever function follows another one that read the same input. ``shuffle``: each
    round runs the functions in a new (seeded) random order, so no function always runs right
    after the same other one (on this project's VMs the function right after a dense oneDNN conv
    ran up to 1.6x slower, even warm); ``times[i][r]`` is still function i in round r.
    """
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    rng = random.Random(0)
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns:
                fn()
        for _ in range(repeats):
            if shuffle:
                rng.shuffle(order)
            for j in order:
                if warm:
                    fns[j]()
                t0 = time.perf_counter()
                fns[j]()
                times[j].append((time.perf_counter() - t0) * 1e3)
    return times


def with_env(fn: Callable[[], object], name: str, value: str) -> Callable[[], object]:
    """``fn`` with the environment variable ``name`` set to ``value`` around each call (for
    timing a kernel knob side by side). Set and restored directly: ``mock.patch.dict(os.environ)``
    copies the whole environment, ~80 us a call, which would skew the timings it wraps."""

    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

    return run


def time_many(
    fns: Sequence[Callable[[], object]], warmup: int = 3, repeats: int = 15
) -> list[float]:
    """Median wall time (ms) of each function, timed in alternation (see ``time_rounds``)."""
    return [statistics.median(ts) for ts in time_rounds(fns, warmup, repeats)]


def _dense_module(
    module_or_shape: nn.Module | Sequence[int], stride, padding, dilation
) -> nn.Conv2d | nn.Linear:
    """The module itself, or a random conv [K, C, R, S] / linear [K, C] of that weight shape."""
    if isinstance(module_or_shape, nn.Module):
        if not isinstance(module_or_shape, nn.Conv2d | nn.Linear):
            raise TypeError(f"expected nn.Conv2d or nn.Linear, got {type(module_or_shape)}")
        return module_or_shape
    shape = tuple(int(v) for v in module_or_shape)
    if len(shape) == 2:
        return nn.Linear(shape[1], shape[0])
    if len(shape) == 4:
        return nn.Conv2d(shape[1], shape[0], shape[2:], stride, padding, dilation)
    raise ValueError(f"weight shape must be [K, C] or [K, C, R, S], got {shape}")


def faster_than_dense(
    module_or_shape: nn.Conv2d | nn.Linear | Sequence[int],
    x_shape: Sequence[int],
    n: int,
    sparsity: float,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    threads: int | None = None,
    margin: float = 1.0,
    repeats: int = 15,
) -> tuple[bool, float, float]:
    """Time a layer dense vs as 1xN at ``sparsity`` on a random input of ``x_shape``.

    ``module_or_shape`` is an ``nn.Conv2d`` / ``nn.Linear`` or a weight shape ``[K, C, R, S]``
    (with ``stride``/``padding``/``dilation``) or ``[K, C]``. Dense runs the module as is on an
    NCHW input. ``threads`` (default: current) is set for both timings and restored; the two are
    timed in alternation. Returns ``(sparse_ms * margin < dense_ms, sparse_ms, dense_ms)``, so a
    sparsify pass can keep a layer dense when sparse does not pay.
    """
    module = _dense_module(module_or_shape, stride, padding, dilation)
    mask = mask_1xn(module.weight, n, sparsity)
    sparse = (Conv2d1xN if isinstance(module, nn.Conv2d) else Linear1xN).from_dense(module, mask, n)
    x = torch.randn(*x_shape, dtype=module.weight.dtype, device=module.weight.device)
    old = torch.get_num_threads()
    torch.set_num_threads(threads or old)
    try:
        dense_ms, sparse_ms = time_many([lambda: module(x), lambda: sparse(x)], repeats=repeats)
    finally:
        torch.set_num_threads(old)
    return sparse_ms * margin < dense_ms, sparse_ms, dense_ms
