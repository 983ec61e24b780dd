"""Training-time pruners: SMCP soft masks, SUBP 1xN blocks, 2:4 retraining, hybrid ranking, DDP."""

from __future__ import annotations

import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.importance import CRITERIA
from graphprune.kernels.masks import is_1xn, is_24, kept_1xn
from graphprune.kernels.onexn import Conv2d1xN
from graphprune.training import FixedMaskTrainer, filter_l1
from graphprune.training.block import draw_mask
from graphprune.training.soft_mask import unsafe_groups


class Net(nn.Module):
    """Four layers, no BatchNorm (so DDP equals one process on the global batch)."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.b2 = nn.BatchNorm2d(16) if bn else nn.Identity()
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        x = F.relu(self.c3(x))
        return self.fc(torch.flatten(x, 1))


class LNMlp(nn.Module):
    """A hidden group normalised by LayerNorm (soft masks cannot remove it) and a plain one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)

    def forward(self, x):
        return self.c(F.relu(self.b(self.ln(self.a(x)))))


def _data(n=32, seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, hw, hw, generator=g), torch.randint(0, 10, (n,), generator=g)


def _train(model, pruner, x, y, steps, lr=0.05, bs=16, hook=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for s in range(steps):
        i = slice((s * bs) % len(x), (s * bs) % len(x) + bs)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        if pruner is not None:
            pruner.step()
        opt.step()
        if hook is not None:
            hook(s)
    return opt


# ---- SMCP ----------------------------------------------------------------------------------------


def test_ramp_schedule():
    """Fractions resolve against total_steps; solves happen every `every` steps and at the end."""
    r = gp.Ramp(start=0.1, end=0.5, every=10, shape="linear")
    assert r.steps(100) == (10, 50)
    assert r.progress(5, 100) == 0.0 and r.progress(30, 100) == 0.5 and r.progress(80, 100) == 1
    assert [t for t in range(101) if r.solve_at(t, 100)] == [10, 20, 30, 40, 50]
    assert gp.Ramp(0.0, 1.0, shape="exp").progress(10, 100) > 0.1  # exponential: fast early
    with pytest.raises(ValueError):
        gp.Ramp(0.1, 0.5).steps(None)


def test_soft_mask_budget_export_and_straight_through():
    """FLOPs budget met at the end of the ramp; masked inputs still get gradients; export verifies
    against the oracle and against the soft-masked user model."""
    torch.manual_seed(0)
    model, (x, y) = Net(bn=True), _data(64, hw=8)
    pr = gp.SoftMaskPruner(model, x[:4], target=gp.Flops(0.5),
                           schedule=gp.Ramp(start=2, end=6, every=2), total_steps=8)
    _train(model, pr, x, y, 8)
    assert pr.history[-1]["step"] == 6 and pr.history[-1]["predicted_fraction"] <= 0.5 + 1e-9
    assert any(not m.all() for m in pr.masks.values())
    # the user's conv sees zeros at masked input channels, yet its original weight gets gradient
    c = next(c for c in pr.consumers if (~pr.alive[c.labels]).any())
    mod = model.get_submodule(c.name.rsplit(".", 1)[0])
    dead = torch.as_tensor(~pr.alive[c.labels])
    assert mod.weight[:, dead].abs().sum() == 0
    F.cross_entropy(model(x[:16]), y[:16]).backward()
    assert mod.weight_orig.grad[:, dead].abs().sum() > 0
    slim = pr.export()
    assert slim.graphprune_report["vs_soft_masked_model"] < 1e-4
    full, kept = gp.stats(pr._clean, x[:4])["macs"], gp.stats(slim, x[:4])["macs"]
    assert kept <= 0.5 * full * 1.01


class _ToyTable:
    """A latency table stand-in: cost c_in * c_out * kernel taps (no measuring in tests)."""

    def lookup(self, sig, ci, co):
        return float(ci * co * int(np.prod(sig.kernel or (1,))))

    def lookup_grid(self, sig, ci, co):
        return np.outer(ci, co).astype(float) * int(np.prod(sig.kernel or (1,)))


def test_soft_mask_latency_target_ramps_with_its_table():
    """A Latency target keeps its table through the ramp; the final solve meets the budget."""
    torch.manual_seed(0)
    model, (x, y) = Net(), _data(32)
    pr = gp.SoftMaskPruner(model, x[:4], target=gp.Latency(0.6, table=_ToyTable()),
                           schedule=gp.Ramp(start=1, end=3, every=1), total_steps=4)
    _train(model, pr, x, y, 4)
    assert [h["step"] for h in pr.history] == [1, 2, 3]
    fr = [float(h["target"].split("=")[1].rstrip(")")) for h in pr.history]
    assert fr[0] == 1.0 and fr[1] > 0.6 and fr[2] == pytest.approx(0.6)
    assert pr.history[-1]["predicted_fraction"] <= 0.6 + 1e-9


def test_soft_mask_channels_return():
    """A re-solve starts from all channels: channels masked earlier come back when they score."""
    torch.manual_seed(0)
    model, (x, _y) = Net(), _data(32)
    pr = gp.SoftMaskPruner(model, x[:4], target=gp.Flops(0.5), schedule=gp.Ramp(0, 1, 1),
                           total_steps=10)
    pr.t = 5
    g = max(pr.a.prunable_groups, key=lambda g: g.size)
    pr.scores[:] = 1.0
    pr.scores[g.classes] = np.linspace(0.01, 0.5, g.size)  # low channels go first
    pr.resolve()
    first = pr.masks[g.id].copy()
    assert not first.all()
    pr.scores[g.classes] = np.linspace(0.5, 0.01, g.size)  # now the other end is weak
    pr.resolve()
    back = pr.masks[g.id] & ~first
    assert back.any(), "no masked channel returned"


def test_soft_mask_skips_channel_mixing_groups():
    """A group normalised by LayerNorm is frozen; the export still equals the soft model."""
    torch.manual_seed(0)
    model, x = LNMlp(), torch.randn(16, 8)
    pr = gp.SoftMaskPruner(model, x[:2], target=gp.Params(0.6), schedule=gp.Ramp(0, 1, 1),
                           total_steps=1)
    ln_group = next(g.id for g in pr.a.groups if any(m.startswith("ln.") for m in g.members))
    assert ln_group in unsafe_groups(pr.a)
    loss = model(x).pow(2).mean()
    loss.backward()
    pr.step()
    assert pr.masks[ln_group].all() and not all(m.all() for m in pr.masks.values())
    assert pr.export().graphprune_report["vs_soft_masked_model"] < 1e-4


def test_soft_mask_bn_rescale():
    """With bn_rescale, the norm feeding a shrunk group scales its kept channels by old/new."""
    torch.manual_seed(0)
    model, (x, _) = Net(bn=True), _data(8)
    pr = gp.SoftMaskPruner(model, x[:4], target=gp.Flops(0.5), schedule=gp.Ramp(0, 1, 1),
                           total_steps=10, bn_rescale=True)
    g = next(g for g in pr.a.prunable_groups if any(m.startswith("b2.") for m in g.members))
    before = model.b2.weight.detach().clone()
    pr.t = 5
    pr.scores[:] = 1.0
    pr.scores[g.classes] = np.linspace(0.01, 0.1, g.size)
    pr.resolve()
    kept = pr.masks[g.id]
    assert not kept.all()
    ratio = g.size / kept.sum()
    assert torch.allclose(model.b2.weight[torch.as_tensor(kept)], before[kept] * ratio)
    assert torch.equal(model.b2.weight[torch.as_tensor(~kept)], before[~kept])


# ---- SUBP ----------------------------------------------------------------------------------------


def test_block_pruner_ramp_masks_and_export():
    """Cubic ramp; masks exactly uniform 1xN at every epoch; export emits verified 1xN ops."""
    torch.manual_seed(0)
    model, (x, y) = Net(), _data(32)
    bp = gp.BlockPruner(model, x[:4], pattern="1x4", sparsity=0.75, criterion="bpar",
                        start_epoch=0, end_epoch=3)
    assert set(bp.layers.values()) == {"c2", "c3"}  # first and last stay dense
    assert bp.sparsity(1) == pytest.approx(0.75 / 27) and bp.sparsity(5) == 0.75
    for _ in range(4):
        _train(model, bp, x, y, 2)
        bp.epoch_end()
        model(x[:2])  # the redraw happens at the next training forward
        for name in bp.layers.values():
            m = bp.mask_of(name)
            c = m.shape[1]
            assert is_1xn(m, 4)
            assert int(m.reshape(4, 4, c, -1)[:, 0, :, 0].sum(1)[0]) == kept_1xn(c, bp.sparsity())
    out = bp.export()
    assert isinstance(out.get_submodule("c2"), Conv2d1xN)
    assert out.graphprune_report["vs_soft_masked_model"] < 1e-4
    bp.remove()  # baked: the user's plain model now holds the 1xN zeros
    assert isinstance(model.c2.weight, nn.Parameter) and is_1xn(model.c2.weight != 0, 4)
    assert torch.allclose(model.eval()(x[:4]), out(x[:4]), atol=1e-5)


def test_block_regrowth_and_decay():
    """Regrowth swaps some top blocks for sampled ones; pruned weights get the decay term."""
    w = torch.randn(16, 32, 3, 3)
    s = torch.arange(32.0).repeat(4, 1)
    top = draw_mask(w, 4, 0.5, s, regrow=0.0)
    grown = draw_mask(w, 4, 0.5, s, regrow=0.5, generator=torch.Generator().manual_seed(0))
    assert is_1xn(grown, 4) and grown.sum() == top.sum() and not torch.equal(grown, top)
    torch.manual_seed(0)
    model, (x, y) = Net(), _data(16)
    bp = gp.BlockPruner(model, x[:4], pattern="1x4", sparsity=0.5, start_epoch=0, end_epoch=0,
                        pruned_decay=1.0)
    F.cross_entropy(model(x), y).backward()
    w = model.c2.weight_orig
    g0 = w.grad.clone()
    bp.step()
    off = ~bp.mask_of("c2")
    assert torch.allclose(w.grad[off], g0[off] + w.detach()[off])
    assert torch.equal(w.grad[~off], g0[~off])


# ---- 2:4 -----------------------------------------------------------------------------------------


def test_sparse24_trainer_keeps_pattern_and_exports():
    """2:4 holds through Adam steps (momentum cannot revive weights); export verifies."""
    torch.manual_seed(0)
    model, (x, y) = Net(bn=True), _data(32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model.eval()(x[:4]).detach()
    s24 = gp.Sparse24Trainer(model, opt, x[:4])
    assert "verified" in s24.permutation
    for step in range(4):
        model.train()
        F.cross_entropy(model(x[step * 8:(step + 1) * 8]), y[:8]).backward()
        opt.step()
        opt.zero_grad()
        for name in s24.masks:
            assert is_24(model.get_parameter(name) != 0)
    assert set(s24.masks) == {"c2.weight", "c3.weight", "fc.weight"}  # C_in % 4 == 0
    out = s24.export()
    assert out.graphprune_report["vs_training_model"] < 1e-4
    assert before.shape == out(x[:4]).shape


def test_permutation_raises_kept_magnitude():
    """The ASP search keeps at least as much magnitude as the unpermuted mask."""
    torch.manual_seed(0)
    m1 = Net()
    m2 = Net()
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(2, 3, 8, 8)
    plain = gp.Sparse24Trainer(m1, torch.optim.SGD(m1.parameters(), 0.1), x, permute=False)
    perm = gp.Sparse24Trainer(m2, torch.optim.SGD(m2.parameters(), 0.1), x, permute=True)
    assert perm.kept_magnitude() >= plain.kept_magnitude()


# ---- hybrid --------------------------------------------------------------------------------------


def test_hybrid_ranks_filters_after_24():
    """Dense L1 prefers the flat filter; after 2:4 the concentrated filter wins."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 2, bias=False)
            self.b = nn.Linear(2, 3, bias=False)

        def forward(self, x):
            return self.b(self.a(x))

    m = Two()
    with torch.no_grad():
        m.a.weight.copy_(torch.tensor([[1.0] * 8, [1.5, 1.5, 0, 0] * 2]))
        m.b.weight.fill_(1.0)
    a = gp.analyze(m, torch.randn(2, 8))
    gid = next(g.id for g in a.prunable_groups)
    assert filter_l1(a)[gid].argmax() == 0
    assert CRITERIA["hybrid"](a)[gid].argmax() == 1
    out = CRITERIA["hybrid_output"](a, data=[torch.randn(4, 8)])
    assert out[gid].shape == (2,)


def test_hybrid_pipeline_end_to_end():
    """filter-prune -> fine-tune -> 2:4 -> fine-tune: the result is smaller, 2:4 and verified."""
    torch.manual_seed(0)
    model, (x, y) = Net(bn=True), _data(32)

    def train_fn(m, opt):
        for i in range(2):
            m.train()
            F.cross_entropy(m(x[i * 16:(i + 1) * 16]), y[i * 16:(i + 1) * 16]).backward()
            opt.step()
            opt.zero_grad()

    res = gp.hybrid_pipeline(model, x[:4], data=[x], train_fn=train_fn,
                             target=gp.Uniform(0.4), importance="hybrid_output")
    n0 = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in res.pruned.parameters()) < n0
    assert "verified" in res.report["sparse_verify"]
    w = res.sparse.get_submodule("c3").weight
    assert is_24(w != 0) and (w == 0).float().mean() >= 0.5


def test_fixed_mask_trainer_any_pattern():
    """FixedMaskTrainer holds an arbitrary (here 1xN) mask."""
    torch.manual_seed(0)
    model, (x, y) = Net(), _data(16)
    from graphprune.kernels.masks import mask_1xn

    opt = torch.optim.Adam(model.parameters(), 1e-2)
    m = mask_1xn(model.c3.weight.detach(), 4, 0.5)
    FixedMaskTrainer(model, opt, {"c3.weight": m})
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.c3.weight != 0, m)


# ---- DDP -----------------------------------------------------------------------------------------


def _run_all(rank: int, world: int) -> dict:
    """SMCP, SUBP and 2:4 for a few steps on a fixed global batch, this rank's share of it."""
    out = {}
    x, y = _data(48, seed=1)
    share = slice(rank * 16 // world, (rank + 1) * 16 // world)

    def run(make, steps=6, epoch=False):
        torch.manual_seed(0)
        base = Net()
        model = nn.parallel.DistributedDataParallel(base) if world > 1 else base
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        pr = make(model, opt)
        for s in range(steps):
            xb, yb = x[(s % 3) * 16:(s % 3 + 1) * 16], y[(s % 3) * 16:(s % 3 + 1) * 16]
            loss = F.cross_entropy(model(xb[share]), yb[share])
            opt.zero_grad()
            loss.backward()
            if hasattr(pr, "step"):
                pr.step()
            opt.step()
            if epoch and s % 2 == 1:
                pr.epoch_end()
        return base, pr

    _, pr = run(lambda m, o: gp.SoftMaskPruner(m, x[:2], target=gp.Flops(0.5),
                                               schedule=gp.Ramp(1, 5, 2), total_steps=6))
    out["smcp"] = {k: torch.as_tensor(v) for k, v in pr.masks.items()}
    base, bp = run(lambda m, o: gp.BlockPruner(m, x[:2], "1x4", 0.5, start_epoch=0, end_epoch=2),
                   epoch=True)
    base(x[:2])  # let the pending redraw happen
    out["subp"] = {n: bp.mask_of(n).clone() for n in bp.layers.values()}
    base, s24 = run(lambda m, o: gp.Sparse24Trainer(m, o, x[:2]))
    out["s24"] = dict(s24.masks)
    out["weights"] = {k: v.detach().clone() for k, v in base.state_dict().items()}
    return out


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_run_all(rank, world), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a: dict, b: dict, atol=0.0) -> None:
    for k in ("smcp", "subp", "s24"):
        assert a[k].keys() == b[k].keys()
        for n in a[k]:
            assert torch.equal(a[k][n], b[k][n]), f"{k} mask {n} differs"
    for n, v in a["weights"].items():
        assert torch.allclose(v, b["weights"][n], atol=atol), n


def test_ddp_masks_equal_across_ranks_and_single_process():
    """2 gloo processes: identical masks on both ranks, equal to one process on the global batch."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, _free_port(), d), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1))
    _same(r0, r1)
    single = _run_all(0, 1)
    _same(r0, single, atol=1e-5)
    assert any(not m.all() for m in single["smcp"].values())


# ---- end to end ----------------------------------------------------------------------------------


def test_digits_end_to_end_smcp():
    """Real digits, a small CNN, 3 epochs of SMCP to half the FLOPs: the slim model still learns."""
    from graphprune.demo import accuracy, load_digits_tensors

    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_tensors(size=16)
    model = Net(bn=True)
    model.fc = nn.Linear(16 * 8 * 8, 10)
    steps = 3 * (len(xtr) // 64)
    pr = gp.SoftMaskPruner(model, xte[:4], target=gp.Flops(0.5),
                           schedule=gp.Ramp(0.2, 0.6, 5), total_steps=steps)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(steps):
        i = torch.randint(0, len(xtr), (64,))
        loss = F.cross_entropy(model(xtr[i]), ytr[i])
        opt.zero_grad()
        loss.backward()
        pr.step()
        opt.step()
    slim = pr.export()
    assert accuracy(slim, xte, yte) > 0.7
    assert slim.graphprune_report["max_rel_err_fp32"] < 1e-4
