"""The one configuration dataclass; the API, CLI and compile backend all build this object."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = ["PruneConfig"]


@dataclass(frozen=True)
class PruneConfig:
    """Every knob of the pruning pipeline (see the README for each)."""

    target: Any = None  # gp.Uniform / gp.Flops / gp.Params / gp.Latency
    importance: str | Callable = "l1"
    reduce: str = "sum"  # how member scores combine per channel: sum | mean | max
    round_to: int = 1
    min_channels: int = 1
    min_fraction: float = 0.1  # cost-based targets keep >= this fraction of every group
    ignore: tuple[str, ...] = ()  # module names whose channels are kept
    leaf_modules: tuple[Any, ...] = ()
    trace: str = "auto"  # auto | fx | export
    verify: bool = True
    verify_trials: int = 2
    seed: int = 0
    time_limit: float = 10.0
    data: Any = None  # calibration batches for data-driven importance (output_l1, taylor)
    loss_fn: Any = None  # loss_fn(output, target) for taylor
    extra: dict = field(default_factory=dict)

    def update(self, **kw) -> PruneConfig:
        names = {f.name for f in fields(self)}
        bad = sorted(set(kw) - names)
        if bad:
            raise TypeError(f"unknown option(s) {bad}; known: {sorted(names)}")
        kw = {k: tuple(v) if k in ("ignore", "leaf_modules") and isinstance(v, Sequence)
              and not isinstance(v, str) else v for k, v in kw.items()}
        return replace(self, **kw)
