"""Tests of the global channel-allocation solver (graphprune.solver) against brute force."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest

from graphprune import solver as S
from graphprune.solver import (
    AllocGroup,
    AllocLayer,
    AllocProblem,
    InfeasibleBudget,
    allocation_cost,
    brute_force,
    greedy,
    min_cost,
    resnet50_like_problem,
    solve,
)


# ----------------------------------------------------------------------------- cost callables
@dataclass(frozen=True)
class Staircase:
    """Latency-like: tiles of `ti` x `to` channels, vectorisable with numpy."""

    a: float
    ti: int
    to: int
    b: float = 0.0
    c: float = 0.0

    def __call__(self, cin, cout):
        tiles = np.ceil(cin / self.ti) * np.ceil(cout / self.to)
        return self.a * tiles + self.b * cin + self.c


@dataclass(frozen=True)
class ScalarStaircase:
    """The same shape written with math.ceil: scalar-only (exercises the per-entry fallback)."""

    a: float
    ti: int

    def __call__(self, cin, cout):
        return self.a * math.ceil(cin / self.ti) * max(cout, 1) ** 0.5 + 0.01


@dataclass(frozen=True)
class Flops:
    """Linear in c_in for a fixed c_out (FLOPs / params)."""

    k: float

    def __call__(self, cin, cout):
        return self.k * cin * cout + 0.1 * cout


# ----------------------------------------------------------------------------- random instances
def random_group(rng: np.random.Generator, name: str) -> AllocGroup:
    n = int(rng.integers(2, 5))
    step = int(rng.choice([1, 2, 4, 8]))
    choices = np.cumsum(rng.integers(1, 4, n) * step)
    gains = rng.exponential(1.0, n)
    gains[rng.random(n) < 0.15] = 0.0  # plateaus: dominated choices
    return AllocGroup(name, tuple(int(c) for c in choices),
                      tuple(float(v) for v in np.cumsum(gains)))


def random_layer(rng: np.random.Generator, n: int, i: int) -> AllocLayer:
    kind = int(rng.integers(0, 8))
    g, h, k = (int(v) for v in rng.choice(n, 3, replace=n < 3))
    stair = Staircase(float(rng.uniform(0.5, 2)), int(rng.choice([2, 4])),
                      int(rng.choice([4, 8])), float(rng.uniform(0, 0.1)), 0.05)
    layers = [
        AllocLayer(f"pair{i}", ((g, 1),), 0, h, 0, stair),
        AllocLayer(f"dw{i}", ((g, 1),), 0, g, 0, stair),  # depthwise: one group only
        AllocLayer(f"const{i}", (), 3, None, 16, stair),  # unprunable
        AllocLayer(f"head{i}", ((g, 2),), 1, None, 10, ScalarStaircase(0.3, 4)),
        AllocLayer(f"stem{i}", (), 3, h, 0, ScalarStaircase(0.2, 2)),
        AllocLayer(f"cat{i}", ((g, 1), (h, 1), (k, 2)), 2, int(rng.integers(n)), 0,
                   Flops(float(rng.uniform(0.001, 0.01)))),
        AllocLayer(f"catstair{i}", ((g, 1), (h, 1), (k, 1)), 0, int(rng.integers(n)), 0, stair),
        AllocLayer(f"cathead{i}", ((g, 1), (h, 2), (k, 1)), 0, None, 12, stair),
    ]
    return layers[kind]


def random_problem(seed: int) -> AllocProblem:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    groups = tuple(random_group(rng, f"g{j}") for j in range(n))
    while math.prod(len(g.choices) for g in groups) > 600:
        groups = groups[:-1]
        n -= 1
    layers = tuple(random_layer(rng, n, i) for i in range(int(rng.integers(2, 7))))
    p = AllocProblem(groups, layers, budget=1.0, const_cost=float(rng.uniform(0, 0.5)))
    lo = min_cost(p)
    hi = allocation_cost(p, [len(g.choices) - 1 for g in groups])
    return AllocProblem(groups, layers, lo + float(rng.uniform(0.02, 0.98)) * (hi - lo),
                        p.const_cost)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", range(40))
def test_solve_matches_brute_force(seed):
    """solve() proves the same optimum as exhaustive search and never exceeds the budget."""
    p = random_problem(seed)
    ref = brute_force(p)
    sol = solve(p, gap=1e-9)
    assert sol.status == "OPTIMAL"
    assert close(sol.value, ref.value)
    assert sol.cost <= p.budget
    assert close(sol.cost, allocation_cost(p, sol.choice))
    assert sol.kept == tuple(g.choices[i] for g, i in zip(p.groups, sol.choice))
    assert sol.bound >= ref.value - 1e-9
    assert sol.heuristic_value <= sol.value + 1e-12


@pytest.mark.parametrize("seed", range(40))
def test_greedy_and_default_gap_are_feasible(seed):
    """greedy() fits the budget; solve() at the default gap keeps a valid bound."""
    p = random_problem(seed)
    ref = brute_force(p)
    h = greedy(p)
    assert h.cost <= p.budget and h.value <= ref.value + 1e-9
    assert h.status == "HEURISTIC" and h.bound >= ref.value - 1e-9
    sol = solve(p)
    assert sol.cost <= p.budget
    assert sol.bound >= ref.value - 1e-9
    assert sol.value >= ref.value * (1 - 1e-3) - 1e-9


@pytest.mark.parametrize("clique_cap", [S._MAX_CLIQUE_LP, 0])
@pytest.mark.parametrize("seed", range(8))
def test_mip_backend_matches_brute_force(seed, clique_cap, monkeypatch):
    """The HiGHS MIP (the fallback when enumeration cannot finish) is exact as well, with the
    junction-tree formulation and with plain pair (transport) variables."""
    monkeypatch.setattr(S, "_MAX_CLIQUE_LP", clique_cap)
    p = random_problem(100 + seed)
    ref = brute_force(p)
    m = S._compile(p)
    res = S._mip(m, [0] * len(p.groups), 10.0, 1e-9)
    assert res.x is not None and res.proven
    assert close(m.value(res.x), ref.value) and res.bound >= ref.value - 1e-6


def test_sum_table_too_large_falls_back_to_repair(monkeypatch):
    """Without an exact c_in-sum table the answer is still feasible and the bound valid."""
    monkeypatch.setattr(S, "_MAX_SUM_TABLE", 1)
    for seed in range(30):
        p = random_problem(seed)
        if not any(len({g for g, _ in lay.in_terms} | {lay.out_group} - {None}) > 2
                   for lay in p.layers):
            continue
        ref = brute_force(p)
        sol = solve(p, gap=1e-9)
        assert sol.cost <= p.budget and sol.bound >= ref.value - 1e-9
        assert close(sol.value, ref.value)


def test_max_marginals_match_enumeration():
    """Variable elimination: maximum and max-marginals equal exhaustive enumeration."""
    rng = np.random.default_rng(0)
    sizes = [3, 2, 4, 3, 2]
    scopes = [(0, 1), (1, 2), (0, 2), (2, 3), (3, 4), (1, 4)]
    unary = [rng.normal(size=n) for n in sizes]
    pairs = {k: rng.normal(size=(sizes[k[0]], sizes[k[1]])) for k in scopes}
    elim = S._Elimination(sizes, scopes)
    total, psis, msgs = elim.forward(unary, pairs)
    mm = elim.max_marginals(total, psis, msgs)
    best = [np.full(n, -np.inf) for n in sizes]
    for x in itertools.product(*[range(n) for n in sizes]):
        f = sum(u[i] for u, i in zip(unary, x)) + sum(t[x[a], x[b]] for (a, b), t in pairs.items())
        for g, i in enumerate(x):
            best[g][i] = max(best[g][i], f)
    assert close(total, max(b.max() for b in best))
    for a, b in zip(mm, best):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    x = elim.decode(psis)
    assert close(sum(u[i] for u, i in zip(unary, x))
                 + sum(t[x[a], x[b]] for (a, b), t in pairs.items()), total)


def test_infeasible_budget_states_min_cost():
    p = random_problem(3)
    floor = min_cost(p)
    tight = AllocProblem(p.groups, p.layers, floor * 0.5, p.const_cost)
    with pytest.raises(InfeasibleBudget, match=f"{floor:.6g}") as err:
        solve(tight)
    assert f"{tight.budget:.6g}" in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(InfeasibleBudget):
        greedy(tight)


def test_budget_above_full_cost_keeps_everything():
    p = random_problem(5)
    full = [len(g.choices) - 1 for g in p.groups]
    roomy = AllocProblem(p.groups, p.layers, allocation_cost(p, full) * 2, p.const_cost)
    sol = solve(roomy)
    assert sol.status == "OPTIMAL" and sol.gap == 0.0
    assert close(sol.value, sum(max(g.values) for g in p.groups))


def test_budget_equal_to_min_cost():
    p = random_problem(7)
    sol = solve(AllocProblem(p.groups, p.layers, min_cost(p), p.const_cost), gap=1e-9)
    assert sol.cost <= min_cost(p) and sol.status == "OPTIMAL"


def test_resnet50_like_step16_is_proven():
    p = resnet50_like_problem(step=16, budget_fraction=0.5, seed=0)
    assert len(p.groups) == 37 and len(p.layers) == 53
    sol = solve(p, time_limit=20.0)
    assert sol.status == "OPTIMAL" and sol.gap <= 1e-3
    assert sol.cost <= p.budget
    assert sol.value >= sol.heuristic_value
    assert close(sol.cost, allocation_cost(p, sol.choice))


def test_resnet50_like_step16_exact_beats_or_matches_greedy():
    p = resnet50_like_problem(step=16, budget_fraction=0.3, seed=1)
    h = greedy(p)
    sol = solve(p, gap=1e-9, time_limit=20.0)
    assert sol.status == "OPTIMAL" and sol.gap <= 1e-9
    assert sol.value >= h.value and sol.cost <= p.budget


@pytest.mark.parametrize("seed", range(25))
def test_lagrangian_bounds_and_enumeration_are_exact(seed):
    """For any lambda >= 0: L(lambda) and every per-choice bound at the optimum are >= the
    optimum, and the enumeration from a hopeless floor finds the optimum."""
    p = random_problem(seed)
    ref = brute_force(p)
    m = S._compile(p)
    lag = S._Lagrangian(m)
    _, lam_star, _ = lag.dual(math.inf)
    for lam in (0.0, 0.5 * lam_star, lam_star, 3.0 * lam_star + 1.0):
        assert lag.evaluate(lam, np.float64)[0] >= ref.value - 1e-9
        per = lag.per_position(lam)
        assert all(per[g][i] >= ref.value - 1e-9 for g, i in enumerate(ref.choice))
        x, complete = lag.search(lam, -1e9, math.inf)
        assert complete and close(m.value(x), ref.value) and m.cost(x) <= 1.0


# ----------------------------------------------------------------------------- coarse relaxation
@pytest.mark.parametrize("seed", range(12))
def test_coarsened_relaxation_bounds_the_optimum(seed):
    """Merging runs of choices (best value, least cost of each run) relaxes the problem: its
    Lagrangian bound is at least the true optimum, and every choice of the optimum keeps a
    max-marginal at least the optimum value (so fixing by it never removes the optimum)."""
    p = random_problem(seed)
    exact = brute_force(p)
    m = S._compile(p)
    starts = [S._buckets(n, 2) for n in m.sizes]
    coarse = S._coarsen(m, starts)
    assert [len(c) for c in coarse.choices] == [len(s) for s in starts]
    lag = S._Lagrangian(coarse)
    bound, lam, _ = lag.dual(math.inf)
    assert bound >= exact.value - 1e-9
    if lam > 0:
        per = lag.per_position(lam)
        for g, (st, i) in enumerate(zip(starts, exact.choice)):
            run = int(np.searchsorted(st, i, side="right")) - 1
            assert per[g][run] >= exact.value - 1e-6


def test_fine_grid_is_proven_through_coarsening():
    """Step-1 channel choices make the exact elimination tables too large; the coarsened
    Lagrangian bound and fixing still prove the answer (it used to stop as HEURISTIC)."""
    p = resnet50_like_problem(step=1, budget_fraction=0.5, seed=0)
    assert not S._Lagrangian(S._compile(p)).tractable
    sol = solve(p, time_limit=20.0)
    assert sol.status in ("OPTIMAL", "FEASIBLE")
    assert sol.gap <= 0.01
    assert sol.cost <= p.budget * (1 + 1e-12)
    assert sol.value >= greedy(p).value - 1e-9
