"""The ``xp`` fixture: every core test runs on every usable backend.

Backends (labels of ``curvlin.backends.available_backends()``): ``numpy``, ``array_api_strict``,
``torch`` (CPU), ``torch-cuda`` and ``cupy`` (the last two only where a GPU answers). A backend
that is not usable is skipped with the reason, unless it is listed in the environment variable
``CURVLIN_REQUIRE_BACKENDS`` (comma-separated labels, e.g. ``numpy,array_api_strict,torch``):
then every test that would run on it fails, so CI cannot pass by skipping silently.

Test-only dependencies (``_helpers.TEST_DEPS``, e.g. ``curvlinops``, the independent reference
of the KFAC factors) work the same way: a test marked ``needs_test_dep(name)`` is skipped when
the module cannot be imported, unless ``name`` is listed in ``CURVLIN_REQUIRE_TEST_DEPS``.
"""

from __future__ import annotations

import os

# The problems here are small: thread pools only add contention. On a 2-core machine, torch's
# OpenMP threads and OpenBLAS's threads spinning against each other made a 256×256 NumPy
# solve several times slower once torch had run. Set before NumPy or torch is imported;
# an explicit setting in the environment wins.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import functools  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _helpers import (  # noqa: E402
    BACKEND_LABELS,
    REQUIRE_ENV,
    REQUIRE_TEST_DEPS_ENV,
    asarray,
    backends,
    missing_test_dep,
    require_backend,
    require_test_dep,
    required_backends,
    required_test_deps,
    to_numpy,
)


def pytest_configure(config):
    required_backends()  # a misspelt label is a usage error, reported before any test runs
    required_test_deps()


def pytest_report_header(config):
    found = ", ".join(backends()) or "none"
    required = ", ".join(sorted(required_backends())) or "none"
    deps = ", ".join(sorted(required_test_deps())) or "none"
    return [
        f"curvlin backends: available {found}; required ({REQUIRE_ENV}) {required}",
        f"curvlin test dependencies required ({REQUIRE_TEST_DEPS_ENV}): {deps}",
    ]


def pytest_collection_modifyitems(config, items):
    """``needs_test_dep(name)`` without the module: skip, unless it is required."""
    required = required_test_deps()
    for item in items:
        for mark in item.iter_markers(name="test_dep"):
            (name,) = mark.args
            reason = missing_test_dep(name)
            if reason is not None and name not in required:
                item.add_marker(pytest.mark.skip(reason=f"test dependency {name!r}: {reason}"))


def pytest_runtest_setup(item):
    """``needs_test_dep(name)`` without the module although it is required: fail."""
    for mark in item.iter_markers(name="test_dep"):
        require_test_dep(*mark.args)


@pytest.fixture(scope="session", params=BACKEND_LABELS)
def backend_label(request) -> str:
    """The backend label; skips (or fails, if required) when the backend is unavailable."""
    require_backend(request.param)
    return request.param


@pytest.fixture(scope="session")
def xp(backend_label):
    """The array-API namespace of the backend under test."""
    return backends()[backend_label][0]


@pytest.fixture(scope="session")
def device(backend_label):
    """The device arrays of the backend under test are created on."""
    return backends()[backend_label][1]


@pytest.fixture(scope="session")
def to_xp(xp, device):
    """``to_xp(numpy_array, dtype="float64")``: a copy on the backend under test."""
    return functools.partial(asarray, xp, device)


@pytest.fixture(scope="session")
def to_np():
    """``to_np(array)``: any backend's array copied to NumPy."""
    return to_numpy


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name, so each test draws its own data."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.name))
    return np.random.default_rng(seed)
