"""`gp.sparsify`: 1xN block sparsity (fast multithreaded CPU kernels) and 2:4 (Sparse Tensor Cores).

Decides per conv/linear layer whether the pattern fits (C_out % N, C_in % 4, depthwise/grouped
convs stay dense, and for 1xN optionally whether the sparse kernel is measured faster than dense
on this machine), builds the masks, hands the decisions to the `sparse_ops` pass, lets the
`fuse_epilogue` pass fold eval-mode BatchNorm into the convs and fuse residual adds and ReLUs into
the 1xN kernels' stores and the `pool_layout` pass run large NCHW max-pools in channels_last, then
(2:4) lets the `semi_structured` pass move the layers the Sparse Tensor Core kernels take onto
them; each step is verified against the one before, the first against the masked dense model.
The report says per layer what was applied or skipped, why, the kept fraction and what was fused.
"""

from __future__ import annotations

import copy
import re
import time

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import GraphpruneError
from .kernels.masks import mask_1xn, mask_24
from .passes.fuse_epilogue import fuse_epilogue
from .passes.pool_layout import pool_layout
from .passes.semi_structured import semi_structured
from .passes.sparse_ops import LayerSparsity, mask_dense, sparse_ops
from .trace import trace
from .verify import verify_against

__all__ = ["sparsify", "parse_pattern"]


def parse_pattern(pattern: str) -> tuple[str, int]:
    """"1x16" -> ("1xN", 16); "2:4" -> ("2:4", 4)."""
    m = re.fullmatch(r"1x(\d+)", pattern.strip().lower())
    if m:
        return "1xN", int(m.group(1))
    if pattern.strip() == "2:4":
        return "2:4", 4
    raise GraphpruneError(f"unknown sparsity pattern {pattern!r}: use '1xN' (e.g. '1x16') or '2:4'")


def _layers(gm: fx.GraphModule):
    """(first call node, module) of every conv/linear module; a module called more than once
    (shared weights) is decided once and replaced for all its calls."""
    seen = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        seen.add(node.target)
        mod = gm.get_submodule(node.target)
        if type(mod) in (nn.Conv2d, nn.Linear):
            yield node, mod


def _why_not(mod: nn.Module, kind: str, n: int) -> str:
    if isinstance(mod, nn.Conv2d) and mod.groups != 1:
        return "grouped/depthwise conv stays dense"
    if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
        return f"padding_mode={mod.padding_mode!r} not supported"
    if isinstance(mod, nn.Conv2d) and kind == "1xN" and isinstance(mod.padding, str):
        from .kernels.onexn import _explicit_padding

        try:
            _explicit_padding(mod)
        except ValueError as e:
            return f"padding={mod.padding!r} here is asymmetric ({e})"
    k, c = mod.weight.shape[0], mod.weight.shape[1]
    if kind == "1xN" and k % n:
        return f"C_out={k} is not a multiple of N={n}"
    if kind == "2:4" and c % 4:
        return f"C_in={c} is not a multiple of 4"
    return ""


def sparsify(
    model: nn.Module,
    example_inputs,
    pattern: str = "1x16",
    sparsity: float = 0.75,
    *,
    verify: bool = True,
    check_speed: bool = True,
    threads: int | None = None,
    skip: tuple[str, ...] = (),
    leaf_modules=(),
    permute: bool = True,
    fuse: bool = True,
    keep_first_last: bool = False,
) -> fx.GraphModule:
    """Sparsify every eligible conv/linear layer; returns a GraphModule with `.graphprune_report`.

    pattern "1xN": uniform 1xN blocks at `sparsity` (fraction of input channels removed per group
    of N outputs); layers where the kernel is measured slower than dense stay dense when
    `check_speed`. pattern "2:4": 2 of every 4 weights along the reduction axis (sparsity fixed at
    0.5). `skip`: module names left dense; `keep_first_last`: also the first and the last
    conv/linear (as `BlockPruner` does by default — a stem conv over 3 RGB channels keeps 1 of
    them at 75%). `fuse`: fold eval-mode BatchNorm into the conv before
    it and fuse residual add + ReLU into the 1xN kernels (numerics: float rounding only, checked
    by the verification), and run large NCHW max-pools in channels_last (`pool_layout`: exact,
    2-5x faster pools). `permute`: reorder channels first so the masks keep more magnitude
    (skipped for 1xN when some layer's weights already hold a 1xN pattern: regrouping its blocks
    would drop weights it kept). The user's model is not modified.
    """
    kind, n = parse_pattern(pattern)
    if kind == "1xN" and not 0.0 < sparsity < 1.0:
        raise GraphpruneError(f"sparsity must be in (0, 1), got {sparsity}")
    t0 = time.perf_counter()
    perm_note = ""
    held = _held_patterns(model, kind, n) if permute else []
    if held:
        perm_note = (f"skipped: {len(held)} layer(s) already hold {pattern} patterns (first: "
                     f"{held[0]}); reordering channels would regroup their "
                     f"{'blocks' if kind == '1xN' else 'groups of 4'}")
    elif permute:
        model, perm_note = _permuted(model, example_inputs, kind, leaf_modules)
    tr = trace(model, example_inputs, leaf_modules=leaf_modules, method="auto")
    gm = tr.gm
    if tr.kind == "export":  # aten conv/linear with constant weights -> modules the passes see
        from .backend import modulize

        gm = modulize(gm)
    report, plan = [], []
    layers = list(_layers(gm))
    edges = {layers[0][0].target, layers[-1][0].target} if keep_first_last and layers else set()
    for node, mod in layers:
        why = ("skipped by the user" if node.target in skip
               else "first/last layer kept dense (keep_first_last)" if node.target in edges
               else _why_not(mod, kind, n))
        entry = {"layer": node.target, "node": node.name, "shape": list(mod.weight.shape)}
        if not why and kind == "1xN" and check_speed:
            why = _slower(mod, node, n, sparsity, threads)
        if why:
            report.append({**entry, "pattern": "dense", "why": why, "kept": 1.0})
            continue
        mask = mask_1xn(mod.weight.detach(), n, sparsity) if kind == "1xN" else mask_24(
            mod.weight.detach())
        plan.append(LayerSparsity(node.name, kind, n, mask))
        report.append({**entry, "pattern": pattern, "why": "", "kept": float(mask.float().mean())})
    out, how = sparse_ops(gm, plan)
    checks = []
    if verify and plan:
        checks.append(("sparse vs masked dense oracle",
                       verify_against(out, mask_dense(gm, plan), tr.args, tr.kwargs, rtol32=1e-4,
                                      rtol64=1e-9, what="sparsified model")))
    fused, pools = {}, []
    if fuse:
        unfused = out
        out, fused, pools = _fuse(unfused, kind)
        if verify and (fused or pools):
            # its own oracle: the model before fusion. Folded BatchNorm weights are products
            # rounded to the model's dtype (fp32: ~1e-7 each, ~1e-6 through a deep net; a wrong
            # fold: ~1); the fp64 check folds a float64 copy, so there it must be exact
            def build64():  # (the passes fuse a copy: u64 stays the unfused oracle)
                u64 = copy.deepcopy(unfused).double()
                return _fuse(u64, kind)[0], u64

            checks.append(("fused vs unfused",
                           verify_against(out, unfused, tr.args, tr.kwargs, rtol32=1e-4,
                                          rtol64=1e-9, what="BN-folded / epilogue-fused model",
                                          build64=build64)))
    if kind == "2:4" and plan:  # last: a compressed weight takes no BN fold and no cast
        dense = out
        out, held = semi_structured(dense, [d.node for d in plan])
        how.update(held)
        if verify and any("semi_structured" in h for h in held.values()):
            checks.append(("2:4 kernels vs masked dense",
                           verify_against(out, dense, tr.args, tr.kwargs, rtol32=1e-4,
                                          rtol64=1e-9, what="2:4 (semi-structured) model")))
    for r in report:
        if r["node"] in how:
            r["held_as"] = how[r["node"]]
        if r["node"] in fused:
            r["fused"] = fused[r["node"]]
    kept = sum(float((gm.get_submodule(_tgt(gm, d.node)).weight.detach().abs() * d.mask).sum())
               for d in plan)
    total = sum(float(gm.get_submodule(_tgt(gm, d.node)).weight.detach().abs().sum())
                for d in plan)
    rep = {"pattern": pattern, "sparsity": sparsity if kind == "1xN" else 0.5, "layers": report,
           "sparsified": len(plan), "seconds": round(time.perf_counter() - t0, 3),
           "kept_magnitude": kept / total if total else 1.0, "permutation": perm_note,
           "fused": len(fused), "pools_channels_last": pools}
    if checks:
        rep["verify"] = "; ".join(f"{what}: {v}" for what, v in checks)
    from .report import SparsityReport

    out.graphprune_report = SparsityReport(rep)
    return out


def _tgt(gm: fx.GraphModule, name: str) -> str:
    return next(n.target for n in gm.graph.nodes if n.name == name)


def _held_patterns(model: nn.Module, kind: str, n: int) -> list[str]:
    """Conv/linear layers whose weights already hold a non-trivial uniform 1xN pattern, or a 2:4
    one (as after `BlockPruner` / `Sparse24Trainer` training, or a model that was sparsified and
    baked back to dense): a 1xN filter reordering would mix their groups, and the mask drawn
    afterwards would drop kept weights; a 2:4 channel reordering cannot keep more than all of
    them (it only costs time and reports permutations that change nothing)."""
    from .kernels.masks import groups_differ_1xn, is_24

    out = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or getattr(mod, "groups", 1) != 1 \
                or not isinstance(w, torch.Tensor):  # fmt: skip
            continue
        nz = w.detach() != 0
        if groups_differ_1xn(nz, n) if kind == "1xN" else bool(nz.any()) and is_24(nz):
            out.append(name)
    return out


def _fuse(gm, kind: str):
    """BN folding and fused epilogues, then (1xN, the CPU path: measured there; 2:4 targets
    GPUs) channels_last pools: (new module, {node: what was fused}, pool nodes)."""
    out, fused = fuse_epilogue(gm)
    pools = []
    if kind == "1xN":
        out, pools = pool_layout(out)
    return out, fused, pools


def _permuted(model, example_inputs, kind: str, leaf_modules):
    """Reorder channels (function unchanged, verified) so the masks keep more magnitude."""
    from .api import analyze
    from .passes.permute import permutable
    from .passes.permute import permute as permute_pass
    from .permutation import filter_order_1xn, search_24

    try:
        a = analyze(model, example_inputs, leaf_modules=leaf_modules, method="fx")
    except GraphpruneError:
        return model, "skipped: model not fx-traceable"
    groups = permutable(a)
    perms = search_24(a, groups) if kind == "2:4" else filter_order_1xn(a, groups)
    if not perms:
        return model, "no permutable group"
    gm = permute_pass(a, perms)
    verify_against(gm, a.graph, a.traced.args, a.traced.kwargs, what="channel-permuted model")
    how = "ASP swap search" if kind == "2:4" else "filters ordered by L1 (Lin et al.)"
    return gm, f"{len(perms)} groups permuted ({how}), verified equal to the original"


_SPEED_CACHE: dict = {}


def _slower(mod, node, n, sparsity, threads) -> str:
    """'' when the 1xN kernel is faster than dense for this layer here, else the reason."""
    from .kernels.onexn import faster_than_dense

    x = node.args[0].meta.get("val")
    if x is None:
        return ""
    key = (tuple(mod.weight.shape), tuple(x.shape), getattr(mod, "stride", 1),
           getattr(mod, "padding", 0), getattr(mod, "dilation", 1), n, sparsity, threads)
    if key not in _SPEED_CACHE:
        kw = {}
        if isinstance(mod, nn.Conv2d):
            kw = {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation}
        _SPEED_CACHE[key] = faster_than_dense(mod, tuple(x.shape), n, sparsity, threads=threads,
                                              **kw)
    ok, sp, de = _SPEED_CACHE[key]
    return "" if ok else f"sparse kernel slower than dense here ({sp:.3f} ms vs {de:.3f} ms)"


_ = torch
