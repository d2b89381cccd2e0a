"""Bad input gets a clear ValueError, TypeError or LinAlgError naming the argument and shapes.

Each check is eager: it looks at shapes, dtypes and Python scalars, so the error arrives before
any factorisation runs.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from _helpers import asarray, random_psd_low_rank, require_backend

from curvlin import (
    LinAlgError,
    NonFiniteError,
    kron_apply,
    kron_dense,
    kron_factorize,
    kron_solve,
    pi_damping,
    spd_inverse,
    spd_inverse_root,
    spd_solve,
)


def shape_re(shape: tuple[int, ...]) -> str:
    """A regex for ``shape`` as printed: ``(2, 3)``, or torch's ``torch.Size([2, 3])``."""
    inner = ", ".join(str(s) for s in shape)
    tup = re.escape(f"({inner},)" if len(shape) == 1 else f"({inner})")
    return rf"(?:{tup}|torch\.Size\(\[{re.escape(inner)}\]\))"


# -- factors --------------------------------------------------------------------------------

KRON_SQUARE = {
    "kron_solve": lambda fs, x: kron_solve(fs, x, damping=0.1),
    "kron_solve exact": lambda fs, x: kron_solve(fs, x, damping=0.1, exact=True),
    "kron_factorize": lambda fs, x: kron_factorize(fs, damping=0.1),
    "pi_damping": lambda fs, x: pi_damping(fs, 0.1),
}
KRON_ALL = {**KRON_SQUARE, "kron_apply": kron_apply, "kron_dense": lambda fs, x: kron_dense(fs)}


@pytest.mark.parametrize("op", list(KRON_SQUARE))
def test_non_square_factor(xp, to_xp, op):
    fs = [to_xp(np.eye(2)), to_xp(np.ones((2, 3)))]
    with pytest.raises(
        ValueError,
        match=rf"factors\[1\] must be a square matrix of shape \(n, n\), got {shape_re((2, 3))}",
    ):
        KRON_SQUARE[op](fs, to_xp(np.ones((2, 3))))


@pytest.mark.parametrize("op", ["kron_apply", "kron_dense"])
def test_factor_not_2d(xp, to_xp, op):
    fs = [to_xp(np.eye(2)), to_xp(np.ones(3))]
    with pytest.raises(
        ValueError, match=rf"{op}: factors\[1\] must be a 2-D matrix, got shape {shape_re((3,))}"
    ):
        KRON_ALL[op](fs, to_xp(np.ones((2, 3))))


@pytest.mark.parametrize("op", list(KRON_ALL))
def test_factors_as_a_single_array(xp, to_xp, op):
    with pytest.raises(TypeError, match=r"factors must be a list or tuple of 2-D arrays, got \w+"):
        KRON_ALL[op](to_xp(np.eye(2)), to_xp(np.ones(2)))


@pytest.mark.parametrize("op", list(KRON_ALL))
def test_empty_factor_list(xp, to_xp, op):
    with pytest.raises(ValueError, match=r"factors must hold at least one matrix, got an empty"):
        KRON_ALL[op]([], to_xp(np.ones(2)))


def test_factors_as_a_generator_or_nested_lists(xp, to_xp):
    with pytest.raises(
        TypeError, match=r"kron_apply: factors must be a list or tuple .* generator"
    ):
        kron_apply((f for f in [to_xp(np.eye(2))]), to_xp(np.ones(2)))
    with pytest.raises(TypeError, match=r"kron_apply: factors\[0\] must be an array, got list"):
        kron_apply([[[1.0, 0.0], [0.0, 1.0]]], to_xp(np.ones(2)))


# -- x against the factors ------------------------------------------------------------------


@pytest.mark.parametrize("x_shape", [(3, 2), (2,), (2, 4), (5, 3, 3)])
def test_x_shape_mismatch(xp, to_xp, x_shape):
    fs = [to_xp(np.eye(2)), to_xp(np.eye(3))]
    x = to_xp(np.ones(x_shape))
    expected = (
        rf"x must have trailing axes \(2, 3\) to match factors of shapes \[\(2, 2\), \(3, 3\)\], "
        rf"got x of shape {re.escape(str(x_shape))}"
    )
    with pytest.raises(ValueError, match="kron_apply: " + expected):
        kron_apply(fs, x)
    with pytest.raises(ValueError, match=expected):
        kron_solve(fs, x, damping=0.1)
    fact = kron_factorize(fs, damping=0.1, exact=True)
    with pytest.raises(ValueError, match="KronFactorization.solve: " + expected):
        fact.solve(x)


def test_x_shape_mismatch_rectangular_factors(xp, to_xp):
    """``x`` must match the factors' column sizes, not their row sizes."""
    fs = [to_xp(np.ones((4, 2))), to_xp(np.ones((5, 3)))]
    with pytest.raises(ValueError, match=r"trailing axes \(2, 3\) .* got x of shape \(4, 5\)"):
        kron_apply(fs, to_xp(np.ones((4, 5))))


# -- arrays from two libraries ----------------------------------------------------------------


@pytest.mark.parametrize("other", ["torch", "array_api_strict"])
def test_arrays_from_two_libraries(other):
    oxp, odev = require_backend(other)
    kind = r"torch\.Tensor" if other == "torch" else r"array_api_strict\.\w+\.Array"
    theirs = asarray(oxp, odev, np.eye(2))
    with pytest.raises(
        TypeError,
        match=rf"kron_apply: arrays must come from one array library, got factors\[0\]: "
        rf"numpy\.ndarray, factors\[1\]: {kind}",
    ):
        kron_apply([np.eye(2), theirs], np.ones((2, 2)))
    with pytest.raises(TypeError, match=rf"kron_apply: .*factors\[0\]: numpy\.ndarray, x: {kind}"):
        kron_apply([np.eye(2)], asarray(oxp, odev, np.ones(2)))
    with pytest.raises(TypeError, match=rf"spd_solve: .*one array library.*m: {kind}, b: numpy"):
        spd_solve(theirs, np.ones(2))
    with pytest.raises(TypeError, match=r"kron_solve: .*one array library"):
        kron_solve([theirs, np.eye(2)], np.ones((2, 2)), damping=0.1)


@pytest.mark.parametrize("other", ["torch", "array_api_strict"])
def test_damping_array_from_another_library(other):
    # Regression: an unchecked damping array used to fail inside the backend with an
    # AttributeError ("'numpy.ndarray' object has no attribute 'to'").
    oxp, odev = require_backend(other)
    with pytest.raises(TypeError, match=r"spd_inverse: .*damping"):
        spd_inverse(asarray(oxp, odev, np.eye(3)), damping=np.ones(()))
    with pytest.raises(TypeError, match=r"spd_inverse: .*damping"):
        spd_inverse(np.eye(3), damping=asarray(oxp, odev, np.ones(())))


# -- dtypes -----------------------------------------------------------------------------------


def test_mixed_dtypes(xp, to_xp):
    with pytest.raises(
        TypeError,
        match=r"kron_apply: mixed dtypes, factors\[0\] is \S*float64 but factors\[1\] is "
        r"\S*float32; cast them",
    ):
        kron_apply([to_xp(np.eye(2)), to_xp(np.eye(2), "float32")], to_xp(np.ones((2, 2))))
    with pytest.raises(TypeError, match=r"kron_apply: mixed dtypes, factors\[0\] is .* but x is"):
        kron_apply([to_xp(np.eye(2))], to_xp(np.ones(2), "float32"))
    with pytest.raises(TypeError, match=r"KronFactorization.solve: mixed dtypes"):
        kron_factorize([to_xp(np.eye(2))], damping=0.1).solve(to_xp(np.ones(2), "float32"))
    with pytest.raises(
        TypeError, match=r"spd_solve: mixed dtypes, m is \S*float32 but b is \S*float64"
    ):
        spd_solve(to_xp(np.eye(2), "float32"), to_xp(np.ones(2)))


def test_non_floating_dtype(xp, device):
    m = xp.asarray(np.eye(3, dtype=np.int64), device=device)
    with pytest.raises(
        TypeError, match=r"spd_inverse: m must have a real floating dtype, got \S*int64"
    ):
        spd_inverse(m)
    with pytest.raises(
        TypeError, match=r"kron_apply: factors\[0\] must have a real floating dtype"
    ):
        kron_apply([m], m)


@pytest.mark.parametrize("func", ["spd_inverse", "spd_inverse_root", "spd_solve"])
def test_non_array_matrix(func):
    m = [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(TypeError, match=rf"{func}: m must be an array, got list"):
        {
            "spd_inverse": spd_inverse,
            "spd_inverse_root": lambda m: spd_inverse_root(m, 2),
            "spd_solve": lambda m: spd_solve(m, np.ones(2)),
        }[func](m)


# -- matrices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3,), (2, 3), (4, 2, 3)])
@pytest.mark.parametrize("func", ["spd_inverse", "spd_inverse_root", "spd_solve"])
def test_non_square_matrix(xp, to_xp, shape, func):
    m = to_xp(np.ones(shape))
    call = {
        "spd_inverse": lambda: spd_inverse(m),
        "spd_inverse_root": lambda: spd_inverse_root(m, 2),
        "spd_solve": lambda: spd_solve(m, to_xp(np.ones(3))),
    }[func]
    expected = rf"{func}: m must be a square matrix of shape \(\.\.\., n, n\), got "
    with pytest.raises(ValueError, match=expected + shape_re(shape)):
        call()


@pytest.mark.parametrize("func", ["spd_inverse", "spd_inverse_root", "spd_solve"])
def test_nan_matrix(xp, to_xp, func):
    m = np.eye(3)
    m[1, 0] = np.nan
    call = {
        "spd_inverse": lambda: spd_inverse(to_xp(m)),
        "spd_inverse_root": lambda: spd_inverse_root(to_xp(m), 4),
        "spd_solve": lambda: spd_solve(to_xp(m), to_xp(np.ones(3))),
    }[func]
    with pytest.raises(
        NonFiniteError, match=rf"{func}: m of shape \(3, 3\) holds NaN or inf in 1 of its 3×3"
    ):
        call()


def test_only_non_finite_input_is_a_non_finite_error(xp, to_xp):
    """The engine skips a coupled step on :class:`NonFiniteError` alone: a matrix that is
    finite but not positive definite stays a plain :class:`LinAlgError`."""
    with pytest.raises(LinAlgError, match="not positive definite") as caught:
        spd_inverse(to_xp(-np.eye(3)))
    assert not isinstance(caught.value, NonFiniteError)
    assert issubclass(NonFiniteError, LinAlgError)


def test_nan_factor(xp, to_xp):
    f = np.eye(3)
    f[2, 2] = np.inf
    x = to_xp(np.ones((2, 3)))
    with pytest.raises(LinAlgError, match=r"holds NaN or inf"):
        kron_solve([to_xp(np.eye(2)), to_xp(f)], x, damping=0.1)
    with pytest.raises(
        LinAlgError, match=r"kron_factorize: factors\[1\] of shape \(3, 3\) holds NaN"
    ):
        kron_solve([to_xp(np.eye(2)), to_xp(f)], x, damping=0.1, exact=True)


def test_indefinite_factor_names_the_factor(xp, to_xp):
    fs = [to_xp(np.eye(2)), to_xp(np.diag([1.0, -1.0, 2.0]))]
    x = to_xp(np.ones((2, 3)))
    with pytest.raises(
        LinAlgError, match=r"kron_factorize: factors\[1\] is not positive semidefinite"
    ):
        kron_solve(fs, x, damping=0.1, exact=True)
    # exact=False factorises each damped factor; the error must still name the factor
    with pytest.raises(LinAlgError, match=r"kron_factorize: factors\[1\] is not positive"):
        kron_solve(fs, x, damping=0.1)


# Seeds whose rank-3 6×6 factor has zero eigenvalues that eigh returns as tiny positive
# roundoff (on NumPy and array-api-strict for 2, 72, 112; on torch CPU for 34, 72, 112).
_ROUNDOFF_POSITIVE_SEEDS = [2, 34, 72, 112]


@pytest.mark.parametrize("seed", _ROUNDOFF_POSITIVE_SEEDS)
def test_exact_kron_singular_product_raises(xp, to_xp, seed):
    # Regression: an exact ``λ ⊗ … + damping > 0`` check let zero eigenvalues returned as
    # +1e-16 through, and the solve returned values ~1e17 instead of raising.
    f = random_psd_low_rank(np.random.default_rng(seed), 6, 3)
    with pytest.raises(LinAlgError, match=r"kron_factorize: .*singular"):
        kron_solve([to_xp(f), to_xp(np.eye(3))], to_xp(np.ones((6, 3))), damping=0.0, exact=True)


# -- damping -------------------------------------------------------------------------------------

DAMPED = {
    "spd_inverse": lambda xp_, to_xp, d: spd_inverse(to_xp(np.eye(2)), damping=d),
    "spd_solve": lambda xp_, to_xp, d: spd_solve(to_xp(np.eye(2)), to_xp(np.ones(2)), damping=d),
    "spd_inverse_root": lambda xp_, to_xp, d: spd_inverse_root(to_xp(np.eye(2)), 2, damping=d),
    "kron_factorize": lambda xp_, to_xp, d: kron_solve(
        [to_xp(np.eye(2))], to_xp(np.ones(2)), damping=d
    ),
    "pi_damping": lambda xp_, to_xp, d: pi_damping([to_xp(np.eye(2))], d),
}


@pytest.mark.parametrize("func", list(DAMPED))
@pytest.mark.parametrize("bad", [-1.0, -1e-300, float("nan"), float("inf"), -2])
def test_bad_damping_value(xp, to_xp, func, bad):
    with pytest.raises(ValueError, match=rf"{func}: damping must be finite and >= 0, got {bad!r}"):
        DAMPED[func](xp, to_xp, bad)


@pytest.mark.parametrize("func", list(DAMPED))
@pytest.mark.parametrize("bad", [True, "0.1", None, [0.1]], ids=["bool", "str", "None", "list"])
def test_bad_damping_type(xp, to_xp, func, bad):
    with pytest.raises(TypeError, match=rf"{func}: damping must be a real number or an array, got"):
        DAMPED[func](xp, to_xp, bad)


def test_damping_array_that_does_not_broadcast(xp, to_xp):
    # Regression: the mismatch used to surface as the backend's own broadcasting error
    # (NumPy "operands could not be broadcast", torch RuntimeError), naming neither.
    m = to_xp(np.stack([np.eye(3)] * 3))
    with pytest.raises(ValueError, match=r"spd_inverse: damping .*\(2,\).*\(3,\)"):
        spd_inverse(m, damping=to_xp(np.ones(2)))


def test_kron_factorize_exact_must_be_bool(xp, to_xp):
    with pytest.raises(TypeError, match=r"kron_factorize: exact must be True or False, got 'yes'"):
        kron_factorize([to_xp(np.eye(2))], exact="yes")
    with pytest.raises(TypeError, match=r"exact must be True or False, got 1"):
        kron_solve([to_xp(np.eye(2))], to_xp(np.ones(2)), exact=1)


# -- spd_inverse_root p ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0, 0.0, -1, -2.5, float("nan"), float("-inf")])
def test_inverse_root_p_not_positive(xp, to_xp, p):
    with pytest.raises(
        ValueError, match=rf"spd_inverse_root: p must be a positive number, got {p!r}"
    ):
        spd_inverse_root(to_xp(np.eye(2)), p)


@pytest.mark.parametrize("p", [True, "2", None, [2]], ids=["bool", "str", "None", "list"])
def test_inverse_root_p_not_a_number(xp, to_xp, p):
    with pytest.raises(
        (TypeError, ValueError), match=r"spd_inverse_root: p must be a positive number"
    ):
        spd_inverse_root(to_xp(np.eye(2)), p)


@pytest.mark.parametrize("p", [np.int64(2), np.float32(2.0)], ids=["np.int64", "np.float32"])
def test_inverse_root_accepts_numpy_scalars(xp, to_xp, to_np, p):
    # Regression: an isinstance(p, int | float) check rejected NumPy scalars.
    out = spd_inverse_root(to_xp(np.diag([4.0, 16.0])), p)
    np.testing.assert_allclose(to_np(out), np.diag([0.5, 0.25]), rtol=1e-6)


# -- spd_solve b ---------------------------------------------------------------------------------


@pytest.mark.parametrize("b_shape", [(), (2,), (4,), (2, 1), (5, 2, 3)])
def test_spd_solve_wrong_b_shape(xp, to_xp, b_shape):
    with pytest.raises(
        ValueError,
        match=rf"spd_solve: b must have shape \(3,\) or \(\.\.\., 3, k\) to match m of shape "
        rf"\(3, 3\), got {re.escape(str(b_shape))}",
    ):
        spd_solve(to_xp(np.eye(3)), to_xp(np.ones(b_shape)))


def test_spd_solve_stacks_that_do_not_broadcast(xp, to_xp):
    m = to_xp(np.stack([np.eye(3)] * 3))
    with pytest.raises(
        ValueError,
        match=r"spd_solve: stack shapes of m \(3, 3, 3\) and b \(2, 3, 1\) do not broadcast",
    ):
        spd_solve(m, to_xp(np.ones((2, 3, 1))))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("m_kind", "b_shape"),
    [("spd", (3,)), ("spd", (2, 3, 2)), ("singular", (3, 1)), ("damped", (3,))],
)
def test_spd_solve_non_finite_b(xp, to_xp, bad, m_kind, b_shape):
    # Regression: a NaN or inf in b went through the solve and came back as NaN, silently.
    m = {"spd": np.eye(3), "singular": np.ones((3, 3)), "damped": np.diag([1.0, 0.0, 2.0])}
    b = np.ones(b_shape)
    b.reshape(-1)[1] = bad
    damping = 0.1 if m_kind == "damped" else 0.0
    with pytest.raises(
        NonFiniteError,
        match=rf"spd_solve: b of shape {re.escape(str(b_shape))} holds NaN or inf in 1 of its "
        rf"{b.size} entries",
    ):
        spd_solve(to_xp(m[m_kind]), to_xp(b), damping=damping)


def test_spd_solve_non_finite_m_and_b_names_m_first(xp, to_xp):
    m = np.eye(3)
    m[2, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"spd_solve: m of shape \(3, 3\) holds NaN or inf"):
        spd_solve(to_xp(m), to_xp(np.full(3, np.nan)))
    # only the lower triangle of m is read: NaN above the diagonal is not m's fault
    m = np.eye(3)
    m[0, 2] = np.nan
    with pytest.raises(
        NonFiniteError, match=r"spd_solve: b of shape \(3, 1\) holds NaN or inf in 3"
    ):
        spd_solve(to_xp(m), to_xp(np.full((3, 1), np.inf)))
