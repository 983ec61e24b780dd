"""graphprune: verified structural pruning and sparsity for PyTorch models.

    import graphprune as gp
    a = gp.analyze(model, example_inputs)
    plan = gp.plan(a, target=gp.Uniform(0.3), importance="l1")
    slim = gp.apply(a, plan)          # verified against gp.mask(a, plan)
"""

from .analysis import Analysis, ChannelGroup
from .api import analyze, apply, mask, plan, prune, stats
from .backend import backend as backend
from .config import PruneConfig
from .errors import GraphpruneError, PlanError, TraceError, VerificationError
from .plan import Flops, Latency, Params, Plan, Uniform
from .saving import load as load
from .saving import save as save
from .sparsify import sparsify
from .trace import Traced, trace
from .training import BlockPruner as BlockPruner
from .training import Ramp as Ramp
from .training import SoftMaskPruner as SoftMaskPruner
from .training import Sparse24Trainer as Sparse24Trainer
from .training import hybrid_pipeline as hybrid_pipeline

__all__ = [
    "analyze", "plan", "mask", "apply", "prune", "stats", "trace", "sparsify",
    "Analysis", "ChannelGroup", "Plan", "Uniform", "Flops", "Params", "Latency", "PruneConfig", "Traced",
    "GraphpruneError", "PlanError", "TraceError", "VerificationError",
]
__version__ = "0.1.0"
