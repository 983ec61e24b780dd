"""Issue 3 end-to-end: latency-targeted pruning of a ResNet-50 on this CPU.

    python benchmarks/latency_target.py --batch 1 8 [--threads 2] [--table /tmp/r50] [--malloc pinned]

For each batch size:

1. measures (or loads ``PREFIX-b<batch>-t<threads>.json``) a latency table for the model's
   conv / linear signatures plus the op-overhead curves, then fits the in-model context on the
   *dense* model (``LatencyTable.calibrate_context``: per-node timings of the dense model vs the
   isolated predictions);
2. for gp.Latency(0.7/0.5/0.3): solve, slim, then compare the *predicted* end-to-end latency
   (``estimate_model_latency``; the solver's own predicted cost is printed beside it) with the
   *measured* latency, and report the speedup over the measured dense model;
3. at equal FLOPs: latency-targeted allocation (Latency(0.5)) vs uniform pruning with the same
   MACs, measured side by side.

``--malloc pinned`` (default) fixes glibc's malloc thresholds first (``cost.pin_malloc``): with the
default dynamic thresholds big activation buffers are returned to the OS and faulted in again,
which makes both the table and the model timings depend on allocation history. Weights are random
(latency does not depend on values); verification is off for speed (the test suite verifies the
same pipeline). Timings are the median of interleaved rounds (each a median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch

import graphprune as gp
from graphprune import cost as C
from graphprune.allocate import cost_layers
from graphprune.report import count_macs
from graphprune.zoo import resnet50


def measure_all(models: dict, x, threads: int, repeats: int, rounds: int = 3) -> dict:
    """Median over interleaved rounds of each model's median latency (ms)."""
    got = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            got[k].append(C.measure_latency(m, (x,), warmup=3, repeats=repeats,
                                            threads=threads)[0])
    return {k: statistics.median(v) for k, v in got.items()}


def get_table(a, batch: int, args) -> tuple[C.LatencyTable, str]:
    path = f"{args.table}-b{batch}-t{args.threads}.json" if args.table else None
    if path and os.path.exists(path):
        return C.LatencyTable.load(path), f"loaded `{path}`"
    reqs = {}
    for L in cost_layers(a):
        ci, co = reqs.get(L.sig, (0, 0))
        reqs[L.sig] = (max(ci, L.c_in), max(co, L.c_out))
    t0 = time.perf_counter()
    table = C.LatencyTable.measure(reqs, round_to=8, threads=args.threads, repeats=3,
                                   progress=False, overheads=False)
    t_layers = time.perf_counter() - t0
    t0 = time.perf_counter()
    table.measure_overheads(max_numel=max(2**20, batch * 64 * 112 * 112), progress=False)
    t_ovh = time.perf_counter() - t0
    points = sum(table.describe(s)["points"] for s in table.sigs)
    how = (f"measured: {len(reqs)} signatures, {points} points in {t_layers:.0f} s, "
           f"op-overhead curves ({len(table.overheads)} kinds) in {t_ovh:.0f} s")
    if path:
        table.save(path)
        how += f", saved `{path}` ({os.path.getsize(path) / 1024:.0f} KiB)"
    return table, how


def run_batch(batch: int, args) -> None:
    torch.manual_seed(0)
    model = resnet50().eval()
    x = torch.randn(batch, 3, args.size, args.size)
    a = gp.analyze(model, (x,))
    table, how = get_table(a, batch, args)
    t0 = time.perf_counter()
    table.calibrate_context(model, (x,), repeats=args.repeats)
    t_ctx = time.perf_counter() - t0
    if args.table:
        table.save(f"{args.table}-b{batch}-t{args.threads}-context.json")
    print(f"\n### batch {batch}, {args.threads} threads\n\ntable: {how}; in-model context fit "
          f"on the dense model in {t_ctx:.0f} s (load before: `{os.getloadavg()[0]:.2f}`)\n")
    dense_macs = count_macs(model, (x,))
    slims, metas = {"dense": model}, {}
    for f in (0.7, 0.5, 0.3):
        p = gp.plan(a, gp.Latency(f, table=table), "l1", round_to=args.round_to,
                    min_fraction=args.min_fraction)
        slims[f] = gp.apply(a, p, verify=False)
        metas[f] = p.meta
    # equal FLOPs: uniform pruning with the MACs of the Latency(0.5) model (bisection)
    macs_l = count_macs(slims[0.5], (x,)) / dense_macs
    lo, hi, best = 0.0, 0.95, None
    for _ in range(9):
        r = (lo + hi) / 2
        s = gp.apply(a, gp.plan(a, gp.Uniform(r), "l1", round_to=args.round_to), verify=False)
        m = count_macs(s, (x,)) / dense_macs
        if best is None or abs(m - macs_l) < abs(best[1] - macs_l):
            best = (s, m, r)
        lo, hi = (r, hi) if m > macs_l else (lo, r)
    slims["uniform"] = best[0]
    ms = measure_all(slims, x, args.threads, args.repeats)
    pred = {k: C.estimate_model_latency(m, (x,), table)[0] for k, m in slims.items()}
    print(f"dense: measured {ms['dense']:.1f} ms, predicted {pred['dense']:.1f} ms "
          f"({100 * (pred['dense'] / ms['dense'] - 1):+.1f}%)\n")
    print("| target | solver | gap | solve s | MACs kept | predicted ms (solver) | measured ms | "
          "pred. error | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f in (0.7, 0.5, 0.3):
        meta, p_ms, m_ms = metas[f], pred[f], ms[f]
        macs = count_macs(slims[f], (x,)) / dense_macs
        print(f"| Latency({f}) | {meta['solver_status']} | {100 * meta['proven_gap']:.3f}% | "
              f"{meta['solve_seconds']:.2f} | {macs:.3f} | {p_ms:.1f} "
              f"({meta['predicted_cost']:.1f}) | {m_ms:.1f} | {100 * (p_ms / m_ms - 1):+.1f}% | "
              f"{ms['dense'] / m_ms:.2f}x |")
    print(f"\nequal FLOPs: latency-targeted (MACs {macs_l:.3f}) {ms[0.5]:.1f} ms vs uniform "
          f"{best[2]:.2f} (MACs {best[1]:.3f}) {ms['uniform']:.1f} ms (predicted "
          f"{pred['uniform']:.1f}) -> latency-targeted is {ms['uniform'] / ms[0.5]:.2f}x faster")
    ctx = table.context["fitted_on"]
    ops = ", ".join(f"{k} {v[0]:.2f}x+{1e3 * v[1]:.0f}us" for k, v in table.context["ops"].items())
    print(f"\ncontext fit: layers {ctx['layers_ms'][0]:.1f} -> {ctx['layers_ms'][1]:.1f} ms "
          f"in model; ops: {ops}; interpreter {1e3 * ctx['interpreter_ms_per_node']:.1f} us/node; "
          f"load after: `{os.getloadavg()[0]:.2f}`", flush=True)


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", default=None, help="load/save tables as PREFIX-b<B>-t<T>.json")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--min-fraction", type=float, default=0.1)
    ap.add_argument("--malloc", choices=("pinned", "default"), default="pinned")
    args = ap.parse_args()
    pinned = C.pin_malloc() if args.malloc == "pinned" else False
    torch.set_num_threads(args.threads)
    print(f"# latency-targeted pruning, ResNet-50 @{args.size}, {C.device_name()}, "
          f"{args.threads} threads, torch {torch.__version__}, {platform.platform()}; malloc "
          f"{'pinned' if pinned else 'default (dynamic glibc thresholds)'}; round_to "
          f"{args.round_to}, min_fraction {args.min_fraction}")
    for b in args.batch:
        run_batch(b, args)


if __name__ == "__main__":
    main()
