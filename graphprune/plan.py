"""Plans (which channels each group keeps) and targets; plain data that round-trips through JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from .analysis import Analysis, ChannelGroup
from .errors import PlanError

__all__ = ["Plan", "Uniform", "Flops", "Params", "Latency", "Target", "select_top", "keep_count", "segments", "repair_empty"]


@dataclass(frozen=True)
class Target:
    """Base of pruning targets."""


@dataclass(frozen=True)
class Uniform(Target):
    """Remove fraction `ratio` of the channels of every prunable group (0 <= ratio < 1)."""

    ratio: float

    def __post_init__(self):
        if not 0.0 <= float(self.ratio) < 1.0:
            raise PlanError(
                f"Uniform(ratio={self.ratio}): ratio must be in [0, 1); 1.0 would empty every layer"
            )


@dataclass(frozen=True)
class Plan:
    """Kept channel indices (group-local, ascending) per group id, plus metadata."""

    keep: Mapping[int, tuple[int, ...]]
    sizes: Mapping[int, int]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "keep", MappingProxyType({int(k): tuple(int(i) for i in v)
                                                           for k, v in self.keep.items()}))
        object.__setattr__(self, "sizes", MappingProxyType({int(k): int(v)
                                                            for k, v in self.sizes.items()}))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def __deepcopy__(self, memo):
        return self  # immutable

    def __reduce__(self):
        return (Plan, (dict(self.keep), dict(self.sizes), dict(self.meta)))

    # ---- JSON -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "keep": {str(k): list(v) for k, v in self.keep.items()},
                "sizes": {str(k): v for k, v in self.sizes.items()},
                "meta": _jsonable(dict(self.meta)),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, s: str) -> Plan:
        d = json.loads(s)
        return cls(
            {int(k): tuple(v) for k, v in d["keep"].items()},
            {int(k): int(v) for k, v in d["sizes"].items()},
            d.get("meta", {}),
        )

    # ---- use ------------------------------------------------------------------------------
    def kept(self, gid: int) -> int:
        return len(self.keep[gid]) if gid in self.keep else self.sizes.get(gid, 0)

    def check(self, a: Analysis) -> None:
        """Raise PlanError if the plan cannot be carried out on this analysis."""
        for gid, idx in self.keep.items():
            if gid < 0 or gid >= len(a.groups):
                raise PlanError(f"plan names group {gid}, but the analysis has {len(a.groups)}")
            g = a.groups[gid]
            if self.sizes.get(gid, g.size) != g.size:
                raise PlanError(
                    f"plan was made for another model: group {gid} has {g.size} channels, "
                    f"plan says {self.sizes[gid]}"
                )
            if len(idx) == g.size:
                continue
            if not g.prunable:
                raise PlanError(f"group {gid} is not prunable: {g.reason}")
            if len(idx) == 0:
                member = g.members[0] if g.members else "?"
                raise PlanError(
                    f"plan removes every channel of group {gid} (e.g. {member}): that would empty "
                    f"a layer; keep at least one channel"
                )
            if min(idx) < 0 or max(idx) >= g.size or len(set(idx)) != len(idx):
                raise PlanError(f"group {gid}: kept indices out of range or repeated")
            for seg, where in segments(a, g):
                if not set(seg) & set(idx):
                    raise PlanError(
                        f"plan removes every channel {where} seen (group {gid}): that would "
                        f"empty a layer; keep at least one channel"
                    )
            if g.rows is not None:
                kept = set(idx)
                counts = {sum(1 for i in r if int(i) in kept) for r in g.rows}
                if len(counts) != 1 or 0 in counts:
                    raise PlanError(
                        f"group {gid}: every head/group row must keep the same non-zero number "
                        f"of channels (rows of {g.rows.shape[1]})"
                    )

    def alive(self, a: Analysis) -> np.ndarray:
        """Bool per channel class of the analysis: False where the plan removes it."""
        self.check(a)
        alive = np.ones(len(a.class_group), bool)
        for gid, idx in self.keep.items():
            g = a.groups[gid]
            if len(idx) == g.size:
                continue
            m = np.zeros(g.size, bool)
            m[list(idx)] = True
            alive[g.classes[~m]] = False
        return alive

    def summary(self, a: Analysis | None = None) -> str:
        from .report import plan_table

        return plan_table(self, a)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def keep_count(n: int, ratio: float, round_to: int = 1, min_channels: int = 1) -> int:
    """Channels kept when removing `ratio` of n, rounded to a multiple of round_to."""
    k = n - int(np.floor(ratio * n + 1e-9))
    if round_to > 1 and n >= round_to:
        k = max(round_to, int(round(k / round_to)) * round_to)
    return int(min(n, max(k, min_channels, 1)))


def select_top(g: ChannelGroup, scores: np.ndarray, k_total: int) -> tuple[int, ...]:
    """Top channels by score (ties by index); with rows, the same count in every row."""
    if g.rows is None:
        order = np.argsort(-scores, kind="stable")[:k_total]
        return tuple(sorted(int(i) for i in order))
    r, c = g.rows.shape
    per_row = max(1, min(c, int(round(k_total / r))))
    keep = []
    for row in g.rows:
        o = np.argsort(-scores[row], kind="stable")[:per_row]
        keep.extend(int(row[i]) for i in o)
    return tuple(sorted(keep))


def segments(a: Analysis, g: ChannelGroup) -> list[tuple[list[int], str]]:
    """Local index sets of the group that one parameter axis sees (a layer's input or output)."""
    return a.segments().get(g.id, [])


def repair_empty(a: Analysis, g: ChannelGroup, keep: tuple[int, ...], scores) -> tuple[int, ...]:
    """Add back the best channel of any layer axis the selection would leave empty."""
    kept = set(keep)
    for seg, _ in segments(a, g):
        if not kept & set(seg):
            kept.add(max(seg, key=lambda i: scores[i]))
    return tuple(sorted(kept))


@dataclass(frozen=True)
class Flops(Target):
    """Keep at most fraction `fraction` of the original conv/linear FLOPs."""

    fraction: float


@dataclass(frozen=True)
class Params(Target):
    """Keep at most fraction `fraction` of the original conv/linear parameters."""

    fraction: float


@dataclass(frozen=True)
class Latency(Target):
    """Keep at most fraction `fraction` of the original latency, as predicted by `table`
    (a LatencyTable measured on the target device; measured on the fly when None)."""

    fraction: float
    table: Any = field(default=None, compare=False, repr=False)
