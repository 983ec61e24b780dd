"""semi_structured: put 2:4-patterned linear / 1x1-conv weights on the Sparse Tensor Core kernels.

Requires: a GraphModule whose named nodes are `call_module` layers holding 2:4 patterns as masked
dense weights (at most 2 nonzeros in every 4 consecutive weights along the input channels).
Ensures: a copy (the input is untouched) computing the same function in which every named layer
the kernels take (CUDA, fp16 / bf16, shapes: `graphprune.kernels.semi24.why_not_semi_structured`)
holds a ``to_sparse_semi_structured`` weight, a 1x1 conv becoming `PointwiseLinear`; the others
keep their masked dense weight. Returns ``(module, {node: how its pattern is held})``.

Run it last: a compressed weight cannot be cast, re-masked or have a BatchNorm folded into it, so
BN folding (`fuse_epilogue`) comes before it.
"""

from __future__ import annotations

import copy

import torch.fx as fx

from graphprune.kernels.semi24 import PointwiseLinear, to_semi_structured, why_not_semi_structured

__all__ = ["semi_structured"]


def semi_structured(gm: fx.GraphModule, nodes: list[str]) -> tuple[fx.GraphModule, dict[str, str]]:
    """Compress the 2:4 weights of the named layers the kernels take (see the module docstring)."""
    out = copy.deepcopy(gm)
    by_name = {n.name: n for n in out.graph.nodes}
    how = {}
    for name in nodes:
        target = by_name[name].target
        mod = out.get_submodule(target)
        if why := why_not_semi_structured(mod):
            how[name] = f"masked dense weight (2:4 kernels not used: {why})"
            continue
        new = to_semi_structured(mod, mod.weight.detach() != 0)
        prefix, _, attr = target.rpartition(".")
        setattr(out.get_submodule(prefix) if prefix else out, attr, new)
        how[name] = "to_sparse_semi_structured (Sparse Tensor Cores)" + (
            ", 1x1 conv as a linear over channels" if isinstance(new, PointwiseLinear) else "")
    out.recompile()
    return out, how
