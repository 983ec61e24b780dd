"""The `torch.compile` backend after soft-mask training (a minute or two, most of it inductor).

Soft-mask training (`gp.SoftMaskPruner`) ends with channels whose consumer weights are zero; here
that end state is imitated by zeroing half of every prunable channel group (lowest L1). The
lossless backend finds those channels, removes them, checks the result against the unmodified
graph, and hands the slimmer graph to inductor. The compiled model equals the eager one.

    python examples/compile_backend.py
"""

from __future__ import annotations

import torch

import graphprune as gp
from graphprune.cli import bench
from graphprune.zoo import ZOO

torch.set_num_threads(1)


def zero_half_of_every_group(model: torch.nn.Module, x: torch.Tensor) -> None:
    """What soft-mask training leaves behind: dead channels, all-zero weights, same shapes."""
    a = gp.analyze(model, x)
    oracle = gp.mask(a, gp.plan(a, gp.Uniform(0.5), importance="l1"))
    model.load_state_dict(oracle.state_dict(), strict=False)


def main() -> None:
    model, _ = ZOO["resnet18"]()
    x = torch.randn(16, 3, 64, 64)
    zero_half_of_every_group(model, x)
    with torch.inference_mode():  # the backend rewrites inference graphs (see its docstring)
        eager = model(x)
        fast = torch.compile(model, backend="graphprune")  # lossless, inner="inductor"
        out = fast(x)
    rep = gp.backend.last_report()
    print(f"backend: {rep['action']}; channels removed per group {rep['removed_channels']}")
    print(f"graph constants {rep['params_before']:,} -> {rep['params_after']:,} elements")
    print("check:", rep["verify"])
    print(f"max |compiled - eager| = {(out - eager).abs().max():.2e}")
    plain = torch.compile(model, backend="inductor")
    t_eager, t_plain, t_fast = (r["median_ms"] for r in bench([model, plain, fast], (x,), 3, 20))
    print(f"eager {t_eager:.2f} ms, inductor {t_plain:.2f} ms, graphprune + inductor "
          f"{t_fast:.2f} ms (median of 20 interleaved calls, 1 thread)")
    # the rewritten graph holds a snapshot of the weights: later changes are not seen
    with torch.no_grad():
        model.fc.weight.mul_(2)
    with torch.inference_mode():
        print("after changing fc.weight, compiled still equals the old eager output:",
              torch.allclose(fast(x), eager, atol=1e-5), "(torch._dynamo.reset() to recompile)")


if __name__ == "__main__":
    main()
