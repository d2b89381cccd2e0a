"""Backend selection, registration, entry points, and the backend kernels against NumPy."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
from _helpers import (
    EXPECTED_BACKEND_NAME,
    asarray,
    assert_close,
    random_spd,
    require_backend,
    to_numpy,
)

import curvlin
import curvlin.backends as backends_mod
from curvlin.backends import (
    Backend,
    available_backends,
    get_backend,
    get_namespace,
    register_backend,
    unregister_backend,
)
from curvlin.blocks import ema

# -- lazy imports ----------------------------------------------------------------------------


def test_import_curvlin_imports_neither_torch_nor_cupy():
    code = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import curvlin, curvlin.backends, curvlin.kron, curvlin.linalg
        before = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cupy"))
        # using curvlin on NumPy arrays must not pull them in either
        m = np.eye(3) + 0.1
        curvlin.spd_inverse(m)
        curvlin.spd_solve(m, np.ones(3))
        curvlin.spd_inverse_root(m, 2)
        curvlin.kron_solve([m, np.eye(2)], np.ones((3, 2)), damping=0.1, exact=True)
        after = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cupy"))
        print(json.dumps({"before": before, "after": after, "curvlin": "curvlin" in sys.modules}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["curvlin"]
    assert report["before"] == [], f"import curvlin imported {report['before']}"
    assert report["after"] == [], f"using curvlin on NumPy imported {report['after']}"


# -- selection ---------------------------------------------------------------------------------


def test_get_backend_picks_the_library_backend(backend_label, to_xp):
    x = to_xp(np.ones((2, 2)))
    backend = get_backend(x)
    assert isinstance(backend, Backend)
    assert backend.name == EXPECTED_BACKEND_NAME[backend_label]
    assert backend.xp is get_namespace(x)
    assert repr(backend) == f"<curvlin backend {backend.name!r}>"
    assert get_backend(x, to_xp(np.zeros(3))) is backend  # cached per namespace


def test_available_backends_lists_usable_pairs():
    found = available_backends()
    assert "numpy" in found
    assert set(found) <= set(EXPECTED_BACKEND_NAME)
    for label, (xp, device) in found.items():
        x = xp.asarray(np.arange(3.0), device=device)
        assert get_backend(x).name == EXPECTED_BACKEND_NAME[label], label
        np.testing.assert_array_equal(to_numpy(x), np.arange(3.0))


def test_get_namespace_rejects_two_libraries():
    txp, tdev = require_backend("torch")
    with pytest.raises(TypeError, match=r"one array library, got numpy\.ndarray, torch\.Tensor"):
        get_namespace(np.ones(2), asarray(txp, tdev, np.ones(2)))


# -- registration ------------------------------------------------------------------------------


class _Tagged(Backend):
    """A backend that delegates to another and counts the calls, to see that it is used."""

    def __init__(self, xp, name, inner):
        super().__init__(xp)
        self.name = name
        self.inner = inner
        self.calls = 0

    def cholesky_ex(self, a):
        self.calls += 1
        return self.inner.cholesky_ex(a)


def test_register_backend_takes_precedence_and_unregisters(backend_label, xp, to_xp):
    x = to_xp(np.eye(3) * 2.0)
    builtin = get_backend(x)
    made = []

    def factory(ns):
        if ns is not xp:
            return None
        made.append(_Tagged(ns, "tagged", builtin))
        return made[-1]

    assert register_backend(factory) is factory  # usable as a decorator
    try:
        backend = get_backend(x)
        assert backend.name == "tagged"
        # the library's own functions go through the registered backend
        out = curvlin.spd_inverse(x)
        assert backend.calls >= 1
        assert_close(out, np.eye(3) / 2.0, rtol=1e-15, what="through the registered backend")

        def later(ns):
            return _Tagged(ns, "later", builtin) if ns is xp else None

        register_backend(later)
        try:
            assert get_backend(x).name == "later"  # the most recent registration wins
        finally:
            unregister_backend(later)
        assert get_backend(x).name == "tagged"
    finally:
        unregister_backend(factory)
    assert get_backend(x).name == EXPECTED_BACKEND_NAME[backend_label]
    unregister_backend(factory)  # removing an absent factory is a no-op


def test_factory_returning_none_falls_through(to_xp, backend_label):
    seen = []

    def decline(ns):
        seen.append(ns)
        return None

    register_backend(decline)
    try:
        x = to_xp(np.ones(2))
        assert get_backend(x).name == EXPECTED_BACKEND_NAME[backend_label]
        assert seen, "the registered factory was not consulted"
    finally:
        unregister_backend(decline)


def test_register_backend_rejects_non_callables():
    with pytest.raises(TypeError, match=r"register_backend: factory must be callable, got int"):
        register_backend(3)


# -- entry points -------------------------------------------------------------------------------


class _EntryPoint:
    def __init__(self, obj):
        self.obj = obj
        self.loads = 0

    def load(self):
        self.loads += 1
        return self.obj


@pytest.fixture
def fresh_registry(monkeypatch):
    """An empty registry, entry points not yet loaded, and a fake ``importlib.metadata``."""
    monkeypatch.setattr(backends_mod, "_registered", [])
    monkeypatch.setattr(backends_mod, "_cache", {})
    # "not loaded yet": a ``_plugins`` list that is None, or an ``_entry_points_loaded`` flag
    reset = {"_plugins": None, "_entry_points_loaded": False}
    present = [name for name in reset if hasattr(backends_mod, name)]
    if not present:
        pytest.fail(
            "curvlin.backends keeps entry-point state in neither _plugins nor "
            "_entry_points_loaded; update this fixture"
        )
    for name in present:
        monkeypatch.setattr(backends_mod, name, reset[name])
    calls = []
    points = []

    def entry_points(*, group):
        calls.append(group)
        return list(points)

    monkeypatch.setattr(backends_mod, "metadata", SimpleNamespace(entry_points=entry_points))
    return SimpleNamespace(calls=calls, points=points)


def test_entry_points_are_consulted_for_unknown_namespaces(fresh_registry):
    sxp, sdev = require_backend("array_api_strict")

    class FromEntryPoint(Backend):
        name = "from-entry-point"

    ep = _EntryPoint(FromEntryPoint)  # would claim any namespace it is asked about
    fresh_registry.points.append(ep)

    # a built-in namespace never needs (or gets overridden by) the entry points
    assert get_backend(np.ones(2)).name == "numpy"
    assert fresh_registry.calls == []

    x = asarray(sxp, sdev, np.ones(2))
    backend = get_backend(x)
    assert backend.name == "from-entry-point"
    assert fresh_registry.calls == ["curvlin.backends"]
    assert ep.loads == 1

    # loaded once: later lookups (even after the cache is dropped) do not scan again
    backends_mod._cache.clear()
    assert get_backend(x).name == "from-entry-point"
    assert fresh_registry.calls == ["curvlin.backends"]
    assert ep.loads == 1


def test_entry_point_that_declines_leaves_the_generic_backend(fresh_registry):
    sxp, sdev = require_backend("array_api_strict")
    fresh_registry.points.append(_EntryPoint(lambda ns: None))
    backend = get_backend(asarray(sxp, sdev, np.ones(2)))
    assert type(backend) is Backend
    assert backend.name == "generic"
    assert fresh_registry.calls == ["curvlin.backends"]


def test_registered_factories_beat_entry_points(fresh_registry):
    sxp, sdev = require_backend("array_api_strict")

    class Registered(Backend):
        name = "registered"

    class FromEntryPoint(Backend):
        name = "from-entry-point"

    fresh_registry.points.append(_EntryPoint(lambda ns: FromEntryPoint(ns)))
    register_backend(lambda ns: Registered(ns) if ns is sxp else None)
    assert get_backend(asarray(sxp, sdev, np.ones(2))).name == "registered"
    assert fresh_registry.calls == []


# -- kernels against NumPy ------------------------------------------------------------------------


@pytest.fixture(params=["native", "generic"])
def impl(request, xp):
    """The backend under test: the library's own, or the pure-standard ``Backend(xp)``."""
    if request.param == "generic":
        return lambda x: Backend(xp)
    return get_backend


def _triangular(rng, batch, n, *, lower):
    t = np.tril(0.3 * rng.standard_normal((*batch, n, n)), -1)
    t = t + np.eye(n) * rng.uniform(1.0, 2.0, size=(*batch, 1, n))
    return t if lower else np.swapaxes(t, -1, -2)


@pytest.mark.parametrize("lower", [True, False], ids=["lower", "upper"])
@pytest.mark.parametrize(("batch", "k"), [((), 1), ((), 3), ((2,), 2), ((2, 3), 4)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_solve_triangular(xp, to_xp, impl, rng, lower, batch, k, dtype):
    t = _triangular(rng, batch, 5, lower=lower)
    b = rng.standard_normal((*batch, 5, k))
    tx = to_xp(t, dtype)
    out = impl(tx).solve_triangular(tx, to_xp(b, dtype), lower=lower)
    assert out.dtype == getattr(xp, dtype)
    rtol = {"float64": 1e-12, "float32": 1e-4}[dtype]
    assert_close(out, np.linalg.solve(t, b), rtol=rtol, what="solve_triangular")


# (4, 5): a stack of 20 small matrices, which the torch CPU backend inverts by a batched solve
@pytest.mark.parametrize(("batch", "k"), [((), 1), ((3,), 2), ((2, 2), 5), ((4, 5), 2)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cholesky_solve_and_inverse(xp, to_xp, to_np, impl, rng, batch, k, dtype):
    a = random_spd(rng, 6, batch, cond=10.0)
    b = rng.standard_normal((*batch, 6, k))
    factor = to_xp(np.linalg.cholesky(a), dtype)
    backend = impl(factor)
    rtol = {"float64": 1e-12, "float32": 1e-4}[dtype]
    solved = backend.cholesky_solve(factor, to_xp(b, dtype))
    assert solved.dtype == getattr(xp, dtype)
    assert_close(solved, np.linalg.solve(a, b), rtol=rtol, what="cholesky_solve")
    inv = backend.cholesky_inverse(factor)
    assert inv.dtype == getattr(xp, dtype)
    assert_close(inv, np.linalg.inv(a), rtol=rtol, what="cholesky_inverse")
    host = to_np(inv)
    np.testing.assert_array_equal(host, np.swapaxes(host, -1, -2))  # exactly symmetric


# torch's CPU Gram: "row" an outer product, "two-blocks" one GEMM (up to two block rows of
# 128 columns), "blocks" three block rows
@pytest.mark.parametrize(
    "shape",
    [(40, 7), (3, 9), (1, 1), (1, 300), (20, 256), (20, 300)],
    ids=["tall", "wide", "scalar", "row", "two-blocks", "blocks"],
)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gram_is_scaled_symmetric_xtx(xp, to_xp, to_np, impl, rng, shape, dtype):
    x = rng.standard_normal(shape)
    xx = to_xp(x, dtype)
    out = impl(xx).gram(xx, scale=0.25)
    assert out.dtype == getattr(xp, dtype)
    assert tuple(out.shape) == (shape[1], shape[1])
    host = to_np(out)
    np.testing.assert_array_equal(host, host.T)  # Kronecker factors stay exactly symmetric
    rtol = {"float64": 1e-12, "float32": 1e-5}[dtype]
    assert_close(out, 0.25 * (x.T @ x), rtol=rtol, what="gram")


# torch's CPU kernel: one block row of 128 (m = 5), three with a partial last one (m = 300)
@pytest.mark.parametrize("m", [5, 300])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_hadamard_kernel_sums_symmetric_layer_kernels(xp, to_xp, to_np, impl, rng, m, dtype):
    shapes = [(7, 3, 1.0), (1, 40, 0.0), (260, 2, 1.0)]  # (p, q, shift): wide, one column, tall
    parts = [(rng.standard_normal((m, p)), rng.standard_normal((m, q)), s) for p, q, s in shapes]
    ref = sum((a @ a.T + s) * (d @ d.T) for a, d, s in parts)
    moved = [(to_xp(a, dtype), to_xp(d, dtype), s) for a, d, s in parts]
    out = impl(moved[0][0]).hadamard_kernel(moved)
    assert out.dtype == getattr(xp, dtype)
    assert tuple(out.shape) == (m, m)
    host = to_np(out)
    np.testing.assert_array_equal(host, host.T)
    rtol = {"float64": 1e-12, "float32": 1e-5}[dtype]
    assert_close(out, ref, rtol=rtol, what="hadamard_kernel")
    for (a, d, _), (ma, md, _) in zip(parts, moved):  # the inputs are untouched
        np.testing.assert_array_equal(to_np(ma), a.astype(dtype))
        np.testing.assert_array_equal(to_np(md), d.astype(dtype))


def test_hadamard_kernel_needs_parts_of_the_same_rows(xp, impl):
    backend = impl(xp.zeros(1))
    with pytest.raises(ValueError, match="at least one"):
        backend.hadamard_kernel([])
    rows = (xp.ones((3, 2)), xp.ones((3, 1)), 1.0)
    with pytest.raises(ValueError, match=r"part 1 must hold two matrices of 3 rows"):
        backend.hadamard_kernel([rows, (xp.ones((3, 2)), xp.ones((4, 1)), 0.0)])


@pytest.mark.parametrize(
    ("stack", "value"),
    [((), 0.25), ((3,), 0.25), ((3,), "per-matrix"), ((), "broadcast")],
    ids=["one", "stack", "per-matrix", "broadcast"],
)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_add_diagonal_matches_plus_identity(xp, to_xp, to_np, impl, rng, stack, value, dtype):
    m = rng.standard_normal((*stack, 4, 4))
    v = {"per-matrix": rng.random(3), "broadcast": rng.random(2)}.get(value, value)
    moved = to_xp(m, dtype)
    vv = v if isinstance(v, float) else to_xp(v, dtype)
    out = impl(moved).add_diagonal(moved, vv)
    plain = moved + (vv if isinstance(vv, float) else vv[..., None, None]) * xp.eye(
        4, dtype=moved.dtype
    )
    assert out.dtype == getattr(xp, dtype)
    assert tuple(out.shape) == tuple(plain.shape)
    # the same bits as ``m + value·I``, and ``m`` itself untouched
    np.testing.assert_array_equal(to_np(out), to_np(plain))
    np.testing.assert_array_equal(to_np(moved), m.astype(dtype))


@pytest.mark.parametrize("decay", [0.9, 0.0, None], ids=["ema", "replace", "sum"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ema_in_place_updates_old_only(xp, to_xp, to_np, impl, rng, decay, dtype):
    old, new = rng.standard_normal((2, 4, 3))
    ref = old + new if decay is None else decay * old + (1.0 - decay) * new
    o, n = to_xp(old.copy(), dtype), to_xp(new.copy(), dtype)  # may share the host memory
    backend = impl(o)
    if type(backend) is Backend:  # the pure-standard update: two products and a sum
        plain = o + n if decay is None else decay * o + (1.0 - decay) * n
    else:  # the library's EMA out of place: a copy of ``o`` updated the same way
        plain = ema(o, n, decay)
        np.testing.assert_array_equal(to_np(o), old.astype(dtype))  # ``o`` kept
    out = backend.ema_(o, n, decay)
    assert out is o
    assert out.dtype == getattr(xp, dtype)
    rtol = {"float64": 1e-12, "float32": 1e-6}[dtype]
    assert_close(o, ref, rtol=rtol, what="ema_")
    # the same bits as the out-of-place EMA
    np.testing.assert_array_equal(to_np(o), to_np(plain))
    np.testing.assert_array_equal(to_np(n), new.astype(dtype))  # new is untouched


def test_torch_gram_of_views_and_of_tensors_requiring_grad(rng):
    import torch

    x = torch.from_numpy(rng.standard_normal((300, 20)))
    for view in (x.mT, x[::2].mT, x.mT.clone().requires_grad_(), x[:1].clone().requires_grad_()):
        out = get_backend(view).gram(view, scale=0.5)
        assert torch.equal(out, out.mT)
        torch.testing.assert_close(out, 0.5 * view.mT @ view, rtol=1e-12, atol=1e-12)
    assert out.requires_grad  # a differentiable product where autograd asks for one


def test_gram_of_strided_and_fortran_ordered_arrays(rng):
    x = rng.standard_normal((30, 8))
    for view in (x[:, ::2], x.T.copy().T, x[::3]):
        np.testing.assert_allclose(get_backend(view).gram(view, scale=2.0), 2.0 * view.T @ view)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cholesky_ex_flags_the_bad_matrices(xp, to_xp, to_np, impl, rng, dtype):
    a = random_spd(rng, 4, (2, 3), cond=10.0)
    a[1, 2] = np.diag([1.0, 2.0, -1.0, 3.0])  # indefinite
    a[0, 1, 3, 0] = a[0, 1, 0, 3] = np.nan  # not finite
    ax = to_xp(a, dtype)
    factor, ok = impl(ax).cholesky_ex(ax)
    expected = np.ones((2, 3), dtype=bool)
    expected[1, 2] = expected[0, 1] = False
    ok = to_np(ok)
    assert ok.dtype == np.bool_
    np.testing.assert_array_equal(ok, expected)
    assert tuple(factor.shape) == a.shape
    host = to_np(factor).astype(np.float64)
    rtol = {"float64": 1e-12, "float32": 1e-5}[dtype]
    assert_close(host[expected], np.linalg.cholesky(a[expected]), rtol=rtol, what="good factors")


def test_cholesky_ex_single_matrix(xp, to_xp, to_np, impl, rng):
    a = random_spd(rng, 3)
    ax = to_xp(a)
    factor, ok = impl(ax).cholesky_ex(ax)
    assert tuple(ok.shape) == ()
    assert bool(to_np(ok))
    assert_close(factor, np.linalg.cholesky(a), rtol=1e-13, what="factor")
    bad = to_xp(-np.eye(3))
    _, ok = impl(bad).cholesky_ex(bad)
    assert not bool(to_np(ok))


EINSUM_CASES = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ij,jk", [(3, 4), (4, 5)]),  # implicit output: letters used once, alphabetical
    ("jk,ij", [(4, 5), (3, 4)]),  # implicit output is "ik", not the order of appearance
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),  # batch matmul
    ("bij,bkj->bik", [(2, 3, 4), (2, 5, 4)]),
    ("ij,ij->", [(3, 4), (3, 4)]),  # Frobenius inner product, no repeated index in one term
    ("ij,ji", [(3, 4), (4, 3)]),  # trace(A B), implicit scalar output
    ("ij,ji->", [(3, 4), (4, 3)]),
    ("i,j->ij", [(3,), (4,)]),  # outer product
    ("ij,j->i", [(3, 4), (4,)]),
    ("ijk->kji", [(2, 3, 4)]),
    ("ij->j", [(3, 4)]),
    ("ij,jk,kl->il", [(3, 4), (4, 5), (5, 2)]),
    ("ab,cd->cabd", [(2, 3), (4, 1)]),
]


@pytest.mark.parametrize(("subscripts", "shapes"), EINSUM_CASES, ids=[c[0] for c in EINSUM_CASES])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_einsum(xp, to_xp, impl, rng, subscripts, shapes, dtype):
    ops = [rng.standard_normal(s) for s in shapes]
    xs = [to_xp(o, dtype) for o in ops]
    out = impl(xs[0]).einsum(subscripts, *xs)
    assert out.dtype == getattr(xp, dtype)
    expected = np.einsum(subscripts, *ops)
    rtol = {"float64": 1e-13, "float32": 1e-5}[dtype]
    assert_close(out, expected, rtol=rtol, what=f"einsum {subscripts}")


@pytest.mark.parametrize(
    ("subscripts", "shape", "message"),
    [("ii->i", (3, 3), "repeated index"), ("...ij->...ji", (2, 3, 3), "ellipsis")],
)
def test_generic_einsum_rejects_what_it_does_not_support(xp, to_xp, subscripts, shape, message):
    with pytest.raises(ValueError, match=rf"einsum: .*{message}"):
        Backend(xp).einsum(subscripts, to_xp(np.ones(shape)))


def test_generic_einsum_checks_operands(xp, to_xp):
    g = Backend(xp)
    a = to_xp(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"einsum: subscripts 'ij,jk->ik' name 2 operands, got 1"):
        g.einsum("ij,jk->ik", a)
    with pytest.raises(ValueError, match=r"einsum: term 'ijk' does not match an operand of shape"):
        g.einsum("ijk->i", a)
    with pytest.raises(ValueError, match=r"einsum: index 'j' has sizes 3 and 4"):
        g.einsum("ij,jk->ik", a, to_xp(np.ones((4, 2))))


_CPU_LABELS = ("numpy", "array_api_strict", "torch")


def test_synchronize_and_to_numpy(xp, to_xp, impl, rng, backend_label):
    a = rng.standard_normal((3, 2))
    x = to_xp(a)
    backend = impl(x)
    assert backend.synchronize() is None
    assert backend.synchronize(x) is None
    if isinstance(backend, type(get_backend(x))) or backend_label in _CPU_LABELS:
        # The generic Backend.to_numpy is np.from_dlpack, which only takes host arrays; it is
        # exercised on CPU namespaces only (a GPU library always has its own backend).
        host = backend.to_numpy(x)
        assert isinstance(host, np.ndarray)
        np.testing.assert_array_equal(host, a)
