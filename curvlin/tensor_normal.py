"""Tensor-normal covariance estimation: mode covariances, trace normalisation, mode solves.

A parameter tensor ``W`` of shape ``(d_1, …, d_k)`` whose (sampled) gradient ``G`` is
tensor-normal, ``Cov(vec G) = U_1 ⊗ … ⊗ U_k`` (row-major ``vec``), has mode-wise second
moments ``E[G_(i) G_(i)ᵀ] = U_i · ∏_{j≠i} tr(U_j)``, where ``G_(i)`` is the mode-``i``
unfolding (axis ``i`` first, the others flattened). So the mode covariances
(:func:`mode_covariances`) determine every ``U_i`` up to scalars whose product is 1, and
:func:`trace_normalize` fixes those scalars so that every mode has the same mean eigenvalue.
TNT preconditions with ``(⊗(U_i + εI))⁻¹`` and Shampoo with ``⊗(H_i + εI)^(-1/(2k))``, both
as ``k`` mode products of small matrices (:func:`mode_factorize`, :func:`mode_solve`), through
:class:`curvlin.KronFactorization`; no Kronecker product is ever formed.

A mode larger than a chosen maximum can be kept as its diagonal only (a 1-D factor, a
scaling along that axis), so a 50 000-row embedding never needs a 50 000² matrix.

References
----------
Ren & Goldfarb (2021), "Tensor normal training for deep learning models", NeurIPS, §3
(the estimator and the trace normalisation); Gupta, Koren & Singer (2018), "Shampoo:
preconditioned stochastic tensor optimization", ICML, Algorithm 2; Kolda & Bader (2009),
"Tensor decompositions and applications", SIAM Review 51, §2.4 (mode products);
``spec/tnt_mbf_smw_kfac.md`` §1 and §4.
"""

from __future__ import annotations

import math
from numbers import Real

from array_api_compat import device as _device

from ._validation import check_damping, namespace_of
from .backends import Array, Backend
from .kron import KronFactorization
from .linalg import spd_inverse, spd_inverse_root

__all__ = ["mode_covariances", "mode_factorize", "mode_solve", "trace_normalize"]


def mode_covariances(
    x: Array, /, *, batched: bool = False, max_dim: int | None = None, scale: float = 1.0
):
    """``scale · X_(i) X_(i)ᵀ`` for every mode ``i`` of a tensor, without unfolding copies.

    Parameters
    ----------
    x : array, shape (d_1, ..., d_k), or (n, d_1, ..., d_k) with ``batched``
        The tensor (``k >= 1``); with ``batched``, ``n`` samples whose mode covariances are
        summed.
    batched : bool, optional
        Whether the leading axis is a sample axis (summed over; it is no mode).
    max_dim : int, optional
        Modes with ``d_i > max_dim`` get only the diagonal of their covariance, a 1-D array
        ``Σ x²`` over the other axes. None (default): every mode gets its full matrix.
    scale : float, optional
        A factor on every covariance, applied inside the Gram products (no extra pass).

    Returns
    -------
    tuple of arrays
        One per mode: ``(d_i, d_i)``, or ``(d_i,)`` for a diagonal mode; in ``x``'s dtype.

    Raises
    ------
    ValueError
        If ``x`` has no mode (a 0-d array, or 1-d with ``batched``) or ``max_dim`` is not a
        positive int.
    TypeError
        If ``batched`` is not a bool or ``scale`` not a finite real number.

    References
    ----------
    Ren & Goldfarb (2021), NeurIPS, §3, the estimator of ``U_i``; ``spec/tnt_mbf_smw_kfac.md``
    §0 (``X_(i) X_(i)ᵀ = tensordot(X, X, all axes but i)``).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import mode_covariances
    >>> w = np.arange(6.0).reshape(2, 3)
    >>> c1, c2 = mode_covariances(w)
    >>> np.allclose(c1, w @ w.T), np.allclose(c2, w.T @ w)
    (True, True)
    >>> [c.shape for c in mode_covariances(np.ones((4, 2, 3)), batched=True, max_dim=2)]
    [(2, 2), (3,)]
    """
    func = "mode_covariances"
    backend = namespace_of(("x", x), func=func)
    if not isinstance(batched, bool):
        raise TypeError(f"{func}: batched must be True or False, got {batched!r}")
    _check_max_dim(max_dim, func)
    lead = int(batched)
    if x.ndim - lead < 1:
        want = "(n, d_1, ..., d_k) with k >= 1" if batched else "(d_1, ..., d_k) with k >= 1"
        raise ValueError(f"{func}: x must have shape {want}, got {tuple(x.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        raise TypeError(f"{func}: scale must be a finite real number, got {scale!r}")
    xp = backend.xp
    scale = float(scale)
    out = []
    for i in range(lead, x.ndim):
        others = [j for j in range(x.ndim) if j != i]
        d = x.shape[i]
        if max_dim is not None and d > max_dim:
            diag = xp.sum(x * x, axis=tuple(others)) if others else x * x
            out.append(diag if scale == 1.0 else diag * scale)
        elif i == x.ndim - 1:  # rows of a reshape without a copy: a symmetric Gram
            out.append(backend.gram(xp.reshape(x, (-1, d)), scale=scale))
        elif i == 0:
            out.append(backend.gram(xp.matrix_transpose(xp.reshape(x, (d, -1))), scale=scale))
        else:
            cov = xp.tensordot(x, x, axes=(others, others))
            out.append(cov if scale == 1.0 else cov * scale)
    return tuple(out)


def trace_normalize(covariances, /):
    """Scale mode covariances to factors with equal mean eigenvalue and the same Kronecker
    product as the tensor-normal covariance they come from.

    For mode covariances ``C_i`` of a tensor with ``P = ∏ d_j`` entries, ``t = tr(C_1)``
    (equal to every ``tr(C_i)`` in exact arithmetic) and ``c = (t/P)^(1/k)``, returns

    ``U_i = C_i / (c^(k−1) · ∏_{j≠i} d_j)``.

    Then ``tr(U_i)/d_i = c`` for every mode, ``tr(⊗U_i) = t``, and if the ``C_i`` are the
    mode covariances ``Σ_i · ∏_{j≠i} tr(Σ_j)`` of a Kronecker covariance ``⊗Σ_i``, then
    ``⊗U_i = ⊗Σ_i`` exactly. One mode (``k = 1``) is returned as is. All-zero covariances
    (a dead unit) give zero factors, not NaN.

    Parameters
    ----------
    covariances : sequence of arrays
        ``C_i`` of shape ``(d_i, d_i)``, or ``(d_i,)`` for a mode kept as its diagonal (as
        :func:`mode_covariances` returns them).

    Returns
    -------
    tuple of arrays
        The ``U_i``, shaped like the ``C_i``, with no host synchronisation.

    References
    ----------
    Ren & Goldfarb (2021), NeurIPS, §3 (the "same average eigenvalue" normalisation);
    ``spec/tnt_mbf_smw_kfac.md`` §1.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import mode_covariances, trace_normalize
    >>> u1, u2 = trace_normalize(mode_covariances(np.arange(6.0).reshape(2, 3)))
    >>> bool(np.isclose(np.trace(u1) / 2, np.trace(u2) / 3))
    True
    """
    func = "trace_normalize"
    covs, backend = _factor_list(covariances, func)
    xp = backend.xp
    k = len(covs)
    if k == 1:
        return tuple(covs)
    dims = [c.shape[0] for c in covs]
    total = math.prod(dims)
    t = _trace(xp, covs[0])
    # t = 0 (a dead unit) gives zero factors; a NaN t stays NaN (never hidden).
    dead = t == 0
    c = (xp.where(dead, xp.ones_like(t), t) / total) ** (1.0 / k)
    scale = xp.where(dead, xp.zeros_like(t), 1.0 / c ** (k - 1))
    return tuple(cov * (scale * (d / total)) for cov, d in zip(covs, dims))


def mode_factorize(
    factors, /, *, damping=0.0, power=1, relative: bool = False
) -> KronFactorization:
    """``(F_i + εI)^(-1/power)`` for every mode: a :class:`~curvlin.KronFactorization` whose
    :meth:`~curvlin.KronFactorization.solve` applies ``⊗(F_i + εI)^(-1/power)`` to ``vec(x)``.

    The same ``ε`` is added to every mode (TNT's damping of trace-normalised factors, and
    Shampoo's ``ε`` before the root). ``power = 1`` is TNT's damped inverse (a Cholesky
    inverse per mode); ``power = 2k`` is Shampoo's inverse root (an eigendecomposition per
    mode, :func:`curvlin.spd_inverse_root`). A 1-D factor is a diagonal and gets the
    elementwise ``(f + ε)^(-1/power)``.

    Parameters
    ----------
    factors : sequence of arrays
        Symmetric positive semidefinite ``F_i`` of shape ``(d_i, d_i)``, or ``(d_i,)``
        non-negative diagonals.
    damping : float, optional
        ``ε >= 0``, added to every mode; it must make every factor positive definite.
    power : float, optional
        ``p > 0`` in ``(F + εI)^(-1/p)``.
    relative : bool, optional
        Scale ``ε`` by each factor's mean eigenvalue, ``ε_i = ε · tr(F_i)/d_i`` (``ε`` where
        that is 0), computed on the device: the damping is then invariant to the scale of
        the factors (a scaled gradient gives the same Shampoo direction).

    Returns
    -------
    KronFactorization
        ``inverses`` holds the ``k`` matrices (or diagonals), ``dampings`` the ``ε`` of each.

    Raises
    ------
    LinAlgError
        If a matrix factor holds NaN or inf or is not positive (semi)definite (as in
        :func:`curvlin.spd_inverse` and :func:`curvlin.spd_inverse_root`).

    Notes
    -----
    For factors with equal mean eigenvalue (those of :func:`trace_normalize`) the π split of
    :func:`curvlin.kron_factorize` gives every mode the same share, so
    ``kron_factorize(factors, damping=ε**k)`` equals ``mode_factorize(factors, damping=ε)``
    up to rounding; this function adds ``ε`` exactly, handles diagonal modes and roots.
    Like every refresh, it looks at a success flag on the host once per matrix factor.

    References
    ----------
    Ren & Goldfarb (2021), NeurIPS, §3 (``Ũ_i = U_i + εI``); Gupta, Koren & Singer (2018),
    ICML, Algorithm 2 (``H_i^(-1/(2k))``).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import mode_factorize
    >>> fact = mode_factorize([np.diag([3.0, 15.0]), np.array([1.0, 3.0, 7.0])], damping=1.0)
    >>> fact.solve(np.ones((2, 3)))  # 1 / ((3 + 1, 15 + 1) ⊗ (1 + 1, 3 + 1, 7 + 1))
    array([[0.125    , 0.0625   , 0.03125  ],
           [0.03125  , 0.015625 , 0.0078125]])
    """
    func = "mode_factorize"
    factors, backend = _factor_list(factors, func)
    damping = check_damping(damping, "damping", func)
    if not isinstance(damping, float):
        raise TypeError(f"{func}: damping must be a number, got an array")
    if isinstance(power, bool) or not isinstance(power, Real) or not (power > 0):
        raise ValueError(f"{func}: power must be a positive number, got {power!r}")
    power = float(power)
    if not isinstance(relative, bool):
        raise TypeError(f"{func}: relative must be True or False, got {relative!r}")
    xp = backend.xp
    out, dampings = [], []
    for f in factors:
        eps = xp.full((), damping, dtype=f.dtype, device=_device(f))
        if relative:
            mean = _trace(xp, f) / f.shape[0]
            eps = xp.where(mean > 0, eps * mean, eps)
        if f.ndim == 1:
            out.append((f + eps) ** (-1.0 / power))
        elif power == 1.0:
            out.append(spd_inverse(f, damping=eps))
        else:
            out.append(spd_inverse_root(f, power, damping=eps))
        dampings.append(eps)
    return KronFactorization(inverses=tuple(out), dampings=tuple(dampings))


def mode_solve(factors, x: Array, /, *, damping=0.0, power=1, relative: bool = False) -> Array:
    """``⊗(F_i + εI)^(-1/power) vec(x)``, shaped like ``x``: :func:`mode_factorize` then
    :meth:`~curvlin.KronFactorization.solve`.

    Parameters
    ----------
    factors : sequence of arrays
        As in :func:`mode_factorize`.
    x : array, shape (..., d_1, ..., d_k)
        The tensor (leading axes a batch).
    damping, power, relative
        As in :func:`mode_factorize`.

    Returns
    -------
    array
        ``x ×_1 (F_1 + εI)^(-1/p) … ×_k (F_k + εI)^(-1/p)``, in ``x``'s dtype.

    References
    ----------
    ``spec/tnt_mbf_smw_kfac.md`` §1 (TNT's step, ``power = 1``) and §4 (Shampoo,
    ``power = 2k``).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import mode_solve
    >>> a, b = np.diag([1.0, 4.0]), np.diag([16.0, 1.0, 1.0])
    >>> mode_solve([a, b], np.ones((2, 3)), power=4)  # Shampoo's L^(-1/4) G R^(-1/4)
    array([[0.5       , 1.        , 1.        ],
           [0.35355339, 0.70710678, 0.70710678]])
    """
    checked, _ = _factor_list(factors, "mode_solve")
    namespace_of(("factors[0]", checked[0]), ("x", x), func="mode_solve")
    dims = tuple(f.shape[0] for f in checked)
    k = len(dims)
    if x.ndim < k or tuple(x.shape[x.ndim - k :]) != dims:
        raise ValueError(
            f"mode_solve: x must have trailing axes {dims} to match the factors, got "
            f"{tuple(x.shape)}"
        )
    return mode_factorize(checked, damping=damping, power=power, relative=relative).solve(x)


# -- shared pieces ------------------------------------------------------------------------


def _factor_list(factors, func: str) -> tuple[list[Array], Backend]:
    """Factors: a non-empty sequence of square matrices or 1-D diagonals of one library."""
    if hasattr(factors, "shape") or not isinstance(factors, list | tuple):
        raise TypeError(
            f"{func}: factors must be a list or tuple of arrays, got {type(factors).__name__}"
        )
    if not factors:
        raise ValueError(f"{func}: factors must hold at least one array, got an empty sequence")
    named = [(f"factors[{i}]", f) for i, f in enumerate(factors)]
    backend = namespace_of(*named, func=func)
    for name, f in named:
        if f.ndim not in (1, 2) or (f.ndim == 2 and f.shape[0] != f.shape[1]):
            raise ValueError(
                f"{func}: {name} must be a square matrix (d, d) or a diagonal (d,), got shape "
                f"{tuple(f.shape)}"
            )
    return list(factors), backend


def _trace(xp, f: Array) -> Array:
    return xp.sum(f) if f.ndim == 1 else xp.sum(xp.linalg.diagonal(f))


def _check_max_dim(max_dim, func: str) -> None:
    if max_dim is not None and (
        isinstance(max_dim, bool) or not isinstance(max_dim, int) or max_dim < 1
    ):
        raise ValueError(f"{func}: max_dim must be None or a positive int, got {max_dim!r}")
