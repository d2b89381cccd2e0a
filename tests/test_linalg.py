"""SPD inverse, solve and inverse root on stacks, against dense float64 references.

References come from ``numpy.linalg`` (``inv``, ``solve``, ``eigh``) and
``scipy.linalg.fractional_matrix_power``; every test runs on every backend of ``xp``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from _helpers import (
    PROPERTY,
    assert_close,
    batch_shapes,
    random_psd_low_rank,
    random_spd,
    reference_inverse_root,
    seeds,
    tolerance,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import curvlin
from curvlin import LinAlgError, spd_inverse, spd_inverse_root, spd_solve

sizes = st.integers(1, 16)
damping_kinds = st.sampled_from(["none", "float", "per-matrix", "broadcast"])
roots = st.sampled_from([1, 2, 4, 0.5, 1.5, 3.7])


def _problem(rng, n, batch, kind, *, cond=1e3):
    """Matrices and a damping of the given kind.

    Returns ``(m, damping, damping_np)``: ``damping`` as passed to the library (``0.0``, a
    float or a NumPy array to be converted), and its NumPy value broadcast to ``batch``.
    With a damping, some matrices are rank-deficient PSD (damping makes them definite).
    """
    m = random_spd(rng, n, batch, cond=cond, scale=10.0 ** rng.uniform(-2, 2, size=batch))
    if kind == "none":
        return m, 0.0, np.zeros(batch)
    if n > 1:
        low = random_psd_low_rank(rng, n, max(1, n // 2), batch)
        use_low = rng.random(batch) < 0.3
        m = np.where(use_low[..., None, None], low, m)
    if kind == "float":
        d = float(rng.uniform(0.1, 1.0))
        return m, d, np.full(batch, d)
    if kind == "per-matrix":
        d = rng.uniform(0.1, 1.0, size=batch)
        return m, d, d
    # "broadcast": one damping per trailing stack axis, broadcast over the leading ones
    shape = batch[1:] if len(batch) > 0 else ()
    d = rng.uniform(0.1, 1.0, size=shape)
    return m, d, np.broadcast_to(d, batch)


def _damped(m, d):
    return m + np.asarray(d)[..., None, None] * np.eye(m.shape[-1])


def _cond(m):
    w = np.linalg.eigvalsh(m)
    return float(np.max(w[..., -1] / w[..., 0]))


def _lib_damping(to_xp, damping, dtype="float64"):
    return damping if isinstance(damping, float) else to_xp(np.asarray(damping), dtype)


# -- spd_inverse ----------------------------------------------------------------------------


@PROPERTY
@given(n=sizes, batch=batch_shapes(), kind=damping_kinds, seed=seeds)
def test_spd_inverse_matches_dense(xp, to_xp, to_np, n, batch, kind, seed):
    rng = np.random.default_rng(seed)
    m, damping, d = _problem(rng, n, batch, kind)
    out = spd_inverse(to_xp(m), damping=_lib_damping(to_xp, damping))
    assert out.dtype == xp.float64
    a = _damped(m, d)
    rtol = tolerance("float64", cond=_cond(a), n=n)
    assert_close(out, np.linalg.inv(a), rtol=rtol, what=f"spd_inverse damping={kind}")
    host = to_np(out)
    np.testing.assert_array_equal(host, np.swapaxes(host, -1, -2))  # symmetrised exactly


def test_spd_inverse_reads_only_the_lower_triangle(xp, to_xp, rng):
    m = random_spd(rng, 5, (2,))
    garbage = np.triu(rng.standard_normal((2, 5, 5)), 1) * 100.0
    out = spd_inverse(to_xp(np.tril(m) + garbage))
    assert_close(out, np.linalg.inv(m), rtol=1e-11, what="upper triangle must be ignored")


def test_spd_inverse_applies_damping_before_factorising(xp, to_xp):
    """``diag(1, -0.5)`` is indefinite; with damping 1 it is ``diag(2, 0.5)``."""
    out = spd_inverse(to_xp(np.diag([1.0, -0.5])), damping=1.0)
    assert_close(out, np.diag([0.5, 2.0]), rtol=1e-15, what="damped inverse")


def test_spd_inverse_damping_array_broadcasts_to_a_bigger_stack(xp, to_xp, rng):
    """A damping array with more axes than the stack broadcasts like any array operand."""
    m = random_spd(rng, 3, (4,))
    d = np.array([[0.1], [1.0]])  # (2, 1) against stack (4,) -> (2, 4)
    out = spd_inverse(to_xp(m), damping=to_xp(d))
    assert tuple(out.shape) == (2, 4, 3, 3)
    assert_close(out, np.linalg.inv(_damped(m, d)), rtol=1e-12, what="broadcast damping")


# -- spd_solve ------------------------------------------------------------------------------


@st.composite
def solve_shapes(draw):
    """``(n, m_batch, b_shape, out_shape)`` with stack shapes that broadcast."""
    n = draw(sizes)
    full = draw(batch_shapes())
    kind = draw(st.sampled_from(["vector", "matrix", "stacked"]))
    m_batch = tuple(s if draw(st.booleans()) else 1 for s in full)
    if kind == "vector":
        out_batch = m_batch
        return n, m_batch, (n,), (*out_batch, n)
    k = draw(st.integers(1, 4))
    if kind == "matrix":
        return n, m_batch, (n, k), (*m_batch, n, k)
    drop = draw(st.integers(0, len(full)))  # b may have fewer stack axes than m
    b_batch = tuple(s if draw(st.booleans()) else 1 for s in full[drop:])
    out_batch = np.broadcast_shapes(m_batch, b_batch)
    return n, m_batch, (*b_batch, n, k), (*out_batch, n, k)


@PROPERTY
@given(shapes=solve_shapes(), kind=damping_kinds, seed=seeds)
def test_spd_solve_matches_dense(xp, to_xp, shapes, kind, seed):
    n, m_batch, b_shape, out_shape = shapes
    rng = np.random.default_rng(seed)
    m, damping, d = _problem(rng, n, m_batch, kind)
    b = rng.standard_normal(b_shape)
    out = spd_solve(to_xp(m), to_xp(b), damping=_lib_damping(to_xp, damping))
    assert out.dtype == xp.float64
    assert tuple(out.shape) == out_shape
    a = _damped(m, d)
    if len(b_shape) == 1:
        expected = np.linalg.solve(a, np.broadcast_to(b, (*m_batch, n))[..., None])[..., 0]
    else:
        expected = np.linalg.solve(a, b)
    rtol = tolerance("float64", cond=_cond(a), n=n)
    assert_close(out, expected, rtol=rtol, what=f"spd_solve b{b_shape} m{m.shape}")


def test_spd_solve_vector_against_a_stack(xp, to_xp, rng):
    m = random_spd(rng, 4, (3,))
    b = rng.standard_normal(4)
    out = spd_solve(to_xp(m), to_xp(b))
    assert tuple(out.shape) == (3, 4)
    assert_close(out, np.stack([np.linalg.solve(mi, b) for mi in m]), rtol=1e-12, what="vec")


def test_spd_solve_reads_only_the_lower_triangle(xp, to_xp, rng):
    m = random_spd(rng, 4)
    b = rng.standard_normal((4, 2))
    out = spd_solve(to_xp(np.tril(m) + np.triu(np.full((4, 4), 7.0), 1)), to_xp(b))
    assert_close(out, np.linalg.solve(m, b), rtol=1e-11, what="upper triangle must be ignored")


def test_spd_solve_damping_array_broadcasts_to_a_bigger_stack(xp, to_xp, rng):
    """Regression: a damping array with more stack axes than ``m`` and ``b`` failed inside the
    backend ("input operand has more dimensions than allowed"), as ``spd_inverse`` does not."""
    m = random_spd(rng, 3)
    d = np.array([0.1, 1.0])
    b = rng.standard_normal(3)
    out = spd_solve(to_xp(m), to_xp(b), damping=to_xp(d))
    assert tuple(out.shape) == (2, 3)
    expected = np.linalg.solve(_damped(m, d), np.broadcast_to(b, (2, 3))[..., None])[..., 0]
    assert_close(out, expected, rtol=1e-12, what="spd_solve with a (2,) damping")


# -- spd_inverse_root -----------------------------------------------------------------------


@PROPERTY
@given(n=sizes, batch=batch_shapes(), kind=damping_kinds, p=roots, seed=seeds)
def test_spd_inverse_root_matches_eigh(xp, to_xp, to_np, n, batch, kind, p, seed):
    rng = np.random.default_rng(seed)
    m, damping, d = _problem(rng, n, batch, kind, cond=100.0)
    out = spd_inverse_root(to_xp(m), p, damping=_lib_damping(to_xp, damping))
    assert out.dtype == xp.float64
    a = _damped(m, d)
    rtol = tolerance("float64", cond=_cond(a), n=n)
    expected = reference_inverse_root(a, p)
    assert_close(out, expected, rtol=rtol, what=f"spd_inverse_root p={p}")
    host = to_np(out)
    np.testing.assert_array_equal(host, np.swapaxes(host, -1, -2))


@pytest.mark.parametrize("p", [1, 2, 4, 2.5])
def test_spd_inverse_root_matches_scipy(xp, to_xp, rng, p):
    m = random_spd(rng, 6, cond=50.0)
    out = spd_inverse_root(to_xp(m), p, damping=0.01)
    expected = scipy.linalg.fractional_matrix_power(m + 0.01 * np.eye(6), -1.0 / p).real
    assert_close(out, expected, rtol=1e-10, what=f"vs scipy, p={p}")


def test_spd_inverse_root_p1_is_the_inverse_and_powers_compose(xp, to_xp, to_np, rng):
    m = random_spd(rng, 5, (2,), cond=20.0)
    inv = to_np(spd_inverse(to_xp(m)))
    assert_close(spd_inverse_root(to_xp(m), 1), inv, rtol=1e-12, what="p = 1")
    r4 = to_np(spd_inverse_root(to_xp(m), 4))
    assert_close(r4 @ r4 @ r4 @ r4, inv, rtol=1e-11, what="(m^(-1/4))^4")
    r2 = to_np(spd_inverse_root(to_xp(m), 2.0))
    assert_close(r2 @ m @ r2, np.broadcast_to(np.eye(5), m.shape), rtol=1e-12, what="r m r = I")


def test_spd_inverse_root_of_singular_psd_is_finite(xp, to_xp, to_np, rng):
    """Roundoff-negative eigenvalues of a singular PSD matrix are raised, not rejected."""
    m = random_psd_low_rank(rng, 6, 3)
    out = to_np(spd_inverse_root(to_xp(m), 2))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, out.T)


# -- float32 --------------------------------------------------------------------------------


@pytest.mark.parametrize("func", ["inverse", "solve", "root"])
@settings(PROPERTY, max_examples=15)
@given(n=sizes, batch=batch_shapes(), kind=damping_kinds, seed=seeds)
def test_float32(xp, to_xp, func, n, batch, kind, seed):
    """Float32 in, float32 out, within ``c·eps32·cond·sqrt(n)`` of the float64 reference."""
    rng = np.random.default_rng(seed)
    m, damping, d = _problem(rng, n, batch, kind, cond=100.0)
    m = m.astype(np.float32).astype(np.float64)  # the reference sees what the library sees
    d = np.asarray(d, dtype=np.float32).astype(np.float64)
    lib_d = float(np.float32(damping)) if isinstance(damping, float) else damping
    args = {"damping": _lib_damping(to_xp, lib_d, "float32")}
    a = _damped(m, d)
    if func == "inverse":
        out, expected = spd_inverse(to_xp(m, "float32"), **args), np.linalg.inv(a)
    elif func == "solve":
        b = rng.standard_normal((*batch, n, 2)).astype(np.float32).astype(np.float64)
        out, expected = (
            spd_solve(to_xp(m, "float32"), to_xp(b, "float32"), **args),
            np.linalg.solve(a, b),
        )
    else:
        out = spd_inverse_root(to_xp(m, "float32"), 2, **args)
        expected = reference_inverse_root(a, 2)
    assert out.dtype == xp.float32
    rtol = tolerance("float32", cond=_cond(a), n=n, factor=20.0)
    assert_close(out, expected, rtol=rtol, what=f"float32 {func}")


# -- half precision in, same dtype out --------------------------------------------------------

HALF_CASES = [
    ("numpy", "float16"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
    ("torch-cuda", "float16"),
    ("torch-cuda", "bfloat16"),
    ("cupy", "float16"),
]


@pytest.mark.parametrize(("label", "dtype"), HALF_CASES, ids=[f"{a}-{b}" for a, b in HALF_CASES])
@pytest.mark.parametrize("func", ["inverse", "solve", "root"])
def test_half_precision_keeps_dtype(label, dtype, func, rng):
    """float16/bfloat16 are computed in float32 and returned in the input dtype."""
    from _helpers import asarray, require_backend, to_numpy

    xp, device = require_backend(label)
    m = random_spd(rng, 4, (2,), cond=4.0)
    m_h = asarray(xp, device, m, dtype)
    m_back = to_numpy(xp.astype(m_h, xp.float32)).astype(np.float64)  # m rounded to half
    if func == "inverse":
        out, expected = spd_inverse(m_h, damping=0.1), np.linalg.inv(_damped(m_back, 0.1))
    elif func == "solve":
        b = rng.standard_normal((2, 4, 3))
        b_h = asarray(xp, device, b, dtype)
        b_back = to_numpy(xp.astype(b_h, xp.float32)).astype(np.float64)
        out = spd_solve(m_h, b_h, damping=0.1)
        expected = np.linalg.solve(_damped(m_back, 0.1), b_back)
    else:
        out, expected = (
            spd_inverse_root(m_h, 2, damping=0.1),
            reference_inverse_root(_damped(m_back, 0.1), 2),
        )
    assert out.dtype == getattr(xp, dtype)
    host = to_numpy(xp.astype(out, xp.float32))
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    assert_close(host, expected, rtol=4 * eps, what=f"{dtype} {func}")


# -- recovery -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["ones", "low-rank", "zeros"])
def test_spd_inverse_recovers_rank_deficient_psd(xp, to_xp, to_np, rng, dtype, kind):
    """Cholesky of a singular PSD matrix fails or is unreliable; jitter must recover a finite,
    symmetric inverse with a positive diagonal, and leave the well-posed matrices of the stack
    untouched.

    Nothing sharper can be asserted about the singular member: ``(m + δI)⁻¹`` with a jitter δ
    near eps has norm ~1/δ, so its roundoff is O(1) in every direction.
    """
    n = 6
    singular = {
        "ones": np.ones((n, n)),  # rank 1, Cholesky breaks down exactly
        "low-rank": random_psd_low_rank(rng, n, 2),
        "zeros": np.zeros((n, n)),
    }[kind]
    good = random_spd(rng, n, (2,), cond=10.0)
    m = np.stack([good[0], singular, good[1]]).astype(dtype)
    out = spd_inverse(to_xp(m, dtype))
    assert out.dtype == getattr(xp, dtype)
    host = to_np(out).astype(np.float64)
    assert np.all(np.isfinite(host))
    np.testing.assert_array_equal(host, np.swapaxes(host, -1, -2))
    assert np.all(np.diagonal(host[1]) > 0), "an SPD inverse has a positive diagonal"
    rtol = tolerance(dtype, cond=10.0, n=n)
    ref = np.linalg.inv(m[[0, 2]].astype(np.float64))
    assert_close(host[[0, 2]], ref, rtol=rtol, what="well-posed members of the stack")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["ones", "low-rank"])
def test_spd_solve_recovers_rank_deficient_psd(xp, to_xp, to_np, rng, dtype, kind):
    """For ``b`` in the range of a singular PSD ``m`` the recovered solve is finite and
    consistent: ``m x = b`` up to the jitter and roundoff (``m x - b = -δx - E x``)."""
    n = 5
    m = np.ones((n, n)) if kind == "ones" else random_psd_low_rank(rng, n, 2)
    b = m @ rng.standard_normal((n, 2))
    m, b = m.astype(dtype), b.astype(dtype)
    x = to_np(spd_solve(to_xp(m, dtype), to_xp(b, dtype)))
    assert x.dtype == np.dtype(dtype)
    assert np.all(np.isfinite(x))
    m64, x64 = m.astype(np.float64), x.astype(np.float64)
    residual = np.linalg.norm(m64 @ x64 - b) / np.linalg.norm(b)
    assert residual < {"float64": 1e-6, "float32": 1e-2}[dtype]


# -- errors ---------------------------------------------------------------------------------


def _indefinite_stack():
    ind = np.diag([1.0, -1.0, 2.0, 1.0])
    return np.stack([np.eye(4), ind, 2.0 * np.eye(4)])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_indefinite_raises(xp, to_xp, dtype):
    m = to_xp(_indefinite_stack(), dtype)
    with pytest.raises(LinAlgError, match=r"spd_inverse: m is not positive definite.*1 of 3 4×4"):
        spd_inverse(m)
    with pytest.raises(LinAlgError, match=r"spd_solve: m is not positive definite.*1 of 3 4×4"):
        spd_solve(m, to_xp(np.ones(4), dtype))
    with pytest.raises(LinAlgError, match=r"spd_inverse_root: m is not positive semidefinite.*4×4"):
        spd_inverse_root(m, 2)


def test_indefinite_raises_even_with_small_damping(xp, to_xp):
    with pytest.raises(LinAlgError, match=r"spd_inverse: .*smallest eigenvalue -0\.5"):
        spd_inverse(to_xp(np.diag([1.0, -1.0])), damping=0.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("func", ["inverse", "solve", "root"])
def test_non_finite_raises(xp, to_xp, bad, func):
    m = np.stack([np.eye(3)] * 4).reshape(2, 2, 3, 3)
    m[1, 0, 2, 1] = bad
    name = {"inverse": "spd_inverse", "solve": "spd_solve", "root": "spd_inverse_root"}[func]
    call = {
        "inverse": lambda x: spd_inverse(x),
        "solve": lambda x: spd_solve(x, to_xp(np.ones((3, 1)))),
        "root": lambda x: spd_inverse_root(x, 2),
    }[func]
    pattern = rf"{name}: m of shape \(2, 2, 3, 3\) holds NaN or inf in 1 of its 3×3 matrices"
    with pytest.raises(LinAlgError, match=pattern):
        call(to_xp(m))


def test_linalg_error_is_a_value_error():
    assert issubclass(curvlin.LinAlgError, ValueError)


# -- empty input -----------------------------------------------------------------------------

EMPTY_STACKS = [(0, 0), (0, 3, 3), (2, 0, 0), (0, 2, 0, 0), (2, 0, 4, 4)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", EMPTY_STACKS, ids=str)
def test_empty_matrices_give_empty_results(xp, to_xp, shape, dtype):
    """Regression: NumPy's SciPy kernels raised "does not support zero-size batches" for
    ``(0, n, n)``, and the eigenvalue tolerance reduced over an empty axis for ``n = 0``.

    The inverse (and inverse root) of a 0×0 matrix is 0×0; an empty stack stays empty."""
    m = to_xp(np.zeros(shape), dtype)
    n = shape[-1]
    outs = {
        "spd_inverse": spd_inverse(m),
        "spd_inverse damped": spd_inverse(m, damping=0.1),
        "spd_inverse_root": spd_inverse_root(m, 2),
        "spd_inverse_root damped": spd_inverse_root(m, 4, damping=0.1),
        "spd_solve vector": spd_solve(m, to_xp(np.ones(n), dtype)),
        "spd_solve columns": spd_solve(m, to_xp(np.ones((n, 2)), dtype)),
    }
    wanted = {"spd_solve vector": shape[:-1], "spd_solve columns": (*shape[:-1], 2)}
    for what, out in outs.items():
        assert tuple(out.shape) == wanted.get(what, shape), what
        assert out.dtype == getattr(xp, dtype), what


@pytest.mark.parametrize(
    ("m_shape", "b_shape", "out_shape"),
    [
        ((3, 3), (0, 3, 1), (0, 3, 1)),
        ((2, 3, 3), (0, 1, 3, 2), (0, 2, 3, 2)),
        ((3, 3), (3, 0), (3, 0)),
        ((2, 3, 3), (3, 0), (2, 3, 0)),
    ],
    ids=str,
)
def test_spd_solve_empty_b(xp, to_xp, rng, m_shape, b_shape, out_shape):
    """An empty ``b`` gives an empty ``x`` (NumPy's ``cho_solve`` rejected zero-size batches);
    a non-empty ``m`` is still factorised, so its errors do not depend on ``b``'s shape."""
    m = random_spd(rng, 3, m_shape[:-2])
    out = spd_solve(to_xp(m), to_xp(np.ones(b_shape)))
    assert tuple(out.shape) == out_shape
    assert out.dtype == xp.float64
    indefinite = np.broadcast_to(np.diag([1.0, -1.0, 2.0]), m_shape).copy()
    with pytest.raises(LinAlgError, match=r"spd_solve: m is not positive definite"):
        spd_solve(to_xp(indefinite), to_xp(np.ones(b_shape)))


def test_empty_stack_from_a_damping_array(xp, to_xp, rng):
    """A damping array broadcasts into the stack shape, empty axes included."""
    m = random_spd(rng, 3)
    empty = to_xp(np.ones(0))
    assert tuple(spd_inverse(to_xp(m), damping=empty).shape) == (0, 3, 3)
    assert tuple(spd_inverse_root(to_xp(m), 2, damping=empty).shape) == (0, 3, 3)
    assert tuple(spd_solve(to_xp(m), to_xp(np.ones(3)), damping=empty).shape) == (0, 3)
    big = to_xp(np.ones((2, 1)))
    assert tuple(spd_inverse(to_xp(np.zeros((0, 3, 3))), damping=big).shape) == (2, 0, 3, 3)


# -- host looks ------------------------------------------------------------------------------


@pytest.fixture
def host_looks(xp, to_xp, monkeypatch):
    """A list that records every ``bool``/``int``/``float`` of an array of the backend.

    NumPy and CuPy arrays cannot be instrumented (their types are immutable): skipped there.
    """
    cls = type(to_xp(np.zeros(1)))
    if cls.__module__.split(".")[0] in ("numpy", "cupy"):
        pytest.skip(f"{cls.__module__}.{cls.__name__} cannot be instrumented")
    seen: list[str] = []
    for dunder in ("__bool__", "__int__", "__float__"):
        original = getattr(cls, dunder)

        def counted(self, _original=original, _name=dunder):
            seen.append(_name)
            return _original(self)

        monkeypatch.setattr(cls, dunder, counted)
    return seen


def test_spd_solve_looks_at_the_host_once(xp, to_xp, rng, host_looks):
    """The check of ``b``'s finiteness shares the one look that checks the factorisation."""
    m, b = to_xp(random_spd(rng, 4, (2,))), to_xp(rng.standard_normal((2, 4, 3)))
    spd_solve(m, b)
    assert len(host_looks) == 1, host_looks
    host_looks.clear()
    spd_solve(to_xp(np.zeros((0, 4, 4))), b[:0, ...])  # empty: nothing to look at
    spd_inverse(to_xp(np.zeros((2, 0, 0))))
    spd_inverse_root(to_xp(np.zeros((0, 3, 3))), 2)
    assert host_looks == []
