"""Per-layer curvature blocks on one protocol, and the driver that runs them.

:class:`Block` is the protocol (statistics, fold, refresh, precondition, second pass, check),
:class:`Driver` runs any set of blocks on one :class:`Schedule` with the non-finite skip and
checkpoints; one module per method holds its block and state.
"""

from ._schedule import Schedule
from .base import NEEDS, Block, BlockState, LayerBatch, homogeneous, homogeneous_gram
from .driver import CHECKPOINT_FORMAT, Distributor, Driver
from .kbfgs import KBFGSBlock, KBFGSLBlock, KBFGSState
from .kfac import KFACBlock, KFACState

__all__ = [
    "CHECKPOINT_FORMAT",
    "NEEDS",
    "Block",
    "BlockState",
    "Distributor",
    "Driver",
    "KBFGSBlock",
    "KBFGSLBlock",
    "KBFGSState",
    "KFACBlock",
    "KFACState",
    "LayerBatch",
    "Schedule",
    "homogeneous",
    "homogeneous_gram",
]
