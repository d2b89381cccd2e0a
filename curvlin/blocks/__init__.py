"""Per-layer curvature blocks: state, update, refresh and precondition, one class per method."""

from ._schedule import Schedule
from .kbfgs import KBFGSBlock, KBFGSLBlock, KBFGSState
from .kfac import KFACBlock, KFACState

__all__ = ["KBFGSBlock", "KBFGSLBlock", "KBFGSState", "KFACBlock", "KFACState", "Schedule"]
