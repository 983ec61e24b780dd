"""Training-time pruning in your own loop, on sklearn's handwritten digits (CPU, about a minute).

    python examples/train_digits.py                # all four methods
    python examples/train_digits.py --method smcp  # smcp | subp | asp | hybrid

* smcp: soft channel masks re-solved toward half the FLOPs while fine-tuning (SMCP);
* subp: soft uniform 1x16 block masks trained from scratch (SUBP), exported to 1x16 ops;
* asp: 2:4 masks computed once and held while fine-tuning (Apex ASP workflow);
* hybrid: filter pruning ranked by L1 after 2:4, fine-tune, 2:4, fine-tune.
Every export is verified against the masked model it came from.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import graphprune as gp
from graphprune.demo import accuracy, load_digits_tensors
from graphprune.zoo import alexnet, resnet18

X_TRAIN, Y_TRAIN, X_TEST, Y_TEST = load_digits_tensors(size=32)
EXAMPLE = X_TEST[:8]


def train(model, epochs, opt=None, pruner=None, lr=2e-3, per_epoch=None):
    """A plain loop; the pruners only add `pruner.step()` (and `epoch_end()` for SUBP)."""
    opt = opt or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(X_TRAIN)).split(64):
            loss = F.cross_entropy(model(X_TRAIN[idx]), Y_TRAIN[idx])
            opt.zero_grad()
            loss.backward()
            if pruner is not None:
                pruner.step()
            opt.step()
        if per_epoch is not None:
            per_epoch()
    return model


def acc(model) -> str:
    return f"{100 * accuracy(model, X_TEST, Y_TEST):.1f}%"


def smcp(dense):
    model = copy.deepcopy(dense)
    epochs = 6
    pruner = gp.SoftMaskPruner(model, EXAMPLE, target=gp.Flops(0.5), importance="taylor",
                               schedule=gp.Ramp(start=0.0, end=0.5, every=8),
                               total_steps=epochs * -(-len(X_TRAIN) // 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True)
    train(model, epochs, opt=opt, pruner=pruner)
    slim = pruner.export()
    full, kept = (gp.stats(m, EXAMPLE)["macs"] for m in (dense, slim))
    print(f"SMCP: {acc(slim)} at {kept / full:.2f} of the MACs "
          f"({slim.graphprune_report['verify']})")


def subp():
    model = resnet18(10, 0.25)
    pruner = gp.BlockPruner(model, EXAMPLE, pattern="1x16", sparsity=0.75, criterion="bpar",
                            start_epoch=0, end_epoch=6)
    train(model, 10, pruner=pruner, per_epoch=pruner.epoch_end)
    fast = pruner.export()
    print(f"SUBP 1x16 at 75% from scratch: {acc(fast)} ({fast.graphprune_report['verify']})")


def asp(dense):
    model = copy.deepcopy(dense)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = gp.Sparse24Trainer(model, opt, EXAMPLE)
    print(f"2:4 masked: {acc(model)} (kept magnitude {trainer.kept_magnitude():.2f}; "
          f"{trainer.permutation})")
    train(model, 3, opt=opt)
    out = trainer.export()
    print(f"2:4 retrained: {acc(out)} (dense {acc(dense)}; {out.graphprune_report['verify']})")


def hybrid():
    dense = train(alexnet(10, 0.5, 256), 8)
    res = gp.hybrid_pipeline(dense, EXAMPLE, train_fn=lambda m, opt: train(m, 2, opt=opt),
                             target=gp.Uniform(0.4), importance="hybrid")
    print(f"hybrid (40% filters, then 2:4): dense {acc(dense)}, filter-pruned {acc(res.pruned)}, "
          f"final {acc(res.sparse)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="all", choices=["all", "smcp", "subp", "asp", "hybrid"])
    m = ap.parse_args().method
    torch.manual_seed(0)
    if m in ("all", "smcp", "asp"):
        dense = train(resnet18(10, 0.25), 8)
        print(f"dense ResNet-18 (width 0.25): {acc(dense)}")
        if m in ("all", "smcp"):
            smcp(dense)
        if m in ("all", "asp"):
            asp(dense)
    if m in ("all", "subp"):
        subp()
    if m in ("all", "hybrid"):
        hybrid()


if __name__ == "__main__":
    main()
