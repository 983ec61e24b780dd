"""A/B timing of the 1xN kernel: the working tree's onexn.cpp vs the one at a git revision.

Both builds run the same packed weights on the same input in the same alternating rounds (so
machine drift cancels), outputs are checked first: bit-equal, or within 1e-5 relative (noted)
when the change moves some pixels to a path with another summation order. Use it to show that a
kernel change is faster, or that it costs nothing.

    python benchmarks/kernel_ab.py --rev HEAD~1 [--threads 2] [--batch 8] [--n 16]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import tempfile

import torch
from torch import nn
from torch.utils import cpp_extension

from graphprune.cost import pin_malloc
from graphprune.kernels import onexn
from graphprune.kernels.masks import mask_1xn

try:
    from kernels_1xn import LAYERS
except ImportError:  # run as a module from the repository root
    from benchmarks.kernels_1xn import LAYERS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _build_rev(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:graphprune/kernels/onexn.cpp"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    d = pathlib.Path(tempfile.mkdtemp(prefix="gp_ab_"))
    (d / "onexn_rev.cpp").write_text(src)
    name = "gp_onexn_ab_" + subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT,
                                           check=True, capture_output=True,
                                           text=True).stdout.strip()  # fmt: skip
    return cpp_extension.load(name=name, sources=[str(d / "onexn_rev.cpp")],
                              extra_cflags=["-O3", "-march=native", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], verbose=False)  # fmt: skip


def _takes_epilogue(ext) -> bool:
    """Kernels from before the fused epilogue take no (residual, relu) arguments. (Found once:
    a failed pybind call formats every argument, tensors included, into its error message.)"""
    return "arg14: bool" in (ext.conv2d_1xn.__doc__ or "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default="HEAD~1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--only", nargs="+", default=[],
                    help="layers whose name contains one of these strings (e.g. 3x3 @7)")
    args = ap.parse_args()
    pin_malloc()
    old, new = _build_rev(args.rev), onexn._ext()
    if new is None:
        raise SystemExit("the working tree's kernel does not build")
    old_epi = _takes_epilogue(old)
    torch.set_num_threads(args.threads)
    print(f"# kernel at {args.rev} vs working tree, batch {args.batch}, {args.threads} threads, "
          f"1x{args.n}; median of {2 * args.repeats} calls each, alternating")
    print("| layer | sparsity | old ms | new ms | new / old |")
    print("|---|---|---|---|---|")
    for layer in LAYERS:
        if args.only and not any(o in layer.name for o in args.only):
            continue
        torch.manual_seed(0)
        conv = nn.Conv2d(layer.cin, layer.cout, layer.k, layer.stride, layer.k // 2)
        x = torch.randn(args.batch, layer.cin, layer.hw, layer.hw)
        p = layer.k // 2
        for sp in args.sparsities:
            m = onexn.Conv2d1xN.from_dense(conv, mask_1xn(conv.weight.detach(), args.n, sp), args.n)
            a = (m.values.detach(), m.indices, m.bias.detach(), layer.stride, layer.stride, p, p,
                 1, 1, args.n, layer.k, layer.k)  # fmt: skip

            ao = a + ((None, False) if old_epi else ())

            def fo(a=ao, x=x):
                return old.conv2d_1xn(x, *a)

            def fn(a=a, x=x):
                return new.conv2d_1xn(x, *a, None, False)

            yo, yn = fo(), fn()
            if not torch.equal(yo, yn):
                # a change of path may change the summation order of some pixels (e.g. an
                # image's last few pixels on the ov tail kernel): rounding, not a bug
                rel = float((yo - yn).abs().max() / yo.abs().max())
                if rel > 1e-5:
                    raise SystemExit(f"{layer.name}: outputs differ (rel {rel:.2e})")
                print(f"(note: {layer.name} {sp:.0%} not bit-equal, rel diff {rel:.1e})")
            r = onexn.time_rounds([fo, fn, fo, fn], repeats=args.repeats)
            to, tn = statistics.median(r[0] + r[2]), statistics.median(r[1] + r[3])
            print(f"| {layer.name} | {sp:.0%} | {to:.3f} | {tn:.3f} | {tn / to:.3f} |")


if __name__ == "__main__":
    main()
