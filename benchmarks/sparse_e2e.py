"""Issue 4 end-to-end: a ResNet-50-shaped model with every eligible conv as 1x16 at 75% sparsity,
dense vs sparse measured side by side (same process, same threads).

    python benchmarks/sparse_e2e.py [--batch 1] [--threads 1 2] [--no-speed-check]
"""

from __future__ import annotations

import argparse
import platform
import warnings

import torch

import graphprune as gp
from graphprune import cost as C
from graphprune.kernels import onexn
from graphprune.zoo import resnet50


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pattern", default="1x16")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--no-speed-check", action="store_true")
    ap.add_argument("--pin-malloc", action="store_true",
                    help="fix glibc malloc thresholds first (cost.pin_malloc: no page faults)")
    args = ap.parse_args()
    if args.pin_malloc:
        print("# malloc pinned:", C.pin_malloc())
    torch.manual_seed(0)
    model = resnet50().eval()
    print(f"# {args.pattern} at {args.sparsity:.0%} end to end, ResNet-50 @224 — "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"kernel: {'C++ ' + onexn.isa() if onexn.available() else 'reference (no C++)'}")
    print("| batch | threads | layers sparse / dense | dense ms | sparse ms | speedup |")
    print("|---|---|---|---|---|---|")
    for b in args.batch:
        x = torch.randn(b, 3, 224, 224)
        for t in args.threads:
            torch.set_num_threads(t)
            s = gp.sparsify(model, (x,), pattern=args.pattern, sparsity=args.sparsity,
                            check_speed=not args.no_speed_check, threads=t, verify=(b == 1))
            rep = s.graphprune_report
            n_dense = sum(1 for r in rep["layers"] if r["pattern"] == "dense")
            d, _ = C.measure_latency(model, (x,), warmup=3, repeats=10, threads=t)
            sp, _ = C.measure_latency(s, (x,), warmup=3, repeats=10, threads=t)
            print(f"| {b} | {t} | {rep['sparsified']} / {n_dense} | {d:.1f} | {sp:.1f} | "
                  f"{d / sp:.2f}x |")


if __name__ == "__main__":
    main()
