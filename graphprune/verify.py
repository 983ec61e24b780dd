"""Verification: a rewritten model must equal its oracle on fresh random inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import VerificationError
from .kernels.semi24 import dense_copy

__all__ = ["VerifyReport", "verify_against", "random_like_inputs", "max_rel_error"]


@dataclass(frozen=True)
class VerifyReport:
    """What was checked and the worst relative error seen per precision."""

    trials: int
    err32: float  # in the model's own precision (fp32, or fp16 / bf16 against an fp32 oracle)
    err64: float | None
    note: str = ""
    precision: str = "fp32"

    def __str__(self) -> str:
        e64 = "n/a" if self.err64 is None else f"{self.err64:.1e}"
        return (f"verified on {self.trials} random inputs: max rel err {self.precision} "
                f"{self.err32:.1e}, fp64 {e64}") + (f" ({self.note})" if self.note else "")


_HALF = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def random_like_inputs(args, kwargs, seed: int):
    """Fresh inputs with the example's shapes: normal floats, ints within the example's range."""
    g = torch.Generator().manual_seed(seed)

    def one(x):
        if not isinstance(x, torch.Tensor):
            return x
        if torch.is_floating_point(x):  # (fp16 / bf16 drawn in fp32, then rounded)
            dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            return torch.randn(x.shape, generator=g, dtype=dt).to(x.device, x.dtype)
        if x.dtype == torch.bool:
            return x.clone()
        lo, hi = int(x.min()), int(x.max())
        return torch.randint(lo, hi + 1, x.shape, generator=g, dtype=x.dtype).to(x.device)

    return tree_map(one, args), tree_map(one, kwargs)


def max_rel_error(out, ref) -> float:
    a, _ = tree_flatten(out)
    b, _ = tree_flatten(ref)
    if len(a) != len(b):
        raise VerificationError(f"output structure differs: {len(a)} vs {len(b)} leaves")
    worst = 0.0
    for x, y in zip(a, b):
        if not isinstance(y, torch.Tensor):
            continue
        if not isinstance(x, torch.Tensor) or x.shape != y.shape:
            raise VerificationError(
                f"output shape differs: {getattr(x, 'shape', type(x))} vs {tuple(y.shape)}"
            )
        if not torch.is_floating_point(y):
            if not torch.equal(x, y):
                return float("inf")
            continue
        x, y = x.double(), y.double()
        if not torch.isfinite(y).all():
            same = torch.equal(torch.isfinite(x), torch.isfinite(y))
            fin = torch.isfinite(y)
            x, y = x[fin], y[fin]
            if not same:
                return float("inf")
        if y.numel() == 0:
            continue
        scale = max(float(y.abs().max()), 1e-12)
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def _run(m: nn.Module, args, kwargs):
    with torch.no_grad():
        return m(*args, **kwargs)


def _to64(x):
    return x.double() if isinstance(x, torch.Tensor) and torch.is_floating_point(x) else x


def _batch1(x):
    return x[:1] if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] > 1 else x


def _to32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in _HALF else x


def _half_dtype(oracle: nn.Module, args, kwargs) -> torch.dtype | None:
    """fp16 / bf16 when the oracle's weights or the example's floats are in it."""
    leaves = [*oracle.parameters(), *oracle.buffers(), *tree_flatten((args, kwargs))[0]]
    return next((t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.dtype in _HALF),
                None)


def _check_half(model, oracle, args, kwargs, trials, seed) -> tuple[float, float]:
    """Half precision: (error of the model, error of the oracle itself), both against an fp32
    copy of the oracle on the same inputs. Two half-precision runs of one function differ by
    rounding (~1e-3 fp16, ~1e-2 bf16, growing with depth), so the model is held to the error the
    dense half-precision oracle itself has, not to an fp32 tolerance."""
    o32 = dense_copy(oracle).float().eval()
    err_m = err_o = 0.0
    for t in range(trials):
        a, k = random_like_inputs(args, kwargs, seed + t)
        ref = _run(o32, tree_map(_to32, a), tree_map(_to32, k))
        err_m = max(err_m, max_rel_error(_run(model, a, k), ref))
        err_o = max(err_o, max_rel_error(_run(oracle, a, k), ref))
    return err_m, err_o


def _check(model, oracle, args, kwargs, trials, seed, cast=None, batch1=False) -> float:
    err = 0.0
    for t in range(trials):
        a, k = random_like_inputs(args, kwargs, seed + t)
        if batch1:  # fp64 convolutions are slow on CPU: one sample is enough for exactness
            a, k = tree_map(_batch1, a), tree_map(_batch1, k)
        if cast is not None:
            a, k = tree_map(cast, a), tree_map(cast, k)
        err = max(err, max_rel_error(_run(model, a, k), _run(oracle, a, k)))
    return err


def verify_against(
    model: fx.GraphModule,
    oracle: nn.Module,
    args,
    kwargs,
    *,
    trials: int = 2,
    seed: int = 0,
    rtol32: float = 1e-4,
    rtol64: float = 1e-9,
    what: str = "slimmed model",
    build64=None,
) -> VerifyReport:
    """Run model and oracle on `trials` random inputs; raise VerificationError on mismatch.

    fp32: the given model against the given oracle. fp16 / bf16 (the oracle's weights or the
    example's floats): both against an fp32 copy of the oracle; the model may be off by at most
    4x the dense half-precision oracle's own error + 2 ulps of the dtype (a wrong rewrite is off
    by ~0.1-1). fp64: `build64()` returns a (model, oracle) pair rebuilt from a float64 copy of
    the source (so the rewrite itself is checked exactly); without it, float64 copies of the
    given pair are compared.
    """
    model.graph.lint()
    was = model.training, oracle.training
    model.eval()
    oracle.eval()
    err64, note = None, ""
    half = _half_dtype(oracle, args, kwargs)
    prec = _HALF.get(half, "fp32")
    try:
        try:
            if half is None:
                err32 = _check(model, oracle, args, kwargs, trials, seed)
                bound, why = rtol32, f"{rtol32:g} (fp32)"
            else:
                err32, err_o = _check_half(model, oracle, args, kwargs, trials, seed)
                bound = 4 * err_o + 2 * torch.finfo(half).eps
                why = (f"{bound:.1e} ({prec} against an fp32 oracle: 4x the dense {prec} "
                       f"oracle's own {err_o:.1e} + 2 ulps)")
                note = f"{prec}: against an fp32 oracle, whose {prec} copy is off by {err_o:.1e}"
        except VerificationError:
            raise
        except Exception as e:  # noqa: BLE001
            raise VerificationError(f"{what} fails to run: {type(e).__name__}: {e}") from e
        if err32 > bound:
            raise VerificationError(
                f"{what} differs from its oracle: max relative error {err32:.3e} > {why}"
            )
        try:
            if build64 is not None:
                m64, o64 = build64()
            else:
                # (compressed 2:4 weights take no cast: decompressed exactly, so the fp64 check
                # still covers the rewrite around them and the compression itself)
                m64, o64 = dense_copy(model).double(), dense_copy(oracle).double()
            m64.eval()
            o64.eval()
            try:
                err64 = _check(m64, o64, args, kwargs, 1, seed + 100, cast=_to64, batch1=True)
            except Exception:  # noqa: BLE001 - static batch (export graphs): full batch
                err64 = _check(m64, o64, args, kwargs, 1, seed + 100, cast=_to64)
        except VerificationError:
            raise
        except Exception as e:  # noqa: BLE001 - graphs with baked dtypes cannot run in fp64
            err64 = None
            note = "; ".join(filter(None, [note, f"fp64 check skipped: {type(e).__name__}"]))
        if err64 is not None and err64 > rtol64:
            raise VerificationError(
                f"{what} differs from its oracle: max relative error {err64:.3e} > {rtol64:g} (fp64)"
            )
    finally:
        model.train(was[0])
        oracle.train(was[1])
    return VerifyReport(trials, err32, err64, note, prec)
