"""ASP-style 2:4 retraining: the mask is computed once and held through fine-tuning.

`FixedMaskTrainer` keeps given weight masks through training with optimizer hooks: before every
`optimizer.step()` the gradients of masked weights are multiplied by the mask, after it the
weights are (so momentum and weight decay cannot revive a pruned weight). `Sparse24Trainer`
computes 2:4 masks (2 largest |w| of every 4 along the reduction axis; conv as (K, R, S, C)) for
every conv/linear layer with C_in % 4 == 0, after an optional channel-permutation search (ASP,
Pool & Yu): a coupled permutation of a producer's outputs and its consumers' inputs, taken from
the channel groups, that raises the kept magnitude and leaves the function unchanged; the user's
weights (and optimizer state) are permuted in place. `export()` is the `sparse_ops` 2:4 pass
result (Sparse Tensor Core weights on CUDA fp16/bf16, masked dense elsewhere), verified.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..kernels.masks import mask_24
from ..passes.sparse_ops import LayerSparsity, mask_dense, sparse_ops
from ..trace import trace
from ..verify import verify_against
from .soft_mask import broadcast_, check_same, clean_copy, unwrap

__all__ = ["FixedMaskTrainer", "Sparse24Trainer", "permute_in_place"]


class FixedMaskTrainer:
    """Hold `masks` ({parameter name: bool mask}) fixed on `model` through `optimizer` steps."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 masks: dict[str, torch.Tensor]):
        self.model, self.optimizer = unwrap(model), optimizer
        params = dict(self.model.named_parameters())
        self.masks = {}
        for name, m in masks.items():
            w = params[name]
            self.masks[name] = broadcast_(m.to(w.device, torch.uint8)).bool()
        self._handles = [optimizer.register_step_pre_hook(self._mask_grads),
                         optimizer.register_step_post_hook(self._mask_weights)]
        self._mask_weights()

    def _pairs(self):
        params = dict(self.model.named_parameters())
        return [(params[n], m) for n, m in self.masks.items()]

    @torch.no_grad()
    def _mask_grads(self, *_):
        for w, m in self._pairs():
            if w.grad is not None:
                w.grad.mul_(m)

    @torch.no_grad()
    def _mask_weights(self, *_):
        for w, m in self._pairs():
            w.mul_(m)

    def remove(self) -> None:
        """Detach the optimizer hooks (the weights keep their zeros)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _eligible(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Conv2d):
        return mod.groups == 1 and mod.in_channels % 4 == 0 and mod.padding_mode == "zeros"
    return isinstance(mod, nn.Linear) and mod.in_features % 4 == 0


def permute_in_place(model: nn.Module, example_inputs, optimizer=None, seed: int = 0,
                     kind: str = "2:4") -> str:
    """Channel permutation applied to model's tensors (and optimizer state) in place: the ASP swap
    search for kind "2:4", Lin et al.'s L1 filter order for "1xN". Returns a note of what was
    done; the function is verified unchanged."""
    from ..api import analyze
    from ..passes.permute import permutable
    from ..permutation import filter_order_1xn, search_24

    ref = clean_copy(model)
    a = analyze(ref, example_inputs, method="fx")
    groups = permutable(a)
    perms = search_24(a, groups, seed=seed) if kind == "2:4" else filter_order_1xn(a, groups)
    if not perms:
        return "no permutable group"
    state = dict(model.state_dict(keep_vars=True))
    for info in a.params.values():
        idx = _index_maps(a, info, perms)
        if not idx:
            continue
        for name in info.names:
            t = state[name]
            extra = optimizer.state.get(t, {}) if optimizer is not None else {}
            for x in [t] + [v for v in extra.values() if torch.is_tensor(v) and v.shape == t.shape]:
                _permute_(x, idx)
    check_same(ref, model, a.traced.args, a.traced.kwargs, "channel-permuted model", rtol=1e-4)
    how = "ASP swap search" if kind == "2:4" else "filters ordered by L1"
    return f"{len(perms)} groups permuted ({how}), verified equal to the original"


def _index_maps(a, info, perms) -> list[tuple[int, torch.Tensor]]:
    """(axis, index) pairs that carry out `perms` on one parameter (as the permute pass does)."""
    out = []
    for f in info.tmap.factors:
        gids = a.class_group[a.labels[f.ids]]
        idx = np.arange(len(f.ids))
        hit = set(gids.tolist()) & set(perms)
        for gid in hit:
            pos = np.flatnonzero(gids == gid)
            idx[pos] = pos[np.asarray(perms[gid])]
        if hit:
            out.append((f.axes[0], torch.as_tensor(idx)))
    return out


@torch.no_grad()
def _permute_(t: torch.Tensor, idx) -> None:
    new = t.detach()
    for axis, i in idx:
        new = new.index_select(axis, i.to(new.device))
    t.copy_(new)


class Sparse24Trainer(FixedMaskTrainer):
    """2:4 masks computed once on `model` (see the module docstring) and held by `optimizer`.

    example_inputs: needed for the permutation search and for `export()`; without them the
    masks are computed on the weights as they are and `export()` returns a masked copy.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example_inputs=None,
                 *, permute: bool = True, skip: tuple[str, ...] = (), seed: int = 0):
        base = unwrap(model)
        self.example_inputs, self.permutation = example_inputs, "not searched"
        if permute and example_inputs is not None:
            self.permutation = permute_in_place(base, example_inputs, optimizer, seed)
            for t in base.state_dict().values():
                broadcast_(t)
        self.layers = {name: mod for name, mod in base.named_modules()
                       if _eligible(mod) and name not in skip}
        masks = {f"{n}.weight": mask_24(m.weight.detach()) for n, m in self.layers.items()}
        w = [m.weight.detach().abs() for m in self.layers.values()]
        total = sum(float(x.sum()) for x in w)
        self._kept = sum(float((x * k).sum()) for x, k in zip(w, masks.values())) / max(total,
                                                                                       1e-30)
        super().__init__(base, optimizer, masks)

    def kept_magnitude(self) -> float:
        """Share of the dense |w| the masks keep (over the masked layers), before any training."""
        return self._kept

    def export(self, verify: bool = True) -> nn.Module | fx.GraphModule:
        """The 2:4 pass result on the current weights (a masked copy without example inputs)."""
        base = clean_copy(self.model)
        if self.example_inputs is None:
            with torch.no_grad():
                for name, m in self.masks.items():
                    base.get_parameter(name).mul_(m)
            return base
        tr = trace(base, self.example_inputs, method="fx")
        nodes = {n.target: n.name for n in tr.gm.graph.nodes if n.op == "call_module"}
        plan = [LayerSparsity(nodes[name], "2:4", 4, self.masks[f"{name}.weight"].cpu())
                for name in self.layers if name in nodes]
        out, how = sparse_ops(tr.gm, plan)
        rep = {"pattern": "2:4", "layers": how, "permutation": self.permutation}
        if verify:
            rep["verify"] = str(verify_against(out, mask_dense(tr.gm, plan), tr.args, tr.kwargs,
                                               what="2:4 model"))
            rep["vs_training_model"] = check_same(self.model, out, tr.args, tr.kwargs, "2:4 model")
        out.graphprune_report = rep
        return out
