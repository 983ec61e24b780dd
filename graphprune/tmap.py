"""Plain types of the channel analysis: which channel element sits at each position of a tensor.

Every channel element gets an integer id. A tensor's `TMap` says, for the axes that carry channel
identity, which id sits at each position: a `Factor` covers one axis (the usual case: conv
channels, linear features) or several axes jointly (a channel axis split into heads × head_dim, or
into groups for a channel shuffle). Axes in no factor are *rigid*: batch, spatial and token axes,
whose length never changes. Id 0 (`FIXED`) is an element that can never be removed. Factors only
live on axes longer than 1, so broadcasting never drops one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["FIXED", "Factor", "TMap", "rigid", "reshape_chunks", "compacted_shape", "alive_mask"]

FIXED = 0


@dataclass(frozen=True, eq=False)
class Factor:
    """Channel ids over one or more tensor axes (ascending); `rows` keeps a head/group layout."""

    axes: tuple[int, ...]
    ids: np.ndarray  # shape == tuple(shape[a] for a in axes)
    rows: np.ndarray | None = None  # [rows, cols] layout recorded when an axis was split


@dataclass(frozen=True, eq=False)
class TMap:
    """The channel map of one tensor value: its shape and its factors (disjoint axes)."""

    shape: tuple[int, ...]
    factors: tuple[Factor, ...] = ()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def factor_of(self, axis: int) -> Factor | None:
        axis = axis % max(self.ndim, 1)
        for f in self.factors:
            if axis in f.axes:
                return f
        return None

    def ids1d(self, axis: int) -> np.ndarray | None:
        """Ids along `axis` if it is a single-axis factor, None if rigid, raise if joint."""
        f = self.factor_of(axis)
        if f is None:
            return None
        if len(f.axes) != 1:
            raise ValueError("joint factor")
        return f.ids

    def is_joint(self, axis: int) -> bool:
        f = self.factor_of(axis)
        return f is not None and len(f.axes) > 1

    def all_ids(self) -> list[np.ndarray]:
        return [f.ids for f in self.factors]

    def permute(self, perm: Sequence[int]) -> TMap:
        """Axis i of the result is axis perm[i] of self."""
        perm = [p % self.ndim for p in perm]
        inv = {old: new for new, old in enumerate(perm)}
        out = []
        for f in self.factors:
            new_axes = [inv[a] for a in f.axes]
            order = np.argsort(new_axes)
            out.append(
                Factor(tuple(sorted(new_axes)), np.transpose(f.ids, order), f.rows)
            )
        return TMap(tuple(self.shape[p] for p in perm), tuple(out))

    def insert_axis(self, axis: int) -> TMap:
        """Insert a size-1 axis (unsqueeze)."""
        nd = self.ndim + 1
        axis = axis % nd
        shape = self.shape[:axis] + (1,) + self.shape[axis:]
        fs = tuple(
            Factor(tuple(a + (a >= axis) for a in f.axes), f.ids, f.rows) for f in self.factors
        )
        return TMap(shape, fs)

    def drop_size1_axis(self, axis: int) -> TMap:
        """Remove a size-1 axis (squeeze); size-1 axes carry no factor."""
        axis = axis % self.ndim
        shape = self.shape[:axis] + self.shape[axis + 1 :]
        fs = tuple(
            Factor(tuple(a - (a > axis) for a in f.axes), f.ids, f.rows) for f in self.factors
        )
        return TMap(shape, fs)

    def with_shape(self, shape: Sequence[int]) -> TMap:
        """Same factors, new sizes on rigid axes (pooling, interpolation, expand)."""
        shape = tuple(int(s) for s in shape)
        return TMap(shape, tuple(f for f in self.factors if all(shape[a] > 1 for a in f.axes)))


def rigid(shape: Sequence[int]) -> TMap:
    """A tensor with no channel identity (graph inputs, shapes of unknown ops)."""
    return TMap(tuple(int(s) for s in shape))


def reshape_chunks(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Minimal runs of input axes and output axes with equal element counts, or None."""
    a, b = list(a), list(b)
    i = j = 0
    chunks = []
    while i < len(a) or j < len(b):
        ia, jb, pa, pb = [], [], 1, 1
        if i < len(a):
            pa *= a[i]
            ia.append(i)
            i += 1
        if j < len(b):
            pb *= b[j]
            jb.append(j)
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                ia.append(i)
                i += 1
            elif pb < pa and j < len(b):
                pb *= b[j]
                jb.append(j)
                j += 1
            else:
                return None
        # absorb size-1 axes that follow, so a chunk never ends in a dangling 1
        while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            ia.append(i)
            i += 1
        while j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            jb.append(j)
            j += 1
        chunks.append((ia, jb))
    return chunks


def alive_mask(f: Factor, alive_of_ids) -> np.ndarray:
    """Boolean array over the factor's ids: True where the element is kept."""
    return alive_of_ids(f.ids)


def compacted_shape(tm: TMap, alive_of_ids) -> tuple[int, ...]:
    """The tensor's shape after removing dead elements (raises if not rectangular)."""
    shape = list(tm.shape)
    for f in tm.factors:
        m = alive_of_ids(f.ids)
        if m.all():
            continue
        if len(f.axes) == 1:
            shape[f.axes[0]] = int(m.sum())
            continue
        done = False
        for k, ax in enumerate(f.axes):
            counts = m.sum(axis=k)
            if np.all(counts == counts.flat[0]):
                # every line along this axis keeps the same count; other axes must keep all lines
                others = [j for j in range(m.ndim) if j != k]
                if np.all(m.any(axis=k)) or counts.flat[0] == 0:
                    shape[ax] = int(counts.flat[0])
                    done = True
                    break
                _ = others
        if not done:
            raise ValueError(f"non-rectangular removal over axes {f.axes}")
    return tuple(shape)
