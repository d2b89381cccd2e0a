"""Kronecker factor algebra against dense float64 references that form ``F_1 ⊗ … ⊗ F_k``.

Shapes are drawn by hypothesis (1 to 4 factors of sizes 1 to 64, 0 to 2 batch axes,
``∏ d_i <= 512``, or 256 where the reference is a dense solve); values
come from ``numpy.random.default_rng(seed)`` with a drawn seed. Every test runs on every backend
of the ``xp`` fixture.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import (
    PROPERTY,
    assert_close,
    batch_shapes,
    dense_kron,
    dense_kron_apply,
    dense_kron_solve,
    kron_dims,
    random_psd_low_rank,
    random_spd,
    reference_pi_dampings,
    seeds,
    tolerance,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import curvlin
from curvlin import (
    KronFactorization,
    kron_apply,
    kron_dense,
    kron_factorize,
    kron_solve,
    pi_damping,
)

dampings = st.floats(1e-3, 1.0)
#: Solve tests compare with a dense ``np.linalg.solve`` of size ∏ d_i, cubic in it: 256 keeps
#: them fast (512 is 8× the work and dominates the suite's runtime on 2 cores).
SOLVE_TOTAL = 256


def _factors(rng, dims, *, cond=10.0, low_rank=False, spread=1.0):
    """Random SPD factors (or, with ``low_rank``, some rank-deficient PSD ones), each scaled
    by ``10**U(-spread, spread)`` so the π split has something to balance."""
    mats = []
    for d in dims:
        scale = 10.0 ** rng.uniform(-spread, spread)
        if low_rank and d > 1 and rng.random() < 0.5:
            r = int(rng.integers(1, d))
            m = random_psd_low_rank(rng, d, r) / r
        else:
            m = random_spd(rng, d, cond=cond)
        mats.append(scale * m)
    return mats


def _kron_cond(mats, shifts=None, total_shift=0.0):
    """Condition number of ``⊗(F_i + s_i I) + total_shift·I`` from the factors' eigenvalues."""
    lam = np.ones(1)
    for i, m in enumerate(mats):
        w = np.clip(np.linalg.eigvalsh(m), 0.0, None)
        if shifts is not None:
            w = w + shifts[i]
        lam = np.multiply.outer(lam, w).reshape(-1)
    lam = lam + total_shift
    return float(lam.max() / lam.min())


# -- kron_apply and kron_dense ------------------------------------------------------------


@st.composite
def rectangular_dims(draw, total_max=512):
    """``[(m_i, d_i)]``: column sizes from :func:`kron_dims`, row sizes 1..8 with ∏ m_i <= 512."""
    dims = draw(kron_dims(total_max=total_max))
    rows, prod = [], 1
    for _ in dims:
        m = draw(st.integers(1, min(8, total_max // prod)))
        rows.append(m)
        prod *= m
    return list(zip(rows, dims))


@PROPERTY
@given(shapes=rectangular_dims(), batch=batch_shapes(), seed=seeds)
def test_kron_apply_matches_dense(xp, to_xp, shapes, batch, seed):
    rng = np.random.default_rng(seed)
    mats = [rng.standard_normal(s) for s in shapes]
    dims = tuple(d for _, d in shapes)
    x = rng.standard_normal((*batch, *dims))
    out = kron_apply([to_xp(m) for m in mats], to_xp(x))
    assert out.dtype == xp.float64
    expected = dense_kron_apply(mats, x)
    assert_close(out, expected, rtol=tolerance("float64", n=math.prod(dims)), what="kron_apply")


@PROPERTY
@given(shapes=rectangular_dims(total_max=64), seed=seeds)
def test_kron_dense_matches_numpy_kron(xp, to_xp, shapes, seed):
    rng = np.random.default_rng(seed)
    mats = [rng.standard_normal(s) for s in shapes]
    out = kron_dense([to_xp(m) for m in mats])
    assert out.dtype == xp.float64
    assert_close(out, dense_kron(mats), rtol=8 * np.finfo(np.float64).eps, what="kron_dense")


def test_kron_apply_row_major_weight_convention(xp, to_xp, rng):
    """For ``W`` of shape (out, in) and factors ``[G, A]``: ``(G ⊗ A) vec(W) = vec(G W Aᵀ)``."""
    g, a, w = rng.standard_normal((4, 4)), rng.standard_normal((3, 3)), rng.standard_normal((4, 3))
    out = kron_apply([to_xp(g), to_xp(a)], to_xp(w))
    assert_close(out, g @ w @ a.T, rtol=1e-13, what="G W Aᵀ")
    flat = np.kron(g, a) @ w.reshape(-1)
    assert_close(out, flat.reshape(4, 3), rtol=1e-13, what="np.kron @ vec")


def test_kron_apply_accepts_tuple_and_single_factor(xp, to_xp, rng):
    """Tuples of factors, a single factor, and 1-element axes are all valid input."""
    f = rng.standard_normal((1, 1))
    x = rng.standard_normal((2, 1))
    out = kron_apply((to_xp(f),), to_xp(x))
    assert_close(out, x * f[0, 0], rtol=1e-15, what="1×1 factor")


# -- pi_damping -----------------------------------------------------------------------------


@PROPERTY
@given(dims=kron_dims(), damping=st.floats(1e-8, 10.0), seed=seeds)
def test_pi_damping_matches_reference(xp, to_xp, to_np, dims, damping, seed):
    rng = np.random.default_rng(seed)
    mats = _factors(rng, dims, spread=2.0, low_rank=True)
    gammas = pi_damping([to_xp(m) for m in mats], damping)
    assert isinstance(gammas, tuple)
    assert len(gammas) == len(dims)
    for g in gammas:
        assert g.shape == ()
        assert g.dtype == xp.float64
    values = np.array([float(to_np(g)) for g in gammas])
    np.testing.assert_allclose(np.prod(values), damping, rtol=1e-12)
    np.testing.assert_allclose(values, reference_pi_dampings(mats, damping), rtol=1e-12)


@pytest.mark.parametrize("as_array", [False, True], ids=["float", "0-d array"])
def test_pi_damping_two_factors_is_kfac_formula(xp, to_xp, to_np, rng, as_array):
    """KFAC's factored Tikhonov damping: ``γ_A = π√λ``, ``γ_G = √λ/π``, ``π = sqrt(t_A/t_G)``."""
    g, a = 3.0 * random_spd(rng, 5), 0.02 * random_spd(rng, 7)
    lam = 1e-3
    pi = math.sqrt((np.trace(a) / 7) / (np.trace(g) / 5))
    damping = to_xp(np.asarray(lam)) if as_array else lam
    gamma_g, gamma_a = pi_damping([to_xp(g), to_xp(a)], damping)  # ordered [G, A] like W
    np.testing.assert_allclose(float(to_np(gamma_a)), pi * math.sqrt(lam), rtol=1e-12)
    np.testing.assert_allclose(float(to_np(gamma_g)), math.sqrt(lam) / pi, rtol=1e-12)


@pytest.mark.parametrize("bad", ["zero", "nan", "inf"])
@pytest.mark.parametrize("k", [2, 3])
def test_pi_damping_even_split_when_a_trace_is_unusable(xp, to_xp, to_np, rng, bad, k):
    mats = [5.0 * random_spd(rng, d) for d in (2, 3, 4)[:k]]
    unusable = {"zero": 0.0, "nan": np.nan, "inf": np.inf}[bad]
    mats[1] = np.diag(np.full(3, unusable))  # trace 0, NaN or inf
    gammas = pi_damping([to_xp(m) for m in mats], 0.01)
    values = np.array([float(to_np(g)) for g in gammas])
    np.testing.assert_allclose(values, np.full(k, 0.01 ** (1.0 / k)), rtol=1e-12)


def test_pi_damping_float32(xp, to_xp, to_np, rng):
    mats = [random_spd(rng, 4), 7.0 * random_spd(rng, 3)]
    mats = [m.astype(np.float32).astype(np.float64) for m in mats]
    gammas = pi_damping([to_xp(m, "float32") for m in mats], 1e-3)
    assert all(g.dtype == xp.float32 for g in gammas)
    values = [float(to_np(g)) for g in gammas]
    np.testing.assert_allclose(values, reference_pi_dampings(mats, 1e-3), rtol=1e-5)


def test_pi_damping_returns_0d_arrays_of_the_input_library(xp, to_xp, rng):
    gammas = pi_damping([to_xp(random_spd(rng, 3)), to_xp(random_spd(rng, 2))], 1e-2)
    for g in gammas:
        assert type(g) is type(to_xp(np.zeros(())))
        assert tuple(g.shape) == ()


def test_pi_damping_zero_damping_gives_zeros(xp, to_xp, to_np, rng):
    gammas = pi_damping([to_xp(random_spd(rng, 3)), to_xp(random_spd(rng, 2))], 0.0)
    assert [float(to_np(g)) for g in gammas] == [0.0, 0.0]


# -- kron_solve / kron_factorize ----------------------------------------------------------


@PROPERTY
@given(dims=kron_dims(total_max=SOLVE_TOTAL), batch=batch_shapes(), damping=dampings, seed=seeds)
def test_kron_solve_factored_damping_matches_dense(xp, to_xp, dims, batch, damping, seed):
    """``exact=False``: ``⊗(F_i + γ_i I)⁻¹ vec(x)`` with the π-split ``γ_i``."""
    rng = np.random.default_rng(seed)
    mats = _factors(rng, dims, low_rank=True)
    x = rng.standard_normal((*batch, *dims))
    out = kron_solve([to_xp(m) for m in mats], to_xp(x), damping=damping)
    assert out.dtype == xp.float64
    gammas = reference_pi_dampings(mats, damping)
    big = dense_kron([m + g * np.eye(m.shape[0]) for m, g in zip(mats, gammas)])
    expected = dense_kron_solve(big, x, len(dims))
    cond = _kron_cond(mats, shifts=gammas)
    rtol = tolerance("float64", cond=cond, n=math.prod(dims))
    assert_close(out, expected, rtol=rtol, what=f"kron_solve exact=False, cond {cond:.3g}")


@PROPERTY
@given(dims=kron_dims(total_max=SOLVE_TOTAL), batch=batch_shapes(), damping=dampings, seed=seeds)
def test_kron_solve_exact_damping_matches_dense(xp, to_xp, dims, batch, damping, seed):
    """``exact=True``: ``(⊗F_i + λI)⁻¹ vec(x)``, also for singular PSD factors."""
    rng = np.random.default_rng(seed)
    mats = _factors(rng, dims, low_rank=True)
    x = rng.standard_normal((*batch, *dims))
    out = kron_solve([to_xp(m) for m in mats], to_xp(x), damping=damping, exact=True)
    assert out.dtype == xp.float64
    n = math.prod(dims)
    big = dense_kron(mats) + damping * np.eye(n)
    expected = dense_kron_solve(big, x, len(dims))
    cond = _kron_cond(mats, total_shift=damping)
    rtol = tolerance("float64", cond=cond, n=n)
    assert_close(out, expected, rtol=rtol, what=f"kron_solve exact=True, cond {cond:.3g}")


@pytest.mark.parametrize("exact", [False, True], ids=["factored", "exact"])
@settings(PROPERTY, max_examples=10)
@given(dims=kron_dims(total_max=128), damping=dampings, seed=seeds)
def test_kron_factorize_serves_many_solves(xp, to_xp, to_np, exact, dims, damping, seed):
    rng = np.random.default_rng(seed)
    mats = _factors(rng, dims)
    fact = kron_factorize([to_xp(m) for m in mats], damping=damping, exact=exact)
    assert isinstance(fact, KronFactorization)
    assert fact.dims == tuple(dims)
    if exact:
        assert fact.inverses is None
        assert fact.dampings is None
        assert len(fact.eigenvectors) == len(dims)
        assert tuple(fact.scale.shape) == tuple(dims)
        big = dense_kron(mats) + damping * np.eye(math.prod(dims))
        cond = _kron_cond(mats, total_shift=damping)
    else:
        assert fact.eigenvectors is None
        assert fact.scale is None
        gammas = reference_pi_dampings(mats, damping)
        np.testing.assert_allclose([float(to_np(g)) for g in fact.dampings], gammas, rtol=1e-12)
        big = dense_kron([m + g * np.eye(m.shape[0]) for m, g in zip(mats, gammas)])
        cond = _kron_cond(mats, shifts=gammas)
    rtol = tolerance("float64", cond=cond, n=math.prod(dims))
    first = None
    for batch in [(), (2,), (3, 2)]:
        x = rng.standard_normal((*batch, *dims))
        out = fact.solve(to_xp(x))
        assert out.dtype == xp.float64
        assert_close(out, dense_kron_solve(big, x, len(dims)), rtol=rtol, what=f"batch {batch}")
        if first is None:
            first = (x, to_np(out))
    # The factorisation is not consumed or changed by solving: the first solve repeats exactly.
    np.testing.assert_array_equal(to_np(fact.solve(to_xp(first[0]))), first[1])


def test_kron_factorize_matches_kron_solve(xp, to_xp, to_np, rng):
    mats = _factors(rng, (3, 4, 2))
    x = rng.standard_normal((5, 3, 4, 2))
    for exact in (False, True):
        via_fact = kron_factorize([to_xp(m) for m in mats], damping=0.1, exact=exact).solve(
            to_xp(x)
        )
        direct = kron_solve([to_xp(m) for m in mats], to_xp(x), damping=0.1, exact=exact)
        np.testing.assert_allclose(to_np(via_fact), to_np(direct), rtol=1e-14, atol=1e-14)


def test_kron_exact_and_factored_agree_for_one_factor(xp, to_xp, to_np, rng):
    """With a single factor, π-damping puts all of λ on it, so both modes are ``(F + λI)⁻¹``."""
    f = random_spd(rng, 6)
    x = rng.standard_normal((3, 6))
    a = kron_solve([to_xp(f)], to_xp(x), damping=0.3)
    b = kron_solve([to_xp(f)], to_xp(x), damping=0.3, exact=True)
    expected = np.linalg.solve(f + 0.3 * np.eye(6), x.T).T
    assert_close(a, expected, rtol=1e-12, what="exact=False")
    assert_close(b, expected, rtol=1e-12, what="exact=True")


def test_kron_solve_exact_singular_product_raises(xp, to_xp):
    """``damping=0`` with an exactly zero factor and ``exact=True`` is singular."""
    with pytest.raises(curvlin.LinAlgError, match=r"kron_factorize: .*singular.*damping > 0"):
        kron_solve([to_xp(np.zeros((3, 3))), to_xp(np.eye(2))], to_xp(np.ones((3, 2))), exact=True)


# -- float32 --------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["apply", "dense", "factored", "exact", "factorize"])
@settings(PROPERTY, max_examples=15)
@given(dims=kron_dims(total_max=256), batch=batch_shapes(), seed=seeds)
def test_kron_float32(xp, to_xp, to_np, op, dims, batch, seed):
    """Float32 inputs stay float32 and agree with the float64 reference to float32 accuracy.

    Factors are well conditioned (cond <= 4) and the damping is 0.1, so the damped Kronecker
    matrices have condition numbers of at most a few hundred.
    """
    rng = np.random.default_rng(seed)
    mats = _factors(rng, dims, cond=4.0, spread=0.5)
    # round the inputs to float32 first so the reference sees exactly what the library sees
    mats = [m.astype(np.float32).astype(np.float64) for m in mats]
    x = rng.standard_normal((*batch, *dims)).astype(np.float32).astype(np.float64)
    fs = [to_xp(m, "float32") for m in mats]
    xs = to_xp(x, "float32")
    n, k, lam = math.prod(dims), len(dims), 0.1
    if op == "apply":
        out = kron_apply(fs, xs)
        expected, cond = dense_kron_apply(mats, x), _kron_cond(mats)
    elif op == "dense":
        out, expected, cond = kron_dense(fs), dense_kron(mats), 1.0
    elif op == "exact":
        out = kron_solve(fs, xs, damping=lam, exact=True)
        expected = dense_kron_solve(dense_kron(mats) + lam * np.eye(n), x, k)
        cond = _kron_cond(mats, total_shift=lam)
    else:
        gammas = reference_pi_dampings(mats, lam)
        if op == "factored":
            out = kron_solve(fs, xs, damping=lam)
        else:
            fact = kron_factorize(fs, damping=lam)
            assert all(inv.dtype == xp.float32 for inv in fact.inverses)
            out = fact.solve(xs)
        big = dense_kron([m + g * np.eye(m.shape[0]) for m, g in zip(mats, gammas)])
        expected, cond = dense_kron_solve(big, x, k), _kron_cond(mats, shifts=gammas)
    assert out.dtype == xp.float32
    rtol = tolerance("float32", cond=cond, n=n, factor=10.0 * k)
    assert_close(out, expected, rtol=rtol, what=f"float32 {op}, cond {cond:.3g}")


def test_kron_solve_float32_accuracy(xp, to_xp, to_np, rng):
    """A float32 solve of a well-conditioned problem (cond ≈ 4) is good to a few ulps."""
    mats = [random_spd(rng, d, cond=2.0) for d in (8, 8)]
    mats = [m.astype(np.float32).astype(np.float64) for m in mats]
    x = rng.standard_normal((8, 8)).astype(np.float32).astype(np.float64)
    out = to_np(kron_solve([to_xp(m, "float32") for m in mats], to_xp(x, "float32"), damping=0.1))
    assert out.dtype == np.float32
    gammas = reference_pi_dampings(mats, 0.1)
    big = dense_kron([m + g * np.eye(8) for m, g in zip(mats, gammas)])
    expected = dense_kron_solve(big, x, 2)
    err = np.max(np.abs(out - expected)) / np.max(np.abs(expected))
    assert err < 1e-5


# -- empty factors ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("exact", [False, True], ids=["factored", "exact"])
def test_kron_empty_factor_gives_empty_solves(xp, to_xp, rng, exact, where, dtype):
    """Regression: ``exact=True`` with a 0×0 factor failed inside the eigenvalue tolerance
    (a maximum over an empty axis). Both modes now return empty arrays shaped like ``x``."""
    mats = [random_spd(rng, 3), random_spd(rng, 2), random_spd(rng, 4)]
    mats[where] = np.zeros((0, 0))
    dims = tuple(m.shape[0] for m in mats)
    fs = [to_xp(m, dtype) for m in mats]
    for damping in (0.1, 0.0):  # an empty product is not singular, even without damping
        fact = kron_factorize(fs, damping=damping, exact=exact)
        assert fact.dims == dims
        for batch in [(), (5,)]:
            x = to_xp(np.ones((*batch, *dims)), dtype)
            for out in (fact.solve(x), kron_solve(fs, x, damping=damping, exact=exact)):
                assert tuple(out.shape) == (*batch, *dims)
                assert out.dtype == getattr(xp, dtype)


@pytest.mark.parametrize("exact", [False, True], ids=["factored", "exact"])
def test_kron_empty_factor_still_checks_the_others(xp, to_xp, exact):
    bad = np.eye(3)
    bad[1, 1] = np.nan
    fs = [to_xp(np.zeros((0, 0))), to_xp(bad)]
    with pytest.raises(curvlin.LinAlgError, match=r"kron_factorize: factors\[1\] of shape \(3, 3"):
        kron_solve(fs, to_xp(np.ones((0, 3))), damping=0.1, exact=exact)


def test_pi_damping_with_an_empty_factor_splits_evenly(xp, to_xp, to_np, rng):
    """A 0×0 factor has trace 0, so π is undefined and the split is even (and warning-free)."""
    gammas = pi_damping([to_xp(np.zeros((0, 0))), to_xp(4.0 * np.eye(3))], 0.01)
    np.testing.assert_allclose([float(to_np(g)) for g in gammas], [0.1, 0.1], rtol=1e-12)


# -- float32 Gram factors with exact damping ----------------------------------------------------


def _fail_float32_eigh(monkeypatch, xp):
    """Make ``eigh`` fail in float32, as LAPACK's or cuSOLVER's "did not converge" can, so that
    the eigendecomposition takes its float64 retry (which CPUs rarely need on these inputs)."""
    eigh = xp.linalg.eigh

    def failing(a, /, *args, **kwargs):
        if a.dtype == xp.float32:
            raise RuntimeError("injected: eigh did not converge in float32")
        return eigh(a, *args, **kwargs)

    monkeypatch.setattr(xp.linalg, "eigh", failing)


#: ``(rows, columns)`` of the data behind each Gram factor ``[G, A]``, and the spread of the
#: column scales ``10**U(-spread, spread)``.
GRAM_KINDS = {
    "rank-deficient": ((10, 50), (4, 6), 0.0),
    "full-rank": ((200, 20), (30, 6), 0.0),
    "dynamic-range": ((10, 50), (4, 6), 3.0),
    "dynamic-range full-rank": ((200, 20), (30, 6), 3.0),
}


def _gram_problem(rng, kind):
    """Data ``[X_G, X_A]`` and a right-hand side, all rounded to float32."""
    shape_g, shape_a, spread = GRAM_KINDS[kind]
    data = []
    for rows, cols in (shape_g, shape_a):
        x = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-spread, spread, size=cols)
        data.append(x.astype(np.float32).astype(np.float64))
    x = rng.standard_normal((shape_g[1], shape_a[1])).astype(np.float32).astype(np.float64)
    return data, x


@pytest.mark.parametrize("eigh_float32", ["native", "fails"])
@pytest.mark.parametrize("kind", list(GRAM_KINDS))
def test_kron_exact_accepts_float32_gram_factors(
    xp, to_xp, to_np, rng, monkeypatch, kind, eigh_float32
):
    """Regression: after the float64 retry the roundoff tolerance used float64's eps, so a
    float32 ``XᵀX`` (whose zero eigenvalues come out as ±eps32·‖G‖) was rejected as "not
    positive semidefinite". The tolerance is float32's now, whichever dtype eigh ran in.

    Against the dense float64 reference of the exact Gram matrices, the result is checked for
    well-scaled data; with a dynamic range of 10^±3 per column the Gram matrices' small
    eigenvalues are below float32's resolution, so only acceptance and finiteness are checked.
    """
    if eigh_float32 == "fails":
        _fail_float32_eigh(monkeypatch, xp)
    data, x = _gram_problem(rng, kind)
    factors = []
    for d in data:
        d32 = to_xp(d, "float32")
        factors.append(xp.matrix_transpose(d32) @ d32)  # the Gram matrix, formed in float32
    out = kron_solve(factors, to_xp(x, "float32"), damping=1e-6, exact=True)
    assert out.dtype == xp.float32
    if kind.startswith("dynamic-range"):
        assert tuple(out.shape) == x.shape
        assert np.all(np.isfinite(to_np(out)))
        return
    grams = [d.T @ d for d in data]
    big = dense_kron(grams) + 1e-6 * np.eye(x.size)
    assert_close(out, dense_kron_solve(big, x, 2), rtol=1e-4, what=f"float32 Gram, {kind}")


@pytest.mark.parametrize("eigh_float32", ["native", "fails"])
def test_kron_exact_still_rejects_a_clearly_indefinite_float32_factor(
    xp, to_xp, rng, monkeypatch, eigh_float32
):
    """An eigenvalue of -1e-2·‖F‖ is no roundoff, in float32 or after the float64 retry."""
    if eigh_float32 == "fails":
        _fail_float32_eigh(monkeypatch, xp)
    q, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    evals = np.abs(rng.standard_normal(50)) + 1.0
    evals[7] = -1e-2 * evals.max()
    f = ((q * evals) @ q.T).astype(np.float32)
    pattern = r"kron_factorize: factors\[0\] is not positive semidefinite"
    with pytest.raises(curvlin.LinAlgError, match=pattern):
        kron_solve(
            [to_xp(f, "float32"), to_xp(np.eye(3), "float32")],
            to_xp(np.ones((50, 3)), "float32"),
            damping=1e-6,
            exact=True,
        )
