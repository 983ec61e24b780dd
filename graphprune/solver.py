"""Global channel allocation: pick a kept count per group to maximise importance under a budget.

The problem (`AllocProblem`) is plain data: groups with candidate kept counts and their values,
and layers whose cost depends exactly on the kept counts of their input and output groups. The
solver proves how good its answer is:

1. *Compile*: every layer becomes an exact cost table over the one or two groups it depends on
   (a 2-D table over the (input, output) pair). A layer whose input is a concatenation of several
   groups is split exactly into pairwise terms when its cost is linear in c_in (FLOPs, params);
   otherwise its c_in is an integer sum modelled exactly in the MIP and bounded from below by a
   linear under-estimator in the relaxation. Dominated choices (no more value, no less cost) go.
2. *Greedy* (the warm start): drop the cheapest value per unit of cost, several channel steps at
   a time so cost staircases are seen, with exact table look-ups; then refill the slack.
3. *Lagrangian bound*: the budget is dualised; the remaining max-sum problem is solved exactly by
   variable elimination, which is fast because networks are chains and trees of blocks (small
   treewidth). The dual optimum is an upper bound (on ResNet-50-shaped problems it is within
   ~0.01% of the optimum); max-marginals remove every choice that provably cannot beat the
   incumbent, which leaves a few choices per group.
4. *Exact search* on what is left: a depth-first enumeration guided by the elimination tables
   (exact best completion and least completion cost of every partial assignment), else a MIP
   (HiGHS through OR-Tools MathOpt, warm-started, junction-tree formulation).
5. The answer is re-costed with the layers' own cost callables and repaired if needed: the
   returned cost is the true cost and never exceeds the budget.

Limits: elimination tables grow as |stream_in| x |internal| x |stream_out| (fine at channel
step 8 for ResNet-50: 2M entries); when a table would be too large (fine grids, or long
DenseNet blocks, where a concatenation couples every group of the block) the Lagrangian step is
skipped and the greedy answer is bounded by the MIP alone, which is much slower.

This is the only module of graphprune that imports OR-Tools.
"""

from __future__ import annotations

import datetime
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "AllocGroup",
    "AllocLayer",
    "AllocProblem",
    "AllocSolution",
    "InfeasibleBudget",
    "solve",
    "greedy",
    "min_cost",
    "allocation_cost",
    "brute_force",
    "resnet50_like_problem",
]

_EPS = 1e-12
_MAX_SUM_TABLE = 2_000_000  # entries of an exact c_in-sum table before it is left to repair
_MAX_CLIQUE_LP = 200_000  # clique variables in the MIP before falling back to pair variables
_MAX_BUCKET = 4_000_000  # entries of one elimination table (float64) ...
_MAX_BUCKETS = 16_000_000  # ... and of all of them, else the Lagrangian step is skipped
_MIP_VARS_PER_S = 10_000  # MathOpt model-building speed, to skip a MIP that cannot finish


# ----------------------------------------------------------------------------- public types
@dataclass(frozen=True)
class AllocGroup:
    """One prunable channel group: candidate kept counts (ascending) and their values."""

    name: str
    choices: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class AllocLayer:
    """A layer whose cost depends on kept counts.

    c_in = in_const + sum(mult * k[group] for group, mult in in_terms); c_out = k[out_group], or
    out_const when out_group is None. `cost(c_in, c_out)` must be non-decreasing in both; it may
    accept numpy arrays (it is then called once per table), else it is called per entry.
    """

    name: str
    in_terms: tuple[tuple[int, int], ...]
    in_const: int
    out_group: int | None
    out_const: int
    cost: Callable[[int, int], float]


@dataclass(frozen=True)
class AllocProblem:
    """Maximise the summed value of the chosen counts s.t. sum of layer costs + const <= budget."""

    groups: tuple[AllocGroup, ...]
    layers: tuple[AllocLayer, ...]
    budget: float
    const_cost: float = 0.0


@dataclass(frozen=True)
class AllocSolution:
    """An allocation, its true cost and value, and how far from optimal it is proven to be.

    status: "OPTIMAL" (proven within the requested gap), "FEASIBLE" (gap above the request, e.g.
    on a time limit) or "HEURISTIC" (no bound better than the trivial one was proven).
    """

    choice: tuple[int, ...]
    kept: tuple[int, ...]
    value: float
    cost: float
    status: str
    bound: float
    gap: float
    seconds: float
    heuristic_value: float


class InfeasibleBudget(ValueError):
    """Even the smallest allocation costs more than the budget."""


# ----------------------------------------------------------------------------- compiled model
@dataclass
class _Sum:
    """A layer with three or more groups whose cost is not linear in c_in.

    c_in = base[j] + rest, rest = sum(mult * k) over `terms` (input groups other than the output
    group), j the output choice. `table[r, j]` is the exact normalised cost at rest = reach[r]
    (None when too large: the callable is used). `low[j] + slope[j] * rest` under-estimates it.
    """

    layer: AllocLayer
    terms: tuple[tuple[int, int], ...]
    out: int | None
    base: np.ndarray
    cout: np.ndarray
    reach: np.ndarray
    table: np.ndarray | None
    low: np.ndarray
    slope: np.ndarray
    scale: float

    def restrict(self, keep: list[np.ndarray]) -> _Sum:
        """The same layer with the output group's choices cut to positions `keep[out]`."""
        if self.out is None:
            return self
        k = keep[self.out]
        table = None if self.table is None else self.table[:, k]
        return _Sum(self.layer, self.terms, self.out, self.base[k], self.cout[k], self.reach,
                    table, self.low[k], self.slope[k], self.scale)

    def cost(self, rest: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Exact normalised cost at rest sums `rest` and output positions `j` (broadcast)."""
        rest, j = np.broadcast_arrays(np.asarray(rest), np.asarray(j))
        if self.table is not None:
            return self.table[np.searchsorted(self.reach, rest), j]
        return _eval_cost(self.layer.cost, self.base[j] + rest, self.cout[j]) / self.scale


@dataclass
class _Model:
    """Choices, values and normalised cost tables over the still-allowed choices of each group.

    Position i of group g is original choice `index[g][i]`. The budget is 1. Exact cost =
    const + sum unary[g][x_g] + sum pairs[(g, h)][x_g, x_h] + sum of the `sums` layers.
    """

    choices: list[np.ndarray]
    index: list[np.ndarray]
    values: list[np.ndarray]
    unary: list[np.ndarray]
    pairs: dict[tuple[int, int], np.ndarray]
    sums: list[_Sum]
    const: float
    scale: float
    pair_of: list[list[tuple[int, int]]] = field(default_factory=list)
    sum_of: list[list[int]] = field(default_factory=list)
    nbrs: list[set[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.choices)
        self.pair_of = [[] for _ in range(n)]
        for a, b in self.pairs:
            self.pair_of[a].append((a, b))
            self.pair_of[b].append((a, b))
        self.sum_of = [[] for _ in range(n)]
        self.nbrs = [set() for _ in range(n)]
        for a, b in self.pairs:
            self.nbrs[a].add(b)
            self.nbrs[b].add(a)
        for s_i, s in enumerate(self.sums):
            scope = {g for g, _ in s.terms} | ({s.out} if s.out is not None else set())
            for g in scope:
                self.sum_of[g].append(s_i)
                self.nbrs[g] |= scope - {g}

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.choices]

    def restrict(self, keep: list[np.ndarray]) -> _Model:
        """The model with group g cut to positions keep[g] (ascending)."""
        pairs = {(a, b): t[np.ix_(keep[a], keep[b])] for (a, b), t in self.pairs.items()}
        return _Model([c[k] for c, k in zip(self.choices, keep)],
                      [i[k] for i, k in zip(self.index, keep)],
                      [v[k] for v, k in zip(self.values, keep)],
                      [u[k] for u, k in zip(self.unary, keep)],
                      pairs, [s.restrict(keep) for s in self.sums], self.const, self.scale)

    def value(self, x: Sequence[int]) -> float:
        return float(sum(v[i] for v, i in zip(self.values, x)))

    def rest(self, s: _Sum, x: Sequence[int]) -> int:
        return int(sum(m * self.choices[g][x[g]] for g, m in s.terms))

    def cost(self, x: Sequence[int]) -> float:
        """Exact normalised cost of positions x."""
        c = self.const + sum(u[i] for u, i in zip(self.unary, x))
        c += sum(t[x[a], x[b]] for (a, b), t in self.pairs.items())
        for s in self.sums:
            c += s.cost(self.rest(s, x), x[s.out] if s.out is not None else 0)
        return float(c)

    def touch(self, x: Sequence[int], g: int) -> np.ndarray:
        """Cost of every term involving g, for each position of g, the others held at x."""
        vec = self.unary[g].copy()
        for a, b in self.pair_of[g]:
            t = self.pairs[(a, b)]
            vec += t[:, x[b]] if a == g else t[x[a], :]
        for s_i in self.sum_of[g]:
            s = self.sums[s_i]
            rest = self.rest(s, x)
            if s.out == g:
                vec += s.cost(rest, np.arange(len(vec)))
            else:
                mult = sum(m for h, m in s.terms if h == g)
                rest_g = rest - mult * self.choices[g][x[g]] + mult * self.choices[g]
                vec += s.cost(rest_g, x[s.out] if s.out is not None else 0)
        return vec

    def relaxed(self) -> tuple[list[np.ndarray], dict[tuple[int, int], np.ndarray], float]:
        """Unary tables, pairwise tables and a constant that equal the cost, except that the
        `sums` layers are replaced by their linear under-estimators."""
        unary = [u.copy() for u in self.unary]
        pairs = {k: t.copy() for k, t in self.pairs.items()}
        const = self.const
        for s in self.sums:
            const += _add_linear(s.out, s.terms, s.low, s.slope, self.choices, unary, pairs)
        return unary, pairs, const


# ----------------------------------------------------------------------------- compiling
def _eval_cost(cost: Callable, c_in: np.ndarray, c_out: np.ndarray) -> np.ndarray:
    """cost at arrays c_in, c_out (same shape): one vectorised call, checked, else a loop."""
    c_in, c_out = np.broadcast_arrays(np.asarray(c_in, dtype=np.int64),
                                      np.asarray(c_out, dtype=np.int64))
    flat_in, flat_out = c_in.ravel(), c_out.ravel()
    try:
        with np.errstate(all="ignore"):
            out = np.asarray(cost(c_in, c_out), dtype=float)
        if out.shape == c_in.shape and np.isfinite(out).all():
            probe = {0, flat_in.size - 1, flat_in.size // 2, flat_in.size // 3}
            flat = out.ravel()
            if all(math.isclose(flat[i], float(cost(int(flat_in[i]), int(flat_out[i]))),
                                rel_tol=1e-12, abs_tol=1e-300) for i in probe):
                return out
    except Exception:  # noqa: BLE001 - any failure means the callable is scalar-only
        pass
    vals = [float(cost(int(a), int(b))) for a, b in zip(flat_in, flat_out)]
    return np.asarray(vals, dtype=float).reshape(c_in.shape)


def _reach(terms: Sequence[tuple[int, int]], choices: Sequence[np.ndarray],
           cap: int) -> np.ndarray | None:
    """Sorted distinct values of sum(mult * k_g); None when there are more than `cap`."""
    acc = np.zeros(1, dtype=np.int64)
    for g, m in terms:
        acc = np.unique(np.add.outer(acc, m * choices[g]).ravel())
        if acc.size > cap:
            return None
    return acc


def _validate(problem: AllocProblem) -> None:
    n = len(problem.groups)
    for g in problem.groups:
        ch = np.asarray(g.choices)
        if len(ch) == 0 or len(ch) != len(g.values):
            raise ValueError(f"group {g.name!r}: needs as many values as choices (>= 1)")
        if np.any(np.diff(ch) <= 0) or ch[0] < 0:
            raise ValueError(f"group {g.name!r}: choices must be ascending and >= 0")
    for lay in problem.layers:
        gs = [g for g, _ in lay.in_terms] + ([lay.out_group] if lay.out_group is not None else [])
        if any(not 0 <= g < n for g in gs):
            raise ValueError(f"layer {lay.name!r}: group index out of range")
        if any(m < 0 for _, m in lay.in_terms):
            raise ValueError(f"layer {lay.name!r}: multipliers must be >= 0")


def _layer_grid(lay: AllocLayer, scope: tuple[int, ...], choices: list[np.ndarray]):
    """c_in and c_out over the grid of the layer's (one or two) groups, axes in scope order."""
    grids = np.meshgrid(*[choices[g] for g in scope], indexing="ij")
    by_group = dict(zip(scope, grids))
    c_in = np.full(grids[0].shape, lay.in_const, dtype=np.int64)
    for g, m in lay.in_terms:
        if m:
            c_in = c_in + m * by_group[g]
    if lay.out_group is None:
        return c_in, np.full_like(c_in, lay.out_const)
    c_out = by_group[lay.out_group]
    return c_in, c_out


def _add_pair(pairs: dict, a: int, b: int, table: np.ndarray) -> None:
    key, tab = ((a, b), table) if a < b else ((b, a), table.T)
    pairs[key] = pairs[key] + tab if key in pairs else np.array(tab, dtype=float)


def _compile_sum(lay: AllocLayer, choices: list[np.ndarray], unary: list, pairs: dict,
                 scale: float) -> tuple[_Sum | None, float]:
    """Split a many-input layer into exact pairwise terms if linear in c_in (returns the constant
    part), else return it as a `_Sum`."""
    out = lay.out_group
    merged: dict[int, int] = {}
    for g, m in lay.in_terms:
        if g != out and m:
            merged[g] = merged.get(g, 0) + m
    terms = tuple(sorted(merged.items()))
    own = sum(m for g, m in lay.in_terms if g == out)
    if out is None:
        base = np.array([lay.in_const], dtype=np.int64)
        cout = np.array([lay.out_const], dtype=np.int64)
    else:
        base = lay.in_const + own * choices[out]
        cout = choices[out]
    reach = _reach(terms, choices, cap=max(2, _MAX_SUM_TABLE // len(cout)))
    if reach is None:  # too many c_in values: exact costs come from the callable, bound is weak
        low = _eval_cost(lay.cost, base + sum(m * choices[g][0] for g, m in terms), cout) / scale
        return _Sum(lay, terms, out, base, cout, np.zeros(0, np.int64), None, low,
                    np.zeros_like(low), scale), 0.0
    table = _eval_cost(lay.cost, base[None, :] + reach[:, None], cout[None, :]) / scale
    slope = np.zeros(len(cout))
    if len(reach) > 1:
        span = (reach - reach[0]).astype(float)
        slope = (table[-1] - table[0]) / span[-1]
        line = table[0] + np.outer(span, slope)
        tol = 1e-9 * max(1.0, float(np.abs(table).max()))
        if np.abs(line - table).max() > tol:  # not linear: exact table in the MIP
            slope = np.min((table[1:] - table[0]) / span[1:, None], axis=0)
            low = table[0] - slope * reach[0]
            return _Sum(lay, terms, out, base, cout, reach, table, low, slope, scale), 0.0
    low = table[0] - slope * reach[0]
    return None, _add_linear(out, terms, low, slope, choices, unary, pairs)


def _add_linear(out, terms, low, slope, choices, unary, pairs) -> float:
    """Add low[j] + slope[j] * sum(m * k_g) as unary and pairwise terms; returns the constant."""
    if out is None:
        for g, m in terms:
            unary[g] += float(slope[0]) * m * choices[g]
        return float(low[0])
    unary[out] += low
    for g, m in terms:
        _add_pair(pairs, g, out, np.outer(m * choices[g], slope))
    return 0.0


def _compile(problem: AllocProblem) -> _Model:
    """Exact normalised tables of every layer (budget -> 1)."""
    _validate(problem)
    scale = float(problem.budget) if problem.budget > 0 else 1.0
    choices = [np.asarray(g.choices, dtype=np.int64) for g in problem.groups]
    values = [np.asarray(g.values, dtype=float) for g in problem.groups]
    unary = [np.zeros(len(c)) for c in choices]
    pairs: dict[tuple[int, int], np.ndarray] = {}
    sums: list[_Sum] = []
    const = problem.const_cost / scale
    for lay in problem.layers:
        scope = tuple(sorted({g for g, m in lay.in_terms if m}
                             | ({lay.out_group} if lay.out_group is not None else set())))
        if len(scope) == 0:
            const += float(lay.cost(int(lay.in_const), int(lay.out_const))) / scale
        elif len(scope) <= 2:
            table = _eval_cost(lay.cost, *_layer_grid(lay, scope, choices)) / scale
            if len(scope) == 1:
                unary[scope[0]] += table
            else:
                _add_pair(pairs, scope[0], scope[1], table)
        else:
            s, c = _compile_sum(lay, choices, unary, pairs, scale)
            const += c
            if s is not None:
                sums.append(s)
    index = [np.arange(len(c)) for c in choices]
    return _Model(choices, index, values, unary, pairs, sums, const, scale)


def _monotone(m: _Model) -> list[bool]:
    """Per group: is every cost table non-decreasing along that group's axis?"""
    ok = [bool(np.all(np.diff(u) >= -1e-12)) for u in m.unary]
    for (a, b), t in m.pairs.items():
        ok[a] &= bool(np.all(np.diff(t, axis=0) >= -1e-12))
        ok[b] &= bool(np.all(np.diff(t, axis=1) >= -1e-12))
    for s in m.sums:
        mono = s.table is None or bool(np.all(np.diff(s.table, axis=0) >= -1e-12))
        for g, _ in s.terms:
            ok[g] &= mono
        if s.out is not None:
            ok[s.out] &= s.table is None or bool(np.all(np.diff(s.table, axis=1) >= -1e-12))
    return ok


def _dominance(m: _Model) -> list[np.ndarray]:
    """Positions worth keeping: a larger choice with no more value than a smaller one costs at
    least as much (costs are monotone), so it is dominated."""
    keep = []
    for v, mono in zip(m.values, _monotone(m)):
        if not mono:
            keep.append(np.arange(len(v)))
            continue
        best = np.maximum.accumulate(v)
        better = np.concatenate(([True], v[1:] > best[:-1]))
        keep.append(np.flatnonzero(better))
    return keep


# ----------------------------------------------------------------------------- greedy
def _drop_moves(m: _Model, x: list[int], g: int) -> tuple[np.ndarray, np.ndarray]:
    """(cost saved, value lost) for moving group g to each smaller position."""
    vec = m.touch(x, g)
    cur = x[g]
    return vec[cur] - vec[:cur], m.values[g][cur] - m.values[g][:cur]


def _drop(m: _Model, x: list[int]) -> list[int]:
    """Lower counts until the cost fits the budget, least value lost per cost saved first; a
    move may skip several steps (cost staircases). The last move is the cheapest that fits."""
    x = list(x)
    total = m.cost(x)
    moves: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    dirty = set(range(len(x)))
    while total > 1.0:
        for g in dirty:
            moves[g] = _drop_moves(m, x, g)
        excess = total - 1.0
        best, best_fit = None, None
        for g, (saved, lost) in moves.items():
            ok = saved > _EPS
            if not ok.any():
                continue
            ratio = np.where(ok, lost / np.where(ok, saved, 1.0), np.inf)
            p = int(np.argmin(ratio))
            if best is None or ratio[p] < best[0]:
                best = (ratio[p], g, p)
            fits = saved >= excess
            if fits.any():
                q = int(np.argmax(np.where(fits, -lost, -np.inf)))
                if best_fit is None or lost[q] < best_fit[0]:
                    best_fit = (lost[q], g, q)
        if best is None:
            break
        _, g, p = best
        if best_fit is not None and moves[g][0][p] >= excess:
            _, g, p = best_fit
        total -= moves[g][0][p]
        x[g] = p
        dirty = {g} | m.nbrs[g]
        if total <= 1.0:
            total = m.cost(x)
    return x


def _fill(m: _Model, x: list[int]) -> list[int]:
    """Raise counts while the slack allows, most value gained per cost added first."""
    x = list(x)
    total = m.cost(x)
    moves: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    dirty = set(range(len(x)))
    while True:
        for g in dirty:
            vec = m.touch(x, g)
            cur = x[g]
            moves[g] = (vec[cur + 1:] - vec[cur], m.values[g][cur + 1:] - m.values[g][cur])
        slack = 1.0 - total - 1e-12
        best = None
        for g, (added, gain) in moves.items():
            ok = (added <= slack) & (gain > 0)
            if not ok.any():
                continue
            score = np.where(ok, gain / np.maximum(added, _EPS), -np.inf)
            p = int(np.argmax(score))
            if best is None or score[p] > best[0]:
                best = (score[p], g, p)
        if best is None:
            return x
        _, g, p = best
        total += moves[g][0][p]
        x[g] += p + 1
        dirty = {g} | m.nbrs[g]


def _greedy_positions(m: _Model, start: list[int] | None = None) -> list[int]:
    """Greedy allocation (positions) from `start` (default: every group full)."""
    x = [len(c) - 1 for c in m.choices] if start is None else list(start)
    return _fill(m, _drop(m, x))


# ----------------------------------------------------------------------------- max-sum elimination
class _Elimination:
    """Exact max-sum over unary and pairwise tables by variable elimination.

    The order is chosen once from the interaction graph (smallest table first); for networks it
    eliminates block-internal groups before the residual streams, so the largest table is
    |stream_in| x |internal| x |stream_out|. `max_marginals` runs the reverse pass.
    """

    def __init__(self, sizes: list[int], scopes: Sequence[tuple[int, int]]):
        n = len(sizes)
        nb = [set() for _ in range(n)]
        for a, b in scopes:
            nb[a].add(b)
            nb[b].add(a)
        self.sizes, self.order, self.sep = sizes, [], [()] * n
        left = set(range(n))
        while left:
            v = min(left, key=lambda u: (math.prod(sizes[w] for w in nb[u]) * sizes[u], u))
            self.order.append(v)
            left.remove(v)
            self.sep[v] = tuple(sorted(nb[v]))
            for w in nb[v]:
                nb[w] |= nb[v] - {w}
                nb[w].discard(v)
        rank = {v: i for i, v in enumerate(self.order)}
        self.scope = [(v,) + self.sep[v] for v in range(n)]
        self.parent = [min(self.sep[v], key=rank.get) if self.sep[v] else None for v in range(n)]
        self.children = [[] for _ in range(n)]
        for v in self.order:
            if self.parent[v] is not None:
                self.children[self.parent[v]].append(v)
        self.bucket_pairs = [[] for _ in range(n)]
        for a, b in scopes:
            self.bucket_pairs[a if rank[a] < rank[b] else b].append((a, b))
        self.cells = [math.prod(sizes[w] for w in self.scope[v]) for v in range(n)]
        self.root = list(range(n))
        for v in reversed(self.order):
            if self.parent[v] is not None:
                self.root[v] = self.root[self.parent[v]]

    def _align(self, table: np.ndarray, scope: Sequence[int], target: Sequence[int]) -> np.ndarray:
        """View of `table` (axes in `scope` order) broadcastable over `target`'s axes."""
        pos = [target.index(v) for v in scope]
        t = table.transpose(np.argsort(pos))
        shape = [1] * len(target)
        for v in scope:
            shape[target.index(v)] = self.sizes[v]
        return t.reshape(shape)

    def forward(self, unary: list[np.ndarray], pairs: dict) -> tuple[float, list, dict]:
        """Max of sum(unary) + sum(pairs); returns it, the bucket tables and the messages."""
        psis: list = [None] * len(self.sizes)
        msgs: dict[int, np.ndarray] = {}
        for v in self.order:
            u = self.scope[v]
            psi = self._align(unary[v], (v,), u)
            for key in self.bucket_pairs[v]:
                psi = psi + self._align(pairs[key], key, u)
            for c in self.children[v]:
                psi = psi + self._align(msgs[c], self.sep[c], u)
            psis[v] = psi
            msgs[v] = psi.max(axis=0)
        total = sum(float(msgs[v]) for v in self.order if self.parent[v] is None)
        return total, psis, msgs

    def decode(self, psis: list) -> list[int]:
        """An assignment attaining the maximum (ties go to the smaller position)."""
        x = [0] * len(self.sizes)
        for v in reversed(self.order):
            x[v] = int(np.argmax(psis[v][(slice(None),) + tuple(x[w] for w in self.sep[v])]))
        return x

    def max_marginals(self, total: float, psis: list, msgs: dict) -> list[np.ndarray]:
        """For every group and position: the maximum over assignments that use it."""
        mu: dict[int, tuple[np.ndarray, tuple[int, ...]]] = {}
        out: list = [None] * len(self.sizes)
        for v in reversed(self.order):
            u = self.scope[v]
            beta = psis[v] + (self._align(*mu[v], u) if self.sep[v] else 0.0)
            out[v] = beta.max(axis=tuple(range(1, len(u)))) if len(u) > 1 else beta
            out[v] = out[v] + (total - float(msgs[self.root[v]]))
            for c in self.children[v]:
                t = beta - self._align(msgs[c], self.sep[c], u)
                drop = tuple(i for i, w in enumerate(u) if w not in self.sep[c])
                mu[c] = (t.max(axis=drop), tuple(w for w in u if w in self.sep[c]))
        return out


# ----------------------------------------------------------------------------- Lagrangian bound
def _table_cost(unary: list, pairs: dict, const: float, x: Sequence[int]) -> float:
    c = const + sum(u[i] for u, i in zip(unary, x))
    return float(c + sum(t[x[a], x[b]] for (a, b), t in pairs.items()))


class _Lagrangian:
    """The budget dualised: L(lam) = lam + max_x [V(x) - lam * C(x)] >= optimum for lam >= 0.

    The inner maximum is exact max-sum elimination over the relaxed tables (equal to the true
    costs except for non-linear many-input layers, which are under-estimated). The search over
    lam runs in float32 (fast); bounds and max-marginals are recomputed in float64.
    """

    def __init__(self, m: _Model):
        self.m = m
        self.unary, self.pairs, self.const = m.relaxed()
        self.elim = _Elimination(m.sizes, list(self.pairs))

    @property
    def tractable(self) -> bool:
        """Small enough to eliminate (False e.g. for long DenseNet blocks, whose concatenated
        inputs couple every group of a block: then only the MIP gives a bound)."""
        cells = self.elim.cells
        return max(cells, default=0) <= _MAX_BUCKET and sum(cells) <= _MAX_BUCKETS

    def _tables(self, lam: float, dtype) -> tuple[list, dict, float]:
        """Shifted tables (max 0 each, for float32 accuracy) and the total shift."""
        unary = [v - lam * u for v, u in zip(self.m.values, self.unary)]
        pairs = {k: -lam * t for k, t in self.pairs.items()}
        shift = lam * (1.0 - self.const)
        shifts = [float(u.max()) for u in unary] + [float(t.max()) for t in pairs.values()]
        unary = [(u - s).astype(dtype) for u, s in zip(unary, shifts)]
        pairs = {k: (t - s).astype(dtype) for (k, t), s in zip(pairs.items(),
                                                               shifts[len(unary):])}
        return unary, pairs, shift + sum(shifts)

    def evaluate(self, lam: float, dtype=np.float32):
        """(L(lam), maximiser, its value, its relaxed cost, bucket tables, messages, shift)."""
        unary, pairs, shift = self._tables(lam, dtype)
        total, psis, msgs = self.elim.forward(unary, pairs)
        x = self.elim.decode(psis)
        cost = _table_cost(self.unary, self.pairs, self.const, x)
        return total + shift, x, self.m.value(x), cost, psis, msgs, shift

    def dual(self, deadline: float) -> tuple[float, float, list[list[int]]]:
        """(bound, best lam, [infeasible and feasible maximisers near it]) by cutting planes on
        the piecewise-linear dual (finite for one constraint)."""
        top = [int(np.argmax(v)) for v in self.m.values]
        lo = (self.m.value(top), _table_cost(self.unary, self.pairs, self.const, top), top)
        if lo[1] <= 1.0:
            return lo[0], 0.0, [top]
        lam, hi, best = max(lo[0], _EPS) / lo[1], None, (math.inf, 0.0)
        for _ in range(200):  # raise lam until the maximiser fits
            val, x, v, c = self.evaluate(lam)[:4]
            best = min(best, (val, lam))
            if c <= 1.0:
                hi = (v, c, x)
                break
            lo, lam = (v, c, x), lam * 4.0
        if hi is None:  # float trouble at extreme lam: keep the bound found so far
            return self.evaluate(best[1], np.float64)[0], best[1], [lo[2]]
        for _ in range(60):
            if time.perf_counter() > deadline or lo[1] - hi[1] <= _EPS:
                break
            lam = (lo[0] - hi[0]) / (lo[1] - hi[1])
            line = lo[0] + lam * (1.0 - lo[1])
            val, x, v, c = self.evaluate(lam)[:4]
            best = min(best, (val, lam))
            if val <= line + 2e-6 * max(1.0, abs(line)):
                break
            if c > 1.0:
                lo = (v, c, x)
            else:
                hi = (v, c, x)
        return self.evaluate(best[1], np.float64)[0], best[1], [lo[2], hi[2]]

    def search(self, lam: float, floor: float, deadline: float) -> tuple[list[int] | None, bool]:
        """Enumerate, depth first, every allocation that could be worth more than `floor`.

        Variables are assigned in reverse elimination order, so the bucket tables give the exact
        best Lagrangian completion of every partial assignment (a branch is entered only if its
        completion could still beat the floor) and the exact least completion cost (a branch is
        entered only if it can still fit). Returns the best allocation worth more than the floor
        (or None) and whether the enumeration finished (then nothing better exists).
        """
        m, el = self.m, self.elim
        _, psis, msgs = el.forward([v - lam * u for v, u in zip(m.values, self.unary)],
                                   {k: -lam * t for k, t in self.pairs.items()})
        _, cpsis, cmsgs = el.forward([-u for u in self.unary],
                                     {k: -t for k, t in self.pairs.items()})
        order, x = el.order[::-1], [0] * len(m.sizes)
        best: list = [floor, None]
        slack, tol = lam * (1.0 - self.const), 1e-9 * max(1.0, abs(floor))
        nodes = itertools.count()

        def visit(k: int, score: float, low: float) -> None:
            if k == len(order):
                value, cost = m.value(x), m.cost(x)
                if cost <= 1.0 and value > best[0]:
                    best[:] = [value, list(x)]
                return
            if next(nodes) % 4096 == 0 and time.perf_counter() > deadline:
                raise TimeoutError
            v = order[k]
            at = tuple(x[w] for w in el.sep[v])
            scores = psis[v][(slice(None),) + at] + (score - msgs[v][at])
            lows = low + cmsgs[v][at] - cpsis[v][(slice(None),) + at]
            for i in np.argsort(-scores, kind="stable"):
                if scores[i] < best[0] - slack - tol:
                    break
                if lows[i] + self.const <= 1.0 + 1e-12:
                    x[v] = int(i)
                    visit(k + 1, float(scores[i]), float(lows[i]))

        total = sum(float(msgs[v]) for v in order if el.parent[v] is None)
        low = -sum(float(cmsgs[v]) for v in order if el.parent[v] is None)
        try:
            visit(0, total, low)
        except TimeoutError:
            return best[1], False
        return best[1], True

    def per_position(self, lam: float) -> list[np.ndarray]:
        """For every group and position: L(lam) restricted to allocations using it."""
        total, _, _, _, psis, msgs, shift = self.evaluate(lam, np.float64)
        return [mm + shift for mm in self.elim.max_marginals(total - shift, psis, msgs)]


def _buckets(n: int, k: int) -> np.ndarray:
    """Start positions of k (or n, if fewer) runs of consecutive positions out of n."""
    return np.unique(np.linspace(0, n, min(n, k) + 1).astype(np.int64)[:-1])


def _coarsen(m: _Model, starts: list[np.ndarray]) -> _Model:
    """A relaxation of m with the positions of group g merged into runs beginning at starts[g]:
    a run is worth the most value and costs the least cost of its members (cost tables are
    reduced by their minimum over each block), so every allocation of m maps to one of the
    coarse model worth at least as much and costing no more. Its Lagrangian bound and
    max-marginals therefore bound m (per run: every member position). `sums` layers enter
    through their linear under-estimators (:meth:`_Model.relaxed`)."""
    unary, pairs, const = m.relaxed()
    red = [np.minimum.reduceat(u, st) for u, st in zip(unary, starts)]
    cpairs = {(a, b): np.minimum.reduceat(np.minimum.reduceat(t, starts[a], axis=0),
                                          starts[b], axis=1) for (a, b), t in pairs.items()}
    values = [np.maximum.reduceat(v, st) for v, st in zip(m.values, starts)]
    choices = [c[st] for c, st in zip(m.choices, starts)]
    index = [i[st] for i, st in zip(m.index, starts)]
    return _Model(choices, index, values, red, cpairs, [], const, m.scale)


def _coarse_step(st: _Search, deadline: float) -> bool:
    """Lagrangian bound and variable fixing through a coarsened relaxation (`_coarsen`), for
    models whose exact elimination tables are too large (fine channel steps, e.g. round_to=1).
    Uses the finest run count that keeps elimination tractable; tightens st.bound, offers the
    dual's maximisers (each run at its smallest member, then the greedy fill) as incumbents and
    removes the fine choices that provably cannot beat the incumbent. False when no coarsening
    is tractable."""
    m = st.model
    pairs = list(m.pairs)
    for k in (256, 128, 96, 64, 48, 32, 24, 16, 12, 8, 6, 4):
        starts = [_buckets(n, k) for n in m.sizes]
        elim = _Elimination([len(s) for s in starts], pairs)
        if max(elim.cells, default=0) <= _MAX_BUCKET and sum(elim.cells) <= _MAX_BUCKETS:
            break
    else:
        return False
    lag = _Lagrangian(_coarsen(m, starts))
    bound, lam, points = lag.dual(deadline)
    st.bound = min(st.bound, max(bound, st.cut))
    for x in points:
        st.offer(m, _greedy_positions(m, [int(s[i]) for s, i in zip(starts, x)]))
    if lam > 0.0 and st.gap() > 0.0 and time.perf_counter() < deadline:
        lengths = [np.diff(np.append(s, n)) for s, n in zip(starts, m.sizes)]
        st.fix([np.repeat(p, ln) for p, ln in zip(lag.per_position(lam), lengths)])
    return True


# ----------------------------------------------------------------------------- synthetic problem
@dataclass(frozen=True)
class _ConvCost:
    """Latency-like conv cost in ms: a roofline of MACs at 100 GMAC/s, with c_in and c_out
    rounded up to tiles of 16 and 32 (a staircase), and bytes at 20 GB/s; plus an overhead."""

    k: int
    hw_in: int
    hw_out: int
    overhead: float = 0.01
    tile_in: int = 16
    tile_out: int = 32

    def __call__(self, c_in, c_out):
        c_in_t = np.ceil(c_in / self.tile_in) * self.tile_in
        macs = c_in_t * np.ceil(c_out / self.tile_out) * self.tile_out * self.k**2 * self.hw_out**2
        moved = 4.0 * (c_in * self.hw_in**2 + c_out * self.hw_out**2 + c_in * c_out * self.k**2)
        return np.maximum(macs / 1e8, moved / 2e7) + self.overhead


def _random_group(name: str, width: int, step: int, rng: np.random.Generator) -> AllocGroup:
    choices = list(range(step, width + 1, step))
    if choices[-1] != width:
        choices.append(width)
    scores = np.sort(rng.lognormal(0.0, 1.0, width))[::-1] * rng.lognormal(0.0, 0.5)
    total = np.cumsum(scores)
    return AllocGroup(name, tuple(choices), tuple(float(total[c - 1]) for c in choices))


def resnet50_like_problem(step: int = 8, budget_fraction: float = 0.5,
                          seed: int = 0) -> AllocProblem:
    """A ResNet-50-shaped allocation problem: 37 groups (stem, one residual stream per stage,
    two internal groups per bottleneck block) and 53 convs with latency-like staircase costs;
    budget = budget_fraction x the unpruned cost."""
    rng = np.random.default_rng(seed)
    groups = [_random_group("stem", 64, step, rng)]
    layers = [AllocLayer("conv1", (), 3, 0, 0, _ConvCost(7, 224, 112))]
    prev, hw = 0, 56
    for s, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        stream = len(groups)
        groups.append(_random_group(f"layer{s + 1}.out", 4 * width, step, rng))
        for b in range(blocks):
            name, hw_out = f"layer{s + 1}.{b}", hw // (2 if b == 0 and s > 0 else 1)
            a, c = len(groups), len(groups) + 1
            groups += [_random_group(f"{name}.conv1", width, step, rng),
                       _random_group(f"{name}.conv2", width, step, rng)]
            src = prev if b == 0 else stream
            layers += [AllocLayer(f"{name}.conv1", ((src, 1),), 0, a, 0, _ConvCost(1, hw, hw)),
                       AllocLayer(f"{name}.conv2", ((a, 1),), 0, c, 0, _ConvCost(3, hw, hw_out)),
                       AllocLayer(f"{name}.conv3", ((c, 1),), 0, stream, 0,
                                  _ConvCost(1, hw_out, hw_out))]
            if b == 0:
                layers.append(AllocLayer(f"{name}.downsample", ((prev, 1),), 0, stream, 0,
                                         _ConvCost(1, hw, hw_out)))
            hw = hw_out
        prev = stream
    problem = AllocProblem(tuple(groups), tuple(layers), budget=1.0, const_cost=0.05)
    full = allocation_cost(problem, [len(g.choices) - 1 for g in groups])
    return AllocProblem(problem.groups, problem.layers, budget_fraction * full, 0.05)


def allocation_cost(problem: AllocProblem, choice: Sequence[int]) -> float:
    """True cost of an allocation (choice = index into each group's choices), from the layers'
    own cost callables."""
    kept = [g.choices[i] for g, i in zip(problem.groups, choice)]
    total = float(problem.const_cost)
    for lay in problem.layers:
        c_in = lay.in_const + sum(m * kept[g] for g, m in lay.in_terms)
        c_out = kept[lay.out_group] if lay.out_group is not None else lay.out_const
        total += float(lay.cost(int(c_in), int(c_out)))
    return total


# ----------------------------------------------------------------------------- exact MIP
@dataclass
class _MipResult:
    x: list[int] | None
    bound: float
    proven: bool


def _mip(m: _Model, hint: Sequence[int], time_limit: float, gap: float) -> _MipResult:
    """Solve the (reduced) model with HiGHS (OR-Tools MathOpt), warm-started from `hint`.

    One-hot choices; pairwise tables through joint distributions over the cliques of the
    elimination order (a junction tree: the LP relaxation is then as strong as the Lagrangian
    bound), or in transport form when those cliques are too large; c_in sums of non-linear
    layers as one-hot reachable values. Clique and pair variables are continuous: they are
    integral once the choices are. Skipped (no result) when the model could not even be built
    in about half the time left.
    """
    from ortools.math_opt.python import mathopt

    start = time.perf_counter()
    unary = [u.copy() for u in m.unary]
    pairs = dict(m.pairs)
    rhs = 1.0 - m.const
    for s in m.sums:
        if s.table is None:  # too large for an exact table: the under-estimator, then repair
            rhs -= _add_linear(s.out, s.terms, s.low, s.slope, m.choices, unary, pairs)
    elim = _Elimination(m.sizes, list(pairs))
    cliques = sum(c for c in elim.cells if c > max(elim.sizes, default=1))
    pair_cells = sum(t.size for t in pairs.values())
    n_vars = min(cliques, pair_cells) + sum(s.table.size for s in m.sums if s.table is not None)
    if n_vars > _MIP_VARS_PER_S * 0.5 * time_limit:
        return _MipResult(None, math.inf, False)
    model = mathopt.Model()
    x = [[model.add_binary_variable() for _ in range(n)] for n in m.sizes]
    for xs in x:
        model.add_linear_constraint(mathopt.fast_sum(xs) == 1.0)
    terms = [(float(c), v) for g, xs in enumerate(x) for c, v in zip(unary[g], xs)]
    if cliques <= min(pair_cells, _MAX_CLIQUE_LP):
        terms += _clique_terms(model, elim, x, pairs)
    else:
        for (a, b), t in pairs.items():
            terms += _table_terms(model, x[a], x[b], t)
    for s in m.sums:
        if s.table is not None:
            terms += _sum_terms(model, m, s, x)
    model.add_linear_constraint(mathopt.fast_sum(c * v for c, v in terms) <= rhs)
    model.maximize(mathopt.fast_sum(float(val) * v for g, xs in enumerate(x)
                                    for val, v in zip(m.values[g], xs)))
    warm = mathopt.SolutionHint(variable_values={
        v: float(i == hint[g]) for g, xs in enumerate(x) for i, v in enumerate(xs)})
    left = time_limit - (time.perf_counter() - start)
    params = mathopt.SolveParameters(time_limit=datetime.timedelta(seconds=max(left, 0.01)),
                                     relative_gap_tolerance=gap, absolute_gap_tolerance=0.0)
    try:
        res = mathopt.solve(model, mathopt.SolverType.HIGHS, params=params,
                            model_params=mathopt.ModelSolveParameters(solution_hints=[warm]))
    except Exception:  # noqa: BLE001 - a solver failure leaves the incumbent standing
        return _MipResult(None, math.inf, False)
    bound = res.termination.objective_bounds.dual_bound
    if not res.has_primal_feasible_solution():
        return _MipResult(None, bound, False)
    sol = [int(np.argmax(res.variable_values(xs))) for xs in x]
    return _MipResult(sol, bound, res.termination.reason == mathopt.TerminationReason.OPTIMAL)


def _clique_terms(model, elim: _Elimination, x: list, pairs: dict) -> list:
    """Cost terms of the pairwise tables over junction-tree clique marginals mu_v (scope
    elim.scope[v]): mu_v sums to x_v on v and agrees with its parent clique on the separator."""

    mus = []
    for v, scope in enumerate(elim.scope):
        shape = tuple(elim.sizes[w] for w in scope)
        if len(scope) == 1:
            mus.append(np.array(x[v], dtype=object))
            continue
        mu = np.array([model.add_variable(lb=0.0, ub=1.0) for _ in range(math.prod(shape))],
                      dtype=object).reshape(shape)
        for i, expr in enumerate(_marginal(mu, scope, (v,))):
            model.add_linear_constraint(expr == x[v][i])
        mus.append(mu)
    for v, p in enumerate(elim.parent):
        if p is not None and len(elim.scope[v]) > 1:
            mine = _marginal(mus[v], elim.scope[v], elim.sep[v])
            theirs = _marginal(mus[p], elim.scope[p], elim.sep[v])
            for a, b in zip(mine, theirs):
                model.add_linear_constraint(a == b)
    terms = []
    for v, keys in enumerate(elim.bucket_pairs):
        if not keys:
            continue
        scope = elim.scope[v]
        coef = sum(elim._align(pairs[k], k, scope) for k in keys)
        coef = np.broadcast_to(coef, mus[v].shape)
        terms += [(float(c), var) for c, var in zip(coef.ravel(), mus[v].ravel())]
    return terms


def _marginal(mu: np.ndarray, scope: Sequence[int], onto: Sequence[int]) -> list:
    """Linear expressions of the marginal of mu (axes `scope`) onto `onto`, row-major."""
    from ortools.math_opt.python import mathopt

    axes = [scope.index(w) for w in onto]
    rest = [i for i in range(len(scope)) if i not in axes]
    flat = mu.transpose(axes + rest).reshape(math.prod(mu.shape[i] for i in axes), -1)
    return [mathopt.fast_sum(row) for row in flat]


def _table_terms(model, xa: list, xb: list, table: np.ndarray) -> list:
    """Cost terms of table[i, j] over a pair of one-hot choices (transport form)."""
    if len(xb) == 1:
        return [(float(c), v) for c, v in zip(table[:, 0], xa)]
    if len(xa) == 1:
        return [(float(c), v) for c, v in zip(table[0], xb)]
    from ortools.math_opt.python import mathopt

    y = [[model.add_variable(lb=0.0, ub=1.0) for _ in xb] for _ in xa]
    for i, v in enumerate(xa):
        model.add_linear_constraint(mathopt.fast_sum(y[i]) == v)
    for j, v in enumerate(xb):
        model.add_linear_constraint(mathopt.fast_sum(row[j] for row in y) == v)
    return [(float(table[i, j]), y[i][j]) for i in range(len(xa)) for j in range(len(xb))]


def _sum_terms(model, m: _Model, s: _Sum, x: list) -> list:
    """Cost terms of an exact non-linear many-input layer: one-hot over reachable c_in sums."""
    from ortools.math_opt.python import mathopt

    reach = _reach(s.terms, m.choices, cap=len(s.reach))
    z = [model.add_binary_variable() for _ in reach]
    model.add_linear_constraint(mathopt.fast_sum(z) == 1.0)
    rest = mathopt.fast_sum(float(mult * c) * v for g, mult in s.terms
                            for c, v in zip(m.choices[g], x[g]))
    model.add_linear_constraint(mathopt.fast_sum(float(r) * v for r, v in zip(reach, z)) == rest)
    table = s.table[np.searchsorted(s.reach, reach)]
    return _table_terms(model, z, x[s.out] if s.out is not None else [None], table)


# ----------------------------------------------------------------------------- public functions
def _positions(m: _Model, choice: Sequence[int]) -> list[int]:
    """Positions in m of original choice indices (which must be allowed in m)."""
    return [int(np.searchsorted(idx, c)) for idx, c in zip(m.index, choice)]


def _original(m: _Model, x: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(idx[i]) for idx, i in zip(m.index, x))


def min_cost(problem: AllocProblem) -> float:
    """Cost with every group at its smallest choice (the least cost when costs are monotone)."""
    return allocation_cost(problem, [0] * len(problem.groups))


def _check_budget(problem: AllocProblem) -> None:
    """Validate the problem; InfeasibleBudget if even the smallest allocation does not fit."""
    _validate(problem)
    floor = min_cost(problem)
    if floor > problem.budget:
        raise InfeasibleBudget(
            f"budget {problem.budget:.6g} is below the smallest achievable cost {floor:.6g} "
            f"(every group at its smallest choice)")
    if not problem.budget > 0:
        raise ValueError(f"budget must be positive, got {problem.budget}")


def _solution(problem: AllocProblem, choice: Sequence[int], status: str, bound: float,
              start: float, heuristic_value: float) -> AllocSolution:
    value = float(sum(g.values[i] for g, i in zip(problem.groups, choice)))
    bound = max(bound, value)
    gap = (bound - value) / max(abs(bound), _EPS)
    return AllocSolution(tuple(int(i) for i in choice),
                         tuple(g.choices[i] for g, i in zip(problem.groups, choice)), value,
                         allocation_cost(problem, choice), status, bound, gap,
                         time.perf_counter() - start, heuristic_value)


def _feasible(problem: AllocProblem, m: _Model, choice: Sequence[int]) -> tuple[int, ...]:
    """`choice` if its true cost fits, else repaired by the greedy drop (then refilled)."""
    choice = tuple(choice)
    while allocation_cost(problem, choice) > problem.budget:
        x = _positions(m, choice)
        tighter = _Model(m.choices, m.index, m.values, m.unary, m.pairs, m.sums,
                         m.const + 1e-9, m.scale)
        repaired = _original(m, _greedy_positions(tighter, x))
        if repaired == choice:
            return tuple(0 for _ in choice)
        choice = repaired
    return choice


def greedy(problem: AllocProblem) -> AllocSolution:
    """Fast heuristic: from the full allocation, drop the least value per unit of cost saved
    (several steps at once where cost is a staircase), exact table look-ups; then refill."""
    start = time.perf_counter()
    _check_budget(problem)
    full = _compile(problem)
    m = full.restrict(_dominance(full))
    choice = _feasible(problem, full, _original(m, _greedy_positions(m)))
    trivial = float(sum(max(g.values) for g in problem.groups))
    value = float(sum(g.values[i] for g, i in zip(problem.groups, choice)))
    return _solution(problem, choice, "HEURISTIC", trivial, start, value)


@dataclass
class _Search:
    """Solver state: the reduced model, the incumbent (original indices) and the proven bound."""

    problem: AllocProblem
    full: _Model
    model: _Model
    best: tuple[int, ...]
    best_value: float
    bound: float
    cut: float = -math.inf  # best bound among the choices removed by fixing

    def offer(self, m: _Model, x: Sequence[int]) -> None:
        """Make positions x of m the incumbent if it truly fits and is better."""
        choice = _feasible(self.problem, self.full, _original(m, x))
        value = self.full.value(choice)
        if value > self.best_value:
            self.best, self.best_value = choice, value

    def gap(self) -> float:
        return (self.bound - self.best_value) / max(abs(self.bound), _EPS)

    def fix(self, per_position: list[np.ndarray]) -> bool:
        """Remove choices whose Lagrangian bound is below the incumbent; True if any went."""
        tol = 1e-9 * max(1.0, abs(self.best_value))
        inc = _positions(self.model, self.best)
        keep = []
        for g, per in enumerate(per_position):
            ok = per >= self.best_value - tol
            ok[inc[g]] = True
            if (~ok).any():
                self.cut = max(self.cut, float(per[~ok].max()))
            keep.append(np.flatnonzero(ok))
        if sum(map(len, keep)) == sum(self.model.sizes):
            return False
        self.model = self.model.restrict(keep)
        return True


def _exact(st: _Search, gap: float, deadline: float) -> bool:
    """Close the gap on the reduced model: Lagrangian-guided enumeration, else the HiGHS MIP.
    Returns whether a bound was proven."""
    lag = _Lagrangian(st.model)
    if lag.tractable and len(st.model.sizes) < 500:
        bound, lam, _ = lag.dual(deadline)
        st.bound = min(st.bound, max(bound, st.cut))
        floor = st.best_value + 0.9 * gap * abs(st.best_value)
        now = time.perf_counter()
        x, complete = lag.search(lam, floor, now + 0.5 * (deadline - now))
        if x is not None:
            st.offer(st.model, x)
        if complete:
            st.bound = min(st.bound, max(st.best_value, floor, st.cut))
            return True
    res = _mip(st.model, _positions(st.model, st.best), deadline - time.perf_counter(), gap)
    if res.x is not None:
        st.offer(st.model, res.x)
    st.bound = min(st.bound, max(res.bound, st.cut))
    return math.isfinite(res.bound)


def solve(problem: AllocProblem, time_limit: float = 10.0, gap: float = 1e-3,
          workers: int = 2) -> AllocSolution:
    """Maximise total value under the budget; proven within relative `gap` unless time runs out.

    Greedy warm start -> Lagrangian bound (exact max-sum elimination) and variable fixing ->
    exact enumeration or the HiGHS MIP on what is left; stops as soon as the proven gap
    (bound - value) / bound is at most `gap` (status "OPTIMAL"). On the time limit the best
    allocation so far is returned as "FEASIBLE" with its proven gap ("HEURISTIC" if no bound
    was proven). The returned cost is the true cost from the layers' callables and never
    exceeds the budget. `workers` is accepted for API stability: every back end used is
    single-threaded (MathOpt's HiGHS takes no thread count).

    Raises InfeasibleBudget if even the smallest allocation does not fit.
    """
    start = time.perf_counter()
    deadline = start + time_limit
    _check_budget(problem)
    full = _compile(problem)
    model = full.restrict(_dominance(full))
    first = _feasible(problem, full, _original(model, _greedy_positions(model)))
    trivial = float(sum(max(g.values) for g in problem.groups))
    st = _Search(problem, full, model, first, full.value(first), trivial)
    heuristic_value, proven = st.best_value, False
    for _ in range(8):
        if st.gap() <= gap or time.perf_counter() > deadline:
            break
        lag = _Lagrangian(st.model)
        if not lag.tractable:  # fine grids: bound and fix through a coarsened relaxation
            size = sum(st.model.sizes)
            if not _coarse_step(st, deadline):
                break
            proven = True
            if sum(st.model.sizes) == size:
                break
            continue
        bound, lam, points = lag.dual(deadline)
        st.bound = min(st.bound, max(bound, st.cut))
        proven = True
        for x in points:
            st.offer(st.model, _greedy_positions(st.model, x))
        if st.gap() <= gap or lam == 0.0 or time.perf_counter() > deadline:
            break
        if not st.fix(lag.per_position(lam)):
            break
    if st.gap() > gap and time.perf_counter() < deadline:
        proven = _exact(st, gap, deadline) or proven
    status = "OPTIMAL" if st.gap() <= gap else ("FEASIBLE" if proven else "HEURISTIC")
    return _solution(problem, st.best, status, st.bound, start, heuristic_value)


def brute_force(problem: AllocProblem) -> AllocSolution:
    """Exhaustive search over every combination (tests; small instances only)."""
    start = time.perf_counter()
    _check_budget(problem)
    best, best_value = None, -math.inf
    for choice in itertools.product(*[range(len(g.choices)) for g in problem.groups]):
        value = float(sum(g.values[i] for g, i in zip(problem.groups, choice)))
        if value > best_value and allocation_cost(problem, choice) <= problem.budget:
            best, best_value = choice, value
    return _solution(problem, best, "OPTIMAL", best_value, start, best_value)
