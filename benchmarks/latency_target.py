"""Issue 3 end-to-end: latency-targeted pruning of a ResNet-50-shaped model on this CPU.

    python benchmarks/latency_target.py [--batch 8] [--size 224] [--table /tmp/r50_b8.json]

1. measures (or loads) a latency table for the model's conv/linear signatures;
2. for gp.Latency(0.3/0.5/0.7): solve, slim, then compare the table's *predicted* end-to-end
   latency (layers + measured op overheads) with the *measured* latency, and report the speedup;
3. at equal FLOPs: latency-targeted allocation vs uniform pruning, measured side by side.
Weights are random (latency does not depend on values); verification is off for speed (the
test suite verifies the same pipeline).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch

import graphprune as gp
from graphprune import cost as C
from graphprune.allocate import cost_layers
from graphprune.report import count_macs
from graphprune.zoo import resnet50


def measure(m, x, threads, repeats=15):
    ms, iqr = C.measure_latency(m, (x,), warmup=3, repeats=repeats, threads=threads)
    return ms


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet50().eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    a = gp.analyze(model, (x,))
    reqs = {}
    for L in cost_layers(a):
        ci, co = reqs.get(L.sig, (0, 0))
        reqs[L.sig] = (max(ci, L.c_in), max(co, L.c_out))
    t0 = time.perf_counter()
    if args.table and os.path.exists(args.table):
        table = C.LatencyTable.load(args.table)
        how = f"loaded {args.table}"
    else:
        table = C.LatencyTable.measure(reqs, round_to=8, threads=args.threads,
                                       repeats=args.repeats, progress=True)
        if args.table:
            table.save(args.table)
        how = f"measured {len(reqs)} signatures in {time.perf_counter() - t0:.0f}s"
    print(f"# latency-targeted pruning, ResNet-50 @{args.size}, batch {args.batch}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}; table: {how}")
    dense_ms = measure(model, x, args.threads)
    dense_pred, _ = C.estimate_model_latency(model, (x,), table)
    dense_macs = count_macs(model, (x,))
    print(f"dense: measured {dense_ms:.1f} ms, predicted {dense_pred:.1f} ms "
          f"({100 * (dense_pred / dense_ms - 1):+.1f}%)\n")
    alpha = dense_ms / dense_pred  # one calibration factor measured on the dense model
    print("| target | solver | gap | solve s | MACs kept | predicted ms | measured ms | "
          "pred. error | calibrated error | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for f in (0.7, 0.5, 0.3):
        p = gp.plan(a, gp.Latency(f, table=table), "l1", round_to=8)
        slim = gp.apply(a, p, verify=False)
        pred, _ = C.estimate_model_latency(slim, (x,), table)
        ms = measure(slim, x, args.threads)
        macs = count_macs(slim, (x,)) / dense_macs
        rows[f] = (slim, macs)
        print(f"| Latency({f}) | {p.meta['solver_status']} | {100 * p.meta['proven_gap']:.3f}% | "
              f"{p.meta['solve_seconds']:.2f} | {macs:.3f} | {pred:.1f} | {ms:.1f} | "
              f"{100 * (pred / ms - 1):+.1f}% | {100 * (alpha * pred / ms - 1):+.1f}% | "
              f"{dense_ms / ms:.2f}x |")
    # equal FLOPs: latency-targeted (0.5) vs uniform with the same MACs
    slim_l, macs_l = rows[0.5]
    lo, hi, best = 0.0, 0.9, None
    for _ in range(9):  # bisection on the uniform ratio for the same MACs
        r = (lo + hi) / 2
        s = gp.apply(a, gp.plan(a, gp.Uniform(r), "l1", round_to=8), verify=False)
        m = count_macs(s, (x,)) / dense_macs
        if best is None or abs(m - macs_l) < abs(best[1] - macs_l):
            best = (s, m, r)
        lo, hi = (r, hi) if m > macs_l else (lo, r)
    s_u, macs_u, r_u = best
    ms_l, ms_u = measure(slim_l, x, args.threads), measure(s_u, x, args.threads)
    print(f"\nequal FLOPs: latency-targeted (MACs {macs_l:.3f}) {ms_l:.1f} ms vs uniform "
          f"{r_u:.2f} (MACs {macs_u:.3f}) {ms_u:.1f} ms -> latency-targeted is "
          f"{ms_u / ms_l:.2f}x faster")


if __name__ == "__main__":
    main()
