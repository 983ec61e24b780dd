"""Does a bf16 1xN kernel pay on this CPU? Dense bf16 vs dense fp32 vs our fp32 1x16 kernel.

The issue asks for "fp32 first, bf16 if it pays". A bf16 1xN kernel built like the fp32 one
(AVX-512 BF16 `vdpbf16ps`: two bf16 multiply-adds per fp32 lane) can at best run twice as fast
as the fp32 kernel. The question is whether that beats dense bf16, which oneDNN runs on AMX
tiles where the CPU has them. This prints, per ResNet-50 layer, dense fp32 and dense bf16 (each
the faster of NCHW and channels_last), the fp32 1x16 kernel at 75%, and that kernel's time
halved (the best a bf16 1xN kernel could do) against dense bf16. All in alternating rounds.

    python benchmarks/bf16_dense.py [--batches 1 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.cost import pin_malloc
from graphprune.kernels import onexn
from graphprune.kernels.masks import mask_1xn

try:
    from kernels_1xn import LAYERS
except ImportError:  # run as a module from the repository root
    from benchmarks.kernels_1xn import LAYERS


def _flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "none"


def _time_layer(layer, b: int, repeats: int) -> tuple[float, float, float]:
    """(dense fp32, dense bf16, 1x16@75% fp32) ms; dense = the faster of NCHW / channels_last."""
    torch.manual_seed(0)
    conv = nn.Conv2d(layer.cin, layer.cout, layer.k, layer.stride, layer.k // 2)
    w, bias = conv.weight.detach(), conv.bias.detach()
    x = torch.randn(b, layer.cin, layer.hw, layer.hw)
    xc, wc = (v.contiguous(memory_format=torch.channels_last) for v in (x, w))
    xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
    xbc, wbc = xc.bfloat16(), wc.bfloat16()
    sp = onexn.Conv2d1xN.from_dense(conv, mask_1xn(w, 16, 0.75), 16)
    a = (conv.stride, conv.padding)
    fns = [lambda: F.conv2d(x, w, bias, *a), lambda: F.conv2d(xc, wc, bias, *a),
           lambda: F.conv2d(xb, wb, bb, *a), lambda: F.conv2d(xbc, wbc, bb, *a),
           lambda: sp(x)]  # fmt: skip
    m = [statistics.median(r) for r in onexn.time_rounds(fns, repeats=repeats)]
    return min(m[0], m[1]), min(m[2], m[3]), m[4]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    pin_malloc()
    print(f"# dense bf16 vs fp32 vs 1x16@75% fp32 — {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, bf16 features: {_flags()}, kernel "
          f"{onexn.isa() if onexn.available() else 'reference'}")
    print("| layer | batch | threads | dense fp32 ms | dense bf16 ms | bf16/fp32 speedup | "
          "1x16@75% fp32 ms | best bf16 1xN (half) ms | best bf16 1xN vs dense bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in args.batches:
        for t in args.threads:
            torch.set_num_threads(t)
            for layer in LAYERS:
                d32, d16, s32 = _time_layer(layer, b, args.repeats)
                print(f"| {layer.name} | {b} | {t} | {d32:.3f} | {d16:.3f} | {d32 / d16:.2f}x | "
                      f"{s32:.3f} | {s32 / 2:.3f} | {d16 / (s32 / 2):.2f}x |")


if __name__ == "__main__":
    main()
