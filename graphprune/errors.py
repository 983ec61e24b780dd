"""Errors that name the node, its op and the user's source line."""

from __future__ import annotations

import torch.fx as fx

__all__ = [
    "GraphpruneError",
    "TraceError",
    "PlanError",
    "VerificationError",
    "node_location",
    "node_desc",
    "target_name",
]


class GraphpruneError(Exception):
    """Base class of every error graphprune raises on bad input or a failed check."""


class TraceError(GraphpruneError):
    """The model could not be captured as a graph."""


class PlanError(GraphpruneError):
    """A plan or target cannot be carried out (empty layer, unprunable group, infeasible)."""


class VerificationError(GraphpruneError):
    """A rewritten model does not match its oracle."""


def target_name(node: fx.Node) -> str:
    """A short readable name of what a node calls."""
    t = node.target
    if node.op in ("call_module", "get_attr", "placeholder", "output", "call_method"):
        return str(t)
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", None) or str(t)
    if str(t).startswith("aten."):
        return str(t)
    return f"{mod}.{name}" if mod and mod != "builtins" else name


def node_location(node: fx.Node) -> str:
    """The innermost user source line recorded for a node ('file:line: code'), or ''."""
    st = node.meta.get("stack_trace") or ""
    lines = [ln for ln in st.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        ln = lines[i].strip()
        if ln.startswith('File "'):
            try:
                file = ln.split('"')[1]
                lineno = ln.split("line ")[1].split(",")[0]
            except IndexError:
                continue
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{file}:{lineno}: {code}"
    return ""


def node_desc(node: fx.Node, module_type: str | None = None) -> str:
    """`node `name` (op target [ModuleType]) at file:line: code`."""
    what = f"{node.op} {target_name(node)}"
    if module_type:
        what += f" [{module_type}]"
    loc = node_location(node)
    return f"node `{node.name}` ({what})" + (f" at {loc}" if loc else "")
