"""Issue 4 end-to-end: a ResNet-50-shaped model with every eligible conv as 1x16 at 75% sparsity,
dense vs sparse measured side by side (same process, same threads, alternating rounds).

Columns: the dense model as the user has it; the dense model with BatchNorm folded into the convs
(`torch.fx.experimental.optimization.fuse`, the fair dense baseline for an inference rewrite);
that model again in channels_last memory format with a channels_last input (the fastest dense
variant here: oneDNN's NHWC convs and max-pool are faster than NCHW ones); the sparse model with the 1xN kernels only (`fuse=False`); and `gp.sparsify`'s default, where the
`fuse_epilogue` pass also folds BatchNorm and fuses residual add + ReLU into the kernels' stores
and `pool_layout` runs the stem max-pool in channels_last.

    python benchmarks/sparse_e2e.py [--batch 1 8] [--threads 1 2] [--pin-malloc] [--no-speed-check]
    python benchmarks/sparse_e2e.py --model vit_b16 ...   # ViT-B/16: Linear1xN, no BN to fold

For ViT-B/16 the two BN-folded columns are not printed (it has LayerNorms, nothing to fold, and
its activations after the patch embedding are 3-D, so there is no channels_last variant).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import warnings

import torch
from torch.fx.experimental.optimization import fuse as fx_fuse

import graphprune as gp
from graphprune import cost as C
from graphprune.kernels import onexn
from graphprune.zoo import resnet50, vit_b16


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pattern", default="1x16")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--model", choices=["resnet50", "vit_b16"], default="resnet50")
    ap.add_argument("--no-speed-check", action="store_true")
    ap.add_argument("--pin-malloc", action="store_true",
                    help="fix glibc malloc thresholds first (cost.pin_malloc: no page faults)")
    args = ap.parse_args()
    if args.pin_malloc:
        print("# malloc pinned:", C.pin_malloc())
    torch.manual_seed(0)
    cnn = args.model == "resnet50"
    model = (resnet50() if cnn else vit_b16()).eval()
    if cnn:
        folded = fx_fuse(model)
        folded_cl = fx_fuse(model).to(memory_format=torch.channels_last)
    print(f"# {args.pattern} at {args.sparsity:.0%} end to end, {args.model} @224 — "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"kernel: {'C++ ' + onexn.isa() if onexn.available() else 'reference (no C++)'}; "
          f"median of {args.rounds} alternating rounds")
    if cnn:
        print("| batch | threads | layers sparse / dense | dense ms | dense BN-folded ms | "
              "dense BN-folded channels_last ms | sparse ms (kernels only) | "
              "sparse ms (default: + fusion, pool layout) | speedup vs dense | vs BN-folded | "
              "vs BN-folded channels_last |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    else:
        print("| batch | threads | layers sparse / dense | dense ms | sparse ms (kernels only) | "
              "sparse ms (default: + fusion) | speedup vs dense |")
        print("|---|---|---|---|---|---|---|")
    for b in args.batch:
        x = torch.randn(b, 3, 224, 224)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        for t in args.threads:
            torch.set_num_threads(t)
            kw = dict(pattern=args.pattern, sparsity=args.sparsity, threads=t,
                      check_speed=not args.no_speed_check, verify=(b == 1))
            plain = gp.sparsify(model, (x,), fuse=False, **kw)
            fused = gp.sparsify(model, (x,), **kw)
            rep = fused.graphprune_report
            n_dense = sum(1 for r in rep["layers"] if r["pattern"] == "dense")
            if not cnn:
                fns = [lambda m=m, x=x: m(x) for m in (model, plain, fused)]
                d, p, s = (statistics.median(ts) for ts in
                           onexn.time_rounds(fns, warmup=3, repeats=args.rounds))
                print(f"| {b} | {t} | {rep['sparsified']} / {n_dense} | {d:.1f} | {p:.1f} | "
                      f"{s:.1f} | **{d / s:.2f}x** |")
                continue
            fns = [lambda m=m, x=x: m(x) for m in (model, folded)]
            fns.append(lambda x_cl=x_cl: folded_cl(x_cl))
            fns += [lambda m=m, x=x: m(x) for m in (plain, fused)]
            times = onexn.time_rounds(fns, warmup=3, repeats=args.rounds)
            d, f, fc, p, s = (statistics.median(ts) for ts in times)
            print(f"| {b} | {t} | {rep['sparsified']} / {n_dense} | {d:.1f} | {f:.1f} | {fc:.1f} | "
                  f"{p:.1f} | {s:.1f} | **{d / s:.2f}x** | {f / s:.2f}x | {fc / s:.2f}x |")


if __name__ == "__main__":
    main()
