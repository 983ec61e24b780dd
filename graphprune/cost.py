"""Cost models: analytic MACs / FLOPs / parameters and measured latency tables.

A layer's cost is a function of its kept input and output channel counts ``(c_in, c_out)``; all
else it depends on (op, kernel, stride, groups, spatial size, batch, dtype, device) is its
:class:`LayerSig`. Analytic costs (:func:`macs`, :func:`flops`, :func:`params`,
:func:`activation_bytes`) are exact. Latency is measured: a :class:`LatencyTable` holds, per
signature, median latencies of the real op on a grid of channel counts and interpolates between
grid points; elementwise and normalisation ops get ``op_overhead`` curves (ms as a function of
bytes moved) so that the latency of a whole model can be composed from its parts
(:func:`estimate_model_latency`).

Measurement strategy (see ``benchmarks/RESULTS_cost.md`` for the numbers behind it): a full
step-``round_to`` grid is measured only when it is small. Otherwise a signature gets a
*staircase-corrected coarse grid*: a coarse 2-D grid (about 9 × 9 points, denser at small counts),
plus the full fine staircase along each axis measured at the other axis' full size. A lookup is the
bilinear interpolation of the coarse grid multiplied by the ratio of each axis' fine staircase to
its own coarse interpolation (a separable correction), which is exact on every measured point.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import math
import operator
import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LayerSig",
    "SUPPORTED_OPS",
    "OVERHEAD_KINDS",
    "CACHE_DIR",
    "COLD_WEIGHT_BYTES",
    "num_groups",
    "output_spatial",
    "macs",
    "flops",
    "params",
    "activation_bytes",
    "sig_from_module",
    "layer_op",
    "measure_latency",
    "num_threads",
    "device_name",
    "device_key",
    "cache_dir",
    "LatencyTable",
    "LatencyTableMismatch",
    "LoadProbe",
    "measure_watched",
    "measure_layer_points",
    "CostItem",
    "model_cost_items",
    "estimate_model_latency",
    "node_kind",
    "node_times",
    "pin_malloc",
]

_CONV_OPS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_CONVT_OPS = {"conv_transpose1d": 1, "conv_transpose2d": 2, "conv_transpose3d": 3}
_DENSE_OPS = {"linear", "matmul"}
SUPPORTED_OPS = frozenset(_CONV_OPS) | frozenset(_CONVT_OPS) | frozenset(_DENSE_OPS)

#: Module-level override of the latency cache folder (else ``$GRAPHPRUNE_CACHE``, else
#: ``~/.cache/graphprune/latency``).
CACHE_DIR: str | os.PathLike | None = None

_FORMAT = "graphprune.latency/1"

#: Bytes of weight copies a timed layer cycles through (cold weights, as inside a whole model).
COLD_WEIGHT_BYTES = 64 * 2**20

#: Share of the CPUs other processes may use while a chunk of points is timed before the chunk
#: is measured again.
LOAD_THRESHOLD = 0.1

#: A measured point worth more than this × both neighbours on the grid is re-measured.
SPIKE_RATIO = 1.5


# ----------------------------------------------------------------------------------------------
# Signatures
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSig:
    """What a layer's cost depends on besides its channel counts.

    ``spatial`` is the input spatial size (H, W) for convolutions; for ``linear`` and ``matmul``
    it is the product of the leading token dims, e.g. ``(N,)`` for an input ``[B, N, C]`` (``()``
    for ``[B, C]``). ``groups`` is ``"1"``, ``"depthwise"`` (groups == c_in, c_out a multiple of
    c_in) or ``"g=<int>"`` (a fixed group count). ``matmul`` means ``a[batch, *spatial, c_in] @
    b[batch, c_in, c_out]`` with two activations (no parameters). Conv fields are normalised:
    ``stride=()`` becomes ``(1, 1)`` and so on, so equal layers give equal (hashable) signatures.
    """

    op: str
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: str = "1"
    spatial: tuple[int, ...] = ()
    batch: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    bias: bool = True

    def __post_init__(self) -> None:
        if self.op not in SUPPORTED_OPS:
            raise ValueError(
                f"LayerSig: unsupported op {self.op!r}; known: {sorted(SUPPORTED_OPS)}"
            )
        nd = _CONV_OPS.get(self.op) or _CONVT_OPS.get(self.op)
        if nd:
            kernel = _per_dim(self.kernel, nd, None, "kernel")
            self._set("kernel", kernel)
            self._set("stride", _per_dim(self.stride, nd, 1, "stride"))
            self._set("padding", _per_dim(self.padding, nd, 0, "padding"))
            self._set("dilation", _per_dim(self.dilation, nd, 1, "dilation"))
            if len(self.spatial) != nd:
                raise ValueError(f"LayerSig {self.op}: spatial needs {nd} dims, got {self.spatial}")
        elif self.kernel or self.stride or self.padding or self.dilation:
            raise ValueError(f"LayerSig {self.op}: kernel/stride/padding/dilation must be empty")
        self._set("spatial", tuple(int(v) for v in self.spatial))
        self._set("groups", _normalise_groups(self.groups))
        if self.op in _DENSE_OPS and self.groups != "1":
            raise ValueError(f"LayerSig {self.op}: groups must be '1'")
        self._set("dtype", str(self.dtype).removeprefix("torch."))
        self._set("device", str(self.device))
        self._set("batch", int(self.batch))
        self._set("bias", bool(self.bias) and self.op != "matmul")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> LayerSig:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def short(self) -> str:
        """A compact human-readable description, e.g. ``conv2d k3 s2 g=1 56x56 b1``."""
        parts = [self.op]
        if self.kernel:
            parts.append("k" + "x".join(map(str, self.kernel)))
            parts.append("s" + "x".join(map(str, self.stride)))
        if self.groups != "1":
            parts.append(self.groups)
        if self.spatial:
            parts.append("x".join(map(str, self.spatial)))
        parts.append(f"b{self.batch}")
        if self.dtype != "float32":
            parts.append(self.dtype)
        return " ".join(parts)


def _per_dim(values: Sequence[int], nd: int, default: int | None, name: str) -> tuple[int, ...]:
    """Expand a per-dimension conv argument to ``nd`` ints (``()`` -> default, one value -> nd)."""
    values = tuple(int(v) for v in values)
    if not values:
        if default is None:
            raise ValueError(f"LayerSig: {name} is required for convolutions")
        return (default,) * nd
    if len(values) == 1:
        return values * nd
    if len(values) != nd:
        raise ValueError(f"LayerSig: {name}={values} does not have {nd} dims")
    return values


def _normalise_groups(groups: str | int) -> str:
    """Canonical form of the ``groups`` field."""
    if isinstance(groups, int):
        return "1" if groups == 1 else f"g={groups}"
    groups = str(groups)
    if groups in ("1", "depthwise"):
        return groups
    if groups.startswith("g=") and groups[2:].isdigit() and int(groups[2:]) >= 1:
        return "1" if int(groups[2:]) == 1 else groups
    raise ValueError(f"LayerSig: groups must be '1', 'depthwise' or 'g=<int>', got {groups!r}")


def num_groups(sig: LayerSig, c_in: int, c_out: int) -> int:
    """The conv ``groups`` argument for these channel counts (checks divisibility)."""
    if sig.groups == "1":
        g = 1
    elif sig.groups == "depthwise":
        g = c_in
    else:
        g = int(sig.groups[2:])
    if c_in <= 0 or c_out <= 0 or c_in % g or c_out % g:
        raise ValueError(f"{sig.short()}: channels ({c_in}, {c_out}) do not fit groups={g}")
    return g


def output_spatial(sig: LayerSig) -> tuple[int, ...]:
    """Output spatial size (exact for stride / padding / dilation; transposed convs assume
    ``output_padding=0``). For linear / matmul this is ``sig.spatial``."""
    if sig.op in _CONV_OPS:
        out = tuple(
            (h + 2 * p - d * (k - 1) - 1) // s + 1
            for h, k, s, p, d in zip(sig.spatial, sig.kernel, sig.stride, sig.padding, sig.dilation)
        )
    elif sig.op in _CONVT_OPS:
        out = tuple(
            (h - 1) * s - 2 * p + d * (k - 1) + 1
            for h, k, s, p, d in zip(sig.spatial, sig.kernel, sig.stride, sig.padding, sig.dilation)
        )
    else:
        out = sig.spatial
    if any(v <= 0 for v in out):
        raise ValueError(f"{sig.short()}: empty output spatial size {out}")
    return out


# ----------------------------------------------------------------------------------------------
# Analytic costs
# ----------------------------------------------------------------------------------------------


def macs(sig: LayerSig, c_in: int, c_out: int) -> int:
    """Multiply-accumulates of one forward call (bias adds are not counted, as in
    ``torch.utils.flop_counter``)."""
    g = num_groups(sig, c_in, c_out)
    if sig.op in _CONV_OPS:
        k = math.prod(sig.kernel)
        return sig.batch * math.prod(output_spatial(sig)) * c_out * (c_in // g) * k
    if sig.op in _CONVT_OPS:
        k = math.prod(sig.kernel)
        return sig.batch * math.prod(sig.spatial) * c_in * (c_out // g) * k
    return sig.batch * math.prod(sig.spatial) * c_in * c_out


def flops(sig: LayerSig, c_in: int, c_out: int) -> int:
    """Floating-point operations: ``2 * macs``."""
    return 2 * macs(sig, c_in, c_out)


def params(sig: LayerSig, c_in: int, c_out: int) -> int:
    """Parameter count of the layer, bias included (``matmul`` has none)."""
    g = num_groups(sig, c_in, c_out)
    bias = c_out if sig.bias else 0
    if sig.op in _CONV_OPS:
        return c_out * (c_in // g) * math.prod(sig.kernel) + bias
    if sig.op in _CONVT_OPS:
        return c_in * (c_out // g) * math.prod(sig.kernel) + bias
    if sig.op == "linear":
        return c_in * c_out + bias
    return 0


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def activation_bytes(sig: LayerSig, c_in: int, c_out: int) -> int:
    """Bytes of the layer's output activation."""
    num_groups(sig, c_in, c_out)
    return sig.batch * math.prod(output_spatial(sig)) * c_out * _itemsize(sig.dtype)


def sig_from_module(
    module: nn.Module, input_shape: Sequence[int], dtype: Any = None, device: Any = None
) -> tuple[LayerSig, int, int]:
    """``(LayerSig, c_in, c_out)`` of a conv / transposed conv / linear module for an input shape.

    ``padding='same'`` with an even total padding is exact; with an odd total (even kernels) the
    stored symmetric padding makes the output one row short (MACs within one row)."""
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        raise TypeError(f"sig_from_module: no cost model for {type(module).__name__}")
    p = next(iter(module.parameters()), None)
    dtype = dtype if dtype is not None else (p.dtype if p is not None else torch.float32)
    device = device if device is not None else (p.device.type if p is not None else "cpu")
    common = {"dtype": str(dtype), "device": str(device), "bias": module.bias is not None}
    shape = tuple(int(s) for s in input_shape)
    if isinstance(module, nn.Linear):
        spatial = (math.prod(shape[1:-1]),) if len(shape) > 2 else ()
        batch = shape[0] if len(shape) > 1 else 1
        sig = LayerSig("linear", spatial=spatial, batch=batch, **common)
        return sig, module.in_features, module.out_features
    nd = len(module.kernel_size)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    if transposed and any(module.output_padding):
        raise ValueError("sig_from_module: output_padding is not modelled")
    op = f"conv_transpose{nd}d" if transposed else f"conv{nd}d"
    c_in, c_out, g = module.in_channels, module.out_channels, module.groups
    groups = "1" if g == 1 else ("depthwise" if g == c_in and c_out % c_in == 0 else f"g={g}")
    sig = LayerSig(
        op,
        kernel=module.kernel_size,
        stride=module.stride,
        padding=_module_padding(module),
        dilation=module.dilation,
        groups=groups,
        spatial=shape[2:] if len(shape) == nd + 2 else shape[1:],
        batch=shape[0] if len(shape) == nd + 2 else 1,
        **common,
    )
    return sig, c_in, c_out


def _module_padding(module: nn.Module) -> tuple[int, ...]:
    pad = module.padding
    if pad == "valid":
        return (0,) * len(module.kernel_size)
    if pad == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
    return tuple(pad)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def num_threads(n: int | None):
    """Context manager fixing ``torch.set_num_threads(n)`` (``None``: leave as is)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(old)


def _first_device(fn: Any, inputs: Iterable) -> torch.device:
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    if isinstance(fn, nn.Module):
        p = next(iter(fn.parameters()), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


def _sample_ms(call: Callable[[], Any], number: int, device: torch.device) -> float:
    """Time ``number`` back-to-back calls; return ms per call."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / number
    t0 = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - t0) * 1e3 / number


def measure_latency(
    fn_or_module: Callable,
    inputs: Any = (),
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    min_sample_ms: float = 0.0,
    device: Any = None,
) -> tuple[float, float]:
    """Median and inter-quartile range (ms) of ``fn_or_module(*inputs)``.

    Runs under ``torch.inference_mode()`` with a fixed thread count (``threads``; ``None`` keeps
    the current one). ``inputs`` is a tuple, a single tensor, or a dict of keyword arguments. Each
    of the ``repeats`` samples times enough back-to-back calls to last ``min_sample_ms`` (one call
    when 0). On CUDA (``device``, else the first tensor input's or the module's device) samples
    are timed with CUDA events after a synchronize.
    """
    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    else:
        args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        kwargs = {}
    if device is None:
        device = _first_device(fn_or_module, list(args) + list(kwargs.values()))
    device = torch.device(device)

    def call():
        return fn_or_module(*args, **kwargs)

    with num_threads(threads), torch.inference_mode():
        for _ in range(max(warmup, 1)):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        number = 1
        if min_sample_ms > 0:
            once = _sample_ms(call, 1, device)
            number = max(1, math.ceil(min_sample_ms / max(once, 1e-6)))
        samples = [_sample_ms(call, number, device) for _ in range(max(repeats, 1))]
    if len(samples) >= 2:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    else:
        q1 = q3 = samples[0]
    return statistics.median(samples), q3 - q1


class _Arena:
    """Random tensors for timing, served as views of a few growing buffers (no per-point
    ``randn``): slot ``"x"`` for activations, ``"w"`` for weights, ``"b"`` for biases."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self.bufs = device, dtype, {}

    def get(self, slot: str, shape: Sequence[int]) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.bufs.get(slot)
        if buf is None or buf.numel() < n:
            size = max(n, int(1.5 * buf.numel()) if buf is not None else n)
            buf = torch.randn(size, device=self.device, dtype=self.dtype)
            self.bufs[slot] = buf
        return buf[:n].view(*shape)

    def rotating(self, slot: str, shape: Sequence[int], footprint: int) -> list[torch.Tensor]:
        """Disjoint copies of a ``shape`` tensor spanning about ``footprint`` bytes (at most
        256 copies), so that cycling through them reads memory no cache still holds."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        n = min(256, max(1, footprint // max(1, math.prod(shape) * itemsize)))
        return list(self.get(slot, (n, *shape)).unbind(0))


def _cycle(tensors: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A no-argument function returning the tensors in turn."""
    if len(tensors) == 1:
        t = tensors[0]
        return lambda: t
    return itertools.cycle(tensors).__next__


def layer_op(
    sig: LayerSig,
    c_in: int,
    c_out: int,
    device: Any = None,
    arena: _Arena | None = None,
    cold_weights: int = COLD_WEIGHT_BYTES,
) -> tuple[Callable, tuple]:
    """``(fn, args)``: the real op of ``sig`` at ``(c_in, c_out)`` on random tensors, for
    :func:`measure_latency`. ``device`` defaults to ``sig.device``.

    In a whole model every layer reads its weights after the other layers have evicted them from
    the caches, while its input was just written by the op before it. So the op cycles through
    copies of its weight spanning ``cold_weights`` bytes (0: one hot copy) and reuses one input.
    """
    device = torch.device(device if device is not None else sig.device)
    arena = arena or _Arena(device, getattr(torch, sig.dtype))
    g = num_groups(sig, c_in, c_out)
    bias = arena.get("b", (c_out,)) if sig.bias else None
    if sig.op in _CONV_OPS:
        x = arena.get("x", (sig.batch, c_in, *sig.spatial))
        w = _cycle(arena.rotating("w", (c_out, c_in // g, *sig.kernel), cold_weights))
        fn, rest = getattr(F, sig.op), (sig.stride, sig.padding, sig.dilation, g)
        return (lambda: fn(x, w(), bias, *rest)), ()
    if sig.op in _CONVT_OPS:
        x = arena.get("x", (sig.batch, c_in, *sig.spatial))
        w = _cycle(arena.rotating("w", (c_in, c_out // g, *sig.kernel), cold_weights))
        fn, rest = getattr(F, sig.op), (sig.stride, sig.padding, 0, g, sig.dilation)
        return (lambda: fn(x, w(), bias, *rest)), ()
    tokens = math.prod(sig.spatial)
    x = arena.get("x", (sig.batch, tokens, c_in) if sig.spatial else (sig.batch, c_in))
    if sig.op == "linear":
        w = _cycle(arena.rotating("w", (c_out, c_in), cold_weights))
        return (lambda: F.linear(x, w(), bias)), ()
    y = arena.get("w", (sig.batch, c_in, c_out))
    return (lambda: torch.matmul(x, y)), ()


# ----------------------------------------------------------------------------------------------
# Device keys and cache
# ----------------------------------------------------------------------------------------------


class LatencyTableMismatch(ValueError):
    """A latency table was measured on another device / torch version / thread count / dtype."""


def device_name(device: Any = "cpu") -> str:
    """A stable human-readable name of a device (GPU model, or CPU model + SIMD level + cores)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cap = torch.backends.cpu.get_cpu_capability()
    return f"cpu: {model} [{cap}] x{os.cpu_count()}"


def device_key(device: Any = "cpu", threads: int | None = None, dtype: str = "float32") -> dict:
    """The header a table is valid for: device name, torch version, thread count, dtype."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": int(threads or torch.get_num_threads()),
        "dtype": str(dtype).removeprefix("torch."),
    }


def cache_dir() -> Path:
    """Folder of cached tables: ``CACHE_DIR`` if set, else ``$GRAPHPRUNE_CACHE``, else
    ``~/.cache/graphprune/latency``."""
    if CACHE_DIR is not None:
        return Path(CACHE_DIR)
    env = os.environ.get("GRAPHPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "graphprune" / "latency"


def _cache_path(key: Mapping) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"latency-t{key['threads']}-{key['dtype']}-{digest}.json"


# ----------------------------------------------------------------------------------------------
# Per-signature tables
# ----------------------------------------------------------------------------------------------


def _axis(c_max: int, step: int) -> list[int]:
    """Multiples of ``step`` up to ``c_max``, plus ``c_max`` itself."""
    if c_max <= step:
        return [c_max]
    vals = list(range(step, c_max + 1, step))
    return vals if vals[-1] == c_max else vals + [c_max]


def _coarse_axis(fine: Sequence[int], n: int) -> list[int]:
    """``n`` points of ``fine``, denser at small counts (targets ``c_max * (i/(n-1))**1.5``),
    always including both ends."""
    if len(fine) <= n:
        return list(fine)
    picked = {fine[0], fine[-1]}
    for i in range(1, n - 1):
        target = fine[-1] * (i / (n - 1)) ** 1.5
        picked.add(min(fine, key=lambda v: abs(v - target)))
    return sorted(picked)


def _axis_weights(axis: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear-interpolation indices and weight along one axis (clamped to its ends)."""
    if len(axis) == 1:
        zero = np.zeros(np.shape(x), dtype=np.intp)
        return zero, zero, np.zeros(np.shape(x))
    x = np.clip(x, axis[0], axis[-1])
    i1 = np.clip(np.searchsorted(axis, x, side="left"), 1, len(axis) - 1)
    i0 = i1 - 1
    return i0, i1, (x - axis[i0]) / (axis[i1] - axis[i0])


def _bilinear(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray, x, y) -> np.ndarray:
    """Bilinear interpolation of ``grid[len(xs), len(ys)]`` at broadcastable ``x``, ``y``."""
    i0, i1, wx = _axis_weights(xs, np.asarray(x, dtype=float))
    j0, j1, wy = _axis_weights(ys, np.asarray(y, dtype=float))
    return (
        (1 - wx) * (1 - wy) * grid[i0, j0]
        + (1 - wx) * wy * grid[i0, j1]
        + wx * (1 - wy) * grid[i1, j0]
        + wx * wy * grid[i1, j1]
    )


def _segment(axis: Sequence[float], x: float) -> tuple[int, int, float]:
    """Scalar twin of :func:`_axis_weights` (pure Python, for fast single lookups)."""
    n = len(axis)
    if n == 1:
        return 0, 0, 0.0
    if x <= axis[0]:
        return 0, 1, 0.0
    if x >= axis[-1]:
        return n - 2, n - 1, 1.0
    i1 = bisect.bisect_left(axis, x)
    return i1 - 1, i1, (x - axis[i1 - 1]) / (axis[i1] - axis[i1 - 1])


def _lerp(axis: Sequence[float], values: Sequence[float], x: float) -> float:
    i0, i1, w = _segment(axis, x)
    return (1 - w) * values[i0] + w * values[i1]


@dataclass
class _SigTable:
    """Measurements of one signature.

    ``grid`` holds the coarse 2-D grid (``coarse_in`` × ``coarse_out``); ``row`` the fine
    staircase along ``fine_in`` at ``c_out = c_out_max`` and ``col`` the one along ``fine_out`` at
    ``c_in = c_in_max``. In ``"full"`` mode coarse == fine; ``"diag"`` (depthwise) tables have one
    ``c_out`` point and ``c_out = c_in * multiplier``."""

    sig: LayerSig
    mode: str
    fine_in: list[int]
    fine_out: list[int]
    coarse_in: list[int]
    coarse_out: list[int]
    grid: np.ndarray
    row: np.ndarray
    col: np.ndarray
    points: int = 0
    seconds: float = 0.0
    remeasured: int = 0
    loaded: int = 0
    arrays: dict = field(default_factory=dict, repr=False)

    @property
    def c_in_max(self) -> int:
        return self.fine_in[-1]

    @property
    def c_out_max(self) -> int:
        return self.fine_out[-1]

    def predict(self, c_in, c_out, correct: bool = True) -> np.ndarray:
        """Interpolated latency (ms) at broadcastable arrays of channel counts."""
        a = self._np()
        ci = np.asarray(c_in, dtype=float)
        co = np.full(np.shape(ci), float(self.c_out_max)) if self.mode == "diag" else c_out
        co = np.asarray(co, dtype=float)
        out = _bilinear(a["ci"], a["co"], self.grid, ci, co)
        if correct and self.mode == "separable":
            out = out * (
                np.interp(ci, a["fi"], self.row) / np.interp(ci, a["ci"], self.grid[:, -1])
            )
            out = out * (np.interp(co, a["fo"], self.col) / np.interp(co, a["co"], self.grid[-1]))
        return out

    def predict_one(self, c_in: float, c_out: float, correct: bool = True) -> float:
        """Scalar :meth:`predict` without numpy (about 10x faster for one point)."""
        a = self._np()
        co = float(self.c_out_max) if self.mode == "diag" else c_out
        i0, i1, wx = _segment(self.coarse_in, c_in)
        j0, j1, wy = _segment(self.coarse_out, co)
        g = a["grid"]
        out = (
            (1 - wx) * (1 - wy) * g[i0][j0]
            + (1 - wx) * wy * g[i0][j1]
            + wx * (1 - wy) * g[i1][j0]
            + wx * wy * g[i1][j1]
        )
        if correct and self.mode == "separable":
            out *= _lerp(self.fine_in, a["row"], c_in) / _lerp(self.coarse_in, a["last_col"], c_in)
            out *= _lerp(self.fine_out, a["col"], co) / _lerp(self.coarse_out, g[-1], co)
        return out

    def _np(self) -> dict:
        if not self.arrays:
            self.arrays.update(
                ci=np.asarray(self.coarse_in, float),
                co=np.asarray(self.coarse_out, float),
                fi=np.asarray(self.fine_in, float),
                fo=np.asarray(self.fine_out, float),
                grid=self.grid.tolist(),
                row=self.row.tolist(),
                col=self.col.tolist(),
                last_col=self.grid[:, -1].tolist(),
            )
        return self.arrays

    def to_dict(self) -> dict:
        return {
            "sig": self.sig.to_dict(),
            "mode": self.mode,
            "fine_in": self.fine_in,
            "fine_out": self.fine_out,
            "coarse_in": self.coarse_in,
            "coarse_out": self.coarse_out,
            "grid": self.grid.tolist(),
            "row": self.row.tolist(),
            "col": self.col.tolist(),
            "points": self.points,
            "seconds": self.seconds,
            "remeasured": self.remeasured,
            "loaded": self.loaded,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> _SigTable:
        return cls(
            sig=LayerSig.from_dict(d["sig"]),
            mode=d["mode"],
            fine_in=list(d["fine_in"]),
            fine_out=list(d["fine_out"]),
            coarse_in=list(d["coarse_in"]),
            coarse_out=list(d["coarse_out"]),
            grid=np.asarray(d["grid"], dtype=float),
            row=np.asarray(d["row"], dtype=float),
            col=np.asarray(d["col"], dtype=float),
            points=int(d.get("points", 0)),
            seconds=float(d.get("seconds", 0.0)),
            remeasured=int(d.get("remeasured", 0)),
            loaded=int(d.get("loaded", 0)),
        )


def _axis_step(sig: LayerSig, round_to: int) -> int:
    if sig.groups.startswith("g="):
        return math.lcm(round_to, int(sig.groups[2:]))
    return round_to


def _plan_sig(
    sig: LayerSig,
    c_in_max: int,
    c_out_max: int,
    round_to: int,
    strategy: str,
    coarse: int,
    full_max_points: int,
) -> tuple[str, list[int], list[int], list[int], list[int], list[tuple[int, int]]]:
    """Choose the mode, axes and the (c_in, c_out) points to measure for one signature."""
    num_groups(sig, c_in_max, c_out_max)
    step = _axis_step(sig, round_to)
    if sig.groups == "depthwise":
        mult = c_out_max // c_in_max
        fine = _axis(c_in_max, step)
        return "diag", fine, [c_out_max], fine, [c_out_max], [(c, c * mult) for c in fine]
    fin, fout = _axis(c_in_max, step), _axis(c_out_max, step)
    cin, cout = _coarse_axis(fin, coarse), _coarse_axis(fout, coarse)
    if strategy == "auto":
        strategy = "full" if len(fin) * len(fout) <= full_max_points else "separable"
    if strategy == "full":
        return "full", fin, fout, fin, fout, [(i, o) for i in fin for o in fout]
    if strategy != "separable":
        raise ValueError(f"unknown strategy {strategy!r} (auto | full | separable)")
    pts = {(i, o) for i in cin for o in cout}
    pts |= {(i, c_out_max) for i in fin} | {(c_in_max, o) for o in fout}
    return "separable", fin, fout, cin, cout, sorted(pts)


def _assemble(
    sig: LayerSig, plan: tuple, values: Mapping[tuple[int, int], float], seconds: float
) -> _SigTable:
    mode, fin, fout, cin, cout, pts = plan
    if mode == "diag":
        mult = cout[0] // fin[-1]
        grid = np.asarray([[values[(c, c * mult)]] for c in fin], dtype=float)
        row, col = grid[:, 0].copy(), grid[-1].copy()
    else:
        grid = np.asarray([[values[(i, o)] for o in cout] for i in cin], dtype=float)
        row = np.asarray([values[(i, fout[-1])] for i in fin], dtype=float)
        col = np.asarray([values[(fin[-1], o)] for o in fout], dtype=float)
    return _SigTable(sig, mode, fin, fout, cin, cout, grid, row, col, len(pts), seconds)


def _merge_requests(sigs: Any) -> dict[LayerSig, tuple[int, int]]:
    """Dedupe ``{sig: (c_in_max, c_out_max)}`` or ``[(sig, c_in_max, c_out_max), ...]`` to one
    entry per signature with the largest counts on each axis."""
    items = sigs.items() if isinstance(sigs, Mapping) else ((s, (i, o)) for s, i, o in sigs)
    merged: dict[LayerSig, tuple[int, int]] = {}
    for sig, (ci, co) in items:
        old = merged.get(sig, (0, 0))
        merged[sig] = (max(old[0], int(ci)), max(old[1], int(co)))
    for sig, (ci, co) in merged.items():
        if sig.groups == "depthwise" and co % ci:
            raise ValueError(f"{sig.short()}: depthwise c_out {co} is not a multiple of c_in {ci}")
    return merged


# ----------------------------------------------------------------------------------------------
# Op overheads (elementwise / normalisation / pooling): ms as a function of bytes moved
# ----------------------------------------------------------------------------------------------


def _nchw(n: int) -> tuple[int, int, int, int]:
    side = max(1, round(math.sqrt(n / 64)))
    return (1, 64, side, side)


def _overhead_ops() -> dict[str, Callable[[torch.Tensor], Callable[[], Any]]]:
    """Kind -> builder taking an NCHW input and returning a no-argument call."""

    def bn(x):
        c = x.shape[1]
        stats = [torch.rand(c, device=x.device, dtype=x.dtype) + 0.5 for _ in range(4)]
        return lambda: F.batch_norm(x, stats[0], stats[1], stats[2], stats[3], False, 0.1, 1e-5)

    def layer_norm(x):
        t = x.reshape(1, -1, 64)
        return lambda: F.layer_norm(t, (64,))

    def binary(op):
        def build(x):
            y = x.clone()
            return lambda: op(x, y)

        return build

    def bcast_mul(x):
        s = torch.rand(1, x.shape[1], 1, 1, device=x.device, dtype=x.dtype)
        return lambda: x * s

    return {
        "batch_norm": bn,
        "layer_norm": layer_norm,
        "relu": lambda x: lambda: F.relu(x),
        "relu_": lambda x: lambda: F.relu_(x),
        "gelu": lambda x: lambda: F.gelu(x),
        "silu": lambda x: lambda: F.silu(x),
        "sigmoid": lambda x: lambda: torch.sigmoid(x),
        "hardswish": lambda x: lambda: F.hardswish(x),
        "add": binary(torch.add),
        "add_": binary(torch.Tensor.add_),
        "mul": binary(torch.mul),
        "mul_bcast": bcast_mul,
        "softmax": lambda x: lambda: torch.softmax(x, -1),
        "max_pool2d": lambda x: lambda: F.max_pool2d(x, 3, 2, 1),
        "avg_pool2d": lambda x: lambda: F.adaptive_avg_pool2d(x, 1),
        "cat": lambda x: lambda: torch.cat([x, x], 1),
        "copy": lambda x: lambda: x.clone(),
    }


#: Kinds with an op-overhead curve; ``"module_call"`` is a constant per ``nn.Module`` call.
OVERHEAD_KINDS = tuple(_overhead_ops()) + ("module_call",)


def _measure_overheads(
    device: torch.device,
    dtype: torch.dtype,
    max_numel: int,
    warmup: int,
    repeats: int,
    progress: bool,
    watch_load: bool = True,
) -> dict[str, dict[str, list[float]]]:
    """ms-vs-bytes curve of each overhead kind on sizes 2**10 .. ``max_numel`` elements."""
    sizes = [2**k for k in range(10, max(11, math.ceil(math.log2(max_numel)) + 1))]
    probe = LoadProbe() if watch_load and device.type == "cpu" else None
    ops = _overhead_ops()
    out: dict[str, dict[str, list[float]]] = {}
    bar = _progress(len(ops) * len(sizes) + 1, "op overheads", progress)
    for kind, build in ops.items():
        inputs = {n: torch.randn(_nchw(n), device=device, dtype=dtype) for n in sizes}

        def measure(n: int, build=build, inputs=inputs) -> float:
            call = build(inputs[n])
            return measure_latency(call, (), warmup, repeats, min_sample_ms=0.5, device=device)[0]

        values, _ = measure_watched(sizes, measure, probe, bar)
        _recheck_spikes([sizes], values, measure)
        nbytes = [float(inputs[n].numel() * inputs[n].element_size()) for n in sizes]
        out[kind] = {"bytes": nbytes, "ms": [values[n] for n in sizes]}
    out["module_call"] = {"bytes": [0.0], "ms": [_module_call_ms(device, dtype, warmup, repeats)]}
    bar.update(1)
    bar.close()
    return out


def _module_call_ms(device: torch.device, dtype: torch.dtype, warmup: int, repeats: int) -> float:
    """Extra cost of an ``nn.Module.__call__`` over a plain function call."""
    x = torch.randn(4, device=device, dtype=dtype)
    t_mod, _ = measure_latency(nn.Identity(), (x,), warmup, repeats, min_sample_ms=0.5)
    t_fn, _ = measure_latency(lambda v: v, (x,), warmup, repeats, min_sample_ms=0.5)
    return max(t_mod - t_fn, 0.0)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="pt")


# ----------------------------------------------------------------------------------------------
# LatencyTable
# ----------------------------------------------------------------------------------------------

Timer = Callable[[LayerSig, int, int], float]


class LatencyTable:
    """Measured latency (ms) per layer signature as a function of ``(c_in, c_out)``.

    Build with :meth:`measure` (or :meth:`cached`), query with :meth:`lookup` /
    :meth:`lookup_grid` and :meth:`overhead`, persist with :meth:`save` / :meth:`load`. The
    ``key`` (device name, torch version, thread count, dtype) says where the numbers hold.
    """

    def __init__(self, key: Mapping, round_to: int = 8):
        self.key = dict(key)
        self.round_to = int(round_to)
        self.tables: dict[LayerSig, _SigTable] = {}
        self.overheads: dict[str, dict[str, list[float]]] = {}
        self._memo: dict[tuple, float] = {}
        self.calibration: dict[str, Any] = {}
        #: In-model context correction (:meth:`calibrate_context`): ``{"layers": {sig: scale},
        #: "ops": {kind: (scale, per_op_ms)}, "fitted_on": {...}}``; empty: none.
        self.context: dict[str, Any] = {}

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def measure(
        cls,
        sigs_with_max_channels: Any,
        round_to: int = 8,
        device: Any = None,
        threads: int | None = None,
        repeats: int = 7,
        progress: bool = True,
        overheads: bool = True,
        **options: Any,
    ) -> LatencyTable:
        """Measure a new table.

        ``sigs_with_max_channels``: ``{sig: (c_in_max, c_out_max)}`` or a list of
        ``(sig, c_in_max, c_out_max)``; identical signatures are measured once (on the union of
        their ranges). ``device`` defaults to the signatures' device, ``threads`` to the current
        thread count (fixed while measuring and recorded in the key). ``overheads`` also measures
        the op-overhead curves. Further ``options`` (strategy, coarse, warmup, ...) are those of
        :meth:`add`.
        """
        merged = _merge_requests(sigs_with_max_channels)
        device = _table_device(merged, device)
        dtype = _table_dtype(merged)
        threads = int(threads or torch.get_num_threads())
        table = cls(device_key(device, threads, dtype), round_to)
        table.add(merged, device=device, repeats=repeats, progress=progress, **options)
        if overheads:
            table.measure_overheads(device=device, progress=progress)
        return table

    def add(
        self,
        sigs_with_max_channels: Any,
        device: Any = None,
        repeats: int = 7,
        warmup: int = 2,
        min_sample_ms: float = 0.5,
        cold_weights: int = COLD_WEIGHT_BYTES,
        progress: bool = True,
        strategy: str = "auto",
        coarse: int = 9,
        full_max_points: int = 160,
        timer: Timer | None = None,
        watch_load: bool = True,
    ) -> int:
        """Measure the signatures this table does not cover yet (or covers on a smaller range)
        under this table's thread count; returns how many signatures were measured.

        Each point is the median of ``repeats`` samples after ``warmup`` calls, a sample
        timing enough calls to last ``min_sample_ms``; weights cycle through ``cold_weights``
        bytes of copies (see :func:`layer_op`). ``strategy``: ``"full"`` (every
        step-``round_to`` point), ``"separable"`` (a ``coarse`` × ``coarse`` grid plus the fine
        staircase of each axis, see the module doc) or ``"auto"`` (full when it has at most
        ``full_max_points`` points). ``timer(sig, c_in, c_out) -> ms`` replaces the real
        measurement (tests, simulations). ``watch_load`` re-measures points timed while other
        processes loaded the CPUs (:class:`LoadProbe`; CPU only).
        """
        merged = _merge_requests(sigs_with_max_channels)
        todo = {s: m for s, m in merged.items() if not self._covers_range(s, *m)}
        if not todo:
            return 0
        for sig, (ci, co) in todo.items():
            old = self.tables.get(sig)
            if old is not None:
                todo[sig] = (max(ci, old.c_in_max), max(co, old.c_out_max))
        self._check_dtype(todo)
        device = torch.device(device if device is not None else _table_device(todo, None))
        plans = {
            s: _plan_sig(s, ci, co, self.round_to, strategy, coarse, full_max_points)
            for s, (ci, co) in todo.items()
        }
        watch = watch_load and timer is None and device.type == "cpu"
        probe = LoadProbe() if watch else None
        if timer is None:
            timer = _OpTimer(device, warmup, repeats, min_sample_ms, cold_weights)
        bar = _progress(sum(len(p[-1]) for p in plans.values()), "latency table", progress)
        with num_threads(self.key["threads"]):
            for sig, plan in plans.items():
                t0 = time.perf_counter()
                values, spikes, loaded = _measure_sig(sig, plan, timer, bar, probe)
                t = _assemble(sig, plan, values, time.perf_counter() - t0)
                t.remeasured, t.loaded = spikes, loaded
                self.tables[sig] = t
                self._memo.clear()
        bar.close()
        _warn_loaded(t for s, t in self.tables.items() if s in todo)
        return len(todo)

    def measure_overheads(
        self,
        device: Any = None,
        max_numel: int = 2**23,
        repeats: int = 7,
        warmup: int = 2,
        progress: bool = True,
        watch_load: bool = True,
    ) -> None:
        """Measure ms-vs-bytes curves of elementwise / norm / pooling ops (:data:`OVERHEAD_KINDS`)
        on sizes 2**10 .. ``max_numel`` elements, once per device (``watch_load`` as in
        :meth:`add`)."""
        if device is None:
            device = self.sigs[0].device if self.tables else "cpu"
        device, dtype = torch.device(device), getattr(torch, self.key["dtype"])
        with num_threads(self.key["threads"]):
            self.overheads = _measure_overheads(
                device, dtype, max_numel, warmup, repeats, progress, watch_load
            )

    @classmethod
    def cached(
        cls,
        sigs_with_max_channels: Any,
        device: Any = None,
        threads: int | None = None,
        **measure_kwargs: Any,
    ) -> LatencyTable:
        """Load the cached table of this device key from :func:`cache_dir`, measure what it
        lacks, save it back and return it."""
        merged = _merge_requests(sigs_with_max_channels)
        device = _table_device(merged, device)
        key = device_key(device, threads or torch.get_num_threads(), _table_dtype(merged))
        path = _cache_path(key)
        if path.exists():
            table = cls.load(path, expect=key)
            overheads = measure_kwargs.pop("overheads", True)
            measure_kwargs.pop("round_to", None)
            n = table.add(merged, device=device, **measure_kwargs)
            if overheads and not table.overheads:
                table.measure_overheads(device, progress=measure_kwargs.get("progress", True))
                n += 1
            if n:
                table.save(path)
            return table
        table = cls.measure(merged, device=device, threads=key["threads"], **measure_kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
        return table

    def calibrate(
        self,
        model: Any,
        example_inputs: Any = None,
        fit: str = "auto",
        repeats: int = 20,
        warmup: int = 5,
        measured_ms: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """Fit what isolated timings miss inside a whole model (allocator page faults, Python
        dispatch, thread-pool wake-ups) from end-to-end measurements of ``model`` (or of a list
        of ``(model, example_inputs)``): ``measured ≈ scale * predicted + per_op_ms * ops``.

        ``fit``: ``"additive"`` (``scale = 1``; one model suffices), ``"scale"``
        (``per_op_ms = 0``), ``"both"`` (least squares; needs models of different sizes, e.g. the
        dense model and a uniformly thinned copy) or ``"auto"`` (``"both"`` given two or more
        models, else ``"additive"``). :func:`estimate_model_latency` applies the fit. Calibrate
        once per device and model family. ``measured_ms`` supplies the end-to-end latencies
        instead of measuring them here.
        """
        pairs = model if isinstance(model, (list, tuple)) else [(model, example_inputs)]
        rows = []
        for i, (m, x) in enumerate(pairs):
            if measured_ms is not None:
                measured = float(measured_ms[i])
            else:
                measured = self._measure_model(m, x, repeats, warmup)
            predicted, items = estimate_model_latency(m, x, self, calibrated=False)
            rows.append(
                {
                    "model": type(m).__name__,
                    "measured_ms": measured,
                    "predicted_ms": predicted,
                    "ops": _op_count(items),
                }
            )
        if fit == "auto":
            fit = "both" if len(rows) > 1 else "additive"
        scale, per_op = _fit_calibration(rows, fit)
        self.calibration = {"scale": scale, "per_op_ms": per_op, "fit": fit, "fitted_on": rows}
        return self.calibration

    def _measure_model(self, model: nn.Module, inputs: Any, repeats: int, warmup: int) -> float:
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        probe = LoadProbe() if _first_device(model, inputs).type == "cpu" else None
        threads = self.key["threads"]

        def one(_):
            return measure_latency(model, inputs, warmup, repeats, threads)[0]

        return measure_watched([0], one, probe)[0][0]

    # -- queries -------------------------------------------------------------------------------

    def __contains__(self, sig: LayerSig) -> bool:
        return sig in self.tables

    def __len__(self) -> int:
        return len(self.tables)

    @property
    def sigs(self) -> list[LayerSig]:
        """The measured signatures."""
        return list(self.tables)

    def covers(self, sig: LayerSig, c_in: int, c_out: int) -> bool:
        """Whether ``lookup(sig, c_in, c_out)`` is inside the measured range."""
        return self._covers_range(sig, c_in, c_out)

    def _covers_range(self, sig: LayerSig, c_in: int, c_out: int) -> bool:
        t = self.tables.get(sig)
        return t is not None and c_in <= t.c_in_max and c_out <= t.c_out_max

    def lookup(self, sig: LayerSig, c_in: int, c_out: int) -> float:
        """Interpolated median latency (ms) of ``sig`` at ``(c_in, c_out)``. Counts below the
        smallest grid point read the smallest; counts above the measured range raise."""
        key = (sig, c_in, c_out)
        hit = self._memo.get(key)
        if hit is None:
            t = self.tables.get(sig)
            if t is None or not (1 <= c_in <= t.c_in_max) or not self._c_out_ok(t, c_out):
                return float(self.lookup_grid(sig, [c_in], [c_out])[0, 0])  # raises clearly
            hit = self._memo[key] = t.predict_one(c_in, c_out)
        return hit

    @staticmethod
    def _c_out_ok(t: _SigTable, c_out: int) -> bool:
        return t.mode == "diag" or 1 <= c_out <= t.c_out_max

    def lookup_grid(
        self,
        sig: LayerSig,
        c_in_values: Sequence[int],
        c_out_values: Sequence[int],
        correct: bool = True,
    ) -> np.ndarray:
        """Latency matrix ``[len(c_in_values), len(c_out_values)]`` (ms), vectorised.
        ``correct=False`` drops the staircase correction of separable tables (coarse grid only)."""
        t = self.tables.get(sig)
        if t is None:
            raise KeyError(f"latency table has no signature {sig.short()} ({sig})")
        ci = np.asarray(c_in_values, dtype=float).reshape(-1, 1)
        co = np.asarray(c_out_values, dtype=float).reshape(1, -1)
        if ci.size and (ci.max() > t.c_in_max or ci.min() < 1):
            raise ValueError(f"{sig.short()}: c_in outside measured range 1..{t.c_in_max}")
        if t.mode != "diag" and co.size and (co.max() > t.c_out_max or co.min() < 1):
            raise ValueError(f"{sig.short()}: c_out outside measured range 1..{t.c_out_max}")
        if t.mode == "diag":
            return np.broadcast_to(t.predict(ci, None, correct), (ci.shape[0], co.shape[1])).copy()
        return t.predict(ci, co, correct)

    def overhead(self, kind: str, nbytes: float) -> float:
        """Latency (ms) of an op of ``kind`` (see :data:`OVERHEAD_KINDS`) touching ``nbytes``
        bytes of input: piecewise linear in bytes between measured sizes, extrapolated linearly
        above them."""
        return float(self.overhead_many(kind, nbytes))

    def overhead_many(self, kind: str, nbytes: Any) -> np.ndarray:
        """:meth:`overhead` at an array of byte counts (vectorised)."""
        curve = self.overheads.get(kind)
        if curve is None:
            raise KeyError(f"no op overhead {kind!r}; measured: {sorted(self.overheads)}")
        nb = np.asarray(nbytes, dtype=float)
        xs, ys = curve["bytes"], curve["ms"]
        out = np.interp(nb, xs, ys)
        if len(xs) > 1 and (nb > xs[-1]).any():
            # least-squares slope over the largest measured sizes, never negative: a noisy last
            # point must not make a bigger op predicted cheaper (or negative)
            k = min(len(xs), 3)
            slope = max(float(np.polyfit(xs[-k:], ys[-k:], 1)[0]), 0.0)
            out = np.where(nb > xs[-1], ys[-1] + slope * (nb - xs[-1]), out)
        return out

    def layer_scale(self, sig: LayerSig) -> float:
        """In-model context factor of a layer signature (1 without :meth:`calibrate_context`)."""
        layers = self.context.get("layers") if self.context else None
        if not layers:
            return 1.0
        return float(layers.get(sig, self.context.get("layer_default", 1.0)))

    def layer_ms(self, sig: LayerSig, c_in: int, c_out: int) -> float:
        """Predicted in-model latency (ms) of a layer: :meth:`lookup` × :meth:`layer_scale`."""
        return self.lookup(sig, c_in, c_out) * self.layer_scale(sig)

    def op_ms(self, kind: str, nbytes: Any) -> Any:
        """Predicted in-model latency (ms) of an overhead op of ``kind`` reading ``nbytes``
        (scalar or array): the isolated curve (:meth:`overhead`), then the context fit
        ``scale * curve + per_op_ms`` of that kind when :meth:`calibrate_context` fitted one."""
        if np.ndim(nbytes) == 0:
            iso = self.overhead(kind, float(nbytes))
        else:
            iso = self.overhead_many(kind, nbytes)
        fit = (self.context.get("ops") or {}).get(kind) if self.context else None
        if fit is None:
            return iso
        return fit[0] * iso + fit[1]

    def calibrate_context(
        self,
        model: nn.Module,
        example_inputs: Any,
        repeats: int = 10,
        warmup: int = 3,
        rounds: int = 3,
    ) -> dict[str, Any]:
        """Fit what isolated timings miss *inside* a model, node by node, from one model
        (typically the dense model being pruned) on this table's device and thread count.

        Every fx node of ``model`` is timed in place (:func:`node_times`: a timing
        ``torch.fx.Interpreter``, its own per-node cost subtracted; the median of ``rounds``
        runs of ``repeats`` forwards, as timings drift) and compared with the
        isolated prediction of the same node. Layers get one factor per signature
        (``sum in-model / sum isolated`` over that signature's nodes: cache and bandwidth
        context, the table being timed on a hot input), overhead ops one affine fit per kind
        (``in-model = scale * isolated + per_op_ms``: a fresh output buffer, data just written
        by another op, thread wake-up; least squares over that kind's nodes, ``scale`` alone
        when they all have one size). The fit is stored in :attr:`context` and used by
        :meth:`layer_ms`, :meth:`op_ms`, :func:`estimate_model_latency` and the latency
        allocation. Returns the fit with per-kind totals."""
        self.context = {}
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        with num_threads(self.key["threads"]):
            items = model_cost_items(model, inputs)
            runs = [node_times(model, inputs, repeats=repeats, warmup=warmup)
                    for _ in range(max(rounds, 1))]
        times = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
        interp = statistics.median(r[1] for r in runs)
        per_call = self.overhead("module_call", 0) if "module_call" in self.overheads else 0.0
        layers: dict[LayerSig, list[float]] = {}
        ops: dict[str, list[tuple[float, float]]] = {}
        for it in items:
            t = times.get(it.name)
            if t is None:
                continue
            if it.kind == "layer":
                acc = layers.setdefault(it.sig, [0.0, 0.0])
                acc[0] += self.lookup(it.sig, it.c_in, it.c_out)
                acc[1] += max(t - per_call, 0.0)
            elif it.kind not in ("free", "unknown") and it.kind in self.overheads:
                ops.setdefault(it.kind, []).append((self.overhead(it.kind, it.nbytes), t))
        scales = {sig: min(max(m / p, 0.5), 2.0) for sig, (p, m) in layers.items() if p > 0}
        tot_p = sum(p for p, _ in layers.values())
        default = sum(m for _, m in layers.values()) / tot_p if tot_p > 0 else 1.0
        fits = {kind: _affine_fit(pairs) for kind, pairs in ops.items()}
        self.context = {
            "layers": scales,
            "layer_default": min(max(default, 0.5), 2.0),
            "ops": fits,
            "fitted_on": {
                "model": type(model).__name__,
                "interpreter_ms_per_node": interp,
                "layers_ms": [tot_p, sum(m for _, m in layers.values())],
                "ops_ms": {k: [sum(p for p, _ in v), sum(m for _, m in v), len(v)]
                           for k, v in ops.items()},
            },
        }
        self._memo.clear()
        return self.context

    def describe(self, sig: LayerSig) -> dict:
        """Mode, axis lengths, measured point count and seconds of one signature's table."""
        t = self.tables[sig]
        return {
            "mode": t.mode,
            "c_in_max": t.c_in_max,
            "c_out_max": t.c_out_max,
            "coarse": (len(t.coarse_in), len(t.coarse_out)),
            "points": t.points,
            "seconds": t.seconds,
            "remeasured": t.remeasured,
            "loaded": t.loaded,
        }

    # -- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "key": self.key,
            "round_to": self.round_to,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tables": [t.to_dict() for t in self.tables.values()],
            "overheads": self.overheads,
            "calibration": self.calibration,
            "context": _context_to_json(self.context),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON (header ``key`` first)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expect: Mapping | str | None = "current",
        on_mismatch: str = "raise",
    ) -> LatencyTable:
        """Read a table saved by :meth:`save` and check its key.

        ``expect``: ``"current"`` compares device name and torch version with this machine and
        the thread count with ``torch.get_num_threads()``; a dict compares the fields it names;
        ``None`` skips the check. ``on_mismatch``: ``"raise"`` (:class:`LatencyTableMismatch`),
        ``"warn"`` or ``"ignore"``.
        """
        data = json.loads(Path(path).read_text())
        if data.get("format") != _FORMAT:
            raise ValueError(
                f"{path}: not a graphprune latency table (format {data.get('format')})"
            )
        table = cls(data["key"], data.get("round_to", 8))
        for d in data["tables"]:
            t = _SigTable.from_dict(d)
            table.tables[t.sig] = t
        table.overheads = {
            k: {"bytes": list(v["bytes"]), "ms": list(v["ms"])}
            for k, v in data.get("overheads", {}).items()
        }
        table.calibration = dict(data.get("calibration", {}))
        table.context = _context_from_json(data.get("context") or {})
        table.check_key(expect, on_mismatch, source=str(path))
        return table

    def check_key(
        self,
        expect: Mapping | str | None = "current",
        on_mismatch: str = "raise",
        source: str = "latency table",
    ) -> list[str]:
        """Compare this table's key with ``expect`` (see :meth:`load`); returns the differences."""
        if expect is None:
            return []
        if expect == "current":
            dev = self.sigs[0].device if self.tables else "cpu"
            expect = device_key(dev, torch.get_num_threads(), self.key.get("dtype", "float32"))
            expect.pop("dtype")
        diffs = [
            f"{k}: table {self.key.get(k)!r} vs expected {v!r}"
            for k, v in expect.items()
            if self.key.get(k) != v
        ]
        if diffs and on_mismatch != "ignore":
            msg = f"{source} was measured under another key: " + "; ".join(diffs)
            if on_mismatch == "raise":
                raise LatencyTableMismatch(msg + " (load with on_mismatch='warn' to use it anyway)")
            warnings.warn(msg, stacklevel=3)
        return diffs

    def _check_dtype(self, sigs: Iterable[LayerSig]) -> None:
        bad = [s for s in sigs if s.dtype != self.key["dtype"]]
        if bad:
            raise ValueError(f"table dtype is {self.key['dtype']}; got {bad[0].dtype} signatures")


def _table_device(sigs: Iterable[LayerSig], device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    devices = {torch.device(s.device) for s in sigs}
    if len(devices) > 1:
        raise ValueError(f"signatures span several devices {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cpu")


def _table_dtype(sigs: Iterable[LayerSig]) -> str:
    dtypes = {s.dtype for s in sigs}
    if len(dtypes) > 1:
        raise ValueError(f"one table holds one dtype; got {sorted(dtypes)}")
    return dtypes.pop() if dtypes else "float32"


class LoadProbe:
    """Share of this machine's CPUs used by *other* processes since :meth:`start` (Linux
    ``/proc/stat`` minus this process's CPU time; always 0 where that is unavailable).

    Timings on a shared machine are spoiled by other processes, with OpenMP threads waiting for
    a descheduled sibling up to 30x slower; the table measurement uses this to re-measure what
    was timed under load."""

    def __init__(self) -> None:
        self.ok = Path("/proc/stat").exists()
        self.start()

    @staticmethod
    def _busy_s() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system

    def start(self) -> None:
        """Start a new interval."""
        self.t0 = time.perf_counter()
        if self.ok:
            self.busy0, self.own0 = self._busy_s(), self._own_s()

    def share(self) -> float:
        """Other processes' share of all CPUs since :meth:`start` (0..1)."""
        wall = time.perf_counter() - self.t0
        if not self.ok or wall <= 0:
            return 0.0
        other = (self._busy_s() - self.busy0) - (self._own_s() - self.own0)
        return min(max(other, 0.0) / (wall * (os.cpu_count() or 1)), 1.0)  # 10 ms ticks

    def wait_quiet(
        self, limit_s: float, threshold: float | None = None, step_s: float = 0.5
    ) -> float:
        """Sleep until other processes use less than ``threshold`` over ``step_s`` (at most
        ``limit_s``); returns the last share seen. ``threshold`` defaults to the share that does
        not disturb this process's ``torch.get_num_threads()`` threads."""
        threshold = _allowed_share() if threshold is None else threshold
        deadline = time.perf_counter() + limit_s
        while True:
            self.start()
            time.sleep(step_s)
            share = self.share()
            if share < threshold or time.perf_counter() >= deadline:
                return share


def _warn_loaded(tables: Iterable[_SigTable]) -> None:
    loaded = {t.sig.short(): t.loaded for t in tables if t.loaded}
    if loaded:
        warnings.warn(
            f"latency table: points were timed while other processes loaded the CPUs even after "
            f"re-measuring ({loaded}); their latencies may be too high. Measure on a quiet "
            f"machine for reliable tables.",
            stacklevel=3,
        )


def _allowed_share() -> float:
    """Other processes' CPU share that does not disturb a timing: the cores this process leaves
    idle (``torch.get_num_threads()`` of them busy) plus :data:`LOAD_THRESHOLD`."""
    cpus = os.cpu_count() or 1
    return LOAD_THRESHOLD + max(cpus - torch.get_num_threads(), 0) / cpus


def measure_watched(
    points: Sequence[Any],
    measure: Callable[[Any], float],
    probe: LoadProbe | None,
    bar: Any = None,
    chunk_s: float = 1.0,
    rounds: int = 2,
    wait_s: float = 10.0,
) -> tuple[dict[Any, float], int]:
    """Measure ``points`` in chunks of about ``chunk_s`` seconds; a chunk during which other
    processes used more of the CPUs than this process left idle (+ :data:`LOAD_THRESHOLD`) is
    measured again (after waiting
    up to ``wait_s`` for quiet), at most ``rounds`` more times, keeping each point's smallest
    value. Returns the values and how many points were still timed under load."""
    values: dict[Any, float] = {}
    todo = list(points)
    for r in range(rounds + 1):
        if r and probe is not None:
            probe.wait_quiet(wait_s)
        loaded, i = [], 0
        while i < len(todo):
            chunk, t0 = [], time.perf_counter()
            if probe is not None:
                probe.start()
            while i < len(todo) and (not chunk or time.perf_counter() - t0 < chunk_s):
                p = todo[i]
                values[p] = min(values.get(p, math.inf), measure(p))
                chunk.append(p)
                i += 1
                if bar is not None and r == 0:
                    bar.update(1)
            if probe is not None and probe.share() > _allowed_share():
                loaded += chunk
        todo = loaded
        if not todo:
            break
    return values, len(todo)


class _OpTimer:
    """The default timer: median latency of the real op (:func:`layer_op`) at one point."""

    def __init__(self, device, warmup: int, repeats: int, min_sample_ms: float, cold: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.min_sample_ms, self.cold = min_sample_ms, cold
        self.arenas: dict[str, _Arena] = {}

    def __call__(self, sig: LayerSig, c_in: int, c_out: int) -> float:
        arena = self.arenas.get(sig.dtype)
        if arena is None:
            arena = self.arenas[sig.dtype] = _Arena(self.device, getattr(torch, sig.dtype))
        fn, args = layer_op(sig, c_in, c_out, self.device, arena, self.cold)
        w, r, dev = self.warmup, self.repeats, self.device
        return measure_latency(fn, args, w, r, None, self.min_sample_ms, dev)[0]


def measure_layer_points(
    sig: LayerSig,
    points: Iterable[tuple[int, int]],
    device: Any = None,
    threads: int | None = None,
    repeats: int = 7,
    warmup: int = 2,
    min_sample_ms: float = 0.5,
    cold_weights: int = COLD_WEIGHT_BYTES,
    watch_load: bool = True,
) -> dict[tuple[int, int], float]:
    """Latency (ms) of ``sig`` at each ``(c_in, c_out)`` with the protocol of
    :meth:`LatencyTable.add` (shuffled order, cold weights, re-measured under load): use it to
    check a table against direct measurements."""
    device = torch.device(device if device is not None else sig.device)
    timer = _OpTimer(device, warmup, repeats, min_sample_ms, cold_weights)
    order = sorted(set(points))
    random.Random(1).shuffle(order)
    probe = LoadProbe() if watch_load and device.type == "cpu" else None
    with num_threads(threads):
        values, _ = measure_watched(order, lambda p: timer(sig, *p), probe)
    return values


def _measure_sig(
    sig: LayerSig, plan: tuple, timer: Timer, bar: Any, probe: LoadProbe | None
) -> tuple[dict[tuple[int, int], float], int, int]:
    """Latency at each planned point, visited in a fixed random order (decorrelates drift and
    load bursts from the grid); what was timed under load is re-measured
    (:func:`measure_watched`), then isolated spikes (:func:`_spikes`). Returns the values, the
    number of spike re-measurements and the number of points still timed under load."""
    order = list(plan[-1])
    random.Random(0).shuffle(order)

    def measure(p: tuple[int, int]) -> float:
        return float(timer(sig, *p))

    values, loaded = measure_watched(order, measure, probe, bar)
    return values, _recheck_spikes(_plan_lines(plan), values, measure), loaded


def _plan_lines(plan: tuple) -> list[list[tuple[int, int]]]:
    """The measured points as 1-D sequences along which latency should vary smoothly."""
    mode, fin, fout, cin, cout, pts = plan
    if mode == "diag":
        return [sorted(pts)]
    lines = [[(i, fout[-1]) for i in fin], [(fin[-1], o) for o in fout]]
    lines += [[(i, o) for o in cout] for i in cin]
    return lines + [[(i, o) for i in cin] for o in cout]


def _work(p: Any) -> float:
    """Size of a measured point: ``c_in * c_out`` for a grid point, the number for a size."""
    return float(p[0] * p[1]) if isinstance(p, tuple) else float(p)


def _spikes(lines: Iterable[Sequence[Any]], values: Mapping[Any, float], ratio: float) -> set:
    """Points costing more than ``ratio`` × what a neighbour along some line allows (its value,
    scaled up by the size ratio when the point is larger): latency never grows faster than the
    work between neighbouring grid points, a burst of load on the machine makes it."""
    out = set()
    for line in lines:
        for k, p in enumerate(line):
            nb = [
                values[q] * max(1.0, _work(p) / _work(q))
                for q in line[max(k - 1, 0) : k + 2]
                if q != p
            ]
            if nb and values[p] > ratio * max(nb):
                out.add(p)
    return out


def _recheck_spikes(
    lines: list[Sequence[Any]],
    values: dict[Any, float],
    measure: Callable[..., float],
    ratio: float = SPIKE_RATIO,
    retries: int = 2,
) -> int:
    """Re-measure spikes up to ``retries`` times, keeping the smaller value; returns the count."""
    n = 0
    for _ in range(retries):
        bad = sorted(_spikes(lines, values, ratio))
        for p in bad:
            values[p] = min(values[p], measure(p))
        n += len(bad)
        if not bad:
            break
    return n


# ----------------------------------------------------------------------------------------------
# Whole-model composition
# ----------------------------------------------------------------------------------------------


@dataclass
class CostItem:
    """One node of a model's cost: a table layer (``kind == "layer"``), an op overhead, ``"free"``
    (views) or ``"unknown"``."""

    name: str
    kind: str
    sig: LayerSig | None = None
    c_in: int = 0
    c_out: int = 0
    nbytes: int = 0
    ms: float = 0.0


_MODULE_KINDS: list[tuple[type, str]] = [
    (nn.modules.batchnorm._BatchNorm, "batch_norm"),
    (nn.LayerNorm, "layer_norm"),
    (nn.GroupNorm, "layer_norm"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu"),
    (nn.LeakyReLU, "relu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Hardsigmoid, "hardswish"),
    (nn.Hardswish, "hardswish"),
    (nn.Softmax, "softmax"),
    (nn.MaxPool2d, "max_pool2d"),
    (nn.AvgPool2d, "avg_pool2d"),
    (nn.AdaptiveAvgPool2d, "avg_pool2d"),
    (nn.Identity, "free"),
    (nn.Dropout, "free"),
    (nn.Flatten, "free"),
]

_FUNCTION_KINDS: dict[Any, str] = {
    operator.add: "add",
    torch.add: "add",
    operator.iadd: "add_",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.imul: "mul",
    F.relu: "relu",
    torch.relu: "relu",
    F.gelu: "gelu",
    F.silu: "silu",
    torch.sigmoid: "sigmoid",
    F.hardswish: "hardswish",
    torch.softmax: "softmax",
    F.softmax: "softmax",
    F.layer_norm: "layer_norm",
    F.batch_norm: "batch_norm",
    F.max_pool2d: "max_pool2d",
    F.adaptive_avg_pool2d: "avg_pool2d",
    torch.cat: "cat",
    torch.flatten: "free",
    torch.reshape: "free",
    operator.getitem: "free",
    getattr: "free",
    torch.permute: "free",
    torch.transpose: "free",
}

_METHOD_KINDS: dict[str, str] = {
    "add": "add",
    "add_": "add_",
    "mul": "mul",
    "mul_": "add_",
    "relu": "relu",
    "relu_": "relu_",
    "sigmoid": "sigmoid",
    "softmax": "softmax",
    "mean": "avg_pool2d",
    "contiguous": "copy",
    "view": "free",
    "reshape": "free",
    "flatten": "free",
    "size": "free",
    "permute": "free",
    "transpose": "free",
    "chunk": "free",
    "split": "free",
    "unsqueeze": "free",
    "squeeze": "free",
    "dim": "free",
    "expand": "free",
}


def _input_bytes(node: Any) -> list[int]:
    """Bytes of each tensor input of an fx node (from ShapeProp's ``tensor_meta``)."""
    from torch.fx import Node

    args = node.args[0] if node.target is torch.cat else node.args
    out = []
    for a in args if isinstance(args, (list, tuple)) else [args]:
        meta = a.meta.get("tensor_meta") if isinstance(a, Node) else None
        if meta is not None and hasattr(meta, "shape"):
            out.append(math.prod(meta.shape) * _itemsize(str(meta.dtype).removeprefix("torch.")))
    return out


def overhead_bytes(kind: str, node: Any, sizes: Sequence[int]) -> tuple[str, int]:
    """(kind, bytes) an overhead op is costed at, from the bytes of its tensor inputs: ``cat``
    reads all inputs, other ops their largest; binary ops that broadcast become
    ``"mul_bcast"``. Shared by :func:`model_cost_items` and the allocation's overhead terms."""
    nbytes = sum(sizes) if node.target is torch.cat else max(sizes, default=0)
    if kind in ("add", "add_", "mul") and len(sizes) >= 2 and min(sizes) < max(sizes):
        kind = "mul_bcast"
    return kind, nbytes


def _overhead_item(node: Any, kind: str) -> CostItem:
    kind, nbytes = overhead_bytes(kind, node, _input_bytes(node))
    return CostItem(node.name, kind, nbytes=nbytes)


def node_kind(gm: Any, node: Any) -> str | None:
    """Cost kind of an fx call node of ``gm``: ``"layer"`` (conv / linear module), an overhead
    kind (:data:`OVERHEAD_KINDS`; in-place ReLU modules give ``"relu_"``), ``"free"`` or
    ``"unknown"``; None for placeholders and outputs. Binary ops that broadcast become
    ``"mul_bcast"`` only in :func:`model_cost_items` (that needs the input sizes)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            return "layer"
        kind = next((k for cls, k in _MODULE_KINDS if isinstance(mod, cls)), "unknown")
        return "relu_" if kind == "relu" and getattr(mod, "inplace", False) else kind
    if node.op == "call_function":
        kind = _FUNCTION_KINDS.get(node.target, "unknown")
        return "relu_" if kind == "relu" and node.kwargs.get("inplace") else kind
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target, "unknown")
    return None


def _node_item(gm: Any, node: Any) -> CostItem | None:
    kind = node_kind(gm, node)
    if kind is None:
        return None
    if kind == "layer":
        shape = node.args[0].meta["tensor_meta"].shape
        return CostItem(node.name, "layer", *sig_from_module(gm.get_submodule(node.target), shape))
    return _overhead_item(node, kind)


def model_cost_items(model: nn.Module, example_inputs: Any) -> list[CostItem]:
    """Trace ``model`` with ``torch.fx`` (a GraphModule is used as is), propagate shapes on the
    example inputs and list one :class:`CostItem` per call node: conv / linear modules become
    table layers with their :class:`LayerSig`, other ops an overhead kind."""
    from torch.fx import GraphModule, symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    gm = model if isinstance(model, GraphModule) else symbolic_trace(model)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    items = [_node_item(gm, n) for n in gm.graph.nodes]
    return [it for it in items if it is not None]


def estimate_model_latency(
    model: nn.Module,
    example_inputs: Any,
    table: LatencyTable,
    module_calls: bool = True,
    calibrated: bool = True,
) -> tuple[float, list[CostItem]]:
    """Predicted latency (ms) of ``model`` on ``example_inputs``: table lookups for conv /
    linear layers plus op overheads (both with the table's in-model context fit,
    :meth:`LatencyTable.calibrate_context`, when it has one), plus a per-``nn.Module``-call
    constant when
    ``module_calls`` and the table's fitted per-op constant (:meth:`LatencyTable.calibrate`)
    when ``calibrated``. Returns the total and the itemised list; ``"unknown"`` items cost 0 and
    are listed so the caller can see what the estimate missed. Missing layers raise ``KeyError``."""
    items = model_cost_items(model, example_inputs)
    per_call = table.overhead("module_call", 0) if module_calls and table.overheads else 0.0
    for it in items:
        if it.kind == "layer":
            it.ms = table.layer_ms(it.sig, it.c_in, it.c_out)
        elif it.kind not in ("free", "unknown") and table.overheads:
            it.ms = float(table.op_ms(it.kind, it.nbytes))
    total = sum(it.ms for it in items)
    if per_call:
        total += per_call * _count_module_calls(model, example_inputs)
    if calibrated and table.calibration:
        cal = table.calibration
        total = cal.get("scale", 1.0) * total + cal["per_op_ms"] * _op_count(items)
    return total, items


def _fit_calibration(rows: list[dict], fit: str) -> tuple[float, float]:
    """``(scale, per_op_ms)`` minimising the squared error of ``scale * predicted + per_op *
    ops`` against ``measured`` over ``rows``."""
    meas = np.array([r["measured_ms"] for r in rows])
    pred = np.array([r["predicted_ms"] for r in rows])
    ops = np.array([r["ops"] for r in rows], dtype=float)
    if fit == "additive":
        return 1.0, float(((meas - pred) @ ops) / max(ops @ ops, 1.0))
    if fit == "scale":
        return float((meas @ pred) / max(pred @ pred, 1e-12)), 0.0
    if fit != "both":
        raise ValueError(f"calibrate: fit must be auto | additive | scale | both, got {fit!r}")
    if len(rows) < 2:
        raise ValueError("calibrate(fit='both') needs two or more models of different sizes")
    (scale, per_op), *_ = np.linalg.lstsq(np.stack([pred, ops], 1), meas, rcond=None)
    return float(scale), float(per_op)


def _op_count(items: Iterable[CostItem]) -> int:
    """Ops that run kernels (everything but views and unknown calls)."""
    return sum(1 for it in items if it.kind not in ("free", "unknown"))


def _count_module_calls(model: nn.Module, example_inputs: Any) -> int:
    """Number of ``nn.Module.__call__``s in one forward (hooks on every submodule)."""
    count = [0]

    def hook(*_):
        count[0] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return count[0]


def _affine_fit(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """``(scale, per_op_ms)`` of ``in_model ≈ scale * isolated + per_op_ms`` over ``(isolated,
    in_model)`` pairs: least squares when the isolated values differ enough, else the mean
    offset; ``scale`` is kept in [0.5, 3] and ``per_op_ms`` non-negative."""
    iso = np.array([p for p, _ in pairs], dtype=float)
    meas = np.array([m for _, m in pairs], dtype=float)
    if len(pairs) >= 3 and iso.max() > 1.5 * max(iso.min(), 1e-9):
        (scale, per_op), *_ = np.linalg.lstsq(np.stack([iso, np.ones_like(iso)], 1), meas,
                                              rcond=None)
        scale = min(max(float(scale), 0.5), 3.0)
        per_op = max(float(np.mean(meas - scale * iso)), 0.0)
        return scale, per_op
    return 1.0, max(float(np.mean(meas - iso)), 0.0)


def _context_to_json(ctx: Mapping) -> dict:
    if not ctx:
        return {}
    out = {k: v for k, v in ctx.items() if k != "layers"}
    out["layers"] = [[sig.to_dict(), float(v)] for sig, v in ctx.get("layers", {}).items()]
    out["ops"] = {k: list(v) for k, v in ctx.get("ops", {}).items()}
    return out


def _context_from_json(d: Mapping) -> dict:
    if not d:
        return {}
    out = dict(d)
    out["layers"] = {LayerSig.from_dict(sd): float(v) for sd, v in d.get("layers", [])}
    out["ops"] = {k: (float(v[0]), float(v[1])) for k, v in d.get("ops", {}).items()}
    return out


def node_times(
    model: nn.Module, example_inputs: Any, repeats: int = 10, warmup: int = 3
) -> tuple[dict[str, float], float]:
    """Median in-model latency (ms) of every call node of ``model`` traced with ``torch.fx``
    (names as in :func:`model_cost_items`), timed in place by a ``torch.fx.Interpreter`` over
    ``repeats`` forwards, minus the interpreter's own cost per node (measured on a chain of
    no-op nodes and returned as the second value). Runs under ``torch.inference_mode()``."""
    from torch.fx import GraphModule, Interpreter, symbolic_trace

    gm = model if isinstance(model, GraphModule) else symbolic_trace(model)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(
        example_inputs)

    class _Timed(Interpreter):
        def __init__(self, module):
            super().__init__(module)
            self.samples: dict[str, list[float]] = {}
            self.on = False

        def run_node(self, n):
            t0 = time.perf_counter()
            out = super().run_node(n)
            if self.on and n.op.startswith("call"):
                self.samples.setdefault(n.name, []).append((time.perf_counter() - t0) * 1e3)
            return out

    def run(module, args, reps):
        ti = _Timed(module)
        with torch.inference_mode():
            for _ in range(max(warmup, 1)):
                ti.run(*args)
            ti.on = True
            for _ in range(reps):
                ti.run(*args)
        return {k: statistics.median(v) for k, v in ti.samples.items()}

    # the interpreter's own cost per node: a chain of nn.Identity modules on a tiny tensor,
    # minus the same chain called directly
    chain = nn.Sequential(*[nn.Identity() for _ in range(32)])
    tiny = torch.zeros(1)
    per_node = statistics.median(run(symbolic_trace(chain), (tiny,), max(repeats, 5)).values())
    direct = measure_latency(chain, (tiny,), 3, 15, min_sample_ms=0.5)[0] / 32
    interp = max(per_node - direct, 0.0)
    times = run(gm, inputs, repeats)
    return {k: max(v - interp, 0.0) for k, v in times.items()}, interp


def pin_malloc(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 2**31 - 1) -> bool:
    """Fix glibc malloc's thresholds in this process (``mallopt``): blocks up to
    ``mmap_threshold`` come from the heap and the heap is never trimmed, so that big activation
    buffers are not returned to the OS and faulted in again on the next forward.

    With glibc's default *dynamic* thresholds whether an op pays page faults for its output
    depends on the allocation history (e.g. a 1×1 conv at batch 8, 56×56, took 6 ms or 18 ms
    depending on its output channel count: 0 vs ~12k minor faults per call) and a dense
    ResNet-50 at batch 8 paid ~57k faults per forward; neither a table nor a whole-model timing
    is then reproducible. Call this before measuring a table *and* before timing or deploying
    the model (or run with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set, or
    jemalloc / tcmalloc). Irreversible for the process; returns False where glibc's ``mallopt``
    is unavailable."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, int(mmap_threshold))) and bool(
        mallopt(m_trim_threshold, int(trim_threshold)))
