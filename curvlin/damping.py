"""Levenberg–Marquardt adaptation of the damping, written once for every method.

A curvature method takes the step ``s`` that minimises its quadratic model of the loss,
``q(s) = gᵀs + ½ sᵀ(C + λI)s``. After the step, the ratio of the actual to the predicted change
of the loss on the same batch,

``ρ = (f(θ + s) − f(θ)) / q(s)``,

says how far the model can be trusted: near 1 it is good and the damping ``λ`` can shrink; small
or negative, the model promised more than the loss delivered and ``λ`` must grow
(Levenberg–Marquardt; Martens & Grosse 2015, §6.5). :func:`reduction_ratio` forms ``ρ`` and
:func:`lm_adapt` moves ``λ`` by a constant factor.

When the step is ``s = −α Δ`` with ``Δ = (C + λI)⁻¹ M`` (``M`` the gradient, or the momentum
the preconditioner was applied to), the model needs no extra curvature product:
``sᵀ(C + λI)s = α² Δᵀ M``, so ``q(s) = −α gᵀΔ + ½ α² ΔᵀM`` (:func:`predicted_change`).
"""

from __future__ import annotations

import math

__all__ = ["lm_adapt", "predicted_change", "reduction_ratio"]


def predicted_change(g_dot_delta, delta_dot_m, *, lr: float):
    """The model's change of the loss for the step ``−lr·Δ``: ``−lr gᵀΔ + ½ lr² ΔᵀM``.

    Parameters
    ----------
    g_dot_delta, delta_dot_m : scalars or 0-d arrays
        ``gᵀΔ`` and ``ΔᵀM`` summed over every preconditioned parameter, where ``Δ`` is the
        direction (after any clipping of its length) and ``M`` what the preconditioner was
        applied to. Arrays stay on their device: no synchronisation.
    lr : float
        The learning rate of the step.

    Examples
    --------
    >>> from curvlin.damping import predicted_change
    >>> predicted_change(2.0, 2.0, lr=1.0)  # a Newton step on a quadratic: −½ gᵀC⁻¹g
    -1.0
    """
    return -lr * g_dot_delta + 0.5 * lr * lr * delta_dot_m


def reduction_ratio(actual: float, predicted: float) -> float:
    """``ρ = actual / predicted`` for host numbers; ``-inf`` when the step cannot be judged.

    A non-finite ``actual`` (the loss overflowed) or a model that predicted no decrease
    (``predicted >= 0``) gives ``-inf``, which :func:`lm_adapt` answers by raising the damping.

    Examples
    --------
    >>> from curvlin.damping import reduction_ratio
    >>> reduction_ratio(-0.9, -1.0)
    0.9
    >>> reduction_ratio(float("nan"), -1.0)
    -inf
    """
    actual, predicted = float(actual), float(predicted)
    if not (math.isfinite(actual) and math.isfinite(predicted)) or predicted >= 0.0:
        return -math.inf
    return actual / predicted


def lm_adapt(
    damping: float,
    ratio: float,
    *,
    factor: float = 0.95,
    low: float = 0.25,
    high: float = 0.75,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
) -> float:
    """The Levenberg–Marquardt rule: ``λ·factor`` if ``ρ > high``, ``λ/factor`` if ``ρ < low``.

    Parameters
    ----------
    damping : float
        The current damping ``λ > 0``.
    ratio : float
        ``ρ`` from :func:`reduction_ratio` (NaN counts as a failure: the damping grows).
    factor : float
        In ``(0, 1)``. Martens & Grosse use ``(19/20)^T`` when adapting every ``T`` steps.
    low, high : float
        The thresholds, ``0 <= low < high``.
    min_damping, max_damping : float
        Bounds on the result.

    Returns
    -------
    float
        The new damping.

    References
    ----------
    Martens & Grosse (2015), ICML, §6.5; Moré (1978), "The Levenberg–Marquardt algorithm";
    ``spec/tnt_mbf_smw_kfac.md`` §3 (the LM rule of SMW-GN).

    Examples
    --------
    >>> from curvlin.damping import lm_adapt
    >>> lm_adapt(1.0, 0.9, factor=0.5), lm_adapt(1.0, 0.1, factor=0.5), lm_adapt(1.0, 0.5)
    (0.5, 2.0, 1.0)
    """
    for name, value in (("damping", damping), ("min_damping", min_damping)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"lm_adapt: {name} must be a number > 0, got {value!r}")
    if not math.isfinite(damping):
        raise ValueError(f"lm_adapt: damping must be finite, got {damping!r}")
    if not 0.0 < factor < 1.0:
        raise ValueError(f"lm_adapt: factor must be in (0, 1), got {factor!r}")
    if not 0.0 <= low < high:
        raise ValueError(f"lm_adapt: need 0 <= low < high, got low={low!r}, high={high!r}")
    if not min_damping <= max_damping:
        raise ValueError("lm_adapt: min_damping must not exceed max_damping")
    ratio = float(ratio)
    if ratio > high:
        damping = damping * factor
    elif not ratio >= low:  # NaN lands here too
        damping = damping / factor
    return min(max(damping, min_damping), max_damping)
