"""Kronecker factor algebra on row-major vec, without ever forming a Kronecker product.

For a tensor ``x`` of shape ``(d_1, …, d_k)`` and factors ``F_i`` of shape ``(m_i, d_i)``,
``(F_1 ⊗ … ⊗ F_k) vec(x) = vec(x ×_1 F_1 … ×_k F_k)`` with ``vec = reshape(-1)`` (C order).
For a weight matrix ``W`` of shape (out, in) and factors ``[G, A]`` this is ``G W Aᵀ``.

A mode product is one matrix product on a reshaped view: after modes ``1..i-1`` the data is laid
out as ``(lead, d_i, rest)``, so ``F_i @ x`` needs no transpose and every step is a GEMM (a
batched one for the middle modes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._errors import LinAlgError
from ._validation import check_damping, check_kron_operand, factor_list
from .backends import Array, Backend
from .linalg import _eigh_checked, _inverse, _working_copy, _zeros

__all__ = [
    "KronFactorization",
    "kron_apply",
    "kron_dense",
    "kron_factorize",
    "kron_solve",
    "pi_damping",
]


def kron_apply(factors, x: Array, /) -> Array:
    """Apply ``F_1 ⊗ … ⊗ F_k`` to ``vec(x)`` and reshape the result like ``x``.

    Parameters
    ----------
    factors : sequence of arrays, each of shape (m_i, d_i)
        The Kronecker factors, ordered like the axes of ``x`` they act on. They need not be
        square.
    x : array, shape (..., d_1, ..., d_k)
        The operand; leading axes are a batch, each member transformed independently.

    Returns
    -------
    array, shape (..., m_1, ..., m_k)
        ``x ×_1 F_1 … ×_k F_k``; for square factors, shaped like ``x``.

    References
    ----------
    Van Loan (2000), "The ubiquitous Kronecker product", J. Comput. Appl. Math. 123, §1
    (the vec trick); row-major form as in ``spec/tnt_mbf_smw_kfac.md`` §0.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import kron_apply
    >>> g, a = np.array([[2.0, 0.0], [1.0, 1.0]]), np.eye(3)
    >>> w = np.arange(6.0).reshape(2, 3)
    >>> np.allclose(kron_apply([g, a], w), g @ w @ a.T)
    True
    >>> np.allclose(kron_apply([g, a], w).reshape(-1), np.kron(g, a) @ w.reshape(-1))
    True
    """
    factors, backend = factor_list(factors, "kron_apply", square=False)
    check_kron_operand(factors, x, "kron_apply")
    return _apply(backend, factors, x)


def _apply(backend: Backend, mats: list[Array], x: Array) -> Array:
    """The mode products, unchecked. ``mats[i]`` has shape (m_i, d_i), or (d_i,) for a
    diagonal factor (held as its diagonal; :mod:`curvlin.tensor_normal` uses them)."""
    xp = backend.xp
    k = len(mats)
    dims = tuple(x.shape[x.ndim - k :])
    batch = tuple(x.shape[: x.ndim - k])
    lead = math.prod(batch)
    y = x
    for i, f in enumerate(mats):
        rest = math.prod(dims[i + 1 :])
        if f.ndim == 1:  # a diagonal factor (a mode too large for a full one): a scaling
            y = xp.reshape(y, (lead, dims[i], rest)) * f[:, None]
        elif rest == 1:
            y = xp.reshape(y, (lead, dims[i])) @ xp.matrix_transpose(f)
        elif lead == 1:
            y = f @ xp.reshape(y, (dims[i], rest))
        else:
            y = f @ xp.reshape(y, (lead, dims[i], rest))
        lead *= f.shape[0]
    return xp.reshape(y, (*batch, *(f.shape[0] for f in mats)))


def kron_dense(factors, /) -> Array:
    """The dense Kronecker product ``F_1 ⊗ … ⊗ F_k``, for references and small problems.

    Parameters
    ----------
    factors : sequence of arrays, each of shape (m_i, d_i)
        The Kronecker factors, outermost first.

    Returns
    -------
    array, shape (∏ m_i, ∏ d_i)
        The Kronecker product, in the factors' dtype and on their device.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import kron_dense
    >>> kron_dense([np.eye(2), np.array([[1.0, 2.0]])])
    array([[1., 2., 0., 0.],
           [0., 0., 1., 2.]])
    """
    factors, backend = factor_list(factors, "kron_dense", square=False)
    xp = backend.xp
    out = factors[0]
    for f in factors[1:]:
        rows, cols = out.shape[0] * f.shape[0], out.shape[1] * f.shape[1]
        out = xp.reshape(out[:, None, :, None] * f[None, :, None, :], (rows, cols))
    return out


def pi_damping(factors, damping, /) -> tuple[Array, ...]:
    """Split a total damping over Kronecker factors with the π heuristic.

    ``γ_i = damping^(1/k) · π_i`` with ``π_i = t_i / (∏_j t_j)^(1/k)`` and
    ``t_i = tr(F_i)/dim(F_i)``, so ``∏ γ_i = damping`` and each factor is damped in proportion
    to its mean eigenvalue. For ``k = 2`` this is KFAC's factored Tikhonov damping,
    ``γ_A = π√λ``, ``γ_G = √λ/π`` with ``π = sqrt(t_A / t_G)``. If a factor has zero or
    non-finite trace, π is undefined and all ``π_i`` are set to 1 (an even split).

    Parameters
    ----------
    factors : sequence of square arrays
        The Kronecker factors ``F_i``, each ``(d_i, d_i)``.
    damping : float or 0-d array
        The total damping ``λ >= 0``.

    Returns
    -------
    tuple of 0-d arrays
        One damping per factor, in the factors' dtype and on their device (computed without a
        host synchronisation).

    References
    ----------
    Martens & Grosse (2015), "Optimizing neural networks with Kronecker-factored approximate
    curvature", §6.3, eq. (12).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import pi_damping
    >>> ga, gg = pi_damping([4.0 * np.eye(3), np.eye(2)], 1e-2)
    >>> round(float(ga), 6), round(float(gg), 6), round(float(ga * gg), 6)
    (0.2, 0.05, 0.01)
    """
    factors, backend = factor_list(factors, "pi_damping")
    damping = check_damping(damping, "damping", "pi_damping")
    return _pi_damping(backend, factors, damping)


def _pi_damping(backend: Backend, factors: list[Array], damping) -> tuple[Array, ...]:
    xp = backend.xp
    k = len(factors)
    traces = xp.stack([_mean_diagonal(backend, f) for f in factors])
    usable = xp.all(xp.logical_and(xp.isfinite(traces), traces > 0))
    safe = xp.where(usable, traces, xp.ones_like(traces))
    pis = safe / xp.exp(xp.mean(xp.log(safe)))
    total = damping ** (1.0 / k)
    # Slicing then reshaping keeps 0-d arrays (NumPy would turn scalar results into np.float64).
    return tuple(xp.reshape(total * pis[i : i + 1], ()) for i in range(k))


def _mean_diagonal(backend: Backend, f: Array) -> Array:
    """``tr(f)/dim(f)`` as a 0-d array; 0 for a 0×0 factor (so π falls back to an even split)."""
    if f.shape[0] == 0:  # a mean over nothing would be NaN, with a warning on NumPy
        return _zeros(backend, (), f)
    return backend.xp.mean(backend.xp.linalg.diagonal(f))


@dataclass(frozen=True)
class KronFactorization:
    """A refreshed Kronecker factorisation that serves many solves.

    Build it with :func:`kron_factorize` (or :func:`curvlin.mode_factorize`); apply it with
    :meth:`solve`. Exactly one of the two representations is set:

    - ``inverses`` (π/factored damping): ``(F_i + γ_i I)⁻¹`` for each factor, with the ``γ_i``
      kept in ``dampings``; a solve is ``k`` matrix products. (:func:`curvlin.mode_factorize`
      stores ``(F_i + εI)^(-1/p)`` here, and a 1-D entry as a diagonal: a scaling of its axis.)
    - ``eigenvectors`` and ``scale`` (exact damping): ``Q_i`` from ``F_i = Q_i Λ_i Q_iᵀ`` and
      ``1/(λ_1 ⊗ … ⊗ λ_k + damping)`` as a tensor of shape ``(d_1, …, d_k)``; a solve is ``2k``
      matrix products and one elementwise product.

    The fields are plain arrays of fixed shape, so the object can be checkpointed or moved.
    """

    inverses: tuple[Array, ...] | None = None
    dampings: tuple[Array, ...] | None = None
    eigenvectors: tuple[Array, ...] | None = None
    scale: Array | None = None

    @property
    def dims(self) -> tuple[int, ...]:
        """The factor sizes ``(d_1, …, d_k)``."""
        mats = self.inverses if self.inverses is not None else self.eigenvectors
        return tuple(m.shape[0] for m in mats)

    def solve(self, x: Array, /) -> Array:
        """Apply the damped inverse to ``vec(x)``.

        Parameters
        ----------
        x : array, shape (..., d_1, ..., d_k)
            Right-hand sides; leading axes are a batch.

        Returns
        -------
        array
            The solve, shaped like ``x``. No host synchronisation.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlin import kron_factorize
        >>> fact = kron_factorize([2.0 * np.eye(2), 4.0 * np.eye(3)], damping=0.0)
        >>> fact.solve(np.ones((2, 3)))
        array([[0.125, 0.125, 0.125],
               [0.125, 0.125, 0.125]])
        """
        mats = list(self.inverses if self.inverses is not None else self.eigenvectors)
        check_kron_operand(mats, x, "KronFactorization.solve")
        backend = _backend_of(mats[0])
        if self.inverses is not None:
            return _apply(backend, mats, x)
        xp = backend.xp
        rotated = _apply(backend, [xp.matrix_transpose(q) for q in mats], x)
        return _apply(backend, mats, rotated * self.scale)


def _backend_of(x: Array) -> Backend:
    from .backends import get_backend

    return get_backend(x)


def kron_factorize(factors, /, *, damping=0.0, exact: bool = False) -> KronFactorization:
    """Factorise damped Kronecker factors once, for many :meth:`KronFactorization.solve` calls.

    Parameters
    ----------
    factors : sequence of square arrays
        Symmetric positive semidefinite Kronecker factors ``F_i`` of shape ``(d_i, d_i)``.
    damping : float or 0-d array, optional
        The total damping ``λ >= 0``.
    exact : bool, optional
        False (default): factored damping, ``⊗(F_i + γ_i I)⁻¹`` with ``γ_i`` from
        :func:`pi_damping`. True: the exact ``(⊗F_i + λI)⁻¹`` through eigendecompositions.

    Returns
    -------
    KronFactorization
        The inverses (π damping) or eigendecompositions (exact damping), ready to solve.

    Raises
    ------
    LinAlgError
        If a factor holds NaN or inf, is not positive semidefinite, or the damped product is
        singular (for instance ``damping=0`` with a singular factor and ``exact=True``).

    Notes
    -----
    A refresh looks at a success flag on the host a small, fixed number of times per factor
    (see :mod:`curvlin.linalg`); solves never synchronise.

    With ``exact=True``, a factor's eigenvalues that are negative by no more than roundoff,
    ``d_i·eps·max|λ|`` with the ``eps`` of the factors' dtype (float32's for float16 and
    bfloat16 factors, which are decomposed in float32), are taken as 0 and clearly negative
    ones raise; this holds also where the eigendecomposition is retried in float64, so a Gram
    matrix ``XᵀX`` formed in float32, rank-deficient or not, is accepted.

    A 0×0 factor is no error, in either mode: the Kronecker product is then 0×0 and every
    solve returns an empty array shaped like ``x`` (with ``x``'s zero-size axis). The other
    factors are still factorised and checked; π damping sees the empty factor's trace as 0
    and splits ``damping`` evenly.

    References
    ----------
    Martens & Grosse (2015), §6.3 (factored Tikhonov damping) and the exact damping of
    ``spec/tnt_mbf_smw_kfac.md`` §4.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import kron_dense, kron_factorize
    >>> rng = np.random.default_rng(0)
    >>> g, a = (rng.standard_normal((n, n)) for n in (2, 3))
    >>> g, a = g @ g.T, a @ a.T
    >>> x = rng.standard_normal((2, 3))
    >>> fact = kron_factorize([g, a], damping=0.1, exact=True)
    >>> dense = kron_dense([g, a]) + 0.1 * np.eye(6)
    >>> np.allclose(fact.solve(x).reshape(-1), np.linalg.solve(dense, x.reshape(-1)))
    True
    """
    factors, backend = factor_list(factors, "kron_factorize")
    damping = check_damping(damping, "damping", "kron_factorize")
    if not isinstance(exact, bool):
        raise TypeError(f"kron_factorize: exact must be True or False, got {exact!r}")
    if not exact:
        gammas = _pi_damping(backend, factors, damping)
        inverses = tuple(
            _inverse(backend, f, g, "kron_factorize", f"factors[{i}]")
            for i, (f, g) in enumerate(zip(factors, gammas))
        )
        return KronFactorization(inverses=inverses, dampings=gammas)
    return _eigen_factorization(backend, factors, damping)


def _eigen_factorization(backend: Backend, factors: list[Array], damping) -> KronFactorization:
    xp = backend.xp
    k = len(factors)
    lam, vecs = None, []
    for i, f in enumerate(factors):
        work = _working_copy(backend, f)  # float16/bfloat16 are decomposed in float32
        evals, evecs, _ = _eigh_checked(backend, work, "kron_factorize", f"factors[{i}]")
        evals = xp.astype(evals, f.dtype, copy=False)
        evecs = xp.astype(evecs, f.dtype, copy=False)
        vecs.append(evecs)
        shape = tuple(-1 if j == i else 1 for j in range(k))
        term = xp.reshape(evals, shape)
        lam = term if lam is None else lam * term
    denom = lam + damping
    if not bool(xp.all(denom > 0)):
        raise LinAlgError(
            f"kron_factorize: the Kronecker product of factors of sizes "
            f"{[f.shape[0] for f in factors]} plus damping={damping!r} is singular; "
            "use damping > 0"
        )
    return KronFactorization(eigenvectors=tuple(vecs), scale=1.0 / denom)


def kron_solve(factors, x: Array, /, *, damping=0.0, exact: bool = False) -> Array:
    """Solve with damped Kronecker factors: ``kron_factorize(factors, ...).solve(x)``.

    Parameters
    ----------
    factors : sequence of square arrays
        Symmetric positive semidefinite factors ``F_i`` of shape ``(d_i, d_i)``.
    x : array, shape (..., d_1, ..., d_k)
        Right-hand sides, leading axes a batch.
    damping : float or 0-d array, optional
        The total damping ``λ >= 0``.
    exact : bool, optional
        False: ``⊗(F_i + γ_i I)⁻¹ vec(x)`` with π-split dampings (:func:`pi_damping`).
        True: ``(⊗F_i + λI)⁻¹ vec(x)``.

    Returns
    -------
    array
        The damped solve, shaped like ``x``, in its dtype and on its device.

    Raises
    ------
    LinAlgError
        As in :func:`kron_factorize`.

    Notes
    -----
    As in :func:`kron_factorize`: a 0×0 factor gives an empty result shaped like ``x``, and
    float32 Gram factors are accepted with ``exact=True``.

    References
    ----------
    Martens & Grosse (2015), §6.3; ``spec/tnt_mbf_smw_kfac.md`` §4, property test 3.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import kron_solve
    >>> g, a = np.diag([1.0, 4.0]), np.diag([1.0, 1.0, 4.0])
    >>> kron_solve([g, a], np.ones((2, 3)), damping=0.0)
    array([[1.    , 1.    , 0.25  ],
           [0.25  , 0.25  , 0.0625]])
    """
    checked, _ = factor_list(factors, "kron_solve")
    check_kron_operand(checked, x, "kron_solve")
    fact = kron_factorize(factors, damping=damping, exact=exact)
    return fact.solve(x)
