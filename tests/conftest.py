"""The ``xp`` fixture: every core test runs on every usable backend.

Backends (labels of ``curvlin.backends.available_backends()``): ``numpy``, ``array_api_strict``,
``torch`` (CPU), ``torch-cuda`` and ``cupy`` (the last two only where a GPU answers). A backend
that is not usable is skipped with the reason, unless it is listed in the environment variable
``CURVLIN_REQUIRE_BACKENDS`` (comma-separated labels, e.g. ``numpy,array_api_strict,torch``):
then every test that would run on it fails, so CI cannot pass by skipping silently.
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
    asarray,
    backends,
    require_backend,
    required_backends,
    to_numpy,
)


def pytest_configure(config):
    required_backends()  # a misspelt label is a usage error, reported before any test runs


def pytest_report_header(config):
    found = ", ".join(backends()) or "none"
    required = ", ".join(sorted(required_backends())) or "none"
    return [f"curvlin backends: available {found}; required ({REQUIRE_ENV}) {required}"]


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
