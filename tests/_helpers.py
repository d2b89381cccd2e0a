"""Shared helpers for the test suite: backend lookup, conversions, random matrices, references.

Everything here works on NumPy arrays in float64 unless it says otherwise; the dense references
form Kronecker products and inverses explicitly, which the library itself never does.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from curvlin.backends import available_backends, get_backend

#: Every backend label the ``xp`` fixture knows, in the order tests are parametrised.
BACKEND_LABELS = ("numpy", "array_api_strict", "torch", "torch-cuda", "cupy")

#: ``Backend.name`` that ``get_backend`` must pick for arrays of each label.
EXPECTED_BACKEND_NAME = {
    "numpy": "numpy",
    "array_api_strict": "generic",
    "torch": "torch",
    "torch-cuda": "torch",
    "cupy": "cupy",
}

REQUIRE_ENV = "CURVLIN_REQUIRE_BACKENDS"

#: Optional test-only dependencies, by import name, with the package that provides each. A test
#: that needs one carries ``needs_test_dep(name)``; it is skipped when the module cannot be
#: imported, unless the name is listed in ``CURVLIN_REQUIRE_TEST_DEPS``: then it fails.
TEST_DEPS = {
    "curvlinops": "curvlinops-for-pytorch",
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
}

REQUIRE_TEST_DEPS_ENV = "CURVLIN_REQUIRE_TEST_DEPS"

#: Hypothesis settings for the property tests: few examples, no deadline (first calls import
#: and compile kernels), fixtures allowed.
PROPERTY = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- backends -----------------------------------------------------------------------------


def required_backends() -> frozenset[str]:
    """Labels listed in ``CURVLIN_REQUIRE_BACKENDS`` (comma-separated); unknown ones fail."""
    raw = os.environ.get(REQUIRE_ENV, "")
    labels = frozenset(s.strip() for s in raw.split(",") if s.strip())
    unknown = sorted(labels - set(BACKEND_LABELS))
    if unknown:
        raise pytest.UsageError(
            f"{REQUIRE_ENV} names unknown backends {unknown}; known: {', '.join(BACKEND_LABELS)}"
        )
    return labels


@functools.cache
def backends() -> dict[str, tuple[object, object]]:
    """``curvlin.backends.available_backends()``, computed once per session."""
    return available_backends()


def unavailable_reason(label: str) -> str:
    """Why ``label`` is missing from :func:`backends`, as precisely as can be found out."""
    if label == "array_api_strict":
        return _import_problem("array_api_strict") or "not reported by available_backends()"
    if label == "torch":
        return _import_problem("torch") or "not reported by available_backends()"
    if label == "torch-cuda":
        problem = _import_problem("torch")
        if problem:
            return problem
        import torch

        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (no GPU or no CUDA build of torch)"
        return "not reported by available_backends()"
    if label == "cupy":
        problem = _import_problem("cupy")
        if problem:
            return problem
        return "cupy imports but no GPU answers (cupy.cuda.is_available() is False or fails)"
    return "not reported by available_backends()"


def _import_problem(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as exc:  # ImportError, or a broken install failing in its own way
        return f"cannot import {module}: {type(exc).__name__}: {exc}"
    return None


def require_backend(label: str) -> tuple[object, object]:
    """``(namespace, device)`` for ``label``; skip if unavailable, fail if it is required."""
    found = backends()
    if label in found:
        return found[label]
    reason = unavailable_reason(label)
    if label in required_backends():
        pytest.fail(
            f"backend {label!r} is listed in {REQUIRE_ENV} but is unavailable: {reason}",
            pytrace=False,
        )
    pytest.skip(f"backend {label!r} unavailable: {reason}")


# -- test-only dependencies ---------------------------------------------------------------


def required_test_deps() -> frozenset[str]:
    """Names listed in ``CURVLIN_REQUIRE_TEST_DEPS`` (comma-separated); unknown ones fail."""
    raw = os.environ.get(REQUIRE_TEST_DEPS_ENV, "")
    names = frozenset(s.strip() for s in raw.split(",") if s.strip())
    unknown = sorted(names - set(TEST_DEPS))
    if unknown:
        raise pytest.UsageError(
            f"{REQUIRE_TEST_DEPS_ENV} names unknown test dependencies {unknown}; "
            f"known: {', '.join(TEST_DEPS)}"
        )
    return names


@functools.cache
def _import_test_dep(name: str):
    """``(module, None)``, or ``(None, why)`` if ``name`` cannot be imported."""
    if name not in TEST_DEPS:
        raise ValueError(f"unknown test dependency {name!r}; add it to TEST_DEPS")
    try:
        with warnings.catch_warnings():  # e.g. curvlinops' dependencies use torch.jit.script
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken install failing in its own way
        return None, (
            f"cannot import {name} (package {TEST_DEPS[name]}): {type(exc).__name__}: {exc}"
        )


def optional_test_dep(name: str):
    """The module ``name``, or None if it cannot be imported; never skips nor fails.

    For a module-level import; mark the tests that use it with :func:`needs_test_dep`.
    """
    return _import_test_dep(name)[0]


def missing_test_dep(name: str) -> str | None:
    """Why the test dependency ``name`` cannot be imported, or None if it can."""
    return _import_test_dep(name)[1]


def require_test_dep(name: str):
    """The module ``name``; skip if it cannot be imported, fail if it is required."""
    module, reason = _import_test_dep(name)
    if module is not None:
        return module
    if name in required_test_deps():
        pytest.fail(
            f"test dependency {name!r} is listed in {REQUIRE_TEST_DEPS_ENV} but is "
            f"unavailable: {reason}",
            pytrace=False,
        )
    pytest.skip(f"test dependency {name!r} unavailable: {reason}")


def needs_test_dep(name: str) -> pytest.MarkDecorator:
    """Mark a test that needs the test-only dependency ``name`` (a key of :data:`TEST_DEPS`).

    ``conftest.py`` skips a marked test when the module cannot be imported (the skip is added at
    collection, so it is reported at the test), and makes it fail instead if
    ``CURVLIN_REQUIRE_TEST_DEPS`` lists the name (:func:`require_test_dep` before it runs).
    """
    if name not in TEST_DEPS:
        raise ValueError(f"unknown test dependency {name!r}; add it to TEST_DEPS")
    return pytest.mark.test_dep(name)


def to_numpy(x) -> np.ndarray:
    """Any backend's array (or a Python/NumPy scalar) as a NumPy array on the host."""
    if isinstance(x, np.ndarray | np.generic | float | int):
        return np.asarray(x)
    return np.asarray(get_backend(x).to_numpy(x))


def asarray(xp, device, a, dtype: str = "float64"):
    """NumPy ``a`` as an array of namespace ``xp`` on ``device``, cast to ``dtype``.

    ``dtype`` is a name (``"float32"``, ``"bfloat16"``) looked up on ``xp`` so every backend
    gets its own dtype object; half precisions go through a float32 copy.
    """
    host = np.asarray(a, dtype=np.float64 if dtype == "float64" else np.float32)
    out = xp.asarray(host, device=device)
    if dtype not in ("float32", "float64"):
        out = xp.astype(out, getattr(xp, dtype))
    return out


def dtype_name(xp, dtype) -> str:
    for name in ("float16", "bfloat16", "float32", "float64"):
        if hasattr(xp, name) and dtype == getattr(xp, name):
            return name
    raise AssertionError(f"unexpected dtype {dtype}")


# -- random matrices ----------------------------------------------------------------------


def random_spd(rng: np.random.Generator, n: int, batch=(), *, cond: float = 10.0, scale=1.0):
    """SPD matrices ``(*batch, n, n)`` with eigenvalues spread log-uniformly in ``[1, cond]``.

    Multiplied by ``scale`` (a number, or an array broadcasting against ``batch``).
    """
    batch = tuple(batch)
    g = rng.standard_normal((*batch, n, n))
    q, r = np.linalg.qr(g)
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
    evals = np.exp(rng.uniform(0.0, math.log(cond), size=(*batch, n)))
    if n > 1:  # pin the extremes so the condition number is what was asked for
        evals[..., 0], evals[..., -1] = 1.0, cond
    m = (q * evals[..., None, :]) @ np.swapaxes(q, -1, -2)
    m = 0.5 * (m + np.swapaxes(m, -1, -2))
    return np.asarray(scale)[..., None, None] * m


def random_psd_low_rank(rng: np.random.Generator, n: int, r: int, batch=()) -> np.ndarray:
    """Rank-``r`` PSD matrices ``a @ aᵀ`` with ``a`` of shape ``(*batch, n, r)``."""
    a = rng.standard_normal((*tuple(batch), n, r))
    return a @ np.swapaxes(a, -1, -2)


# -- dense references ---------------------------------------------------------------------


def dense_kron(mats) -> np.ndarray:
    """``F_1 ⊗ … ⊗ F_k`` with ``numpy.kron``."""
    return functools.reduce(np.kron, [np.asarray(m, dtype=np.float64) for m in mats])


def dense_kron_apply(mats, x: np.ndarray) -> np.ndarray:
    """``(F_1 ⊗ … ⊗ F_k) vec(x)`` for every batch member of ``x``, reshaped to the out dims."""
    k = len(mats)
    batch = x.shape[: x.ndim - k]
    big = dense_kron(mats)
    flat = x.reshape(-1, big.shape[1]).astype(np.float64)
    out = flat @ big.T
    return out.reshape(*batch, *(m.shape[0] for m in mats))


def dense_kron_solve(big: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Solve ``big @ vec(y) = vec(x)`` for every batch member of ``x``, reshaped like ``x``."""
    batch = x.shape[: x.ndim - k]
    flat = x.reshape(-1, big.shape[1]).astype(np.float64)
    out = np.linalg.solve(big, flat.T).T
    return out.reshape(*batch, *x.shape[x.ndim - k :])


def reference_pi_dampings(mats, damping: float) -> list[float]:
    """π-split dampings computed independently: ``γ_i = λ^(1/k) t_i / (∏ t_j)^(1/k)``."""
    k = len(mats)
    t = np.array([np.trace(m) / m.shape[0] for m in mats], dtype=np.float64)
    if not np.all(np.isfinite(t) & (t > 0)):
        t = np.ones(k)
    geo = np.prod(t) ** (1.0 / k)
    return [damping ** (1.0 / k) * ti / geo for ti in t]


def reference_inverse_root(m: np.ndarray, p: float) -> np.ndarray:
    """``m^(-1/p)`` for SPD stacks, from ``numpy.linalg.eigh`` in float64."""
    w, v = np.linalg.eigh(np.asarray(m, dtype=np.float64))
    return (v * w[..., None, :] ** (-1.0 / p)) @ np.swapaxes(v, -1, -2)


# -- comparisons --------------------------------------------------------------------------

EPS = {"float64": float(np.finfo(np.float64).eps), "float32": float(np.finfo(np.float32).eps)}


def assert_close(actual, expected, *, rtol: float, what: str = "") -> None:
    """Elementwise ``|a - e| <= rtol·(|e| + max|e|)``: relative, with an absolute floor.

    The floor at ``rtol·max|e|`` keeps near-zero entries of a well-scaled result from failing
    on roundoff that is small compared to the result as a whole.
    """
    actual = to_numpy(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite entries in the result"
    floor = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(
        actual.astype(np.float64), expected, rtol=rtol, atol=rtol * floor, err_msg=what
    )


def tolerance(dtype: str, *, cond: float = 1.0, n: int = 1, factor: float = 50.0) -> float:
    """A relative tolerance ``factor·eps·cond·sqrt(n)`` for a solve of size ``n``."""
    return factor * EPS[dtype] * cond * math.sqrt(max(n, 1))


# -- hypothesis strategies ----------------------------------------------------------------


@st.composite
def kron_dims(draw, *, k_max: int = 4, d_max: int = 64, total_max: int = 512):
    """``(d_1, …, d_k)`` with ``1 <= k <= k_max``, ``d_i <= d_max``, ``∏ d_i <= total_max``."""
    k = draw(st.integers(1, k_max))
    dims, prod = [], 1
    for _ in range(k):
        d = draw(st.integers(1, min(d_max, total_max // prod)))
        dims.append(d)
        prod *= d
    return tuple(dims)


def batch_shapes(max_axes: int = 2, max_size: int = 3):
    """Leading batch shapes with 0 to ``max_axes`` axes of size 1 to ``max_size``."""
    return st.lists(st.integers(1, max_size), min_size=0, max_size=max_axes).map(tuple)


seeds = st.integers(0, 2**32 - 1)
