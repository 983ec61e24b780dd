"""1xN block sparsity on CPU: 75% of each 16-output block's input channels removed, multithreaded
C++ kernels (a minute or so; the first run JIT-builds the kernels).

    python examples/sparse_1xn_cpu.py
"""

from __future__ import annotations

import torch

import graphprune as gp
from graphprune.cli import bench
from graphprune.zoo import ZOO


def main() -> None:
    if not hasattr(gp, "sparsify"):
        print("gp.sparsify is not available in this build of graphprune")
        return
    threads = torch.get_num_threads()
    model, _ = ZOO["resnet50"]()
    x = torch.randn(8, 3, 64, 64)
    fast = gp.sparsify(model, x, pattern="1x16", sparsity=0.75)
    rep = fast.graphprune_report
    for layer in rep["layers"]:
        print(f"  {layer['layer']:<28} {layer['pattern']:<6} kept {layer['kept']:.2f} "
              f"{layer['why']}")
    print(f"{rep['sparsified']} layers sparsified; check: {rep.get('verify')}")
    dense_ms, sparse_ms = (r["median_ms"] for r in bench([model, fast], (x,), 3, 15, threads))
    print(f"dense {dense_ms:.2f} ms, 1x16 sparse {sparse_ms:.2f} ms ({threads} threads): "
          f"{dense_ms / sparse_ms:.2f}x")


if __name__ == "__main__":
    main()
