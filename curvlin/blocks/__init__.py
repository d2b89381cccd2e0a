"""Per-layer curvature blocks: state, update, refresh and precondition, one class per method."""

from ._schedule import Schedule
from .kfac import KFACBlock, KFACState

__all__ = ["KFACBlock", "KFACState", "Schedule"]
