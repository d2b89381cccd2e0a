"""Tests of curvlin.quasi_newton: double damping, BFGS inverse update, L-BFGS, Hessian action.

Property tests T3–T11 of ``spec/kbfgs.md`` §10 on every backend of the ``xp`` fixture, against
dense NumPy float64 references written here (the product form of BFGS, dense BFGS from
``gamma·I`` on the same pairs), plus the §9.6 in-place regression test, bad inputs, and a
check on torch's meta device that nothing synchronises with the host.
"""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pytest
from _helpers import PROPERTY, assert_close, random_spd, seeds
from hypothesis import given
from hypothesis import strategies as st

from curvlin import quasi_newton as qn
from curvlin.quasi_newton import (
    bfgs_inverse_update,
    double_damping,
    hessian_action_update,
    hessian_action_update_minibatch,
    lbfgs_apply,
    lbfgs_init,
    lbfgs_push,
    lm_damping,
    powell_damping,
)

DTYPES = ("float64", "float32")
#: Relative tolerances of exact identities (the float32 ones are loose: roundoff, cond ~ 10).
RTOL = {"float64": 1e-10, "float32": 2e-3}

dims = st.integers(1, 10)


# -- references (NumPy, float64) ------------------------------------------------------------


def ref_bfgs(h, s, y):
    """BFGS inverse update in product form ``(I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ``."""
    h, s, y = (np.asarray(a, dtype=np.float64) for a in (h, s, y))
    rho = 1.0 / (s @ y)
    v = np.eye(len(s)) - rho * np.outer(y, s)
    return v.T @ h @ v + rho * np.outer(s, s)


def ref_lbfgs_dense(pairs, d, gamma):
    """Dense BFGS from ``gamma·I`` with the pairs, oldest first."""
    h = gamma * np.eye(d)
    for s, y in pairs:
        h = ref_bfgs(h, s, y)
    return h


def curvature_pair(rng, d, *, cond=10.0):
    """``(s, B s)`` for a random SPD ``B``: a pair with ``sᵀy > 0``."""
    b = random_spd(rng, d, cond=cond)
    s = rng.standard_normal(d)
    return s, b @ s


def host(x):
    """A backend array on the host as float64 NumPy."""
    from _helpers import to_numpy

    return np.asarray(to_numpy(x), dtype=np.float64)


def state_arrays(state):
    from _helpers import to_numpy

    return [np.asarray(to_numpy(a)) for a in state]


# -- T3: BFGS secant, symmetry, positive definiteness ----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@PROPERTY
@given(d=dims, seed=seeds)
def test_bfgs_update_matches_reference_and_secant(xp, to_xp, dtype, d, seed):
    rng = np.random.default_rng(seed)
    h = random_spd(rng, d, cond=10.0)
    s, y = curvature_pair(rng, d)
    h_x, s_x, y_x = to_xp(h, dtype), to_xp(s, dtype), to_xp(y, dtype)
    out = bfgs_inverse_update(h_x, s_x, y_x)
    assert out.dtype == h_x.dtype
    assert tuple(out.shape) == (d, d)
    new = host(out)
    rtol = RTOL[dtype]
    assert_close(new, ref_bfgs(host(h_x), host(s_x), host(y_x)), rtol=rtol, what="H+")
    # secant equation H⁺y = s, norm-wise relative
    yy, ss = host(y_x), host(s_x)
    residual = np.linalg.norm(new @ yy - ss)
    assert residual <= rtol * (np.linalg.norm(ss) + np.linalg.norm(new, 2) * np.linalg.norm(yy))
    assert np.array_equal(new, new.T), "H+ must be exactly symmetric"
    np.linalg.cholesky(new)  # positive definite


def test_bfgs_returns_new_array_and_leaves_input_alone(xp, to_xp, to_np, rng):
    """Regression for spec §9.6: rebinding ``H = (H + Hᵀ)/2`` then updating the copy."""
    d = 5
    h = random_spd(rng, d)
    s, y = curvature_pair(rng, d)
    h_x = to_xp(h)
    before = np.array(to_np(h_x), copy=True)
    out = bfgs_inverse_update(h_x, to_xp(s), to_xp(y))
    assert np.array_equal(to_np(h_x), before), "the caller's h was modified in place"
    assert_close(out, ref_bfgs(h, s, y), rtol=1e-10, what="the returned H+ is the update")
    assert not np.allclose(to_np(out), before)
    # the same for an L-BFGS memory and the Hessian-action update
    state = _init_like(xp, to_xp, d, 2, "float64")
    saved = state_arrays(state)
    lbfgs_push(state, to_xp(s), to_xp(y))
    assert all(np.array_equal(a, b) for a, b in zip(state_arrays(state), saved))
    hessian_action_update(h_x, to_xp(random_spd(rng, d)), to_xp(s), damping=0.1)
    assert np.array_equal(to_np(h_x), before)


# -- T4: Powell -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@PROPERTY
@given(d=dims, seed=seeds, mu1=st.floats(0.05, 0.95))
def test_powell_inequality_equality_unchanged(xp, to_xp, to_np, dtype, d, seed, mu1):
    rng = np.random.default_rng(seed)
    h = random_spd(rng, d)
    s, y = rng.standard_normal(d), rng.standard_normal(d)
    s_x, y_x, hy_x = to_xp(s, dtype), to_xp(y, dtype), to_xp(h @ y, dtype)
    out = powell_damping(s_x, y_x, hy_x, mu1=mu1)
    assert out.dtype == s_x.dtype
    ss, yy, hy = host(s_x), host(y_x), host(hy_x)
    sty, yhy = ss @ yy, yy @ hy
    new_sty = host(out) @ yy
    scale = abs(yhy) + np.linalg.norm(host(out)) * np.linalg.norm(yy)
    if sty < mu1 * yhy:  # active: equality
        assert abs(new_sty - mu1 * yhy) <= RTOL[dtype] * scale
    else:  # inactive: bit-identical
        assert np.array_equal(to_np(out), to_np(s_x))
    assert new_sty >= mu1 * yhy - RTOL[dtype] * scale


def test_powell_zero_y_leaves_s_unchanged(xp, to_xp, to_np):
    s = to_xp(np.array([1.0, -2.0, 0.5]))
    zero = to_xp(np.zeros(3))
    out = powell_damping(s, zero, zero, mu1=0.2)  # 0/0: must not produce NaN
    assert np.array_equal(to_np(out), to_np(s))


# -- T5: Levenberg–Marquardt ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@PROPERTY
@given(d=dims, seed=seeds, mu2=st.floats(0.01, 3.0))
def test_lm_convex_and_additive(xp, to_xp, to_np, dtype, d, seed, mu2):
    rng = np.random.default_rng(seed)
    s, y = rng.standard_normal(d), rng.standard_normal(d)
    s_x, y_x = to_xp(s, dtype), to_xp(y, dtype)
    ss, yy = host(s_x), host(y_x)
    sty, sts = ss @ yy, ss @ ss
    rtol = RTOL[dtype]
    # v1, convex
    out = host(lm_damping(s_x, y_x, mu2=mu2))
    scale = mu2 * sts + np.linalg.norm(ss) * np.linalg.norm(out)
    if sty < mu2 * sts:
        assert abs(ss @ out - mu2 * sts) <= rtol * scale
    else:
        assert np.array_equal(out, yy)
    assert ss @ out >= mu2 * sts - rtol * scale
    # v2, additive: s̃ᵀỹ = s̃ᵀy + mu2 s̃ᵀs̃
    add = host(lm_damping(s_x, y_x, mu2=mu2, variant="additive"))
    assert abs(ss @ add - (sty + mu2 * sts)) <= rtol * (abs(sty) + mu2 * sts + 1e-300)
    assert_close(add, yy + mu2 * ss, rtol=rtol, what="additive")


def test_lm_convex_zero_denominator_and_mu2_one(xp, to_xp, to_np):
    s = to_xp(np.array([1.0, 0.0]))
    y = to_xp(np.array([1.0, 1.0]))  # sᵀy = sᵀs = 1: zero denominator, active for mu2 = 2
    out = to_np(lm_damping(s, y, mu2=2.0))
    assert np.all(np.isfinite(out))
    assert_close(out, np.array([2.0, 1.0]), rtol=1e-15)
    assert out @ np.array([1.0, 0.0]) == pytest.approx(2.0)
    # mu2 = 1: θ2 = 0, ỹ = s
    y2 = to_xp(np.array([0.5, 3.0]))
    assert_close(lm_damping(s, y2, mu2=1.0), np.array([1.0, 0.0]), rtol=1e-15)
    # mu2 > 1 with a nonzero denominator still gives equality
    y3 = to_xp(np.array([-0.5, 1.0]))
    out3 = to_np(lm_damping(s, y3, mu2=1.5))
    assert out3[0] == pytest.approx(1.5, rel=1e-14)


def test_mu2_as_array_matches_number(xp, to_xp, to_np, rng):
    s, y = rng.standard_normal(4), rng.standard_normal(4)
    for variant in ("convex", "additive"):
        a = lm_damping(to_xp(s), to_xp(y), mu2=0.7, variant=variant)
        b = lm_damping(to_xp(s), to_xp(y), mu2=to_xp(np.asarray(0.7)), variant=variant)
        assert_close(b, to_np(a), rtol=1e-15)


# -- T6: growth and shrink caps; G1 -----------------------------------------------------------


@pytest.mark.parametrize("variant", ["convex", "additive"])
@PROPERTY
@given(d=dims, seed=seeds, mu1=st.floats(0.05, 0.9), mu2=st.floats(1e-3, 0.99))
def test_double_damping_caps(xp, to_xp, to_np, variant, d, seed, mu1, mu2):
    rng = np.random.default_rng(seed)
    h = random_spd(rng, d, cond=10.0)
    s, y = rng.standard_normal(d), rng.standard_normal(d)
    if seed % 2:  # half of the draws: a near-secant pair, where LM is often inactive
        s, y = curvature_pair(rng, d)
    h_x, y_x = to_xp(h), to_xp(y)
    s_d, y_d = double_damping(to_xp(s), y_x, h_x, mu1=mu1, mu2=mu2, variant=variant)
    h_new = host(bfgs_inverse_update(h_x, s_d, y_d))
    sd, yd = host(s_d), host(y_d)
    tol = 1e-9
    sty = sd @ yd
    assert sty > 0  # G1
    assert sty >= mu2 * (sd @ sd) * (1 - tol)
    if variant == "additive":
        assert sty >= (mu1 * (y @ h @ y) + mu2 * (sd @ sd)) * (1 - tol)
    # growth cap: ỹᵀH⁺ỹ <= ỹᵀỹ / mu2
    assert yd @ h_new @ yd <= (yd @ yd) / mu2 * (1 + tol)
    # shrink cap, whenever step 2 left y unchanged
    if np.array_equal(to_np(y_d), to_np(y_x)):
        assert y @ h_new @ y >= mu1 * (y @ h @ y) * (1 - tol)


def test_shrink_cap_when_lm_is_inactive(xp, to_xp, to_np, rng):
    d, mu1 = 6, 0.2
    h = random_spd(rng, d)
    for _ in range(5):
        s, y = rng.standard_normal(d), rng.standard_normal(d)
        s_d, y_d = double_damping(to_xp(s), to_xp(y), to_xp(h), mu1=mu1, mu2=1e-8)
        assert np.array_equal(to_np(y_d), y)  # LM inactive
        h_new = host(bfgs_inverse_update(to_xp(h), s_d, y_d))
        assert y @ h_new @ y >= mu1 * (y @ h @ y) * (1 - 1e-10)


def test_double_damping_dead_pair_is_returned_and_skipped(xp, to_xp, to_np, rng):
    d = 4
    h = to_xp(random_spd(rng, d))
    zero, v = to_xp(np.zeros(d)), to_xp(rng.standard_normal(d))
    for s, y in ((zero, v), (v, zero), (zero, zero)):
        s_d, y_d = double_damping(s, y, h, mu2=0.5)
        assert np.array_equal(to_np(s_d), to_np(s))
        assert np.array_equal(to_np(y_d), to_np(y))
        assert np.array_equal(to_np(bfgs_inverse_update(h, s_d, y_d)), to_np(h))


# -- T7: positive definiteness over a long run (NumPy only, a smoke bound) --------------------


@pytest.mark.parametrize("variant", ["convex", "additive"])
def test_long_run_stays_positive_definite(variant):
    rng = np.random.default_rng(7)
    d, mu2 = 7, math.sqrt(0.3)
    h = np.eye(d)
    steps = rng.uniform(-1.0, 1.0, size=(2000, 2, d))
    for k, (s, y) in enumerate(steps):
        s_d, y_d = double_damping(s, y, h, mu2=mu2, variant=variant)
        h = bfgs_inverse_update(h, s_d, y_d)
        if k % 250 == 249:
            evals = np.linalg.eigvalsh(h)
            assert evals[0] > 0, (k, evals[0])
            assert np.isfinite(evals[-1]), (k, evals[-1])


# -- T8: L-BFGS equals dense BFGS -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@PROPERTY
@given(
    d=dims,
    memory=st.integers(1, 6),
    n_pairs=st.integers(0, 12),
    cols=st.sampled_from([None, 1, 3]),
    gamma=st.sampled_from([1.0, 0.5, 2.5]),
    seed=seeds,
)
def test_lbfgs_matches_dense_bfgs(xp, to_xp, dtype, d, memory, n_pairs, cols, gamma, seed):
    rng = np.random.default_rng(seed)
    state = _init_like(xp, to_xp, d, memory, dtype)
    pairs = []
    for _ in range(n_pairs):
        s, y = curvature_pair(rng, d, cond=5.0)
        s_x, y_x = to_xp(s, dtype), to_xp(y, dtype)
        state = lbfgs_push(state, s_x, y_x)
        pairs.append((host(s_x), host(y_x)))
    kept = pairs[-memory:] if pairs else []
    dense = ref_lbfgs_dense(kept, d, gamma)
    v = rng.standard_normal(d if cols is None else (d, cols))
    v_x = to_xp(v, dtype)
    expected = dense @ host(v_x)
    for method in ("two-loop", "compact"):
        out = lbfgs_apply(state, v_x, gamma=gamma, method=method)
        assert out.dtype == v_x.dtype
        assert tuple(out.shape) == v.shape
        assert_close(out, expected, rtol=RTOL[dtype] * 10, what=method)
    assert int(np.sum(state_arrays(state)[3])) == len(kept)


def test_lbfgs_eviction_keeps_the_last_pairs(xp, to_xp, rng):
    d, memory, gamma = 5, 3, 1.0
    state = _init_like(xp, to_xp, d, memory, "float64")
    pairs = [curvature_pair(rng, d) for _ in range(7)]
    for s, y in pairs:
        state = lbfgs_push(state, to_xp(s), to_xp(y))
    dense = ref_lbfgs_dense(pairs[-memory:], d, gamma)
    eye = to_xp(np.eye(d))
    for method in ("two-loop", "compact"):
        assert_close(lbfgs_apply(state, eye, method=method), dense, rtol=1e-10, what=method)
    assert_close(state.s, np.stack([s for s, _ in pairs[-memory:]]), rtol=0.0)


def test_lbfgs_empty_and_skipped_pairs(xp, to_xp, rng):
    d = 4
    state = _init_like(xp, to_xp, d, 3, "float64")
    v = rng.standard_normal(d)
    for method in ("two-loop", "compact"):
        assert_close(lbfgs_apply(state, to_xp(v), gamma=2.0, method=method), 2.0 * v, rtol=0.0)
    good = curvature_pair(rng, d)
    state = lbfgs_push(state, to_xp(good[0]), to_xp(good[1]))
    state = lbfgs_push(state, to_xp(good[0]), to_xp(-good[1]))  # rejected
    dense = ref_lbfgs_dense([good], d, 1.0)
    for method in ("two-loop", "compact"):
        assert_close(lbfgs_apply(state, to_xp(v), method=method), dense @ v, rtol=1e-10)


@pytest.mark.parametrize("method", ["two-loop", "compact"])
def test_double_damping_with_lbfgs_state_matches_dense(xp, to_xp, to_np, rng, method):
    d = 6
    state = _init_like(xp, to_xp, d, 4, "float64")
    pairs = [curvature_pair(rng, d) for _ in range(3)]
    for s, y in pairs:
        state = lbfgs_push(state, to_xp(s), to_xp(y))
    h = ref_lbfgs_dense(pairs, d, 1.5)
    s, y = rng.standard_normal(d), rng.standard_normal(d)
    got = double_damping(to_xp(s), to_xp(y), state, mu2=0.3, gamma=1.5, lbfgs_method=method)
    want = double_damping(to_xp(s), to_xp(y), to_xp(h), mu2=0.3)
    for a, b in zip(got, want):
        assert_close(a, to_np(b), rtol=1e-10)


def _init_like(xp, to_xp, d, memory, dtype):
    probe = to_xp(np.zeros(1), dtype)
    from array_api_compat import device

    return lbfgs_init(d, memory, xp=xp, dtype=probe.dtype, device=device(probe))


# -- T9: Hessian-action update ----------------------------------------------------------------


@PROPERTY
@given(d=dims, seed=seeds, damping=st.sampled_from([0.0, 0.1, 1.0]))
def test_hessian_action_fixed_point_and_monotone_error(xp, to_xp, d, seed, damping):
    rng = np.random.default_rng(seed)
    a = random_spd(rng, d, cond=20.0)
    a_lam = a + damping * np.eye(d)
    exact = np.linalg.inv(a_lam)
    u = rng.standard_normal(d)
    out = hessian_action_update(to_xp(exact), to_xp(a), to_xp(u), damping=damping)
    assert_close(out, exact, rtol=1e-10, what="fixed point")
    w, v = np.linalg.eigh(a_lam)
    root = (v * np.sqrt(w)) @ v.T

    def error(h):
        return np.linalg.norm(root @ h @ root - np.eye(d))

    h = random_spd(rng, d, cond=5.0)
    h_x, a_x = to_xp(h), to_xp(a)
    previous = error(h)
    for _ in range(6):
        h_x = hessian_action_update(h_x, a_x, to_xp(rng.standard_normal(d)), damping=damping)
        current = error(host(h_x))
        assert current <= previous * (1 + 1e-9) + 1e-12
        previous = current


def test_hessian_action_damping_argument_equals_damped_matrix(xp, to_xp, rng):
    d, lam = 5, 0.3
    a, h, u = random_spd(rng, d), random_spd(rng, d), rng.standard_normal(d)
    one = hessian_action_update(to_xp(h), to_xp(a), to_xp(u), damping=lam)
    two = hessian_action_update(to_xp(h), to_xp(a + lam * np.eye(d)), to_xp(u))
    assert_close(one, host(two), rtol=1e-12)
    s_a = h @ u
    assert_close(host(one) @ ((a + lam * np.eye(d)) @ s_a), s_a, rtol=1e-10, what="secant")


@pytest.mark.parametrize("dtype", DTYPES)
@PROPERTY
@given(
    d=st.integers(1, 8),
    lead=st.sampled_from([(6,), (3, 4), (1,)]),
    seed=seeds,
    damping=st.sampled_from([0.0, 0.2]),
)
def test_minibatch_hessian_action_matches_dense(xp, to_xp, dtype, d, lead, seed, damping):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, d))
    n = lead[0]  # conv convention: divide by the examples, sum over the spatial axis
    h = random_spd(rng, d)
    u = x.reshape(-1, d).mean(axis=0) + 0.1
    x_x, h_x, u_x = to_xp(x, dtype), to_xp(h, dtype), to_xp(u, dtype)
    out = hessian_action_update_minibatch(h_x, x_x, u_x, n_examples=n, damping=damping)
    rows = host(x_x).reshape(-1, d)
    a = rows.T @ rows / n + damping * np.eye(d)
    hh, uu = host(h_x), host(u_x)
    s_a = hh @ uu
    y_a = a @ s_a
    # (with damping 0, X̄ s_a = 0 would make the pair skipped)
    expected = ref_bfgs(hh, s_a, y_a) if s_a @ y_a > 0 else hh
    assert_close(out, expected, rtol=RTOL[dtype] * 10, what="minibatch H_a")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(6,), (3, 4)])
def test_minibatch_implicit_homogeneous_column(xp, to_xp, dtype, lead, rng):
    """``homogeneous=True`` on ``x`` equals the explicit rows ``[x, 1]``."""
    d = 5
    x = rng.standard_normal((*lead, d - 1))
    x_bar = np.concatenate([x, np.ones((*lead, 1))], axis=-1)
    h, u = random_spd(rng, d), x_bar.reshape(-1, d).mean(axis=0)
    kw = {"n_examples": lead[0], "damping": 0.2}
    implicit = hessian_action_update_minibatch(
        to_xp(h, dtype), to_xp(x, dtype), to_xp(u, dtype), homogeneous=True, **kw
    )
    explicit = hessian_action_update_minibatch(
        to_xp(h, dtype), to_xp(x_bar, dtype), to_xp(u, dtype), **kw
    )
    assert_close(implicit, host(explicit), rtol=RTOL[dtype] * 10, what="implicit [x, 1]")
    rows = x_bar.reshape(-1, d)  # and the dense float64 reference
    s_a = h @ u
    expected = ref_bfgs(h, s_a, (rows.T @ rows / lead[0] + 0.2 * np.eye(d)) @ s_a)
    assert_close(implicit, expected, rtol=RTOL[dtype] * 10, what="implicit [x, 1] vs dense")


def test_minibatch_duplication_invariance(xp, to_xp, to_np, rng):
    """T11: duplicating the minibatch (and its example count) changes nothing."""
    d, m = 4, 5
    x = np.concatenate([rng.standard_normal((m, d - 1)), np.ones((m, 1))], axis=1)
    h, u = random_spd(rng, d), x.mean(axis=0)
    once = hessian_action_update_minibatch(to_xp(h), to_xp(x), to_xp(u), n_examples=m, damping=0.1)
    twice = hessian_action_update_minibatch(
        to_xp(h), to_xp(np.concatenate([x, x])), to_xp(u), n_examples=2 * m, damping=0.1
    )
    assert_close(twice, to_np(once), rtol=1e-13)


# -- T10: skip rules --------------------------------------------------------------------------


def _skip_case(case, rng, d):
    s, y = curvature_pair(rng, d)
    kw = {}
    if case == "negative-curvature":
        y = -y
    elif case == "threshold":
        kw["min_curvature"] = (s @ y) / (s @ s) * 1.01
    elif case == "nan":
        s = s.copy()
        s[0] = np.nan
    elif case == "inf":
        y = y.copy()
        y[-1] = np.inf
    return s, y, kw


SKIP_CASES = ["negative-curvature", "threshold", "nan", "inf"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SKIP_CASES)
def test_skip_rules_leave_h_and_memory_bit_identical(xp, to_xp, to_np, rng, case, dtype):
    d = 5
    h = random_spd(rng, d)
    h[0, 1] = h[1, 0] = -0.0  # bit for bit includes the sign of a zero
    h_x = to_xp(h, dtype)
    s, y, kw = _skip_case(case, rng, d)
    s_x, y_x = to_xp(s, dtype), to_xp(y, dtype)
    out = bfgs_inverse_update(h_x, s_x, y_x, **kw)
    assert to_np(out).tobytes() == to_np(h_x).tobytes()
    state = _init_like(xp, to_xp, d, 3, dtype)
    good = curvature_pair(rng, d)
    state = lbfgs_push(state, to_xp(good[0], dtype), to_xp(good[1], dtype))
    pushed = lbfgs_push(state, s_x, y_x, **kw)
    for a, b in zip(state_arrays(pushed), state_arrays(state)):
        assert np.array_equal(a, b)
    # Hessian action with the threshold rule
    if case == "threshold":
        u = to_xp(rng.standard_normal(d), dtype)
        a = to_xp(random_spd(rng, d), dtype)
        out = hessian_action_update(h_x, a, u, min_curvature=1e30)
        assert np.array_equal(to_np(out), to_np(h_x))


def test_threshold_just_below_accepts(xp, to_xp, to_np, rng):
    d = 5
    h = to_xp(random_spd(rng, d))
    s, y = curvature_pair(rng, d)
    kw = {"min_curvature": (s @ y) / (s @ s) * 0.99}
    assert not np.array_equal(to_np(bfgs_inverse_update(h, to_xp(s), to_xp(y), **kw)), to_np(h))
    # and as a 0-d array
    kw = {"min_curvature": to_xp(np.asarray(kw["min_curvature"]))}
    assert not np.array_equal(to_np(bfgs_inverse_update(h, to_xp(s), to_xp(y), **kw)), to_np(h))


@pytest.mark.parametrize("dtype", DTYPES)
def test_overflowing_result_is_skipped(xp, to_xp, to_np, dtype):
    d = 3
    big = 1e200 if dtype == "float64" else 1e30
    h = to_xp(np.eye(d), dtype)
    s = to_xp(np.array([big, 0.0, 0.0]), dtype)
    y = to_xp(np.array([1.0 / big, 0.0, 0.0]), dtype)  # sᵀy = 1, H⁺ ~ big²
    with warnings.catch_warnings():  # NumPy reports the overflow of the rejected branch
        warnings.simplefilter("ignore", RuntimeWarning)
        out = bfgs_inverse_update(h, s, y)
    assert np.array_equal(to_np(out), to_np(h))


# -- T11: sign and scale invariance -----------------------------------------------------------


@PROPERTY
@given(d=dims, seed=seeds, k=st.integers(-6, 6), variant=st.sampled_from(["convex", "additive"]))
def test_sign_and_scale_invariance(xp, to_xp, to_np, d, seed, k, variant):
    rng = np.random.default_rng(seed)
    h = to_xp(random_spd(rng, d))
    s, y = rng.standard_normal(d), rng.standard_normal(d)
    c = 2.0**k  # a power of two: every scaling is exact, so results are bit-identical
    base = double_damping(to_xp(s), to_xp(y), h, mu2=0.4, variant=variant)
    scaled = double_damping(to_xp(c * s), to_xp(c * y), h, mu2=0.4, variant=variant)
    for a, b in zip(base, scaled):
        assert np.array_equal(c * to_np(a), to_np(b))  # identical DD decisions
    h_new = to_np(bfgs_inverse_update(h, *base))
    assert np.array_equal(to_np(bfgs_inverse_update(h, scaled[0], scaled[1])), h_new)
    neg = bfgs_inverse_update(h, -base[0], -base[1])
    assert_close(neg, h_new, rtol=1e-14, what="(-s, -y)")


# -- float32 scalars on a device without float64 ----------------------------------------------


def test_no_float64_device_falls_back_to_float32():
    xp = pytest.importorskip("array_api_strict")
    dev = xp.Device("no_float64")
    rng = np.random.default_rng(3)
    d = 4
    h = random_spd(rng, d)
    s, y = curvature_pair(rng, d)

    def arr(a):
        return xp.asarray(np.asarray(a, dtype=np.float32), device=dev)

    out = bfgs_inverse_update(arr(h), arr(s), arr(y), min_curvature=1e-4)
    assert out.dtype == xp.float32
    assert_close(out, ref_bfgs(h, s, y), rtol=2e-3)
    s_d, y_d = double_damping(arr(s), arr(-y), arr(h), mu2=0.5)
    state = lbfgs_init(d, 2, xp=xp, dtype=xp.float32, device=dev)
    state = lbfgs_push(state, s_d, y_d)
    for method in ("two-loop", "compact"):
        got = lbfgs_apply(state, arr(s), method=method)
        assert_close(got, ref_lbfgs_dense([(host(s_d), host(y_d))], d, 1.0) @ s, rtol=2e-3)


def test_float32_scalars_accumulated_in_float64(xp, to_xp):
    h = to_xp(np.eye(2), "float32")
    assert qn._accumulation_dtype(xp, h) == xp.float64


# -- no host synchronisation ------------------------------------------------------------------


def test_nothing_synchronises_on_torch_meta_tensors():
    """On the meta device ``.item()``/``bool()``/``float()`` raise: every path must avoid them."""
    torch = pytest.importorskip("torch")
    d = 5

    def m(*shape):
        return torch.empty(shape, device="meta", dtype=torch.float32)

    h, s, y = m(d, d), m(d), m(d)
    scalar = m()
    bfgs_inverse_update(h, s, y, min_curvature=scalar)
    powell_damping(s, y, s, mu1=0.2)
    for variant in ("convex", "additive"):
        lm_damping(s, y, mu2=scalar, variant=variant)
        double_damping(s, y, h, mu2=0.5, variant=variant)
    state = lbfgs_init(d, 3, xp=torch, dtype=torch.float32, device="meta")
    state = lbfgs_push(state, s, y, min_curvature=scalar)
    for method in ("two-loop", "compact"):
        assert lbfgs_apply(state, m(d, 4), gamma=scalar, method=method).shape == (d, 4)
    double_damping(s, y, state, mu2=0.5)
    hessian_action_update(h, h, s, damping=scalar)
    hessian_action_update_minibatch(h, m(7, 3, d), s, n_examples=7, damping=0.1)


def test_kernels_have_no_host_conversions():
    kernels = [qn._powell, qn._lm, qn._bfgs, qn._two_loop, qn._compact, qn._masked]
    kernels += [qn._finite_part, qn._dot]
    for fn in kernels:
        src = inspect.getsource(fn)
        for bad in (".item(", "float(", "bool(", "int(", ".tolist("):
            assert bad not in src, f"{fn.__name__} contains {bad!r}"


# -- bad inputs -------------------------------------------------------------------------------


def _bad_calls(xp, to_xp):
    v3, v4 = to_xp(np.ones(3)), to_xp(np.ones(4))
    h3 = to_xp(np.eye(3))
    f32 = to_xp(np.ones(3), "float32")
    state = lbfgs_push(_init_like(xp, to_xp, 3, 2, "float64"), v3, v3)
    return [
        # shapes
        (ValueError, "y must be a vector", lambda: bfgs_inverse_update(h3, v3, v4)),
        (
            ValueError,
            "h must be a square",
            lambda: bfgs_inverse_update(to_xp(np.ones((3, 4))), v3, v3),
        ),
        (ValueError, "to match h", lambda: bfgs_inverse_update(to_xp(np.eye(4)), v3, v3)),
        (ValueError, "s must be a vector", lambda: bfgs_inverse_update(h3, h3, v3)),
        (ValueError, "hy must be a vector", lambda: powell_damping(v3, v3, v4)),
        (ValueError, "to match h", lambda: double_damping(v4, v4, h3, mu2=0.1)),
        (ValueError, "to match h", lambda: double_damping(v4, v4, state, mu2=0.1)),
        (ValueError, "to match state", lambda: lbfgs_push(state, v4, v4)),
        (ValueError, "v must have shape", lambda: lbfgs_apply(state, v4)),
        (ValueError, "v must have shape", lambda: lbfgs_apply(state, to_xp(np.ones((3, 2, 2))))),
        (ValueError, "a must have shape", lambda: hessian_action_update(h3, to_xp(np.eye(4)), v3)),
        (ValueError, "u must be a vector", lambda: hessian_action_update(h3, h3, v4)),
        (
            ValueError,
            "x must have shape",
            lambda: hessian_action_update_minibatch(h3, v3, v3, n_examples=1, damping=0.1),
        ),
        (
            ValueError,
            "x must have shape",
            lambda: hessian_action_update_minibatch(
                h3, to_xp(np.ones((5, 4))), v3, n_examples=5, damping=0.1
            ),
        ),
        (
            ValueError,
            r"x must have shape \(\.\.\., 2\).*homogeneous=True",
            lambda: hessian_action_update_minibatch(
                h3, h3, v3, n_examples=3, damping=0.1, homogeneous=True
            ),
        ),
        (
            TypeError,
            "homogeneous must be a bool",
            lambda: hessian_action_update_minibatch(
                h3, h3, v3, n_examples=3, damping=0.1, homogeneous=1
            ),
        ),
        (
            ValueError,
            "n_examples must be >= 1",
            lambda: hessian_action_update_minibatch(h3, h3, v3, n_examples=0, damping=0.1),
        ),
        (
            TypeError,
            "n_examples must be an integer",
            lambda: hessian_action_update_minibatch(h3, h3, v3, n_examples=2.0, damping=0.1),
        ),
        (
            ValueError,
            "inconsistent shapes",
            lambda: lbfgs_apply(state._replace(rho=to_xp(np.zeros(3))), v3),
        ),
        # dtypes
        (TypeError, "mixed dtypes", lambda: bfgs_inverse_update(h3, f32, v3)),
        (TypeError, "mixed dtypes", lambda: lbfgs_push(state, f32, f32)),
        (
            TypeError,
            "real floating",
            lambda: bfgs_inverse_update(xp.eye(3, dtype=xp.int64), v3, v3),
        ),
        (TypeError, "must be an array", lambda: bfgs_inverse_update(h3, [1.0, 2.0, 3.0], v3)),
        # options
        (ValueError, "mu1 must lie", lambda: powell_damping(v3, v3, v3, mu1=0.0)),
        (ValueError, "mu1 must lie", lambda: powell_damping(v3, v3, v3, mu1=1.0)),
        (ValueError, "mu1 must lie", lambda: double_damping(v3, v3, h3, mu1=1.5, mu2=0.1)),
        (ValueError, "mu1 must lie", lambda: powell_damping(v3, v3, v3, mu1=float("nan"))),
        (TypeError, "mu1 must be a real", lambda: powell_damping(v3, v3, v3, mu1="0.2")),
        (ValueError, "mu2 must be finite and > 0", lambda: lm_damping(v3, v3, mu2=0.0)),
        (ValueError, "mu2 must be finite and > 0", lambda: lm_damping(v3, v3, mu2=-1.0)),
        (ValueError, "mu2 must be finite", lambda: double_damping(v3, v3, h3, mu2=math.inf)),
        (TypeError, "mu2 must be a real", lambda: lm_damping(v3, v3, mu2=True)),
        (ValueError, "0-d array", lambda: lm_damping(v3, v3, mu2=v3)),
        (TypeError, "missing 1 required keyword", lambda: lm_damping(v3, v3)),
        (ValueError, "variant must be one of", lambda: lm_damping(v3, v3, mu2=0.1, variant="v1")),
        (
            ValueError,
            "variant must be one of",
            lambda: double_damping(v3, v3, h3, mu2=0.1, variant="DDV2"),
        ),
        (ValueError, "method must be one of", lambda: lbfgs_apply(state, v3, method="dense")),
        (
            ValueError,
            "lbfgs_method must be one of",
            lambda: double_damping(v3, v3, state, mu2=0.1, lbfgs_method="dense"),
        ),
        (ValueError, "gamma must be finite and > 0", lambda: lbfgs_apply(state, v3, gamma=0.0)),
        (
            ValueError,
            "min_curvature must be finite and >= 0",
            lambda: bfgs_inverse_update(h3, v3, v3, min_curvature=-1e-4),
        ),
        (
            ValueError,
            "damping must be finite and >= 0",
            lambda: hessian_action_update(h3, h3, v3, damping=-0.1),
        ),
        (ValueError, "memory must be >= 1", lambda: lbfgs_init(3, 0, xp=xp)),
        (TypeError, "memory must be an integer", lambda: lbfgs_init(3, 2.0, xp=xp)),
        (ValueError, "dim must be >= 1", lambda: lbfgs_init(0, 2, xp=xp)),
        (
            TypeError,
            "dtype must be a real floating",
            lambda: lbfgs_init(3, 2, xp=xp, dtype=xp.int32),
        ),
        (TypeError, "xp must be an array library", lambda: lbfgs_init(3, 2, xp=math)),
        (TypeError, "must be an LBFGSState", lambda: lbfgs_apply((state.s, state.y), v3)),
        (TypeError, "must be an LBFGSState", lambda: lbfgs_push(h3, v3, v3)),
    ]


def test_bad_inputs_raise_with_clear_messages(xp, to_xp):
    for exc, match, call in _bad_calls(xp, to_xp):
        with pytest.raises(exc, match=match):
            call()


def test_mixed_libraries_raise():
    strict = pytest.importorskip("array_api_strict")
    h = np.eye(3)
    s = strict.asarray(np.ones(3))
    with pytest.raises(TypeError, match="one array library"):
        bfgs_inverse_update(h, s, np.ones(3))
    with pytest.raises(TypeError, match="one array library"):
        double_damping(s, np.ones(3), h, mu2=0.1)
    with pytest.raises(TypeError, match="same library"):
        lm_damping(np.ones(3), np.ones(3), mu2=strict.asarray(0.5))
    state = lbfgs_init(3, 2)
    with pytest.raises(TypeError, match="one array library"):
        lbfgs_push(state, s, s)
