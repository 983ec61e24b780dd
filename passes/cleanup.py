"""cleanup: remove dead code and submodules/attributes nothing refers to.

Requires: a GraphModule. Ensures: the same module with dead pure nodes erased and unused
submodules deleted (in place on the module passed in — callers pass their own copy).
"""

from __future__ import annotations

import torch.fx as fx

__all__ = ["cleanup"]


def cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    """Dead-code elimination plus deletion of unused submodules; returns gm."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
