"""The Levenberg–Marquardt damping rule (curvlin.damping), on a quadratic.

``f(θ) = ½ θᵀQθ`` with a curvature model ``C = c·Q`` that is off by ``c``: with ``c = 0.1`` the
model underestimates the curvature tenfold, its undamped steps overshoot and diverge, and the
rule must raise ``λ`` until the steps decrease ``f``; with ``c = 1`` (an exact model) and a
large initial ``λ`` it must lower ``λ`` towards Newton's method.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from curvlin.damping import lm_adapt, predicted_change, reduction_ratio


def _run(c, damping, steps, *, adapt=True, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((6, 6))
    q = q @ q.T + 0.1 * np.eye(6)
    theta = rng.standard_normal(6)
    f = lambda t: 0.5 * t @ q @ t  # noqa: E731
    history, dampings = [f(theta)], [damping]
    for _ in range(steps):
        g = q @ theta
        delta = np.linalg.solve(c * q + damping * np.eye(6), g)
        new = theta - delta
        predicted = predicted_change(g @ delta, delta @ g, lr=1.0)
        # the model's own prediction, from gᵀΔ and ΔᵀM alone, equals q(s) with C + λI
        s = -delta
        assert math.isclose(predicted, g @ s + 0.5 * s @ (c * q + damping * np.eye(6)) @ s)
        rho = reduction_ratio(f(new) - f(theta), predicted)
        if adapt:
            damping = lm_adapt(damping, rho, factor=0.5)
        theta = new
        history.append(f(theta))
        dampings.append(damping)
    return np.array(history), np.array(dampings)


def test_an_overconfident_model_gets_more_damping_and_converges():
    values, _ = _run(0.1, 1e-2, 40, adapt=False)
    assert values[-1] > 1e3 * values[0]  # without the rule: divergence
    values, dampings = _run(0.1, 1e-2, 300)
    assert dampings[-1] > 100 * dampings[0]  # raised by orders of magnitude
    assert int(np.argmax(values)) < 30  # the damping caught up early (each failure doubles λ)
    assert values[-1] < 1e-9 * values[0]  # and then it converges


def test_an_exact_model_loses_its_damping():
    values, dampings = _run(1.0, 100.0, 60)
    assert np.all(np.diff(values) <= 0)
    assert dampings[-1] < 1e-3 * dampings[0]  # ρ stays near 1: λ shrinks every step
    assert values[-1] < 1e-6 * values[0]  # towards Newton's method


def test_reduction_ratio_guards():
    assert reduction_ratio(-1.0, -2.0) == 0.5
    assert reduction_ratio(1.0, -2.0) == -0.5
    assert reduction_ratio(-1.0, 0.0) == -math.inf  # the model predicted no decrease
    assert reduction_ratio(math.inf, -1.0) == -math.inf
    assert lm_adapt(1.0, math.nan, factor=0.5) == 2.0  # NaN counts as a failure


def test_lm_adapt_bounds_and_errors():
    assert lm_adapt(1e-8, 1.0, factor=0.5) == 1e-8
    assert lm_adapt(1e8, -1.0, factor=0.5) == 1e8
    with pytest.raises(ValueError, match="damping"):
        lm_adapt(0.0, 0.5)
    with pytest.raises(ValueError, match="factor"):
        lm_adapt(1.0, 0.5, factor=1.0)
    with pytest.raises(ValueError, match="low < high"):
        lm_adapt(1.0, 0.5, low=0.8, high=0.2)
