"""Benchmark the 1xN linear kernel against dense ``F.linear`` on the ViT-B/16 linear shapes.

For every shape (qkv, attention proj, MLP fc1, fc2), rows M = 197 tokens x batch, thread count
and sparsity (N = 16), prints the dense time, the sparse time with the kernel's default mode and
with the channel-blocked ov mode turned off (``GP_1XN_OVB=0``, the kernel before it), the
speedups over dense and the new/old time ratio. All columns of a row are measured side by side:
shuffled rounds in one process, median of the repeats.

    python benchmarks/linear_1xn.py                     # batch 1 and 8, 1 and 2 threads
    python benchmarks/linear_1xn.py --batches 8 --threads 2
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.cost import pin_malloc
from graphprune.kernels import onexn
from graphprune.kernels.masks import mask_1xn

SHAPES = [("qkv", 768, 2304), ("proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768)]


def bench(name: str, cin: int, cout: int, rows: int, threads: int, sparsity: float,
          repeats: int) -> str:  # fmt: skip
    """One table row: dense vs 1x16 (default mode) vs 1x16 with GP_1XN_OVB=0."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    lin = nn.Linear(cin, cout)
    w, b = lin.weight.detach(), lin.bias.detach()
    sp = onexn.Linear1xN.from_dense(lin, mask_1xn(w, 16, sparsity), 16)
    x = torch.randn(rows, cin)
    with torch.no_grad():
        fns = [lambda: F.linear(x, w, b), lambda: sp(x), onexn.with_env(lambda: sp(x), "GP_1XN_OVB", "0")]
        ref = F.linear(x.double(), sp.to_dense().double(), b.double())
        for f in fns[1:]:
            err = float((f().double() - ref).abs().max() / ref.abs().max())
            assert err < 1e-5, f"{name}: sparse output differs from dense masked by {err:.2e}"
        rounds = onexn.time_rounds(fns, repeats=repeats, warm=True, shuffle=True)
    t = [statistics.median(r) for r in rounds]
    ratio = statistics.median(a / c for a, c in zip(rounds[1], rounds[2]))
    gf = 2 * rows * cin * cout * (1 - sparsity) / t[1] / 1e6
    return (f"| {name} {cin}->{cout} | {rows} | {threads} | {sparsity:.0%} | {t[0]:.2f} | {t[1]:.2f} "
            f"| **{t[0] / t[1]:.2f}x** | {t[2]:.2f} | {t[0] / t[2]:.2f}x | {ratio:.2f} | {gf:.0f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    if not onexn.available():
        raise SystemExit("the 1xN C++ kernel is not available here: nothing to time")
    pin_malloc()
    print(f"isa {onexn.isa()}, torch {torch.__version__}")
    print("| layer | M | threads | sparsity | dense ms | 1x16 ms | speedup | ovb off ms | speedup "
          "| new/old time | GFLOP/s kept |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        for threads in args.threads:
            for sparsity in args.sparsities:
                for name, cin, cout in SHAPES:
                    print(bench(name, cin, cout, 197 * batch, threads, sparsity, args.repeats),
                          flush=True)


if __name__ == "__main__":
    main()
