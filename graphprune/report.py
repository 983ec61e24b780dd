"""Human-readable tables (rich) for analyses and plans, and model statistics (params, MACs)."""

from __future__ import annotations

import io

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["analysis_table", "plan_table", "sparsity_table", "SparsityReport", "count_params",
           "count_macs", "render"]


def render(table) -> str:
    buf = io.StringIO()
    Console(file=buf, width=140, force_terminal=False, color_system=None).print(table)
    return buf.getvalue()


def _short(members, n):
    s = ", ".join(members[:n])
    return s + (f" (+{len(members) - n})" if len(members) > n else "")


def analysis_table(a, max_members: int = 3) -> str:
    t = Table(title=f"channel groups of {a.traced.model_name} (traced with {a.traced.kind})")
    for c in ("id", "size", "members", "prunable / reason"):
        t.add_column(c, overflow="fold")
    for g in a.groups:
        state = "yes" + (f" (rows {g.rows.shape[0]}x{g.rows.shape[1]})" if g.rows is not None else "")
        t.add_row(str(g.id), str(g.size), _short(list(g.members), max_members),
                  state if g.prunable else f"no: {g.reason}")
    p = sum(g.prunable for g in a.groups)
    return render(t) + f"{len(a.groups)} groups, {p} prunable\n"


def plan_table(plan, a=None) -> str:
    t = Table(title="plan")
    for c in ("group", "kept", "total", "removed %"):
        t.add_column(c)
    for gid in sorted(plan.keep):
        n = plan.sizes[gid]
        k = len(plan.keep[gid])
        if k == n:
            continue
        t.add_row(str(gid), str(k), str(n), f"{100 * (n - k) / n:.0f}")
    meta = ", ".join(f"{k}={v}" for k, v in plan.meta.items() if not isinstance(v, (dict, list)))
    return render(t) + (meta + "\n" if meta else "")


def sparsity_table(rep) -> str:
    """Per layer: pattern applied (and how it is held) or why the layer stayed dense."""
    t = Table(title=f"sparsity ({rep['pattern']}, {rep['sparsity']:.0%} of the weights removed)")
    for c in ("layer", "weight", "pattern", "kept", "held as / why dense", "fused"):
        t.add_column(c, overflow="fold")
    for r in rep["layers"]:
        t.add_row(r["layer"], "x".join(map(str, r["shape"])), r["pattern"], f"{r['kept']:.2f}",
                  r.get("held_as") or r["why"], r.get("fused", ""))
    tail = (f"{rep['sparsified']} of {len(rep['layers'])} layers sparsified, kept magnitude "
            f"{rep['kept_magnitude']:.2f}")
    if rep.get("fused"):
        tail += f"; {rep['fused']} layers absorbed BatchNorm / residual add / ReLU"
    if rep.get("pools_channels_last"):
        k = len(rep["pools_channels_last"])
        tail += f"; {k} max-pool{'s' if k != 1 else ''} run in channels_last"
    if rep.get("permutation"):
        tail += f"; {rep['permutation']}"
    return render(t) + tail + "\n" + (f"check: {rep['verify']}\n" if rep.get("verify") else "")


class SparsityReport(dict):
    """`gp.sparsify`'s report: a plain dict (JSON-ready) with a readable `summary()`."""

    def summary(self) -> str:
        return sparsity_table(self)


def count_params(m: nn.Module) -> int:
    seen, n = set(), 0
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def count_macs(m: nn.Module, args, kwargs=None) -> int:
    """Multiply-accumulates of one forward (conv, matmul, attention), via FlopCounterMode."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(*args, **(kwargs or {}))
    return int(fc.get_total_flops() // 2)
