"""Tensor-normal primitives against dense float64 references (spec §1 property tests 1-8).

Every reference forms the Kronecker product ``⊗U_i`` with ``numpy.kron`` and its partial
traces with ``einsum`` on the ``(d_1…d_k, d_1…d_k)`` reshaped tensor; the library never does.
Tests 4 (one datum), 6 (warm start, EMA) and 7 (reshape round trip) of the spec are in
``tests/test_tensor_blocks.py`` where they concern the blocks; their primitive parts are here.
"""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
from _helpers import (
    assert_close,
    dense_kron,
    random_spd,
    reference_inverse_root,
    tolerance,
)

from curvlin import (
    LinAlgError,
    kron_solve,
    mode_covariances,
    mode_factorize,
    mode_solve,
    trace_normalize,
)

SHAPES = [(5,), (3, 4), (2, 3, 4), (2, 3, 2, 3)]


def _partial_trace(sigma: np.ndarray, dims, i: int) -> np.ndarray:
    """``Σ_{j≠i} tr_j`` of a dense ``(P, P)`` covariance: the mode-``i`` second moment."""
    k = len(dims)
    rows, cols = string.ascii_lowercase[:k], string.ascii_lowercase[k : 2 * k]
    cols = "".join(cols[j] if j == i else rows[j] for j in range(k))
    out = rows[i] + cols[i]
    return np.einsum(f"{rows}{cols}->{out}", sigma.reshape(*dims, *dims))


def _mode_moments_numpy(x: np.ndarray):
    """``X_(i) X_(i)ᵀ`` by explicit unfolding (moveaxis + reshape)."""
    out = []
    for i in range(x.ndim):
        unfolded = np.moveaxis(x, i, 0).reshape(x.shape[i], -1)
        out.append(unfolded @ unfolded.T)
    return out


@pytest.mark.parametrize("dims", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mode_covariances_are_the_unfolded_grams(dims, dtype, xp, to_xp, to_np, rng):
    x = rng.standard_normal(dims)
    got = mode_covariances(to_xp(x, dtype))
    assert len(got) == len(dims)
    for c, ref in zip(got, _mode_moments_numpy(x)):
        assert c.dtype == to_xp(x, dtype).dtype
        assert_close(c, ref, rtol=tolerance(dtype, n=x.size), what="mode covariance")
    batch = rng.standard_normal((6, *dims))
    summed = [sum(m) for m in zip(*(_mode_moments_numpy(b) for b in batch))]
    for c, ref in zip(mode_covariances(to_xp(batch, dtype), batched=True), summed):
        assert_close(c, ref, rtol=tolerance(dtype, n=batch.size), what="batched")


def test_mode_covariances_scale_every_mode(xp, to_xp, rng):
    x = rng.standard_normal((4, 3, 2))
    got = mode_covariances(to_xp(x), max_dim=3, scale=2.5)
    full = _mode_moments_numpy(x)
    for c, ref in zip(got, [np.diag(full[0]), *full[1:]]):
        assert_close(c, 2.5 * ref, rtol=1e-12, what="scaled mode covariance")
    for bad in (float("nan"), "2", True):
        with pytest.raises(TypeError, match="scale"):
            mode_covariances(to_xp(x), scale=bad)


def test_mode_covariances_diagonal_modes(xp, to_xp, to_np, rng):
    x = rng.standard_normal((7, 3, 2))
    full = _mode_moments_numpy(x)
    got = mode_covariances(to_xp(x), max_dim=3)
    assert [tuple(c.shape) for c in got] == [(7,), (3, 3), (2, 2)]
    assert_close(got[0], np.diag(full[0]), rtol=1e-12)
    assert_close(got[1], full[1], rtol=1e-12)


@pytest.mark.parametrize("dims", SHAPES, ids=str)
def test_mode_moment_identity(dims, xp, to_xp, to_np, rng):
    """Spec test 1: the partial traces of ``⊗U_i`` are ``U_i ∏_{j≠i} tr U_j``, and they are the
    expected mode covariances of ``vec G = L z`` (``L Lᵀ = ⊗U_i``, ``E[z zᵀ] = I``): summing
    the mode covariances of ``L e_p`` over the ``P`` unit vectors gives them exactly."""
    us = [random_spd(rng, d, cond=5.0) for d in dims]
    sigma = dense_kron(us)
    for i, u in enumerate(us):
        others = math.prod(np.trace(v) for j, v in enumerate(us) if j != i)
        assert np.allclose(_partial_trace(sigma, dims, i), u * others)
    # E[G_(i) G_(i)ᵀ] from the library: with G = L z, Σ_z over the P unit vectors z = e_p
    # of mode_covariances(L e_p) is exactly the partial trace of L Lᵀ = Σ.
    chol = np.linalg.cholesky(sigma)
    samples = chol.T.reshape(-1, *dims)  # rows: L e_p, reshaped to the tensor
    for i, c in enumerate(mode_covariances(to_xp(samples), batched=True)):
        assert_close(c, _partial_trace(sigma, dims, i), rtol=1e-10, what=f"mode {i}")


@pytest.mark.parametrize("dims", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_trace_normalize_is_exact_for_kronecker_covariances(dims, dtype, xp, to_xp, to_np, rng):
    """Spec test 2: from the partial traces of ``Σ = ⊗U_i``, ``⊗(normalised) == Σ`` and every
    mode has the same mean eigenvalue ``c = (tr Σ / P)^(1/k)``."""
    us = [random_spd(rng, d, cond=5.0, scale=rng.uniform(0.1, 10.0)) for d in dims]
    sigma = dense_kron(us)
    covs = [to_xp(_partial_trace(sigma, dims, i), dtype) for i in range(len(dims))]
    got = [to_np(u) for u in trace_normalize(covs)]
    tol = tolerance(dtype, n=sigma.shape[0], factor=200.0)
    assert_close(dense_kron(got), sigma, rtol=tol, what="⊗U")
    c = (np.trace(sigma) / sigma.shape[0]) ** (1.0 / len(dims))
    for u, d in zip(got, dims):
        assert math.isclose(np.trace(u) / d, c, rel_tol=tol)


def test_trace_normalize_diagonal_and_dead_modes(xp, to_xp, to_np, rng):
    g = rng.standard_normal((6, 3))
    full = trace_normalize(mode_covariances(to_xp(g)))
    diag = trace_normalize(mode_covariances(to_xp(g), max_dim=4))
    assert_close(diag[0], np.diag(to_np(full[0])), rtol=1e-12)  # the same scalars
    assert_close(diag[1], full[1], rtol=1e-12)
    zeros = trace_normalize(mode_covariances(to_xp(np.zeros((3, 2, 2)))))
    for u in zeros:
        assert np.all(to_np(u) == 0.0)
    nan = trace_normalize([to_xp(np.full((2, 2), np.nan)), to_xp(np.eye(3))])
    assert np.all(np.isnan(to_np(nan[1])))  # never hidden


@pytest.mark.parametrize("dims", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mode_solve_is_the_dense_kronecker_solve(dims, dtype, xp, to_xp, to_np, rng):
    """Spec test 3: mode products with ``(U_i + εI)⁻¹`` == ``solve(⊗(U_i + εI), vec_r M)``;
    column-major vec pairs with the reversed Kronecker order (no silent transposition)."""
    eps = 0.3
    us = [random_spd(rng, d, cond=5.0) for d in dims]
    m = rng.standard_normal((2, *dims))  # a batch of two right-hand sides
    damped = [u + eps * np.eye(len(u)) for u in us]
    big = dense_kron(damped)
    ref = np.linalg.solve(big, m.reshape(2, -1).T).T.reshape(m.shape)
    got = mode_solve([to_xp(u, dtype) for u in us], to_xp(m, dtype), damping=eps)
    assert got.dtype == to_xp(m, dtype).dtype
    assert_close(got, ref, rtol=tolerance(dtype, cond=5.0 ** len(dims), n=big.shape[0]))
    col = np.linalg.solve(dense_kron(damped[::-1]), m[0].reshape(-1, order="F"))
    assert np.allclose(col.reshape(dims, order="F"), ref[0])
    if len(dims) > 1:  # the wrong (column-major) order is not what we compute
        wrong = np.linalg.solve(dense_kron(damped[::-1]), m[0].reshape(-1))
        assert not np.allclose(wrong.reshape(dims), ref[0])


@pytest.mark.parametrize("dims", SHAPES, ids=str)
def test_balanced_factors_make_kron_solve_equal_mode_solve(dims, xp, to_xp, to_np, rng):
    """After trace normalisation, ``kron_solve``'s π split of ``ε^k`` is ``ε`` per mode."""
    g = rng.standard_normal(dims)
    us = trace_normalize(mode_covariances(to_xp(g)))
    us = [u + 0.5 * xp.eye(u.shape[0], dtype=u.dtype) for u in us]  # SPD for every shape
    m = to_xp(rng.standard_normal(dims))
    eps = 0.1
    a = mode_solve(us, m, damping=eps)
    b = kron_solve(us, m, damping=eps ** len(dims))
    assert_close(a, to_np(b), rtol=1e-10)


def test_mode_solve_with_diagonal_modes(xp, to_xp, to_np, rng):
    us = [np.diag(rng.uniform(0.5, 2.0, 4)), random_spd(rng, 3)]
    m = rng.standard_normal((4, 3))
    ref = np.linalg.solve(dense_kron([u + 0.1 * np.eye(len(u)) for u in us]), m.reshape(-1))
    got = mode_solve([to_xp(np.diag(us[0]).copy()), to_xp(us[1])], to_xp(m), damping=0.1)
    assert_close(got, ref.reshape(4, 3), rtol=1e-10)


def test_one_mode_is_the_damped_inverse(xp, to_xp, to_np, rng):
    """Spec test 7, k = 1: ``(Ĉ + εI)⁻¹ g``."""
    g = rng.standard_normal(6)
    (c,) = trace_normalize(mode_covariances(to_xp(g)))
    assert_close(c, np.outer(g, g), rtol=1e-12)
    got = mode_solve([c], to_xp(g), damping=0.2)
    assert_close(got, np.linalg.solve(np.outer(g, g) + 0.2 * np.eye(6), g), rtol=1e-10)


def test_one_datum_is_exact(xp, to_xp, to_np, rng):
    """Spec test 4: one datum, ``G = δ aᵀ`` (rank one): ``⊗U_i = vec G vec Gᵀ``, which is also
    KFAC's separate-bias weight block ``(δδᵀ) ⊗ (aaᵀ)`` for that datum."""
    delta, a = rng.standard_normal(3), rng.standard_normal(5)
    g = np.outer(delta, a)
    us = [to_np(u) for u in trace_normalize(mode_covariances(to_xp(g)))]
    assert np.allclose(dense_kron(us), np.outer(g.reshape(-1), g.reshape(-1)))
    assert np.allclose(dense_kron(us), dense_kron([np.outer(delta, delta), np.outer(a, a)]))


@pytest.mark.parametrize("dims", SHAPES, ids=str)
def test_scaling(dims, xp, to_xp, to_np, rng):
    """Spec test 5: ``G → sG`` scales every normalised factor by ``s^(2/k)``."""
    g, s = rng.standard_normal(dims), 3.7
    base = trace_normalize(mode_covariances(to_xp(g)))
    scaled = trace_normalize(mode_covariances(to_xp(s * g)))
    for u, v in zip(base, scaled):
        assert_close(v, to_np(u) * s ** (2.0 / len(dims)), rtol=1e-10)


def test_statistical_convergence_to_a_tensor_normal_covariance(xp, to_xp, to_np):
    """Spec test 8: samples ``vec G ~ N(0, ⊗U_i)``; the normalised mean mode covariances give
    ``⊗U → Σ``, with an error that falls like ``n^(-1/2)``."""
    rng = np.random.default_rng(8)
    dims = (3, 2, 4)
    sigma = dense_kron([random_spd(rng, d, cond=4.0) for d in dims])
    chol = np.linalg.cholesky(sigma)
    errors = []
    for n in (500, 8000):
        z = rng.standard_normal((n, sigma.shape[0]))
        samples = (z @ chol.T).reshape(n, *dims)
        covs = [c / n for c in mode_covariances(to_xp(samples), batched=True)]
        est = dense_kron([to_np(u) for u in trace_normalize(covs)])
        errors.append(np.linalg.norm(est - sigma) / np.linalg.norm(sigma))
    assert errors[1] < 0.05
    assert errors[1] < errors[0] / 2.5  # 16× the samples: ≈ 4× smaller error


@pytest.mark.parametrize("dims", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_shampoo_root_is_the_dense_kronecker_root(dims, dtype, xp, to_xp, to_np, rng):
    """Spec §4 test 7: ``G ×_i (H_i + εI)^(-1/(2k))`` == ``(⊗(H_i + εI))^(-1/(2k)) vec_r G``,
    the root of the dense Kronecker product, by its own eigendecomposition."""
    k, eps = len(dims), 1e-2
    hs = [random_spd(rng, d, cond=5.0) for d in dims]
    g = rng.standard_normal(dims)
    dense = dense_kron([h + eps * np.eye(len(h)) for h in hs])
    ref = reference_inverse_root(dense, 2 * k) @ g.reshape(-1)
    got = mode_solve([to_xp(h, dtype) for h in hs], to_xp(g, dtype), damping=eps, power=2 * k)
    assert_close(got, ref.reshape(dims), rtol=tolerance(dtype, cond=5.0**k, n=dense.shape[0]))


def test_bad_arguments_name_themselves(xp, to_xp):
    with pytest.raises(ValueError, match="x must have shape"):
        mode_covariances(to_xp(np.ones(3)), batched=True)
    with pytest.raises(ValueError, match="max_dim"):
        mode_covariances(to_xp(np.ones(3)), max_dim=0)
    with pytest.raises(ValueError, match=r"factors\[1\] must be a square"):
        trace_normalize([to_xp(np.eye(2)), to_xp(np.ones((2, 3)))])
    with pytest.raises(ValueError, match="power"):
        mode_factorize([to_xp(np.eye(2))], power=0)
    with pytest.raises(ValueError, match="damping"):
        mode_factorize([to_xp(np.eye(2))], damping=-1.0)
    with pytest.raises(ValueError, match="trailing axes"):
        mode_solve([to_xp(np.eye(2))], to_xp(np.ones(3)))
    with pytest.raises(LinAlgError):
        mode_factorize([to_xp(-np.eye(2))])
    with pytest.raises(LinAlgError):
        mode_factorize([to_xp(-np.eye(2))], power=4)
    with pytest.raises(TypeError, match="factors must be a list"):
        trace_normalize(to_xp(np.eye(2)))


@pytest.mark.parametrize("power", [1, 4])
def test_relative_damping_scales_by_the_mean_eigenvalue(power, xp, to_xp, to_np, rng):
    fs = [random_spd(rng, 3, scale=7.0), np.diag(random_spd(rng, 4)).copy()]
    x = rng.standard_normal((3, 4))
    eps = [0.1 * np.trace(fs[0]) / 3, 0.1 * np.mean(fs[1])]
    damped = [fs[0] + eps[0] * np.eye(3), np.diag(fs[1] + eps[1])]
    ref = reference_inverse_root(dense_kron(damped), power) @ x.reshape(-1)
    fact = mode_factorize([to_xp(f) for f in fs], damping=0.1, power=power, relative=True)
    assert_close(fact.solve(to_xp(x)), ref.reshape(3, 4), rtol=1e-10)
    assert np.allclose([float(to_np(e)) for e in fact.dampings], eps)
    zero = mode_factorize([to_xp(np.zeros((2, 2)))], damping=0.5, relative=True)
    assert_close(zero.inverses[0], 2.0 * np.eye(2), rtol=1e-12)  # ε itself where tr = 0
