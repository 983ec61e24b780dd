"""One-shot pruning to a latency target on a zoo model (about a minute on a laptop CPU).

Measures a latency table for the model's conv/linear layers on this machine, lets the solver
choose how many channels each group keeps so the predicted latency is at most 70% of the
original, slims and verifies the model, then times both for real.

    python examples/prune_to_latency.py
"""

from __future__ import annotations

import torch

import graphprune as gp
from graphprune.allocate import cost_layers
from graphprune.cost import LatencyTable, measure_latency
from graphprune.zoo import ZOO

THREADS = 1
torch.set_num_threads(THREADS)


def measure_table(a: gp.Analysis) -> LatencyTable:
    """Median latency of every conv/linear signature of the model on a grid of channel counts."""
    requests: dict = {}
    for layer in cost_layers(a):
        ci, co = requests.get(layer.sig, (0, 0))
        requests[layer.sig] = (max(ci, layer.c_in), max(co, layer.c_out))
    return LatencyTable.measure(requests, round_to=8, repeats=3, overheads=False)


def main() -> None:
    model, _ = ZOO["resnet18"]()  # ResNet-18 (width 0.25) with deterministic weights
    x = torch.randn(16, 3, 64, 64)
    a = gp.analyze(model, x)
    print(a)
    table = measure_table(a)
    table.save("cpu_table.json")  # reuse later: LatencyTable.load("cpu_table.json")
    slim = gp.prune(model, x, target=gp.Latency(0.7, table=table), round_to=8)
    print(slim.graphprune_plan.summary())
    print("check:", slim.graphprune_report["verify"])
    before, after = gp.stats(model, x), gp.stats(slim, x)
    t0, _ = measure_latency(model, (x,), threads=THREADS)
    t1, _ = measure_latency(slim, (x,), threads=THREADS)
    print(f"params {before['params']:,} -> {after['params']:,}; MACs {before['macs']:,} -> "
          f"{after['macs']:,}")
    meta = slim.graphprune_plan.meta
    print(f"latency predicted {meta['predicted_fraction']:.2f} of the original; measured "
          f"{t0:.2f} ms -> {t1:.2f} ms ({t1 / t0:.2f}) with {THREADS} thread(s)")


if __name__ == "__main__":
    main()
