"""When to gather statistics and when to refresh inverses: shared by every method."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """Statistics every ``stats_every`` steps, inverses every ``inverse_every`` steps.

    Step 0 does both, so an optimizer always has an inverse before its first update.

    Examples
    --------
    >>> from curvlin.blocks import Schedule
    >>> s = Schedule(stats_every=10, inverse_every=100)
    >>> [step for step in range(250) if s.inverse_due(step)]
    [0, 100, 200]
    """

    stats_every: int = 1
    inverse_every: int = 1

    def __post_init__(self):
        for name in ("stats_every", "inverse_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Schedule: {name} must be a positive int, got {value!r}")

    def stats_due(self, step: int) -> bool:
        """Whether step ``step`` (counted from 0) gathers curvature statistics."""
        return step % self.stats_every == 0

    def inverse_due(self, step: int) -> bool:
        """Whether step ``step`` refreshes the inverses."""
        return step % self.inverse_every == 0
