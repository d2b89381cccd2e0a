"""When to gather statistics, refresh and check: one vocabulary for every method."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Schedule"]


def _check_interval(owner: str, name: str, value, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        want = "None or a positive int" if optional else "a positive int"
        raise ValueError(f"{owner}: {name} must be {want}, got {value!r}")


@dataclass(frozen=True)
class Schedule:
    """Statistics every ``stats_every`` steps, refreshes every ``refresh_every`` steps, and a
    check-and-repair every ``check_every`` statistics steps (None: never).

    Steps are counted from 0 and step 0 gathers statistics and refreshes, so an optimizer
    always has curvature before its first update. For a method with a second pass (K-BFGS),
    a statistics step is one that runs the second pass.

    Examples
    --------
    >>> from curvlin.blocks import Schedule
    >>> s = Schedule(stats_every=10, refresh_every=100, check_every=5)
    >>> [step for step in range(250) if s.refresh_due(step)]
    [0, 100, 200]
    >>> [step for step in range(120) if s.check_due(step)]
    [40, 90]
    """

    stats_every: int = 1
    refresh_every: int = 1
    check_every: int | None = None

    def __post_init__(self):
        _check_interval("Schedule", "stats_every", self.stats_every)
        _check_interval("Schedule", "refresh_every", self.refresh_every)
        _check_interval("Schedule", "check_every", self.check_every, optional=True)

    def stats_due(self, step: int) -> bool:
        """Whether step ``step`` gathers curvature statistics."""
        return step % self.stats_every == 0

    def refresh_due(self, step: int) -> bool:
        """Whether step ``step`` refreshes the amortised part (inverses, roots)."""
        return step % self.refresh_every == 0

    def check_due(self, step: int) -> bool:
        """Whether step ``step`` is the ``check_every``-th statistics step since the last check."""
        if self.check_every is None or not self.stats_due(step):
            return False
        return (step // self.stats_every + 1) % self.check_every == 0
