"""The torch.compile path end to end: `torch.compile(model, backend="graphprune")` on a
ResNet-50-shaped model whose conv weights already carry 1x16 patterns at 75% (as after
`BlockPruner` training; every conv but the 3-channel stem), against dense and `gp.sparsify`.

All columns compute the same function (checked: max relative error printed) and are timed side
by side in alternating rounds in one process: dense eager with BN folded in channels_last (the
fastest dense variant here), dense under inductor, the graphprune backend with inductor as the
inner compiler (default), with `inner="eager"`, with `fuse=False` (no BN folding / epilogue
fusion: the backend before it fused), and `gp.sparsify` of the same model (stem left dense, no
filter permutation).

    python benchmarks/backend_e2e.py [--batch 1 8] [--threads 2] [--rounds 10]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse

import graphprune as gp
from graphprune import cost as C
from graphprune.kernels import onexn
from graphprune.kernels.masks import mask_1xn
from graphprune.zoo import resnet50


def patterned_resnet50() -> nn.Module:
    """ResNet-50 (random weights) with every conv but the stem masked to 1x16 at 75%."""
    torch.manual_seed(0)
    model = resnet50().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels > 3:
                m.weight.mul_(mask_1xn(m.weight, 16, 0.75))
    return model


def _compiled(model, x, backend):
    torch._dynamo.reset()
    t = time.perf_counter()
    fn = torch.compile(model, backend=backend)
    with torch.no_grad():
        fn(x)
    return fn, time.perf_counter() - t


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    C.pin_malloc()
    model = patterned_resnet50()
    print(f"# torch.compile(backend='graphprune') on ResNet-50 @224 with 1x16 patterns at 75% — "
          f"{platform.machine()}, torch {torch.__version__}, kernel: "
          f"{'C++ ' + onexn.isa() if onexn.available() else 'reference'}; median of "
          f"{a.rounds} alternating rounds (ms); speedups vs dense BN-folded channels_last")
    print("| batch | threads | dense BN-folded cl | dense inductor | backend (inductor) | "
          "backend (eager) | backend fuse=False | gp.sparsify | backend speedup | "
          "gp.sparsify speedup | max rel err | compile s (backend / inductor) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for th in a.threads:
        torch.set_num_threads(th)
        for b in a.batch:
            x = torch.randn(b, 3, 224, 224)
            dense_cl = fx_fuse(model).to(memory_format=torch.channels_last)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            ind, t_ind = _compiled(fx_fuse(model), x, "inductor")
            back, t_back = _compiled(model, x, "graphprune")
            rep = gp.backend.last_report()
            n_sparse = sum("conv2d_1xn" in str(e.get("applied")) for e in rep.get("sparse", []))
            back_e, _ = _compiled(model, x, gp.backend(inner="eager"))
            back_nf, _ = _compiled(model, x, gp.backend(fuse=False))
            # (permute=False: reordering filters would regroup the existing blocks and re-mask)
            sp = gp.sparsify(model, (x,), "1x16", 0.75, skip=("conv1",), permute=False)

            def call(f, inp):
                def run():
                    with torch.no_grad():
                        return f(inp)

                return run

            fns = [call(dense_cl, x_cl), call(ind, x), call(back, x), call(back_e, x),
                   call(back_nf, x), call(sp, x)]  # fmt: skip
            with torch.no_grad():
                ref = model(x)
                err = max(float((f() - ref).abs().max() / ref.abs().max()) for f in fns)
            r = onexn.time_rounds(fns, repeats=a.rounds, shuffle=True)
            t = [statistics.median(z) for z in r]
            print(f"| {b} | {th} | {t[0]:.1f} | {t[1]:.1f} | {t[2]:.1f} | {t[3]:.1f} | {t[4]:.1f} "
                  f"| {t[5]:.1f} | **{t[0] / t[2]:.2f}x** ({n_sparse} 1xN layers) | "
                  f"{t[0] / t[5]:.2f}x | {err:.1e} | {t_back:.0f} / {t_ind:.0f} |", flush=True)


if __name__ == "__main__":
    main()
