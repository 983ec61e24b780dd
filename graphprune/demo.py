"""The built-in demo: train a small ResNet on real handwritten digits, prune it, check it.

Uses scikit-learn's bundled `load_digits` (1,797 real 8x8 digits, upsampled to 32x32), so it
needs no download. Prints channel groups, parameters, MACs, accuracy and latency before/after,
and the verification result against the oracle.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .report import count_macs, count_params, render

__all__ = ["load_digits_tensors", "train", "accuracy", "run_demo"]


def load_digits_tensors(size: int = 32, seed: int = 0):
    """(x_train, y_train, x_test, y_test): digits as [N, 3, size, size] floats, 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.3) / 0.4).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    i_tr, i_te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed,
                                  stratify=d.target)
    return x[i_tr], y[i_tr], x[i_te], y[i_te]


def train(model: nn.Module, x, y, epochs: int, lr: float = 2e-3, seed: int = 0, bs: int = 64):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(x) // bs))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(bs):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def latency_ms(model: nn.Module, x, repeats: int = 20) -> float:
    model.eval()
    for _ in range(3):
        model(x)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def run_demo(target=None, epochs: int = 4, finetune: int = 2, seed: int = 0) -> dict:
    """Train, prune (verified), fine-tune; print and return the before/after numbers."""
    from rich.table import Table

    import graphprune as gp
    from graphprune.zoo import resnet18

    torch.manual_seed(seed)
    target = target if target is not None else gp.Uniform(0.5)
    xtr, ytr, xte, yte = load_digits_tensors(seed=seed)
    print(f"data: sklearn digits, {len(xtr)} train / {len(xte)} test images (32x32)")
    model = resnet18(num_classes=10, width=0.25)
    t0 = time.perf_counter()
    train(model, xtr, ytr, epochs, seed=seed)
    print(f"trained ResNet-18 (width 0.25) for {epochs} epochs in {time.perf_counter() - t0:.0f}s")
    example = (xte[:8],)
    a = gp.analyze(model, example)
    print(f"analysis: {len(a.groups)} channel groups, {len(a.prunable_groups)} prunable")
    plan = gp.plan(a, target, "l1")
    slim = gp.apply(a, plan)
    acc_pruned = accuracy(slim, xte, yte)
    t0 = time.perf_counter()
    train(slim, xtr, ytr, finetune, lr=1e-3, seed=seed + 1)
    print(f"fine-tuned the pruned model for {finetune} epochs in {time.perf_counter() - t0:.0f}s")
    xb = xte[:64]
    res = {
        "params": (count_params(model), count_params(slim)),
        "macs": (count_macs(model, example), count_macs(slim, example)),
        "accuracy": (accuracy(model, xte, yte), accuracy(slim, xte, yte)),
        "latency_ms": (latency_ms(model, xb), latency_ms(slim, xb)),
        "accuracy_pruned_before_finetune": acc_pruned,
        "verify": slim.graphprune_report["verify"],
    }
    t = Table(title=f"graphprune demo: {target!r}, L1 importance")
    for c in ("", "original", "pruned", "ratio"):
        t.add_column(c)
    for k, fmt in (("params", "{:,}"), ("macs", "{:,}"), ("latency_ms", "{:.2f}")):
        o, p = res[k]
        t.add_row(k if k != "macs" else "MACs (8 images)", fmt.format(o), fmt.format(p),
                  f"{o / p:.2f}x" if p else "-")
    o, p = res["accuracy"]
    t.add_row("test accuracy", f"{100 * o:.1f}%", f"{100 * p:.1f}%",
              f"{100 * (p - o):+.1f} pt")
    print(render(t))
    print(f"accuracy right after pruning (before fine-tuning): {100 * acc_pruned:.1f}%")
    print(f"check: slimmed model vs masked oracle — {res['verify']}")
    return res
