"""SUBP: soft uniform 1xN block pruning trained from scratch in the user's own loop.

`BlockPruner` puts a straight-through weight mask (`STMask`) on every eligible conv/linear layer
(groups=1, C_out % N == 0; the first and last layers stay dense by default). The mask is uniform
1xN: every group of N output channels keeps the same number of input channels (blocks of N
outputs x 1 input x all taps), so every thread of the 1xN kernel gets the same work.

* Sparsity ramps cubically, p * ((e - start) / (end - start))^3, and is p from `end_epoch` on.
* After `epoch_end()` the next training forward pass redraws every mask from the current
  (unmasked) weights: the top blocks by the
  criterion, plus a share `regrow` of the kept blocks drawn among the others by importance
  sampling with probability softmax(score / tau) (the share decays linearly to 0 at end_epoch).
  Criteria: "l1" (block L1) or "bpar" (block L1 / row max minus alpha * angular redundancy
  sum|cos| / row max, over the blocks of the same output group).
* `step()` (after backward, before the optimizer) decays pruned weights by `pruned_decay`.
* Under DDP rank 0's masks are broadcast after every redraw.
* `export()` emits `Conv2d1xN` / `Linear1xN` modules (the `sparse_ops` pass) and verifies them
  against the masked dense model and the training model.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.masks import block_scores_1xn, kept_1xn, mask_1xn
from ..passes.sparse_ops import LayerSparsity, mask_dense, sparse_ops
from ..sparsify import parse_pattern
from ..trace import trace
from ..verify import verify_against
from .soft_mask import attach_mask, broadcast_, check_same, clean_copy, unwrap

__all__ = ["BlockPruner", "block_scores", "draw_mask"]


def block_scores(weight: torch.Tensor, n: int, criterion: str = "l1",
                 alpha: float = 1.0) -> torch.Tensor:
    """Score of every 1xN block, [K/N, C]: "l1" block L1, or "bpar" (angular redundancy)."""
    l1 = block_scores_1xn(weight, n)
    if criterion == "l1":
        return l1
    if criterion != "bpar":
        raise ValueError(f"unknown block criterion {criterion!r}: l1 | bpar")
    k, c = weight.shape[:2]
    w = weight.detach().float().reshape(k // n, n, c, -1).permute(0, 2, 1, 3).reshape(k // n, c, -1)
    wn = F.normalize(w, dim=2)
    red = (wn @ wn.transpose(1, 2)).abs().sum(-1) - (wn * wn).sum(-1)  # drop each block's self
    norm = lambda x: x / x.amax(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    return norm(l1) - alpha * norm(red)


def draw_mask(weight: torch.Tensor, n: int, sparsity: float, score: torch.Tensor,
              regrow: float = 0.0, tau: float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform 1xN mask keeping kept_1xn(C, sparsity) blocks per output group: the top ones by
    score, except a share `regrow` drawn from the rest with probability softmax(score / tau)."""
    g, c = score.shape
    k = kept_1xn(c, sparsity)
    r = min(int(round(regrow * k)), c - k)
    if r <= 0 or k >= c:
        return mask_1xn(weight, n, sparsity, score=score)
    s = score / score.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    chosen = torch.zeros(g, c, dtype=torch.bool)
    chosen.scatter_(1, order[:, : k - r], True)
    logits = (s / tau).masked_fill(chosen, float("-inf"))
    picks = torch.multinomial(torch.softmax(logits, dim=1), r, replacement=False,
                              generator=generator)
    chosen.scatter_(1, picks, True)
    return mask_1xn(weight, n, sparsity, score=chosen.float())


def _eligible(mod: nn.Module, n: int) -> bool:
    if isinstance(mod, nn.Conv2d):
        return mod.groups == 1 and mod.padding_mode == "zeros" and mod.out_channels % n == 0
    return isinstance(mod, nn.Linear) and mod.out_features % n == 0


def _layer_order(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(node name, module name) of conv/linear call_module nodes in execution order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in (nn.Conv2d,
                                                                                 nn.Linear):
            out.append((node.name, node.target))
    return out


class BlockPruner:
    """SUBP soft uniform 1xN block masks on the user's model; see the module docstring."""

    def __init__(self, model: nn.Module, example_inputs, pattern: str = "1x16",
                 sparsity: float = 0.75, criterion: str = "l1", *, start_epoch: int = 0,
                 end_epoch: int | None = None, regrow: float = 0.2, tau: float = 1.0,
                 alpha: float = 1.0, pruned_decay: float = 2e-4, keep_first_last: bool = True,
                 skip: tuple[str, ...] = (), seed: int = 0):
        kind, self.n = parse_pattern(pattern)
        if kind != "1xN":
            raise ValueError(f"BlockPruner needs a 1xN pattern, got {pattern!r}")
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        self.model, self.pattern, self.p = unwrap(model), pattern, float(sparsity)
        self.criterion, self.regrow, self.tau, self.alpha = criterion, regrow, tau, alpha
        self.start, self.end = int(start_epoch), int(end_epoch if end_epoch is not None
                                                     else start_epoch + 1)
        self.decay, self.seed, self.epoch = pruned_decay, seed, 0
        self.traced = trace(clean_copy(self.model), example_inputs, method="fx")
        order = _layer_order(self.traced.gm)
        if keep_first_last and order:
            order = order[1:-1]
        self.layers = {node: name for node, name in order if name not in skip
                       and _eligible(self.model.get_submodule(name), self.n)}
        self.masks = {}
        for name in self.layers.values():
            mod = self.model.get_submodule(name)
            self.masks[name] = attach_mask(mod, "weight", torch.ones_like(mod.weight))
        self._pending = False
        self._redraw()
        self._hook = self.model.register_forward_pre_hook(self._before_forward)

    # ---- schedule -------------------------------------------------------------------------
    def progress(self, epoch: int | None = None) -> float:
        """(e - start) / (end - start) clipped to [0, 1]."""
        e = self.epoch if epoch is None else epoch
        return min(1.0, max(0.0, (e - self.start) / max(self.end - self.start, 1)))

    def sparsity(self, epoch: int | None = None) -> float:
        """Target sparsity of an epoch: p * progress^3 (SUBP's cubic ramp)."""
        return self.p * self.progress(epoch) ** 3

    # ---- the training-loop hooks ----------------------------------------------------------
    def _original(self, name: str) -> nn.Parameter:
        return self.masks[name].original

    @torch.no_grad()
    def step(self) -> None:
        """Call after loss.backward(), before optimizer.step(): decay the pruned weights."""
        if not self.decay:
            return
        for name, st in self.masks.items():
            w = self._original(name)
            if w.grad is not None:
                w.grad.add_(w.detach() * (1.0 - st.mask), alpha=self.decay)

    def epoch_end(self) -> None:
        """Advance the epoch; the masks are redrawn at the next training-mode forward pass (so
        `export()` after the last epoch uses the masks that epoch trained with)."""
        self.epoch += 1
        self._pending = True

    def _before_forward(self, module, args) -> None:
        if self._pending and module.training:
            self._pending = False
            self._redraw()

    @torch.no_grad()
    def _redraw(self) -> None:
        p = self.sparsity()
        rho = self.regrow * (1.0 - self.progress()) if p > 0 else 0.0
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        for name, st in self.masks.items():
            w = self._original(name).detach().cpu()
            if p <= 0:
                m = torch.ones_like(w, dtype=torch.bool)
            else:
                s = block_scores(w, self.n, self.criterion, self.alpha)
                m = draw_mask(w, self.n, p, s, rho, self.tau, gen)
            st.mask.copy_(broadcast_(m.to(st.mask.device, st.mask.dtype)))
            st.refresh()

    def remove(self, bake: bool = True) -> None:
        """Take the masks off the user's model (`bake`: zero the masked weights first)."""
        self._hook.remove()
        for st in self.masks.values():
            st.remove(bake)
        self.masks = {}

    # ---- results --------------------------------------------------------------------------
    def mask_of(self, name: str) -> torch.Tensor:
        """The current bool mask of a layer (by module name)."""
        return self.masks[name].mask.bool()

    def export(self, verify: bool = True, check_speed: bool = False) -> fx.GraphModule:
        """A GraphModule whose masked layers are Conv2d1xN / Linear1xN modules (current masks),
        verified against the masked dense model and the soft-masked training model. With
        `check_speed`, layers where the 1xN kernel is measured slower than dense here (at the
        example input's shape) keep a masked dense weight instead (the same function)."""
        gm = trace(clean_copy(self.model), (self.traced.args, self.traced.kwargs),
                   method="fx").gm
        plan = [LayerSparsity(node, "1xN", self.n, self.mask_of(name).cpu())
                for node, name in self.layers.items()]
        slow = self._slow_layers(gm, plan) if check_speed else {}
        out, how = sparse_ops(mask_dense(gm, [d for d in plan if d.node in slow]),
                              [d for d in plan if d.node not in slow])
        how.update({k: f"masked dense weight ({why})" for k, why in slow.items()})
        rep = {"pattern": self.pattern, "sparsity": self.sparsity(), "epoch": self.epoch,
               "layers": how}
        if verify:
            v = verify_against(out, mask_dense(gm, plan), self.traced.args, self.traced.kwargs,
                               what="1xN model")
            rep["verify"] = str(v)
            rep["vs_soft_masked_model"] = check_same(self.model, out, self.traced.args,
                                                     self.traced.kwargs, "1xN model")
        out.graphprune_report = rep
        return out

    def _slow_layers(self, gm: fx.GraphModule, plan) -> dict[str, str]:
        from ..sparsify import _slower

        nodes = {n.name: n for n in gm.graph.nodes}
        out = {}
        for d in plan:
            node = nodes[d.node]
            why = _slower(gm.get_submodule(node.target), node, self.n, self.sparsity(), None)
            if why:
                out[d.node] = why
        return out
