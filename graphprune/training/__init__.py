"""Training-time pruning in the user's own loop: SMCP soft channel masks, SUBP soft uniform 1xN
blocks, ASP 2:4 retraining and hybrid filter + 2:4 pruning; all of them work under DDP."""

from .block import BlockPruner
from .hybrid import filter_l1, hybrid_pipeline
from .soft_mask import Ramp, SoftMaskPruner
from .sparse24 import FixedMaskTrainer, Sparse24Trainer

__all__ = ["SoftMaskPruner", "Ramp", "BlockPruner", "Sparse24Trainer", "FixedMaskTrainer",
           "hybrid_pipeline", "filter_l1"]
