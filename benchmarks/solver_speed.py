"""Solver speed and proven gap on synthetic ResNet-50- and DenseNet-121-shaped problems.

Run:  python benchmarks/solver_speed.py [--steps 8 16] [--seeds 0] [--densenet] [--mip-only S]

For each problem: the greedy heuristic alone, solve() at the default gap (1e-3, the bar: <= 2 s
at step 8), and solve() asked for the exact optimum (gap 1e-9). `--mip-only S` adds the plain
HiGHS MIP on the unreduced model with an S-second limit (the baseline the probe measured).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace

import numpy as np

from graphprune import solver as S
from graphprune.solver import AllocLayer, AllocProblem, allocation_cost, greedy, solve


def resnet50_problem(step: int, fraction: float, seed: int) -> AllocProblem:
    """37 groups, 53 convs, latency-like staircase costs (see solver.resnet50_like_problem)."""
    return S.resnet50_like_problem(step=step, budget_fraction=fraction, seed=seed)


def resnet50_smooth_problem(step: int, fraction: float, seed: int) -> AllocProblem:
    """The same without tile staircases (tiles of 1 channel): every step-8 choice matters."""
    p = S.resnet50_like_problem(step=step, budget_fraction=1.0, seed=seed)
    layers = tuple(replace(lay, cost=replace(lay.cost, tile_in=1, tile_out=1))
                   for lay in p.layers)
    full = allocation_cost(replace(p, layers=layers), [len(g.choices) - 1 for g in p.groups])
    return replace(p, layers=layers, budget=fraction * full)


class Macs:
    """MACs of a k x k conv at hw x hw output, in GMAC: linear in c_in (exactly split)."""

    def __init__(self, k: int, hw: int):
        self.scale = k * k * hw * hw / 1e9

    def __call__(self, c_in, c_out):
        return self.scale * c_in * c_out


def densenet121_problem(step: int, fraction: float, seed: int) -> AllocProblem:
    """DenseNet-121-shaped: blocks (6, 12, 24, 16), growth 32, bottleneck 128; every growth
    group feeds every later 1x1 conv of its block (concatenation), costs in MACs."""
    rng = np.random.default_rng(seed)
    groups = [S._random_group("stem", 64, step, rng)]
    layers = [AllocLayer("conv0", (), 3, 0, 0, Macs(7, 112))]
    source, hw = [0], 56
    for b, n in enumerate((6, 12, 24, 16)):
        for i in range(n):
            bn, gr = len(groups), len(groups) + 1
            groups += [S._random_group(f"block{b}.{i}.bn", 128, step, rng),
                       S._random_group(f"block{b}.{i}.growth", 32, step, rng)]
            terms = tuple((g, 1) for g in source)
            layers += [AllocLayer(f"block{b}.{i}.conv1", terms, 0, bn, 0, Macs(1, hw)),
                       AllocLayer(f"block{b}.{i}.conv2", ((bn, 1),), 0, gr, 0, Macs(3, hw))]
            source = source + [gr]
        if b < 3:
            width = sum(groups[g].choices[-1] for g in source) // 2
            t = len(groups)
            groups.append(S._random_group(f"transition{b}", width, step, rng))
            layers.append(AllocLayer(f"transition{b}", tuple((g, 1) for g in source), 0, t, 0,
                                     Macs(1, hw)))
            source, hw = [t], hw // 2
    layers.append(AllocLayer("fc", tuple((g, 1) for g in source), 0, None, 1000, Macs(1, 1)))
    p = AllocProblem(tuple(groups), tuple(layers), 1.0)
    full = allocation_cost(p, [len(g.choices) - 1 for g in groups])
    return AllocProblem(p.groups, p.layers, fraction * full)


def row(name: str, p: AllocProblem, args) -> list[str]:
    t = time.perf_counter()
    h = greedy(p)
    t_h = time.perf_counter() - t
    fast = solve(p, time_limit=args.time_limit)
    exact = solve(p, time_limit=args.time_limit, gap=1e-9)
    best = max(exact.value, fast.value)
    cells = [name, f"{t_h:.3f}", f"{100 * (best - h.value) / best:.4f}",
             f"{fast.seconds:.3f}", fast.status, f"{100 * fast.gap:.4f}",
             f"{100 * (best - fast.value) / best:.4f}", f"{exact.seconds:.3f}", exact.status,
             f"{100 * exact.gap:.2e}", f"{exact.value:.3f}",
             f"{exact.cost / p.budget:.6f}"]
    if args.mip_only:
        m = S._compile(p)
        t = time.perf_counter()
        res = S._mip(m, list(h.choice), args.mip_only, 1e-9)
        val = m.value(res.x) if res.x is not None else float("nan")
        gap = max(0.0, 100 * (res.bound - val) / res.bound)
        cells.append(f"{time.perf_counter() - t:.1f}s gap {gap:.3f}%")
    return cells


HEADER = ["problem", "greedy s", "greedy loss %", "solve s (gap 1e-3)", "status",
          "proven gap %", "loss vs opt %", "exact s", "status", "proven gap %", "optimum",
          "cost/budget"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--smooth", action="store_true", help="add ResNet-50 rows without tiles")
    ap.add_argument("--densenet", action="store_true", help="add DenseNet-121-shaped rows")
    ap.add_argument("--mip-only", type=float, default=0.0, help="HiGHS-only baseline, seconds")
    args = ap.parse_args()
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    header = HEADER + (["HiGHS only"] if args.mip_only else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    makers = [("resnet50", resnet50_problem)]
    if args.smooth:
        makers.append(("resnet50-smooth", resnet50_smooth_problem))
    if args.densenet:
        makers.append(("densenet121", densenet121_problem))
    for kind, make in makers:
        for step in args.steps:
            for frac in args.fractions:
                for seed in args.seeds:
                    p = make(step, frac, seed)
                    name = f"{kind} step {step} budget {frac:.0%} seed {seed}"
                    print("| " + " | ".join(row(name, p, args)) + " |", flush=True)


if __name__ == "__main__":
    main()
