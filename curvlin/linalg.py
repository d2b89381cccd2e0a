"""SPD inverse, solve and inverse root on stacks of matrices, with jitter and float64 recovery.

Every function factorises ``m + damping·I``. A Cholesky factorisation that fails (roundoff
on a nearly singular matrix) is retried on the failing matrices only, first with a jitter of
``c·eps·mean(diag)`` in the input dtype, then in float64 with growing jitter up to
``1e-6·mean(diag)``; the result is cast back to the input dtype. If that also fails,
:class:`curvlin.LinAlgError` says which matrices and why. Nothing returns NaN or inf silently.

Deciding whether to retry needs a look at a success flag on the host: once per call of
:func:`spd_inverse` and :func:`spd_solve` (whose one look also covers the finiteness of the
right-hand side), twice for :func:`spd_inverse_root` (eigenvalues finite, then non-negative).
These functions belong on the refresh path of an optimizer (every few steps), not in its
per-step solve, which applies cached inverses with plain matrix products.

An empty ``m`` (0×0 matrices, or a stack with a 0-size axis) has nothing to factorise:
every function returns the empty result of the right shape and dtype, without a host look.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

from ._errors import LinAlgError, NonFiniteError
from ._validation import check_damping, check_square, namespace_of
from .backends import Array, Backend

__all__ = ["spd_inverse", "spd_inverse_root", "spd_solve"]

#: Relative jitters (times eps of the input dtype) tried before moving to float64.
_JITTER_EPS_MULTIPLES = (1e1, 1e3)
#: Relative jitters tried in float64.
_JITTER_FLOAT64 = (0.0, 1e-12, 1e-10, 1e-8, 1e-6)


def spd_inverse(m: Array, /, *, damping=0.0) -> Array:
    """Inverse of symmetric positive definite matrices, ``(m + damping·I)⁻¹``.

    Parameters
    ----------
    m : array, shape (..., n, n)
        Symmetric positive (semi)definite matrices; only the lower triangle is read.
    damping : float or array, optional
        Added to the diagonal before inverting: a non-negative number, or an array that
        broadcasts against the stack shape ``m.shape[:-2]`` (one damping per matrix; not
        checked for sign, to avoid a device synchronisation).

    Returns
    -------
    array, shape (..., n, n)
        The symmetric inverse, in ``m``'s dtype and on its device.

    Raises
    ------
    LinAlgError
        If a matrix holds NaN or inf, or is not positive definite even after jitter and a
        float64 retry.

    Notes
    -----
    Empty input is no error: the inverse of 0×0 matrices is 0×0, and an empty stack (such as
    ``(0, n, n)``) gives an empty stack, in ``m``'s dtype; nothing is factorised.

    References
    ----------
    Golub & Van Loan, *Matrix Computations*, 4th ed., §4.2 (Cholesky).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import spd_inverse
    >>> m = np.array([[4.0, 2.0], [2.0, 3.0]])
    >>> spd_inverse(m) @ m
    array([[1., 0.],
           [0., 1.]])
    >>> spd_inverse(np.stack([m, 2 * m]), damping=1.0).shape
    (2, 2, 2)
    """
    backend = namespace_of(("m", m), func="spd_inverse")
    check_square(m, "m", "spd_inverse")
    damping = check_damping(damping, "damping", "spd_inverse", like=m)
    return _inverse(backend, m, damping, "spd_inverse", "m")


def _inverse(backend: Backend, m: Array, damping, func: str, name: str) -> Array:
    """:func:`spd_inverse` after validation; ``func`` and ``name`` label its errors."""
    work = _damped(backend, _working_copy(backend, m), damping)
    if _is_empty(work):  # 0×0 matrices or an empty stack: nothing to factorise
        return _zeros(backend, work.shape, m)
    factor = _cholesky(backend, work, func, name)
    return backend.xp.astype(backend.cholesky_inverse(factor), m.dtype, copy=False)


def spd_solve(m: Array, b: Array, /, *, damping=0.0) -> Array:
    """Solve ``(m + damping·I) x = b`` for symmetric positive definite ``m``.

    Parameters
    ----------
    m : array, shape (..., n, n)
        Symmetric positive (semi)definite matrices; only the lower triangle is read.
    b : array, shape (n,) or (..., n, k)
        Right-hand sides: a vector, or a stack of ``k`` columns whose stack shape broadcasts
        against ``m``'s (array-API convention: a 1-D ``b`` is a vector).
    damping : float or array, optional
        As in :func:`spd_inverse`.

    Returns
    -------
    array
        ``x``, shaped like the broadcast of ``m`` and ``b`` (``(..., n)`` for a vector ``b``).

    Raises
    ------
    LinAlgError
        As in :func:`spd_inverse`, and if ``b`` holds NaN or inf (the solve would be NaN).

    Notes
    -----
    The finiteness of ``b`` is checked in the same single host look that checks the
    factorisation. If ``x`` is empty, nothing is solved: with an empty ``m`` (0×0 matrices or
    an empty stack) nothing is factorised either; with a non-empty ``m`` and an empty ``b``
    (``k = 0`` columns or an empty stack) ``m`` is still factorised and its errors raised.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import spd_solve
    >>> m = np.array([[4.0, 2.0], [2.0, 3.0]])
    >>> spd_solve(m, np.array([6.0, 5.0]))
    array([1., 1.])
    """
    backend = namespace_of(("m", m), ("b", b), func="spd_solve")
    n = check_square(m, "m", "spd_solve")
    xp = backend.xp
    vector = b.ndim == 1
    if b.ndim == 0 or b.shape[-2 if not vector else -1] != n:
        raise ValueError(
            f"spd_solve: b must have shape ({n},) or (..., {n}, k) to match m of shape "
            f"{tuple(m.shape)}, got {tuple(b.shape)}"
        )
    damping = check_damping(damping, "damping", "spd_solve", like=m)
    rhs = b[:, None] if vector else b
    stack = tuple(m.shape[:-2])
    if not isinstance(damping, float):  # a damping array may enlarge the stack (checked above)
        stack = np.broadcast_shapes(stack, tuple(damping.shape))
    try:
        batch = np.broadcast_shapes(stack, tuple(rhs.shape[:-2]))
    except ValueError:
        raise ValueError(
            f"spd_solve: stack shapes of m {tuple(m.shape)} and b {tuple(b.shape)} do not broadcast"
        ) from None
    shape = (*batch, n, rhs.shape[-1])
    work = _damped(backend, _working_copy(backend, m), damping)
    if _is_empty(work):  # 0×0 matrices or an empty stack: nothing to factorise
        return _zeros(backend, shape[:-1] if vector else shape, b)
    factor = _cholesky(backend, work, "spd_solve", "m", rhs=("b", b))
    if math.prod(shape) == 0:  # m is factorised (and checked), but there is nothing to solve
        return _zeros(backend, shape[:-1] if vector else shape, b)
    factor = xp.broadcast_to(factor, (*batch, n, n))
    rhs = xp.broadcast_to(xp.astype(rhs, factor.dtype), shape)
    x = xp.astype(backend.cholesky_solve(factor, rhs), b.dtype, copy=False)
    return x[..., 0] if vector else x


def spd_inverse_root(m: Array, p, /, *, damping=0.0) -> Array:
    """Inverse ``p``-th root of symmetric positive definite matrices, ``(m + damping·I)^(-1/p)``.

    Computed from an eigendecomposition. Eigenvalues of ``m + damping·I`` that are negative by
    no more than roundoff (``n·eps·max|λ|``, with the ``eps`` of ``m``'s dtype even where the
    eigendecomposition is retried in float64; float32's for float16 and bfloat16, which are
    computed in float32) are raised to that tolerance; clearly negative ones raise
    :class:`~curvlin.LinAlgError`. Empty input (0×0 matrices or an empty stack) gives the empty
    result, as in :func:`spd_inverse`.

    Parameters
    ----------
    m : array, shape (..., n, n)
        Symmetric positive (semi)definite matrices.
    p : float
        The root, ``p > 0`` (``p = 1`` is the inverse, ``p = 4`` Shampoo's matrix case).
    damping : float or array, optional
        As in :func:`spd_inverse`.

    Returns
    -------
    array, shape (..., n, n)
        Symmetric ``(m + damping·I)^(-1/p)`` in ``m``'s dtype.

    Raises
    ------
    LinAlgError
        If a matrix holds NaN or inf, or has a clearly negative eigenvalue.

    References
    ----------
    Gupta, Koren & Singer (2018), Shampoo, Algorithm 1 (``L^(-1/4) G R^(-1/4)``).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import spd_inverse_root
    >>> spd_inverse_root(np.diag([4.0, 16.0]), 2)
    array([[0.5 , 0.  ],
           [0.  , 0.25]])
    """
    backend = namespace_of(("m", m), func="spd_inverse_root")
    check_square(m, "m", "spd_inverse_root")
    if isinstance(p, bool) or not isinstance(p, Real) or not p > 0:
        raise ValueError(f"spd_inverse_root: p must be a positive number, got {p!r}")
    damping = check_damping(damping, "damping", "spd_inverse_root", like=m)
    xp = backend.xp
    work = _damped(backend, _working_copy(backend, m), damping)
    if _is_empty(work):  # 0×0 matrices or an empty stack: nothing to decompose
        return _zeros(backend, work.shape, m)
    evals, evecs, tol = _eigh_checked(backend, work, "spd_inverse_root", "m")
    evals = xp.maximum(evals, tol)
    root = (evecs * (evals ** (-1.0 / float(p)))[..., None, :]) @ xp.matrix_transpose(evecs)
    return xp.astype(_symmetrize(backend, root), m.dtype, copy=False)


# -- shared pieces ------------------------------------------------------------------------


def _working_copy(backend: Backend, m: Array) -> Array:
    """``m`` in a dtype the factorisations support (float16/bfloat16 are raised to float32)."""
    xp = backend.xp
    if m.dtype in (xp.float32, xp.float64):
        return m
    return xp.astype(m, xp.float32)


def _is_empty(m: Array) -> bool:
    """Whether ``m`` has no elements (a shape check: no host synchronisation)."""
    return math.prod(m.shape) == 0


def _zeros(backend: Backend, shape, like: Array) -> Array:
    """Zeros of ``shape`` in ``like``'s dtype and on its device (the empty results)."""
    from array_api_compat import device

    return backend.xp.zeros(tuple(shape), dtype=like.dtype, device=device(like))


def _identity(backend: Backend, m: Array) -> Array:
    from array_api_compat import device

    return backend.xp.eye(m.shape[-1], dtype=m.dtype, device=device(m))


def _damped(backend: Backend, m: Array, damping) -> Array:
    if isinstance(damping, float) and damping == 0.0:
        return m
    if not isinstance(damping, float):
        damping = backend.xp.astype(damping, m.dtype)
    return backend.add_diagonal(m, damping)


def _symmetrize(backend: Backend, m: Array) -> Array:
    return 0.5 * (m + backend.xp.matrix_transpose(m))


def _mean_diagonal(xp, m: Array) -> Array:
    """Per-matrix mean |diagonal|, with 1 where that is zero or not finite (jitter scale)."""
    scale = xp.mean(xp.abs(xp.linalg.diagonal(m)), axis=-1)
    good = xp.logical_and(xp.isfinite(scale), scale > 0)
    return xp.where(good, scale, xp.ones_like(scale))


def _cholesky(
    backend: Backend, m: Array, func: str, name: str, *, rhs: tuple[str, Array] | None = None
) -> Array:
    """Lower Cholesky factor of ``m``, recovered with jitter and float64 if it fails.

    With ``rhs=(name, b)``, a right-hand side that must be finite is checked in the same host
    look as the factorisation, and :class:`LinAlgError` names it if it is not.
    """
    xp = backend.xp
    factor, ok = backend.cholesky_ex(m)
    good = xp.all(ok)
    if rhs is not None:
        rhs_finite = xp.all(xp.isfinite(rhs[1]))
        good = xp.logical_and(good, rhs_finite)
    if bool(good):  # the one host look per call; see the module docstring
        return factor
    if not bool(xp.all(ok)):
        _raise_if_not_finite(xp, m, func, name)
    if rhs is not None and not bool(rhs_finite):
        rhs_name, b = rhs
        bad = int(xp.sum(xp.astype(xp.logical_not(xp.isfinite(b)), xp.int32)))
        raise NonFiniteError(
            f"{func}: {rhs_name} of shape {tuple(b.shape)} holds NaN or inf in {bad} of its "
            f"{math.prod(b.shape)} entries; the solve would not be finite"
        )
    scale = _mean_diagonal(xp, m)[..., None, None] * _identity(backend, m)
    attempts = [(m.dtype, c * xp.finfo(m.dtype).eps) for c in _JITTER_EPS_MULTIPLES]
    attempts += [(xp.float64, c) for c in _JITTER_FLOAT64]
    for dtype, rel in attempts:
        failed = xp.logical_not(ok)[..., None, None]
        if dtype != factor.dtype:
            factor = xp.astype(factor, dtype)
        base = xp.astype(m, dtype)
        retry, retry_ok = backend.cholesky_ex(base + rel * xp.astype(scale, dtype))
        factor = xp.where(failed, retry, factor)
        ok = xp.logical_or(ok, retry_ok)
        if bool(xp.all(ok)):
            return factor
    bad = int(xp.sum(xp.astype(xp.logical_not(ok), xp.int32)))
    total = math.prod(ok.shape)
    low = float(xp.min(xp.linalg.eigvalsh(xp.astype(m, xp.float64))))
    n = m.shape[-1]
    raise LinAlgError(
        f"{func}: {name} is not positive definite: Cholesky failed for {bad} of {total} "
        f"{n}×{n} matrices even with jitter up to {_JITTER_FLOAT64[-1]:g}·mean(diag) in "
        f"float64 (smallest eigenvalue {low:.3g}); add damping or check the matrix"
    )


def _raise_if_not_finite(xp, m: Array, func: str, name: str) -> None:
    finite = xp.all(xp.isfinite(m), axis=(-2, -1))
    if not bool(xp.all(finite)):
        bad = int(xp.sum(xp.astype(xp.logical_not(finite), xp.int32)))
        n = m.shape[-1]
        raise NonFiniteError(
            f"{func}: {name} of shape {tuple(m.shape)} holds NaN or inf in {bad} of its "
            f"{n}×{n} matrices; nothing to factorise"
        )


def _eigh_checked(backend: Backend, m: Array, func: str, name: str) -> tuple[Array, Array, Array]:
    """Eigenpairs of a PSD ``m`` and a roundoff tolerance per matrix.

    Eigenvalues negative by no more than the tolerance ``n·eps·max|λ|`` are set to 0; clearly
    negative ones, NaN or inf raise :class:`LinAlgError`. ``eps`` is that of ``m``'s dtype, the
    precision ``m`` was rounded to, also when the eigendecomposition is retried in float64:
    a float32 Gram matrix has eigenvalues that are negative by float32 roundoff, which a
    float64 eigendecomposition resolves rather than rounds away. The float64 retry may return
    float64 arrays. An empty ``m`` gives empty eigenpairs (zeros of the right shapes) without
    calling ``eigh``.
    """
    xp = backend.xp
    n = m.shape[-1]
    info = xp.finfo(m.dtype)
    if _is_empty(m):
        tol = _zeros(backend, (*m.shape[:-2], 1), m) + info.smallest_normal
        return _zeros(backend, m.shape[:-1], m), _zeros(backend, m.shape, m), tol
    for dtype in dict.fromkeys((m.dtype, xp.float64)):  # retry in float64 if eigh fails
        work = xp.astype(m, dtype, copy=False)
        try:
            evals, evecs = xp.linalg.eigh(work)
        except Exception:  # e.g. LAPACK's "did not converge"; the checks below explain it
            continue
        if bool(xp.all(xp.isfinite(evals))):
            break
    else:
        _raise_if_not_finite(xp, m, func, name)
        raise LinAlgError(f"{func}: eigendecomposition of {name} did not converge")
    # The input's eps, not that of the dtype eigh succeeded in (see the docstring).
    tol = n * info.eps * xp.max(xp.abs(evals), axis=-1, keepdims=True)
    tol = xp.where(tol > 0, tol, xp.full_like(tol, info.smallest_normal))
    if not bool(xp.all(evals >= -tol)):
        low = float(xp.min(evals))
        raise LinAlgError(
            f"{func}: {name} is not positive semidefinite: smallest eigenvalue of "
            f"{name} + damping·I is {low:.3g} (tolerance {float(xp.max(tol)):.3g}) for "
            f"{n}×{n} matrices; add damping or check the matrix"
        )
    return xp.where(evals > tol, evals, xp.zeros_like(evals)), evecs, tol
