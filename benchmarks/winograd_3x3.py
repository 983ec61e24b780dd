"""The 1xN Winograd F(2x2, 3x3) kernel against the direct 1xN kernel and dense ``F.conv2d``.

For the ResNet-50 3x3 stride-1 layers where the default rule picks Winograd (14x14 and 7x7;
28x28 for contrast), batch, threads and sparsity (N = 16; 0% keeps every block, i.e. a dense
Winograd, to show how much of the gain is the algorithm), prints the dense time (the faster of
NCHW and channels_last oneDNN), the speedups of the direct kernel (``GP_1XN_WINO=0``) and of
Winograd (``GP_1XN_WINO=2``), their time ratio, and what the default rule picks. All columns of
a row are measured side by side: shuffled warm rounds in one process, medians.

    python benchmarks/winograd_3x3.py                      # batch 1 and 8, 1 and 2 threads
    python benchmarks/winograd_3x3.py --batches 8 --threads 2 --sparsities 0.5
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

LAYERS = [(128, 28), (256, 14), (512, 7)]  # (channels in = out, image size), 3x3, pad 1


def bench(c: int, hw: int, batch: int, threads: int, sparsity: float, repeats: int) -> str:
    """One table row: dense (NCHW, channels_last) vs direct 1x16 vs Winograd 1x16."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    conv = nn.Conv2d(c, c, 3, padding=1)
    conv_cl = nn.Conv2d(c, c, 3, padding=1).to(memory_format=torch.channels_last)
    conv_cl.load_state_dict(conv.state_dict())
    sp = onexn.Conv2d1xN.from_dense(conv, mask_1xn(conv.weight.detach(), 16, sparsity), 16)
    x = torch.randn(batch, c, hw, hw)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    direct = onexn.with_env(lambda: sp(x), "GP_1XN_WINO", "0")
    wino = onexn.with_env(lambda: sp(x), "GP_1XN_WINO", "2")
    with torch.no_grad():
        ref = F.conv2d(x.double(), sp.to_dense().double(), sp.bias.double(), padding=1)
        for f in (direct, wino):
            err = float((f().double() - ref).abs().max() / ref.abs().max())
            assert err < 1e-5, f"{c}@{hw}: sparse output differs from dense masked by {err:.2e}"
        fns = [lambda: conv(x), lambda: conv_cl(x_cl), direct, wino]
        rounds = onexn.time_rounds(fns, repeats=repeats, warm=True, shuffle=True)
    d, dc, a, w = (statistics.median(r) for r in rounds)
    dense = min(d, dc)
    ratio = statistics.median(b / a for a, b in zip(rounds[2], rounds[3]))
    picks = "Winograd" if sp.uses_winograd(x.shape) else "direct"
    return (f"| {c}->{c} 3x3 @{hw} | {batch} | {threads} | {sparsity:.0%} | {dense:.2f} "
            f"| {dense / a:.2f}x | {dense / w:.2f}x | {ratio:.2f} | {picks} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    if not onexn.available():
        raise SystemExit("the 1xN C++ kernel is not available here: nothing to time")
    pin_malloc()
    print(f"isa {onexn.isa()}, torch {torch.__version__}")
    print("| layer | batch | threads | sparsity | dense ms | direct 1x16 | Winograd 1x16 "
          "| Winograd / direct time | default picks |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for c, hw in LAYERS:
        for batch in args.batches:
            for threads in args.threads:
                for sparsity in args.sparsities:
                    print(bench(c, hw, batch, threads, sparsity, args.repeats), flush=True)


if __name__ == "__main__":
    main()
