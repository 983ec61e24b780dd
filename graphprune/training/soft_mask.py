"""SMCP: soft input-channel masks trained toward a cost target that ramps over training.

`SoftMaskPruner` puts a straight-through mask on the input-channel slice of every consumer
(conv/linear weight) of every maskable channel group of the user's own model, through
a forward pre-hook (`STMask`): the forward pass uses w * mask, the backward pass hands the full
gradient to w, so a masked channel keeps learning and can come back. After `loss.backward()` the
user calls `pruner.step()`, which accumulates first-order Taylor importance |sum(w * dL/dw)| per
channel (momentum 0.9), optionally decays pruned weights, and every `schedule.every` steps
re-solves the masks from all channels with `graphprune.allocate` toward the current cost target.
`export()` slims the model (`gp.apply`, verified against the oracle) and checks the result against
the soft-masked model.

This module also holds the helpers the other training pruners share: DDP unwrapping, collective
ops, the straight-through weight mask (`STMask`) and the clean (unmasked) copy used for export.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..allocate import _table_for, allocate, cost_layers
from ..analysis import Analysis, iter_maps
from ..api import analyze, apply
from ..config import PruneConfig
from ..errors import PlanError, VerificationError
from ..importance import _layer_weights, score
from ..optable import lookup
from ..plan import Flops, Latency, Params, Plan
from ..verify import max_rel_error, random_like_inputs

__all__ = ["SoftMaskPruner", "Ramp", "STMask", "unwrap", "world", "broadcast_", "all_reduce_mean_",
           "attach_mask", "original_state", "clean_copy", "check_same"]


# ---- shared helpers (used by every training pruner) -------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def world() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite t in place with rank src's copy (no-op without a process group)."""
    if world() > 1:
        dist.broadcast(t, src)
    return t


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average t in place over all ranks (no-op without a process group)."""
    if world() > 1:
        dist.all_reduce(t)
        t /= world()
    return t


class STMask:
    """Soft weight mask on `module.<attr>` with a straight-through gradient.

    The Parameter moves (same object, so optimizers and DDP keep working) to `<attr>_orig`, the
    mask (float, broadcastable to the weight; 1 keeps) is the buffer `<attr>_mask`, and a forward
    pre-hook sets `module.<attr> = w + (w * mask - w).detach()`: the forward pass sees w * mask,
    the backward pass hands dL/d(w * mask) to w unchanged, so masked weights keep learning.
    """

    def __init__(self, module: nn.Module, attr: str, mask: torch.Tensor):
        self.module, self.attr = module, attr
        w = module._parameters.pop(attr)
        module.register_parameter(attr + "_orig", w)
        module.register_buffer(attr + "_mask", mask.to(w.device, w.dtype))
        self.handles = [module.register_forward_pre_hook(self),
                        module.register_forward_hook(self._after)]
        self.refresh()

    @property
    def original(self) -> nn.Parameter:
        return getattr(self.module, self.attr + "_orig")

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.module, self.attr + "_mask")

    def refresh(self) -> None:
        """Recompute the visible weight (without autograd history)."""
        with torch.no_grad():
            setattr(self.module, self.attr, self.original * self.mask)

    def __call__(self, module, args) -> None:
        w = self.original
        setattr(module, self.attr, w + (w * self.mask - w).detach())

    def _after(self, module, args, out) -> None:
        setattr(module, self.attr, getattr(module, self.attr).detach())  # deepcopy-able again

    def remove(self, bake: bool = False) -> None:
        """Put the original Parameter back under its name and drop the mask; with `bake` the
        masked entries are zeroed first (the module keeps computing the masked function)."""
        if bake:
            with torch.no_grad():
                self.original.mul_(self.mask)
        for h in self.handles:
            h.remove()
        m = self.module
        m.__dict__.pop(self.attr, None)
        w = m._parameters.pop(self.attr + "_orig")
        m._buffers.pop(self.attr + "_mask")
        m.register_parameter(self.attr, w)


def attach_mask(module: nn.Module, attr: str, mask: torch.Tensor) -> STMask:
    """Put an `STMask` on module.attr."""
    return STMask(module, attr, mask)


def masked_modules(model: nn.Module):
    """(qualified module name, STMask) for every soft mask on the model."""
    for name, m in model.named_modules():
        for h in list(m._forward_pre_hooks.values()):
            if isinstance(h, STMask):
                yield name, h


def original_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with masked weights under their plain names (their unmasked originals)."""
    model = unwrap(model)
    out = model.state_dict()
    for name, st in masked_modules(model):
        key = f"{name}.{st.attr}" if name else st.attr
        out[key] = out.pop(key + "_orig")
        out.pop(key + "_mask")
    return out


def clean_copy(model: nn.Module) -> nn.Module:
    """A deep copy without soft masks, holding the unmasked original weights."""
    c = copy.deepcopy(unwrap(model))
    for _, st in list(masked_modules(c)):
        st.remove()
    return c


def check_same(model: nn.Module, other: nn.Module, args, kwargs, what: str,
               rtol: float = 1e-4, trials: int = 2) -> float:
    """Max relative error of `other` against `model` (both in eval) on random inputs; raise
    VerificationError above rtol. Training modes are restored."""
    modes = [m.training for m in (model, other)]
    model.eval()
    other.eval()
    err = 0.0
    try:
        with torch.no_grad():
            for t in range(trials):
                a, k = random_like_inputs(args, kwargs, 1234 + t)
                err = max(err, max_rel_error(other(*a, **k), model(*a, **k)))
    finally:
        model.train(modes[0])
        other.train(modes[1])
    if err > rtol:
        raise VerificationError(f"{what} differs from the masked training model: max relative "
                                f"error {err:.3e} > {rtol:g}")
    return err


# ---- schedule ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ramp:
    """When masks are re-solved and how the pruned share of the cost grows.

    `start`, `end`: where the ramp begins and reaches the final target, as fractions of the
    pruner's `total_steps` (values <= 1.0 given as floats) or as step counts (ints). Masks are
    re-solved every `every` steps from `start` to `end`, and once more at `end`; after `end` they
    are frozen. `shape`: "exp" (fast early, 1 - e^(-5u) normalised: SMCP's exponential ramp),
    "cubic" (1 - (1 - u)^3, Zhu & Gupta) or "linear".
    """

    start: float = 0.1
    end: float = 0.6
    every: int = 100
    shape: str = "exp"

    def steps(self, total: int | None) -> tuple[int, int]:
        """(start, end) as step counts."""
        out = []
        for v in (self.start, self.end):
            if isinstance(v, float) and v <= 1.0:
                if total is None:
                    raise ValueError("Ramp with fractional start/end needs total_steps=")
                v = round(v * total)
            out.append(int(v))
        if out[1] < out[0]:
            raise ValueError(f"Ramp end {self.end} is before its start {self.start}")
        return out[0], out[1]

    def progress(self, t: int, total: int | None) -> float:
        """Share of the final pruning reached at step t (0 before start, 1 from end on)."""
        s, e = self.steps(total)
        u = 1.0 if t >= e else max(0.0, (t - s) / max(e - s, 1))
        if self.shape == "linear":
            return u
        if self.shape == "cubic":
            return 1.0 - (1.0 - u) ** 3
        if self.shape == "exp":
            return float((1.0 - np.exp(-5.0 * u)) / (1.0 - np.exp(-5.0)))
        raise ValueError(f"unknown ramp shape {self.shape!r}: exp | cubic | linear")

    def solve_at(self, t: int, total: int | None) -> bool:
        """True when masks are re-solved after step t."""
        s, e = self.steps(total)
        return t == e or (s <= t < e and (t - s) % max(self.every, 1) == 0 and t > 0)


# ---- which groups the input-channel view can mask exactly --------------------------------------

_REDUCTIONS = ("mean", "var", "std", "amax", "amin", "logsumexp", "sum", "maxmin")


def _groups_of(a: Analysis, v) -> set[int]:
    out: set[int] = set()
    for tm in iter_maps(v):
        for f in tm.factors:
            out |= set(a.class_group[a.labels[f.ids.reshape(-1)]].tolist())
    return out - {-1}


def unsafe_groups(a: Analysis) -> set[int]:
    """Groups that a non-weight op reads across channels (norms over channels, softmax, attention,
    channel reductions): masking only the consumers' weights would not remove them exactly."""
    layers = set(_layer_weights(a))
    bad: set[int] = set()
    for node in a.graph.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node.name in layers:
            continue
        out = a.tmaps.get(node.name)
        if not any(True for _ in iter_maps(out)):
            continue  # size queries and the like read no values
        ins = set().union(*(_groups_of(a, a.tmaps.get(x.name)) for x in node.all_input_nodes
                            if x.op != "get_attr"))
        mod = a.graph.get_submodule(node.target) if node.op == "call_module" else None
        rule = lookup(node, mod)
        if rule is not None and (rule.mixes or (rule.oracle is not None
                                                and rule.name not in _REDUCTIONS)):
            bad |= ins
        else:
            bad |= ins - _groups_of(a, out)
    return bad


# ---- consumers: conv/linear weights whose input slices get masked --------------------------------


@dataclass
class _Consumer:
    """One masked weight: where it lives in the user's model and the class label of each input."""

    name: str  # qualified parameter name, e.g. "layer1.0.conv1.weight"
    labels: np.ndarray  # [C_in] or [groups, C_in/groups] class labels
    grouped: bool
    out_labels: np.ndarray | None = None  # [C_out] class labels of the output rows
    mask: STMask | None = None

    def mask_tensor(self, alive: np.ndarray, weight: torch.Tensor) -> torch.Tensor:
        """Float mask broadcastable to the weight from per-class liveness."""
        m = torch.as_tensor(alive[self.labels], dtype=weight.dtype)
        if self.grouped:
            m = m.repeat_interleave(weight.shape[0] // m.shape[0], dim=0)
        else:
            m = m.reshape(1, -1)
        return m.reshape(m.shape + (1,) * (weight.ndim - 2))

    def channel_stat(self, wg: torch.Tensor, alive: np.ndarray) -> np.ndarray:
        """Signed sum of w*g per input position over the output rows still alive, in the shape
        of `labels` (SMCP sums over a layer's kept outputs only)."""
        if self.out_labels is not None:
            rows = torch.as_tensor(alive[self.out_labels], dtype=wg.dtype)
            wg = wg * rows.reshape(-1, *([1] * (wg.ndim - 1)))
        if self.grouped:
            g, cin = self.labels.shape
            v = wg.reshape(g, -1, cin, *wg.shape[2:]).sum(dim=[1] + list(range(3, wg.ndim + 1)))
        else:
            v = wg.sum(dim=[d for d in range(wg.ndim) if d != 1])
        return v.double().cpu().numpy()


def _consumers(a: Analysis) -> list[_Consumer]:
    by_name = {n: info for info in a.params.values() for n in info.names}
    out, seen = [], set()
    for name in sorted(set(_layer_weights(a).values())):
        info = by_name.get(name)
        if info is None or id(info) in seen or len(info.tmap.shape) < 2:
            continue
        seen.add(id(info))
        f0 = info.tmap.factor_of(0)
        rows = a.labels[f0.ids] if f0 is not None and len(f0.axes) == 1 else None
        if info.grouped_in is not None:
            out.append(_Consumer(name, a.labels[info.grouped_in], True, rows))
            continue
        f = info.tmap.factor_of(1)
        if f is not None and len(f.axes) == 1:
            out.append(_Consumer(name, a.labels[f.ids], False, rows))
    return out


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, attr = name.rpartition(".")
    return (root.get_submodule(prefix) if prefix else root), attr


# ---- the pruner ---------------------------------------------------------------------------------


class SoftMaskPruner:
    """SMCP soft channel masking inside the user's training loop; see the module docstring.

    model: the user's nn.Module (or its DDP wrapper), traced once with torch.fx on a copy.
    target: gp.Flops / gp.Params / gp.Latency (a latency table is measured once when none given).
    importance: "taylor" (gradients seen by `step()`), or any `gp.importance` criterion / callable
    evaluated on the current weights at each re-solve. total_steps: needed when the schedule's
    start/end are fractions. Other keyword arguments update the `PruneConfig` (round_to,
    min_channels, min_fraction, ignore, time_limit).
    Under DDP the importance is averaged over ranks, rank 0 solves and broadcasts the masks.
    """

    def __init__(self, model: nn.Module, example_inputs, target=None, importance="taylor", *,
                 schedule: Ramp | None = None, total_steps: int | None = None,
                 pruned_decay: float = 2e-4, bn_rescale: bool = False, momentum: float = 0.9,
                 config: PruneConfig | None = None, **kw):
        self.model = unwrap(model)
        self.target = target if target is not None else Flops(0.5)
        if not isinstance(self.target, (Flops, Params, Latency)):
            raise PlanError(f"SoftMaskPruner needs a cost target (Flops/Params/Latency), got "
                            f"{self.target!r}")
        self.importance, self.schedule = importance, schedule or Ramp()
        self.total_steps, self.decay, self.momentum = total_steps, pruned_decay, momentum
        self.bn_rescale = bn_rescale
        self.cfg = (config or PruneConfig()).update(importance=importance, **kw)
        self.schedule.steps(total_steps)  # fail early on a bad schedule
        self._clean = clean_copy(self.model)
        self.a = analyze(self._clean, example_inputs, method="fx")
        self.skip = self._frozen_groups()
        if isinstance(self.target, Latency) and self.target.table is None:
            layers = cost_layers(self.a, frozen=self.skip)
            self.target = Latency(self.target.fraction,
                                  _table_for(self.a, self.target, layers, self.cfg.round_to))
        self.alive = np.ones(len(self.a.class_group), bool)
        self.scores = np.zeros(len(self.a.class_group))
        self.t = 0
        self.history: list[dict] = []
        self.consumers = [c for c in _consumers(self.a) if self._maskable(c)]
        for c in self.consumers:
            mod, attr = _owner(self.model, c.name)
            c.mask = attach_mask(mod, attr, c.mask_tensor(self.alive, getattr(mod, attr)))

    # ---- setup ----------------------------------------------------------------------------
    def _frozen_groups(self) -> set[int]:
        from ..api import _ignored_groups

        free = {g.id for g in self.a.prunable_groups}
        return ({g.id for g in self.a.groups} - free) | unsafe_groups(self.a) | _ignored_groups(
            self.a, self.cfg.ignore)

    def _maskable(self, c: _Consumer) -> bool:
        gids = set(self.a.class_group[c.labels.reshape(-1)].tolist())
        return bool(gids - self.skip - {-1})

    def _weights(self):
        """(consumer, original weight Parameter) pairs of the user's model."""
        for c in self.consumers:
            yield c, c.mask.original

    # ---- the training-loop hook -----------------------------------------------------------
    def step(self) -> None:
        """Call after loss.backward() and before optimizer.step()."""
        if self.importance == "taylor":
            self._accumulate()
        if self.decay:
            self._decay()
        self.t += 1
        if self.schedule.solve_at(self.t, self.total_steps):
            self.resolve()

    @torch.no_grad()
    def _accumulate(self) -> None:
        """SMCP's Taylor score: per channel |sum over the group's consumers (kept output rows,
        all taps) of w * g| for this batch, then a momentum average over batches."""
        cur = np.zeros_like(self.scores)
        for c, w in self._weights():
            if w.grad is not None:
                np.add.at(cur, c.labels, c.channel_stat(w.detach() * w.grad, self.alive))
        self.scores = self.momentum * self.scores + (1.0 - self.momentum) * np.abs(cur)

    @torch.no_grad()
    def _decay(self) -> None:
        for c, w in self._weights():
            if w.grad is not None and not bool(c.mask.mask.all()):
                w.grad.add_(w.detach() * (1.0 - c.mask.mask), alpha=self.decay)

    # ---- solving --------------------------------------------------------------------------
    def current_target(self):
        """The cost target at the current step (the ramp applied to the final fraction)."""
        u = self.schedule.progress(self.t, self.total_steps)
        f = 1.0 - (1.0 - float(self.target.fraction)) * u
        return type(self.target)(f) if not isinstance(self.target, Latency) else Latency(
            f, self.target.table)

    def _group_scores(self) -> dict[int, np.ndarray]:
        if self.importance == "taylor":
            s = torch.as_tensor(self.scores)
            per = all_reduce_mean_(s).numpy()
            return {g.id: per[g.classes] for g in self.a.groups}
        self.sync()
        return score(self.a, self.importance, data=self.cfg.data, loss_fn=self.cfg.loss_fn,
                     reduce=self.cfg.reduce)

    def resolve(self) -> Plan:
        """Re-solve the masks from all channels toward `current_target()` and install them."""
        tgt = self.current_target()
        scores = self._group_scores()
        alive = torch.ones(len(self.alive), dtype=torch.uint8)
        meta: dict = {"step": self.t, "target": repr(tgt)}
        if tgt.fraction < 1.0 and (not dist.is_initialized() or dist.get_rank() == 0):
            keep, m = allocate(self.a, tgt, scores, self.cfg, self.skip)
            alive = torch.as_tensor(Plan(keep, self._sizes()).alive(self.a), dtype=torch.uint8)
            meta.update(predicted_fraction=m.get("predicted_fraction"))
        broadcast_(alive)
        self._install(alive.numpy().astype(bool))
        meta["kept"] = {g.id: int(self.alive[g.classes].sum()) for g in self.a.prunable_groups}
        self.history.append(meta)
        return self.plan()

    def _sizes(self) -> dict[int, int]:
        return {g.id: g.size for g in self.a.groups}

    @torch.no_grad()
    def _install(self, alive: np.ndarray) -> None:
        old = self.alive
        self.alive = alive
        if self.bn_rescale:
            self._rescale_bn(old, alive)
        for c, w in self._weights():
            c.mask.mask.copy_(c.mask_tensor(alive, w))
            c.mask.refresh()

    @torch.no_grad()
    def _rescale_bn(self, old: np.ndarray, new: np.ndarray) -> None:
        """Scale the norm affine parameters of a group's kept channels by old/new kept count, so
        consumers' pre-activations keep their magnitude when inputs drop out (or come back)."""
        for info in self.a.params.values():
            name = info.names[0]
            mod, attr = _owner(self._clean, name)
            f = info.tmap.factor_of(0)
            if (not isinstance(mod, nn.modules.batchnorm._BatchNorm) or f is None
                    or attr not in ("weight", "bias")):
                continue
            lab = self.a.labels[f.ids]
            t = getattr(*_owner(self.model, name))
            for gid in set(self.a.class_group[lab].tolist()) - {-1}:
                cls = self.a.groups[gid].classes
                k0, k1 = int(old[cls].sum()), int(new[cls].sum())
                if k0 != k1 and k1 > 0:
                    sel = torch.as_tensor((self.a.class_group[lab] == gid) & new[lab])
                    t[sel] *= k0 / k1

    # ---- results --------------------------------------------------------------------------
    @property
    def masks(self) -> dict[int, np.ndarray]:
        """Per prunable group: bool per local channel (True = kept)."""
        return {g.id: self.alive[g.classes].copy() for g in self.a.prunable_groups}

    def plan(self) -> Plan:
        """The current masks as a Plan over `self.a`."""
        keep = {gid: tuple(np.flatnonzero(m).tolist()) for gid, m in self.masks.items()
                if not m.all()}
        return Plan(keep, self._sizes(), {"importance": str(self.importance), "step": self.t})

    def sync(self) -> None:
        """Copy the user's current (unmasked) weights and buffers into the analysed copy."""
        self._clean.load_state_dict(original_state(self.model))

    def remove(self, bake: bool = True) -> None:
        """Take the soft masks off the user's model (`bake`: zero the masked weights first)."""
        for c in self.consumers:
            c.mask.remove(bake)
        self.consumers = []

    def export(self, verify: bool = True):
        """The slimmed GraphModule of the current masks: verified against the oracle (gp.apply)
        and against the soft-masked training model."""
        self.sync()
        slim = apply(self.a, self.plan(), verify=verify)
        if verify:
            err = check_same(self.model, slim, self.a.traced.args, self.a.traced.kwargs,
                             "slimmed model")
            slim.graphprune_report["vs_soft_masked_model"] = err
        return slim

