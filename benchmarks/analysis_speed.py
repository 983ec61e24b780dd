"""Analyze and apply time on the zoo, including full ResNet-50 and DenseNet-121 at 224x224.

    python benchmarks/analysis_speed.py [--repeats 5] [--quick]

Prints a table: trace (+shapes), channel analysis, analyze total, plan (Uniform 0.5, L1),
apply without verification, and verification, each the median of --repeats warm runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch

import graphprune as gp
from graphprune.analysis import analyze_graph
from graphprune.trace import trace
from graphprune.zoo import FULL, ZOO


def _med(fn, repeats):
    ts, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def bench(name, factory, repeats, verify=True):
    m, x = factory()
    trace(m, x)  # warm-up: imports, meta kernels
    t_tr, tr = _med(lambda: trace(m, x), repeats)
    t_an, a = _med(lambda: analyze_graph(tr), repeats)
    t_pl, p = _med(lambda: gp.plan(a, gp.Uniform(0.5)), repeats)
    t_ap, _ = _med(lambda: gp.apply(a, p, verify=False), repeats)
    t_ve = float("nan")
    if verify:
        t_ve = _med(lambda: gp.apply(a, p, verify=True), 1)[0] - t_ap
    return {
        "model": name, "kind": tr.kind, "nodes": len(tr.gm.graph.nodes), "groups": len(a.groups),
        "trace": t_tr, "analysis": t_an, "analyze": t_tr + t_an, "plan": t_pl, "apply": t_ap,
        "verify": t_ve,
    }


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="full-size models only")
    args = ap.parse_args()
    rows = []
    for name in ("resnet50", "densenet121"):
        rows.append(bench(name + "@224", FULL[name], args.repeats, verify=False))
    if not args.quick:
        for name in sorted(ZOO):
            rows.append(bench(name, ZOO[name], max(1, args.repeats // 2)))
    print(f"# analysis speed — {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    hdr = ("model", "trace", "nodes", "groups", "trace s", "analysis s", "analyze s", "plan s",
           "apply s", "verify s")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(f"| {r['model']} | {r['kind']} | {r['nodes']} | {r['groups']} | {r['trace']:.3f} | "
              f"{r['analysis']:.3f} | {r['analyze']:.3f} | {r['plan']:.3f} | {r['apply']:.3f} | "
              f"{r['verify']:.2f} |")


if __name__ == "__main__":
    main()
