"""Issue 4, the GPU half: 2:4 (Sparse Tensor Cores, `to_sparse_semi_structured`) vs dense in
fp16, side by side in one process (alternating rounds, CUDA events, median).

1. Linear layers: the ViT-B/16 linears (tokens = 197 x batch) and the ResNet-50 1x1 convs as
   products over pixels; dense `F.linear` vs the 2:4 weight under cuSPARSELt (torch's default)
   and CUTLASS.
2. The im2col question for kxk convs: dense `F.conv2d` vs unfold + 2:4 linear on the ResNet-50
   3x3 shapes (the pass keeps kxk convs as masked dense weights unless this pays).
3. End to end: ViT-B/16 and ResNet-50 in fp16, dense vs `gp.sparsify(pattern="2:4")` (which
   converts the linears and 1x1 convs and verifies against the masked dense oracle).

    python benchmarks/semi24_gpu.py [--batch 1 8 32] [--rounds 20] [--dtype fp16|bf16]
    python benchmarks/semi24_gpu.py --smoke   # no GPU: tiny shapes, CPU fp32, checks the script

With --smoke (or without CUDA) nothing here measures 2:4: the sparse columns are masked dense
stand-ins on the CPU, and the tables say so. No GPU has been lent to this project so far, so
RESULTS.md has no numbers from this script yet.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import graphprune as gp
from graphprune.kernels.masks import mask_24
from graphprune.verify import max_rel_error
from graphprune.zoo import resnet50, vit

VIT_LINEARS = [(768, 2304, "qkv"), (768, 768, "proj"), (768, 3072, "fc1"), (3072, 768, "fc2")]
R50_1X1 = [(256, 64, 56), (64, 256, 56), (512, 128, 28), (1024, 256, 14), (2048, 512, 7)]
R50_3X3 = [(64, 56), (128, 28), (256, 14), (512, 7)]


SMOKE = False  # set by main: print no numbers (the timings of the CPU stand-ins mean nothing)


def _ms(t: float) -> str:
    return "–" if SMOKE else f"{t:.4f}"


def _x(a: float, b: float) -> str:
    return "–" if SMOKE else f"{a / b:.2f}x"


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Before timing: the sparse form computes what the masked dense one does."""
    tol = 1e-5 if a.dtype == torch.float32 else 2e-2
    err = max_rel_error(a, b)
    if err > tol:
        raise AssertionError(f"{what}: sparse and masked dense differ by {err:.2e} > {tol:g}")


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def time_rounds(fns, dev: str, rounds: int, inner: int = 10) -> list[float]:
    """Median ms per call of each fn; every round runs each fn `inner` times, in turn."""
    for f in fns:  # warm-up (cuSPARSELt picks its algorithm on first use)
        for _ in range(3):
            f()
    _sync(dev)
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            _sync(dev)
            if dev == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(inner):
                    f()
                b.record()
                torch.cuda.synchronize()
                times[i].append(a.elapsed_time(b) / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    f()
                times[i].append((time.perf_counter() - t0) * 1e3 / inner)
    return [statistics.median(t) for t in times]


def _sparse_weight(w: torch.Tensor, cutlass: bool):
    """The 2:4 weight as the kernels hold it; on the CPU (smoke) the masked dense stand-in."""
    w = (w * mask_24(w)).contiguous()
    if not w.is_cuda:
        return w
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        return to_sparse_semi_structured(w)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False


def linear_table(batches, dev, dt, rounds, smoke) -> None:
    print("\n| layer | M x K -> N | dense ms | 2:4 cuSPARSELt ms | 2:4 CUTLASS ms | "
          "speedup cuSPARSELt | speedup CUTLASS |")
    print("|---|---|---|---|---|---|---|")
    shapes = [(f"ViT-B {n}", 197 * b, k, o) for b in batches for k, o, n in VIT_LINEARS]
    shapes += [(f"R50 1x1 {c}->{k}@{hw}", b * hw * hw, c, k)
               for b in batches for c, k, hw in R50_1X1]
    if smoke:
        shapes = [(s[0], min(s[1], 256), min(s[2], 128), min(s[3], 128)) for s in shapes[:3]]
    for name, m, k, n in shapes:
        x = torch.randn(m, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
        ws = [_sparse_weight(w, cut) for cut in (False, True)]
        for sw in ws:
            _same(F.linear(x, sw), F.linear(x, w * mask_24(w)), name)
        fns = [lambda x=x, w=w: F.linear(x, w)] + [lambda s=s, x=x: F.linear(x, s) for s in ws]
        d, s1, s2 = time_rounds(fns, dev, rounds)
        print(f"| {name} | {m} x {k} -> {n} | {_ms(d)} | {_ms(s1)} | {_ms(s2)} | "
              f"{_x(d, s1)} | {_x(d, s2)} |")


def im2col_table(batches, dev, dt, rounds, smoke) -> None:
    print("\n| 3x3 conv | batch | dense conv ms (faster of NCHW, channels_last) | "
          "im2col + 2:4 linear ms | speedup |")
    print("|---|---|---|---|---|")
    for b in batches:
        for c, hw in (R50_3X3[:1] if smoke else R50_3X3):
            c, hw = (16, 8) if smoke else (c, hw)
            x = torch.randn(b, c, hw, hw, device=dev, dtype=dt)
            w = torch.randn(c, c, 3, 3, device=dev, dtype=dt) / (9 * c) ** 0.5
            # (K, C*9) in unfold's (c, r, s) order: 2:4 along the reduction axis
            ws = _sparse_weight(w.flatten(1), cutlass=False)

            def im2col(x=x, ws=ws, c=c, hw=hw, b=b):
                cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(b * hw * hw, 9 * c)
                return F.linear(cols, ws).reshape(b, hw, hw, c).permute(0, 3, 1, 2)

            wm = (w.flatten(1) * mask_24(w.flatten(1))).view_as(w)
            _same(im2col(), F.conv2d(x, wm, padding=1), f"im2col {c}@{hw}")
            xc, wc = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
            d1, d2, s = time_rounds([lambda x=x, w=w: F.conv2d(x, w, padding=1),
                                     lambda x=xc, w=wc: F.conv2d(x, w, padding=1), im2col],
                                    dev, rounds)
            d = min(d1, d2)  # the faster dense layout (NCHW or channels_last)
            print(f"| {c}->{c} @{hw} | {b} | {_ms(d)} | {_ms(s)} | {_x(d, s)} |")


def e2e_table(batches, dev, dt, rounds, smoke) -> None:
    print("\n| model | batch | layers 2:4 kernels / masked dense | dense ms | 2:4 ms | speedup |")
    print("|---|---|---|---|---|---|")
    models = {"ViT-B/16": (lambda: vit(img_size=32, embed_dim=64, depth=2, num_heads=2))
              if smoke else vit, "ResNet-50": (lambda: resnet50(width=0.25)) if smoke else resnet50}
    for name, build in models.items():
        torch.manual_seed(0)
        model = build().to(dev, dt).eval()
        for b in batches:
            x = torch.randn(b, 3, 32 if smoke else 224, 32 if smoke else 224, device=dev, dtype=dt)
            s = gp.sparsify(model, (x,), pattern="2:4", verify=(b == batches[0]))
            held = [r.get("held_as", "") for r in s.graphprune_report["layers"]]
            n24 = sum("semi_structured" in h for h in held)
            with torch.no_grad():
                d, t = time_rounds([lambda m=model, x=x: m(x), lambda s=s, x=x: s(x)], dev, rounds,
                                   inner=3)
            print(f"| {name} | {b} | {n24} / {len(held) - n24} | {_ms(d)} | {_ms(t)} | "
                  f"{_x(d, t)} |")


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (no 2:4)")
    args = ap.parse_args(argv)
    global SMOKE
    smoke = SMOKE = args.smoke or not torch.cuda.is_available()
    dev = "cpu" if smoke else "cuda"
    dt = torch.float32 if smoke else {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    batches = args.batch[:1] if smoke else args.batch
    rounds = 2 if smoke else args.rounds
    if smoke:
        print("# SMOKE RUN (no CUDA, or --smoke): CPU fp32, tiny shapes, '2:4' held as masked "
              "dense; every step runs, no number is printed (nothing here measures 2:4).")
    else:
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}; "
              f"median of {rounds} alternating rounds (CUDA events)")
    linear_table(batches, dev, dt, rounds, smoke)
    im2col_table(batches, dev, dt, rounds, smoke)
    e2e_table(batches, dev, dt, rounds, smoke)


if __name__ == "__main__":
    main()
