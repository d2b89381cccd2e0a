"""Quasi-Newton building blocks of K-BFGS: double damping, the BFGS inverse update, L-BFGS.

Everything here is a pure function of arrays of one library (NumPy, torch, CuPy,
array-api-strict), chosen from the arrays given:

- :func:`powell_damping`, :func:`lm_damping` and :func:`double_damping`: Powell's damping on the
  inverse ``H`` followed by Levenberg–Marquardt damping, which make a pair ``(s, y)`` safe for
  BFGS (``sᵀy > 0``) and cap how much one update can grow or shrink ``H``;
- :func:`bfgs_inverse_update`: the BFGS update of a dense inverse-Hessian approximation;
- :class:`LBFGSState`, :func:`lbfgs_init`, :func:`lbfgs_push` and :func:`lbfgs_apply`: a
  limited-memory BFGS operator with a fixed-size buffer of the last ``memory`` pairs;
- :func:`hessian_action_update` and :func:`hessian_action_update_minibatch`: K-BFGS's update of
  the inverse of the input-side Kronecker factor from the action of ``A + λ_A I`` on
  ``s_a = H_a u`` (the second one without storing ``A``).

No host synchronisation. Skip rules and damping branches are decided on the device with
``xp.where`` on 0-d boolean masks, never with a Python ``if`` on an array value, so a rejected
pair costs the same as an accepted one and leaves its input bit-identical. Only shapes, dtypes
and Python options are checked eagerly (``ValueError``/``TypeError`` naming the argument).

Skip rules (one set for :func:`bfgs_inverse_update`, :func:`lbfgs_push` and the Hessian-action
updates): a pair is rejected when ``sᵀy <= 0``, when ``sᵀy <= min_curvature · sᵀs`` (K-BFGS uses
``min_curvature = 1e-4·‖ḡ‖``), or when ``s``, ``y`` or the updated matrix holds NaN or inf.

Precision: the scalars ``sᵀy``, ``sᵀs`` and ``yᵀHy`` and the coefficients made from them are
computed in float64 when the array library supports it on the arrays' device (else float32),
then cast back to the input dtype; matrix products stay in the input dtype.

Signs and scales: these updates are invariant to ``(s, y) → (−s, −y)`` and to a joint
rescaling ``(c s, c y)``; the threshold ``min_curvature`` is not scale-invariant
(``spec/kbfgs.md`` §9.5).

References
----------
Goldfarb, Ren & Bahamou (2020), "Practical quasi-Newton methods for training deep neural
networks", NeurIPS (K-BFGS, double damping, Hessian-action update); Ren, Bahamou & Goldfarb
(2021), "Kronecker-factored quasi-Newton methods for deep learning", arXiv:2102.06737
(minibatch Hessian action); Nocedal & Wright, *Numerical Optimization*, 2nd ed., §6.1, §7.2,
Procedure 18.2; Byrd, Nocedal & Schnabel (1994), "Representations of quasi-Newton matrices and
their use in limited memory methods", Math. Programming 63, Theorem 2.2; ``spec/kbfgs.md``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import NamedTuple

from array_api_compat import device as _device

from ._rows import Rows, like_of
from ._validation import check_square, namespace_of
from .backends import Array, Backend, get_backend

__all__ = [
    "LBFGSState",
    "bfgs_inverse_update",
    "double_damping",
    "hessian_action_update",
    "hessian_action_update_minibatch",
    "lbfgs_apply",
    "lbfgs_init",
    "lbfgs_push",
    "lm_damping",
    "powell_damping",
]

_VARIANTS = ("convex", "additive")
_METHODS = ("two-loop", "compact")


# -- damping ------------------------------------------------------------------------------


def powell_damping(s: Array, y: Array, hy: Array, /, *, mu1: float = 0.2) -> Array:
    """Powell's damping of ``s`` against the inverse approximation ``H`` (K-BFGS step 1).

    If ``sᵀy < mu1·yᵀHy``, then ``s ← θ1 s + (1 − θ1) Hy`` with
    ``θ1 = (1 − mu1) yᵀHy / (yᵀHy − sᵀy)``, after which ``sᵀy = mu1·yᵀHy``. Otherwise ``s`` is
    returned unchanged. This is Powell's rule for the Hessian with the roles of ``s`` and ``y``
    swapped, so that it bounds the change of the *inverse* ``H``.

    Parameters
    ----------
    s : array, shape (d,)
        The step (for K-BFGS's G factor, the change of the mean pre-activation).
    y : array, shape (d,)
        The change of gradient (the mean per-example pre-activation gradient).
    hy : array, shape (d,)
        ``H @ y`` for the current symmetric positive definite inverse approximation ``H``
        (before this pair is used to update it).
    mu1 : float, optional
        The Powell threshold, ``0 < mu1 < 1`` (K-BFGS uses 0.2).

    Returns
    -------
    array, shape (d,)
        The damped ``s``, in ``s``'s dtype. It is ``s`` itself, bit for bit, when the rule is
        inactive, and also when ``yᵀHy <= 0`` (``y = 0``, or ``H`` not positive definite: the
        0/0 case) or when an input holds NaN or inf (the BFGS update then rejects the pair).

    References
    ----------
    Goldfarb, Ren & Bahamou (2020), §3 (double damping, Powell step); Nocedal & Wright,
    *Numerical Optimization*, Procedure 18.2; ``spec/kbfgs.md`` §5.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.quasi_newton import powell_damping
    >>> s, y, hy = np.array([0.1, -1.0]), np.array([1.0, 0.0]), np.array([2.0, 0.0])
    >>> s_damped = powell_damping(s, y, hy, mu1=0.2)  # sᵀy = 0.1 < 0.2·yᵀHy = 0.4
    >>> s_damped
    array([ 0.4   , -0.8421])
    >>> round(float(s_damped @ y), 12)
    0.4
    >>> powell_damping(2.0 * hy, y, hy)  # sᵀy >= mu1·yᵀHy already: unchanged
    array([4., 0.])
    """
    func = "powell_damping"
    backend = namespace_of(("s", s), ("y", y), ("hy", hy), func=func)
    _check_vectors(func, ("s", s), ("y", y), ("hy", hy))
    mu1 = _check_mu1(mu1, func)
    return _powell(backend, s, y, hy, mu1)


def lm_damping(s: Array, y: Array, /, *, mu2, variant: str = "convex") -> Array:
    """Levenberg–Marquardt damping of ``y`` (K-BFGS step 2): keep ``sᵀy >= mu2·sᵀs``.

    ``variant="convex"`` (DD-v1 of the 2020 paper): if ``sᵀy < mu2·sᵀs``, then
    ``y ← θ2 y + (1 − θ2) s`` with ``θ2 = (1 − mu2) sᵀs / (sᵀs − sᵀy)``, which gives
    ``sᵀy = mu2·sᵀs``; otherwise ``y`` is unchanged.

    ``variant="additive"`` (DD-v2): ``y ← y + mu2·s`` always, the secant pair of ``B + mu2 I``,
    so ``sᵀỹ = sᵀy + mu2·sᵀs``.

    Parameters
    ----------
    s : array, shape (d,)
        The (Powell-damped) step.
    y : array, shape (d,)
        The change of gradient.
    mu2 : float or 0-d array
        The Levenberg–Marquardt damping, ``> 0``; an array is not checked for sign (that would
        synchronise). K-BFGS uses ``mu2 = √λ``, tied to the damping ``λ_A = √λ`` of the A factor,
        and assumes the per-example scale of ``y`` (``spec/kbfgs.md`` §4).
    variant : {"convex", "additive"}, optional
        The damping rule, as above.

    Returns
    -------
    array, shape (d,)
        The damped ``y``, in ``y``'s dtype; ``y`` itself, bit for bit, when the convex rule is
        inactive or an input holds NaN or inf.

    Notes
    -----
    With ``mu2 >= 1`` the convex rule is no longer a convex combination (``θ2 <= 0``), and its
    denominator ``sᵀs − sᵀy`` vanishes when ``sᵀy = sᵀs`` (possible while the rule is active only
    if ``mu2 > 1``). Whenever the denominator is nonzero the formula still gives
    ``sᵀỹ = mu2·sᵀs`` exactly, but ``θ2`` grows without bound near the zero, so ``ỹ`` can be
    large. At an exact zero this function uses the additive shift ``ỹ = y + (mu2 − 1)·s``, which
    gives the same ``sᵀỹ = mu2·sᵀs`` without NaN. Prefer ``variant="additive"`` for
    ``mu2 >= 1`` (``λ >= 1``); it has neither problem.

    References
    ----------
    Goldfarb, Ren & Bahamou (2020), §3 (double damping, LM step); Ren, Bahamou & Goldfarb
    (2021) for the additive form; ``spec/kbfgs.md`` §5 and §9.5.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.quasi_newton import lm_damping
    >>> s, y = np.array([1.0, 0.0]), np.array([0.1, 1.0])
    >>> y_damped = lm_damping(s, y, mu2=0.5)
    >>> y_damped
    array([0.5   , 0.5556])
    >>> float(s @ y_damped)
    0.5
    >>> lm_damping(s, y, mu2=0.5, variant="additive")
    array([0.6, 1. ])
    """
    func = "lm_damping"
    backend = namespace_of(("s", s), ("y", y), func=func)
    _check_vectors(func, ("s", s), ("y", y))
    mu2 = _check_scalar(mu2, "mu2", func, like=s, strict=True)
    _check_variant(variant, func)
    return _lm(backend, s, y, mu2, variant)


def double_damping(
    s: Array,
    y: Array,
    h,
    /,
    *,
    mu1: float = 0.2,
    mu2,
    variant: str = "convex",
    gamma=1.0,
    lbfgs_method: str = "two-loop",
) -> tuple[Array, Array]:
    """Double damping of a pair: Powell on ``H`` (:func:`powell_damping`), then LM on ``y``.

    Parameters
    ----------
    s : array, shape (d,)
        The step; for K-BFGS, the (EMA of the) mean change of pre-activations.
    y : array, shape (d,)
        The change of gradient; for K-BFGS, the (EMA of the) mean change of per-example
        pre-activation gradients.
    h : array of shape (d, d), or LBFGSState
        The current inverse approximation ``H``, before it is updated with this pair: a dense
        symmetric positive definite matrix, or an L-BFGS memory (then ``Hy`` is
        ``lbfgs_apply(h, y, gamma=gamma, method=lbfgs_method)``).
    mu1 : float, optional
        Powell threshold, ``0 < mu1 < 1``.
    mu2 : float or 0-d array
        Levenberg–Marquardt damping, ``> 0`` (see :func:`lm_damping`).
    variant : {"convex", "additive"}, optional
        The LM rule (DD-v1 or DD-v2), see :func:`lm_damping`.
    gamma : float or 0-d array, optional
        The L-BFGS initial matrix ``gamma·I``; used only when ``h`` is an :class:`LBFGSState`.
    lbfgs_method : {"two-loop", "compact"}, optional
        How ``Hy`` is computed when ``h`` is an :class:`LBFGSState` (see :func:`lbfgs_apply`):
        the compact form is a handful of matrix products instead of ``2p`` small ones, faster
        on torch and on GPUs.

    Returns
    -------
    s_damped, y_damped : arrays, shape (d,)
        The damped pair. For ``s, y != 0`` and ``H`` positive definite, ``s̃ᵀỹ > 0`` and
        ``s̃ᵀỹ >= mu2·s̃ᵀs̃``, so :func:`bfgs_inverse_update` accepts it (without
        ``min_curvature``) and ``ỹᵀH⁺ỹ <= ỹᵀỹ / mu2``. A dead pair, ``s = 0`` or ``y = 0``
        (a layer that did not move or has no gradient), is returned unchanged, bit for bit, so
        that the update skips it (``sᵀy = 0``); damping it would otherwise invent curvature
        (``mu1·Hy`` or ``mu2·s``) from no information (``spec/kbfgs.md`` §9.5).

    References
    ----------
    Goldfarb, Ren & Bahamou (2020), §3 (double damping); ``spec/kbfgs.md`` §5.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.quasi_newton import bfgs_inverse_update, double_damping
    >>> h = np.eye(2)
    >>> s, y = np.array([1.0, 0.0]), np.array([-1.0, 1.0])  # sᵀy < 0: not usable as is
    >>> s_d, y_d = double_damping(s, y, h, mu2=0.5)
    >>> bool(s_d @ y_d >= 0.5 * (s_d @ s_d) - 1e-12)
    True
    >>> h_new = bfgs_inverse_update(h, s_d, y_d)
    >>> np.allclose(h_new @ y_d, s_d)
    True
    """
    func = "double_damping"
    if isinstance(h, LBFGSState):
        backend = _check_state(h, func, "h")
        namespace_of(("h.s", h.s), ("s", s), ("y", y), func=func)
        _check_vectors(func, ("s", s), ("y", y), dim=h.dim, dim_of="h (LBFGSState)")
        gamma = _check_scalar(gamma, "gamma", func, like=s, strict=True)
    else:
        backend = namespace_of(("h", h), ("s", s), ("y", y), func=func)
        d = check_square(h, "h", func, stacked=False)
        _check_vectors(func, ("s", s), ("y", y), dim=d, dim_of=f"h of shape {tuple(h.shape)}")
    mu1 = _check_mu1(mu1, func)
    mu2 = _check_scalar(mu2, "mu2", func, like=s, strict=True)
    _check_variant(variant, func)
    if lbfgs_method not in _METHODS:
        raise ValueError(f"{func}: lbfgs_method must be one of {_METHODS}, got {lbfgs_method!r}")
    xp = backend.xp
    s_clean, _ = _finite_part(xp, s)
    y_clean, _ = _finite_part(xp, y)
    if isinstance(h, LBFGSState):
        column = xp.reshape(y_clean, (-1, 1))
        hy = xp.reshape(_lbfgs_columns(backend, h, column, gamma, lbfgs_method), (-1,))
    else:
        hy = h @ y_clean
    s_damped = _powell(backend, s, y, hy, mu1)
    y_damped = _lm(backend, s_damped, y, mu2, variant)
    # A dead pair (s = 0 or y = 0) carries no curvature: return it as is, so that the BFGS
    # update skips it (sᵀy = 0) instead of learning mu1·Hy or mu2·s from nothing.
    live = xp.any(s_clean != 0) & xp.any(y_clean != 0)
    return xp.where(live, s_damped, s), xp.where(live, y_damped, y)


def _powell(backend: Backend, s: Array, y: Array, hy: Array, mu1: float) -> Array:
    xp = backend.xp
    acc = _accumulation_dtype(xp, s)
    s0, finite_s = _finite_part(xp, s)
    y0, finite_y = _finite_part(xp, y)
    hy0, finite_hy = _finite_part(xp, hy)
    sty, yhy = _dot(xp, s0, y0, acc), _dot(xp, y0, hy0, acc)
    active = finite_s & finite_y & finite_hy & (yhy > 0) & (sty < mu1 * yhy)
    # Active implies yᵀHy − sᵀy > (1 − mu1)·yᵀHy > 0; elsewhere divide by 1 (value unused).
    denominator = xp.where(active, yhy - sty, xp.ones_like(yhy))
    theta = xp.astype((1.0 - mu1) * yhy / denominator, s.dtype)
    return xp.where(active, theta * s0 + (1.0 - theta) * hy0, s)


def _lm(backend: Backend, s: Array, y: Array, mu2, variant: str) -> Array:
    xp = backend.xp
    s0, finite_s = _finite_part(xp, s)
    y0, finite_y = _finite_part(xp, y)
    finite = finite_s & finite_y
    if variant == "additive":  # a Python option, not an array value
        return xp.where(finite, y0 + _as_dtype(xp, mu2, y.dtype) * s0, y)
    acc = _accumulation_dtype(xp, s)
    mu2_acc = _as_dtype(xp, mu2, acc)
    sty, sts = _dot(xp, s0, y0, acc), _dot(xp, s0, s0, acc)
    active = finite & (sty < mu2_acc * sts)
    denominator = sts - sty  # > (1 − mu2)·sᵀs > 0 when active and mu2 < 1
    singular = denominator == 0  # only possible when active with mu2 > 1
    safe = xp.where(active & ~singular, denominator, xp.ones_like(denominator))
    theta = xp.astype((1.0 - mu2_acc) * sts / safe, y.dtype)
    convex = theta * y0 + (1.0 - theta) * s0
    shifted = y0 + _as_dtype(xp, mu2_acc - 1.0, y.dtype) * s0  # sᵀỹ = mu2·sᵀs if sᵀy = sᵀs
    return xp.where(active, xp.where(singular, shifted, convex), y)


# -- dense BFGS ---------------------------------------------------------------------------


def bfgs_inverse_update(h: Array, s: Array, y: Array, /, *, min_curvature=0.0) -> Array:
    """BFGS update of an inverse-Hessian approximation, skipping unsafe pairs.

    ``H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ`` with ``ρ = 1/(sᵀy)``, computed as the rank-2
    form ``H + (ρ² yᵀHy + ρ) s sᵀ − ρ (s (Hy)ᵀ + (Hy) sᵀ)``, whose rank-2 term is exactly
    symmetric in floating point, so ``H⁺`` is exactly symmetric when ``H`` is. It satisfies the
    secant equation ``H⁺y = s`` and stays positive definite when ``H`` is and ``sᵀy > 0``.

    The pair is skipped, and ``h`` returned bit-identical, when ``sᵀy <= 0``, when
    ``sᵀy <= min_curvature·sᵀs``, or when ``s``, ``y`` or ``H⁺`` holds NaN or inf. The decision
    is made on the device (no host synchronisation).

    Parameters
    ----------
    h : array, shape (d, d)
        The current symmetric positive definite inverse approximation. Never modified: the
        update returns a new array.
    s : array, shape (d,)
        The (damped) step.
    y : array, shape (d,)
        The (damped) change of gradient.
    min_curvature : float or 0-d array, optional
        Reject the pair unless ``sᵀy > min_curvature·sᵀs`` (a lower bound on the curvature
        ``sᵀy/sᵀs`` along ``s``); ``0`` (default) keeps only the rule ``sᵀy > 0``. K-BFGS passes
        ``1e-4·‖ḡ‖`` with ``ḡ`` the mean per-example pre-activation gradient (or ``1e-4·‖u‖``
        for the A factor). Not scale-invariant. An array is not checked for sign.

    Returns
    -------
    array, shape (d, d)
        ``H⁺``, or ``h`` (values bit-identical) when the pair is skipped; in ``h``'s dtype.

    Notes
    -----
    ``sᵀy``, ``sᵀs``, ``yᵀHy`` and the two coefficients are computed in float64 where the
    library supports it on the arrays' device, then cast to ``h``'s dtype. The overflow test
    bounds ``|H⁺_ij|`` by ``max_i H_ii`` plus the largest entry of the rank-2 term, which
    relies on ``h`` being positive definite; with NumPy, a pair so large that this float64
    bound overflows may raise NumPy's overflow ``RuntimeWarning`` before it is rejected.

    References
    ----------
    Nocedal & Wright, *Numerical Optimization*, 2nd ed., eq. (6.17); Goldfarb, Ren & Bahamou
    (2020), §3 and its skip rules; ``spec/kbfgs.md`` §3, §4 and §9.6.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.quasi_newton import bfgs_inverse_update
    >>> h = np.eye(2)
    >>> s, y = np.array([1.0, 0.0]), np.array([2.0, 1.0])
    >>> h_new = bfgs_inverse_update(h, s, y)
    >>> h_new @ y  # secant equation
    array([1., 0.])
    >>> h  # the input is not modified
    array([[1., 0.],
           [0., 1.]])
    >>> bfgs_inverse_update(h, s, -y) is not h, np.array_equal(bfgs_inverse_update(h, s, -y), h)
    (True, True)
    """
    func = "bfgs_inverse_update"
    backend = namespace_of(("h", h), ("s", s), ("y", y), func=func)
    d = check_square(h, "h", func, stacked=False)
    _check_vectors(func, ("s", s), ("y", y), dim=d, dim_of=f"h of shape {tuple(h.shape)}")
    min_curvature = _check_scalar(min_curvature, "min_curvature", func, like=h, strict=False)
    return _bfgs(backend, h, s, y, min_curvature)


def _bfgs(backend: Backend, h: Array, s: Array, y: Array, min_curvature) -> Array:
    """The BFGS inverse update with the skip rules, unchecked; returns ``h`` values if skipped.

    Three passes over the matrix (two broadcast products and the sums): the skip decision is
    made on vectors, never on the new matrix.
    """
    xp = backend.xp
    acc = _accumulation_dtype(xp, h)
    s0, finite_s = _finite_part(xp, s)
    y0, finite_y = _finite_part(xp, y)
    w = h @ y0
    sty, sts, ywy = _dot(xp, s0, y0, acc), _dot(xp, s0, s0, acc), _dot(xp, y0, w, acc)
    ok = finite_s & finite_y & (sty > 0) & (sty > _as_dtype(xp, min_curvature, acc) * sts)
    rho = 1.0 / xp.where(ok, sty, xp.ones_like(sty))
    half_ss = xp.astype(0.5 * rho * (rho * ywy + 1.0), h.dtype)
    t = half_ss * s0 - xp.astype(rho, h.dtype) * w
    # H⁺ = H + (s tᵀ + t sᵀ). Each entry of the rank-2 term is at most 2·max|s|·max|t|, and
    # |H_ij| <= max_i H_ii for a positive definite H: bounding that sum bounds H⁺, so an
    # overflow (or NaN/inf in t, which fail the comparison) is caught without reading H⁺.
    size = xp.max(xp.abs(xp.astype(s0, acc))) * xp.max(xp.abs(xp.astype(t, acc)))
    bound = xp.astype(xp.max(xp.linalg.diagonal(h)), acc) + 2.0 * size
    ok = ok & (bound < xp.finfo(h.dtype).max / 2)
    # A skipped pair becomes s = +0, t = −0: every entry of the rank-2 term is then −0, and
    # x + (−0) is x bit for bit for every x (a +0 term would turn a −0 entry of H into +0).
    s0 = xp.where(ok, s0, xp.zeros_like(s0))
    t = xp.where(ok, t, -xp.zeros_like(t))
    # Two broadcast products, not one and its transpose: entry (i, j) adds the same two rounded
    # products as entry (j, i), so the term, and H⁺ with it, is exactly symmetric (a + b = b + a),
    # and both products read memory in order.
    return h + (s0[:, None] * t[None, :] + t[:, None] * s0[None, :])


# -- L-BFGS -------------------------------------------------------------------------------


class LBFGSState(NamedTuple):
    """An L-BFGS memory: the last ``memory`` accepted pairs in a fixed-size buffer.

    Rows are ordered by age, oldest first and newest last. :func:`lbfgs_push` shifts the buffer
    by one row and writes the new pair last, evicting the oldest (on the device, with
    ``xp.where``: a rejected pair leaves every array bit-identical). Slots not yet filled are
    zero and marked invalid; they act as no-ops.

    Attributes
    ----------
    s : array, shape (memory, d)
        Steps ``s_i``.
    y : array, shape (memory, d)
        Gradient changes ``y_i``.
    rho : array, shape (memory,)
        ``1 / (s_iᵀy_i)`` (0 in invalid slots), in the state's dtype.
    valid : array of bool, shape (memory,)
        Which slots hold an accepted pair.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.quasi_newton import lbfgs_init, lbfgs_push
    >>> state = lbfgs_init(3, 2)
    >>> state.memory, state.dim, state.valid
    (2, 3, array([False, False]))
    >>> state = lbfgs_push(state, np.array([1.0, 0.0, 0.0]), np.array([2.0, 0.0, 0.0]))
    >>> state.valid, state.rho
    (array([False,  True]), array([0. , 0.5]))
    """

    s: Array
    y: Array
    rho: Array
    valid: Array

    @property
    def memory(self) -> int:
        """Number of slots ``p``."""
        return self.s.shape[0]

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the vectors."""
        return self.s.shape[1]


def lbfgs_init(dim: int, memory: int, /, *, xp=None, dtype=None, device=None) -> LBFGSState:
    """An empty L-BFGS memory of ``memory`` pairs of vectors of size ``dim``.

    Parameters
    ----------
    dim : int
        Dimension ``d`` of the vectors (for K-BFGS(L), the layer's output size ``d_g``).
    memory : int
        Number of pairs kept, ``p >= 1`` (K-BFGS(L) uses 100).
    xp : module, optional
        The array library or its array-API namespace (``numpy``, ``torch``, ``cupy``,
        ``array_api_strict``, ...). Default: NumPy.
    dtype : dtype, optional
        A real floating dtype of that library; default: the library's default float.
    device : device, optional
        Where to allocate; default: the library's default device.

    Returns
    -------
    LBFGSState
        Zero buffers with every slot invalid; applying it is ``gamma·I``.

    References
    ----------
    Nocedal & Wright, *Numerical Optimization*, 2nd ed., §7.2; ``spec/kbfgs.md`` §4.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.quasi_newton import lbfgs_init
    >>> state = lbfgs_init(4, 3, xp=np, dtype=np.float32)
    >>> state.s.shape, state.s.dtype, state.rho.shape
    ((3, 4), dtype('float32'), (3,))
    """
    func = "lbfgs_init"
    dim = _check_count(dim, "dim", func)
    memory = _check_count(memory, "memory", func)
    if xp is None:
        import numpy as xp
    try:
        probe = xp.zeros((0,)) if device is None else xp.zeros((0,), device=device)
        ns = get_backend(probe).xp
    except Exception as exc:  # not an array library, or a device it does not know
        raise TypeError(
            f"{func}: xp must be an array library or array-API namespace (with device "
            f"{device!r}), got {xp!r} ({type(exc).__name__}: {exc})"
        ) from None
    if dtype is None:
        dtype = probe.dtype
    try:
        floating = ns.isdtype(dtype, "real floating")
    except Exception:
        floating = False
    if not floating:
        raise TypeError(
            f"{func}: dtype must be a real floating dtype of {ns.__name__}, got {dtype}"
        )
    kw = {"dtype": dtype} if device is None else {"dtype": dtype, "device": device}
    bkw = {"dtype": ns.bool} if device is None else {"dtype": ns.bool, "device": device}
    return LBFGSState(
        s=ns.zeros((memory, dim), **kw),
        y=ns.zeros((memory, dim), **kw),
        rho=ns.zeros((memory,), **kw),
        valid=ns.zeros((memory,), **bkw),
    )


def lbfgs_push(state: LBFGSState, s: Array, y: Array, /, *, min_curvature=0.0) -> LBFGSState:
    """Append a pair to an L-BFGS memory, evicting the oldest when full; skip unsafe pairs.

    The skip rules are those of :func:`bfgs_inverse_update`: the pair is rejected when
    ``sᵀy <= 0``, ``sᵀy <= min_curvature·sᵀs``, or ``s``, ``y`` or ``1/(sᵀy)`` is not finite;
    a rejected pair returns a state whose arrays are bit-identical to ``state``'s. Decided on
    the device, without a host synchronisation.

    Parameters
    ----------
    state : LBFGSState
        The memory; not modified.
    s : array, shape (d,)
        The (damped) step.
    y : array, shape (d,)
        The (damped) change of gradient.
    min_curvature : float or 0-d array, optional
        As in :func:`bfgs_inverse_update` (K-BFGS(L) passes ``1e-4·‖ḡ‖``).

    Returns
    -------
    LBFGSState
        The new memory (new arrays of the same shapes).

    References
    ----------
    Nocedal & Wright, *Numerical Optimization*, 2nd ed., §7.2; Goldfarb, Ren & Bahamou (2020),
    K-BFGS(L); ``spec/kbfgs.md`` §4 and §9.7.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.quasi_newton import lbfgs_init, lbfgs_push
    >>> state = lbfgs_init(2, 2)
    >>> for k in (1.0, 2.0, 3.0):
    ...     state = lbfgs_push(state, np.array([k, 0.0]), np.array([1.0, 0.0]))
    >>> state.s[:, 0], state.valid  # the oldest pair (k = 1) was evicted
    (array([2., 3.]), array([ True,  True]))
    >>> rejected = lbfgs_push(state, np.array([1.0, 0.0]), np.array([-1.0, 0.0]))
    >>> np.array_equal(rejected.s, state.s)
    True
    """
    func = "lbfgs_push"
    backend = _check_state(state, func, "state")
    namespace_of(("state.s", state.s), ("s", s), ("y", y), func=func)
    _check_vectors(func, ("s", s), ("y", y), dim=state.dim, dim_of="state")
    min_curvature = _check_scalar(min_curvature, "min_curvature", func, like=s, strict=False)
    xp = backend.xp
    acc = _accumulation_dtype(xp, s)
    s0, finite_s = _finite_part(xp, s)
    y0, finite_y = _finite_part(xp, y)
    sty, sts = _dot(xp, s0, y0, acc), _dot(xp, s0, s0, acc)
    ok = finite_s & finite_y & (sty > 0) & (sty > _as_dtype(xp, min_curvature, acc) * sts)
    rho = xp.astype(1.0 / xp.where(ok, sty, xp.ones_like(sty)), s.dtype)
    ok = ok & xp.isfinite(rho)

    def shifted(buffer, new):
        return xp.where(ok, xp.concat((buffer[1:, ...], new[None, ...]), axis=0), buffer)

    return LBFGSState(
        s=shifted(state.s, s0),
        y=shifted(state.y, y0),
        rho=shifted(state.rho, rho),
        valid=shifted(state.valid, xp.ones_like(state.valid[0])),  # True, made on the device
    )


def lbfgs_apply(state: LBFGSState, v: Array, /, *, gamma=1.0, method: str = "two-loop") -> Array:
    """Apply the L-BFGS inverse approximation ``H`` to a vector or to columns of a matrix.

    ``H`` is the BFGS inverse built from ``gamma·I`` with the stored pairs, oldest first; both
    methods give the same operator (up to roundoff).

    Parameters
    ----------
    state : LBFGSState
        The memory.
    v : array, shape (d,) or (d, n)
        A vector, or ``n`` columns (for K-BFGS(L), the gradient matrix ``M`` of shape
        ``(d_g, d_a)``, giving ``H_g M``).
    gamma : float or 0-d array, optional
        The initial matrix ``gamma·I``, ``> 0``; K-BFGS(L) keeps ``gamma = 1``. An array (for
        instance ``sᵀy/yᵀy`` of the newest pair) is not checked for sign.
    method : {"two-loop", "compact"}, optional
        ``"two-loop"``: the two-loop recursion, ``4pd`` multiply-adds per column, a Python loop
        over the ``p`` slots. ``"compact"``: the compact representation of Byrd, Nocedal and
        Schnabel, a few matrix products with ``S`` and ``Y`` and two ``p × p`` triangular solves
        (in float64 where supported), rebuilt from the buffer at every call.

    Returns
    -------
    array, shaped like ``v``
        ``H v``, in ``v``'s dtype. No host synchronisation.

    References
    ----------
    Nocedal & Wright, *Numerical Optimization*, 2nd ed., Algorithm 7.4 (two-loop recursion);
    Byrd, Nocedal & Schnabel (1994), Theorem 2.2 (compact form); ``spec/kbfgs.md`` §4.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.quasi_newton import bfgs_inverse_update, lbfgs_apply, lbfgs_init, lbfgs_push
    >>> rng = np.random.default_rng(0)
    >>> b = np.diag([1.0, 2.0, 4.0])
    >>> state, h = lbfgs_init(3, 5), np.eye(3)
    >>> for _ in range(2):
    ...     s = rng.standard_normal(3)
    ...     state, h = lbfgs_push(state, s, b @ s), bfgs_inverse_update(h, s, b @ s)
    >>> v = rng.standard_normal((3, 2))
    >>> np.allclose(lbfgs_apply(state, v), h @ v)
    True
    >>> np.allclose(lbfgs_apply(state, v, method="compact"), h @ v)
    True
    """
    func = "lbfgs_apply"
    backend = _check_state(state, func, "state")
    namespace_of(("state.s", state.s), ("v", v), func=func)
    if v.ndim not in (1, 2) or v.shape[0] != state.dim:
        raise ValueError(
            f"{func}: v must have shape ({state.dim},) or ({state.dim}, n) to match a state "
            f"of dimension {state.dim}, got {tuple(v.shape)}"
        )
    gamma = _check_scalar(gamma, "gamma", func, like=v, strict=True)
    if method not in _METHODS:
        raise ValueError(f"{func}: method must be one of {_METHODS}, got {method!r}")
    xp = backend.xp
    out = _lbfgs_columns(backend, state, xp.reshape(v, (state.dim, -1)), gamma, method)
    return xp.reshape(out, v.shape)


def _lbfgs_columns(backend: Backend, state: LBFGSState, cols: Array, gamma, method: str) -> Array:
    if method == "two-loop":
        return _two_loop(backend.xp, state, cols, gamma)
    return _compact(backend, state, cols, gamma)


def _masked(xp, state: LBFGSState) -> tuple[Array, Array, Array]:
    """``s``, ``y`` and ``rho`` with invalid slots zeroed, so that they are exact no-ops."""
    valid = state.valid
    zero = xp.zeros_like(state.rho)
    return (
        xp.where(valid[:, None], state.s, zero[:, None]),
        xp.where(valid[:, None], state.y, zero[:, None]),
        xp.where(valid, state.rho, zero),
    )


def _two_loop(xp, state: LBFGSState, q: Array, gamma) -> Array:
    """Two-loop recursion on columns ``q`` of shape (d, n); slot order is age order."""
    s, y, rho = _masked(xp, state)
    s, y, rho = (xp.astype(a, q.dtype) if a.dtype != q.dtype else a for a in (s, y, rho))
    p = state.memory
    alphas = [None] * p
    for i in range(p - 1, -1, -1):  # newest to oldest; a loop over pairs, not elements
        alphas[i] = rho[i] * (s[i, :] @ q)
        q = q - y[i, :][:, None] * alphas[i][None, :]
    r = _as_dtype(xp, gamma, q.dtype) * q
    for i in range(p):  # oldest to newest
        beta = rho[i] * (y[i, :] @ r)
        r = r + s[i, :][:, None] * (alphas[i] - beta)[None, :]
    return r


def _compact(backend: Backend, state: LBFGSState, v: Array, gamma) -> Array:
    """Compact form ``γI + [S γY] M [Sᵀ; γYᵀ]`` (Byrd, Nocedal & Schnabel 1994, Thm 2.2).

    Rows of ``s`` and ``y`` are the columns of ``S`` and ``Y`` in age order. An invalid slot has
    zero ``s`` and ``y``, so its row and column of ``R = triu(SᵀY)`` vanish; its diagonal entry
    is set to 1 so that ``R`` stays invertible without changing the valid block.
    """
    xp = backend.xp
    acc = _accumulation_dtype(xp, v)
    s, y, _ = _masked(xp, state)
    s, y = (xp.astype(a, v.dtype) if a.dtype != v.dtype else a for a in (s, y))
    p = state.memory
    sty = xp.astype(s @ xp.matrix_transpose(y), acc)  # (p, p): s_iᵀ y_j
    yty = xp.astype(y @ xp.matrix_transpose(y), acc)
    d = xp.linalg.diagonal(sty)
    eye = xp.eye(p, dtype=acc, device=_device(sty))
    invalid = xp.astype(xp.logical_not(state.valid), acc)
    r = xp.triu(sty) + eye * invalid[None, :]
    # S and Y stacked: two products with k = 2p instead of four with k = p (better GEMM shapes).
    sy = xp.concat([s, y], axis=0)  # (2p, d)
    sy_v = xp.astype(sy @ v, acc)  # (2p, n): Sᵀv over Yᵀv
    st_v, yt_v = sy_v[:p, ...], sy_v[p:, ...]
    g = _as_dtype(xp, gamma, acc)
    t = backend.solve_triangular(r, st_v, lower=False)  # R⁻¹ Sᵀv
    middle = d[:, None] * t + g * (yty @ t) - g * yt_v
    u = backend.solve_triangular(xp.matrix_transpose(r), middle, lower=True)  # R⁻ᵀ(...)
    coefficients = xp.astype(xp.concat([u, -g * t], axis=0), v.dtype)  # (2p, n)
    scaled = v if _is_one(gamma) else _as_dtype(xp, gamma, v.dtype) * v  # K-BFGS(L): γ = 1
    return scaled + xp.matrix_transpose(sy) @ coefficients


# -- Hessian-action update of the A-factor inverse ----------------------------------------


def hessian_action_update(
    h_a: Array, a: Array, u: Array, /, *, damping=0.0, min_curvature=0.0
) -> Array:
    """K-BFGS's Hessian-action BFGS update of ``H_a ≈ (A + λ_A I)⁻¹`` from a stored ``A``.

    With ``s_a = H_a u`` and ``y_a = (A + damping·I) s_a``, returns the BFGS update of ``H_a``
    on ``(s_a, y_a)`` (:func:`bfgs_inverse_update`). Since ``s_aᵀy_a >= damping·‖s_a‖²`` the pair
    needs no damping. If ``H_a = (A + damping·I)⁻¹`` already, ``H_a`` is a fixed point; else the
    error ``E = A_λ^{1/2} H_a A_λ^{1/2} − I`` becomes ``(I − Π) E (I − Π)`` for an orthogonal
    projector ``Π``, so ``‖E‖_F`` never grows.

    Parameters
    ----------
    h_a : array, shape (d_a, d_a)
        The current symmetric positive definite approximation of ``(A + λ_A I)⁻¹``; not modified.
    a : array, shape (d_a, d_a)
        The input-side factor, for K-BFGS the EMA of ``(1/m) Σ_i x̄_i x̄_iᵀ`` (bias as the last
        coordinate of ``x̄``), already updated at this iteration. Pass ``A + λ_A I`` with
        ``damping=0``, or ``A`` with ``damping=λ_A``.
    u : array, shape (d_a,)
        The direction probed; K-BFGS uses the minibatch mean of ``x̄`` with its last
        (homogeneous) entry set to 1.
    damping : float or 0-d array, optional
        ``λ_A >= 0`` added to ``A`` (K-BFGS: ``√λ``). An array is not checked for sign.
    min_curvature : float or 0-d array, optional
        As in :func:`bfgs_inverse_update` (K-BFGS passes ``1e-4·‖u‖``).

    Returns
    -------
    array, shape (d_a, d_a)
        The updated ``H_a`` (``h_a``'s values if the pair is skipped).

    References
    ----------
    Goldfarb, Ren & Bahamou (2020), §4 (Hessian-action BFGS for the A factor);
    ``spec/kbfgs.md`` §3 (A-ii) and property test T9.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.quasi_newton import hessian_action_update
    >>> a = np.array([[2.0, 1.0], [1.0, 2.0]])
    >>> u = np.array([0.5, 1.0])
    >>> h_new = hessian_action_update(np.eye(2), a, u, damping=0.1)
    >>> s_a = u  # = H_a u for H_a = I
    >>> np.allclose(h_new @ ((a + 0.1 * np.eye(2)) @ s_a), s_a)
    True
    >>> exact = np.linalg.inv(a + 0.1 * np.eye(2))  # a fixed point
    >>> np.allclose(hessian_action_update(exact, a, u, damping=0.1), exact)
    True
    """
    func = "hessian_action_update"
    backend = namespace_of(("h_a", h_a), ("a", a), ("u", u), func=func)
    d = check_square(h_a, "h_a", func, stacked=False)
    if tuple(a.shape) != (d, d):
        raise ValueError(f"{func}: a must have shape ({d}, {d}) to match h_a, got {tuple(a.shape)}")
    _check_vectors(func, ("u", u), dim=d, dim_of=f"h_a of shape {tuple(h_a.shape)}")
    damping = _check_scalar(damping, "damping", func, like=h_a, strict=False)
    min_curvature = _check_scalar(min_curvature, "min_curvature", func, like=h_a, strict=False)
    xp = backend.xp
    s_a = h_a @ u
    y_a = a @ s_a
    if not _is_zero(damping):
        y_a = y_a + _as_dtype(xp, damping, h_a.dtype) * s_a
    return _bfgs(backend, h_a, s_a, y_a, min_curvature)


def hessian_action_update_minibatch(
    h_a: Array,
    x: Array,
    u: Array,
    /,
    *,
    n_examples: int,
    damping,
    min_curvature=0.0,
    homogeneous: bool = False,
) -> Array:
    """Hessian-action update of ``H_a`` without storing ``A``: ``A`` from this minibatch.

    With ``s_a = H_a u`` and
    ``y_a = (1/n_examples) X̄ᵀ(X̄ s_a) + damping·s_a``, computed as two matrix-vector products
    (``O(R·d_a)``, never forming ``X̄ᵀX̄``), returns the BFGS update of ``H_a`` on
    ``(s_a, y_a)``. This is :func:`hessian_action_update` with
    ``A = (1/n_examples) X̄ᵀX̄``.

    Parameters
    ----------
    h_a : array, shape (d_a, d_a)
        The current symmetric positive definite approximation of ``(A + λ_A I)⁻¹``; not modified.
    x : array of shape (..., d_a), or Rows
        The layer-input rows ``x̄``, leading axes flattened into ``R`` rows: ``(m, d_a)`` for a
        linear layer, ``(m, T, d_a)`` or ``(m·T, d_a)`` of unfolded patches for a convolution,
        or a :class:`curvlin.blocks.Rows` of shape (R, d_a), read only through its products
        (which need not build the patches). Include the homogeneous 1 as the last entry of
        each row if the bias is preconditioned by ``H_a`` (``spec/kbfgs.md`` §1).
    u : array, shape (d_a,)
        The direction probed (K-BFGS: the mean row of ``x̄``, last entry 1).
    n_examples : int
        The divisor ``≥ 1`` of ``X̄ᵀX̄``, which fixes the scale of ``A``. For a linear layer the
        batch size ``m`` (``A = (1/m) Σ_i x̄_i x̄_iᵀ``). For a convolution, ``spec/kbfgs.md`` §6
        uses the spatial *sum*, ``A = (1/m) Σ_i Σ_t x̄_{i,t} x̄_{i,t}ᵀ``, so pass ``m``, not
        ``m·T`` (which would give the spatial mean, ASDL's convention).
    damping : float or 0-d array
        ``λ_A >= 0`` (K-BFGS: ``√λ``); ``0`` is the "not damped" variant. An array is not
        checked for sign.
    min_curvature : float or 0-d array, optional
        As in :func:`bfgs_inverse_update`.
    homogeneous : bool, optional
        If True, ``x`` has ``d_a − 1`` columns and stands for the rows ``[x, 1]``: the
        homogeneous entry is applied implicitly instead of being copied into every row.

    Returns
    -------
    array, shape (d_a, d_a)
        The updated ``H_a`` (``h_a``'s values if the pair is skipped).

    References
    ----------
    Ren, Bahamou & Goldfarb (2021), "Kronecker-factored quasi-Newton methods for deep
    learning", minibatch Hessian action; ``spec/kbfgs.md`` §3 (A-iii) and §6.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.quasi_newton import hessian_action_update, hessian_action_update_minibatch
    >>> rng = np.random.default_rng(0)
    >>> x = np.concatenate([rng.standard_normal((8, 2)), np.ones((8, 1))], axis=1)
    >>> u = x.mean(axis=0)
    >>> h_new = hessian_action_update_minibatch(np.eye(3), x, u, n_examples=8, damping=0.1)
    >>> dense = hessian_action_update(np.eye(3), x.T @ x / 8, u, damping=0.1)
    >>> np.allclose(h_new, dense)
    True
    >>> implicit = hessian_action_update_minibatch(  # the same rows without their column of 1s
    ...     np.eye(3), x[:, :2], u, n_examples=8, damping=0.1, homogeneous=True
    ... )
    >>> np.allclose(implicit, h_new)
    True
    """
    func = "hessian_action_update_minibatch"
    given = like_of(x)
    backend = namespace_of(("h_a", h_a), ("x", given), ("u", u), func=func)
    d = check_square(h_a, "h_a", func, stacked=False)
    if not isinstance(homogeneous, bool):
        raise TypeError(f"{func}: homogeneous must be a bool, got {homogeneous!r}")
    columns = d - 1 if homogeneous else d
    if x.ndim < 2 or x.shape[-1] != columns:
        raise ValueError(
            f"{func}: x must have shape (..., {columns}) with at least 2 axes to match h_a of "
            f"shape {tuple(h_a.shape)}{' (homogeneous=True)' if homogeneous else ''}, "
            f"got {tuple(x.shape)}"
        )
    _check_vectors(func, ("u", u), dim=d, dim_of=f"h_a of shape {tuple(h_a.shape)}")
    n_examples = _check_count(n_examples, "n_examples", func)
    damping = _check_scalar(damping, "damping", func, like=h_a, strict=False)
    min_curvature = _check_scalar(min_curvature, "min_curvature", func, like=h_a, strict=False)
    xp = backend.xp
    rows = x if isinstance(x, Rows) else Rows(xp.reshape(x, (-1, columns)))
    s_a = h_a @ u
    if homogeneous:  # [x, 1] s_a = x s_a[:-1] + s_a[-1];  [x, 1]ᵀ z = [xᵀz, Σ z]
        z = rows.matvec(s_a[:-1]) + s_a[-1]
        y_a = xp.concat([rows.rmatvec(z), xp.sum(z, keepdims=True)]) / float(n_examples)
    else:
        y_a = rows.rmatvec(rows.matvec(s_a)) / float(n_examples)
    if not _is_zero(damping):
        y_a = y_a + _as_dtype(xp, damping, h_a.dtype) * s_a
    return _bfgs(backend, h_a, s_a, y_a, min_curvature)


# -- shared pieces ------------------------------------------------------------------------


def _accumulation_dtype(xp, like: Array):
    """float64 if the library supports it on ``like``'s device, else float32."""
    if like.dtype == xp.float64:
        return xp.float64
    try:
        info = xp.__array_namespace_info__()
        if "float64" in info.dtypes(device=_device(like), kind="real floating"):
            return xp.float64
    except Exception:  # an older namespace without inspection: assume float64 exists
        return xp.float64
    return xp.float32


def _dot(xp, a: Array, b: Array, dtype) -> Array:
    """``aᵀb`` of two vectors as a 0-d array of ``dtype``."""
    if a.dtype != dtype:
        a = xp.astype(a, dtype)
    if b.dtype != dtype:
        b = xp.astype(b, dtype)
    return xp.vecdot(a, b)


def _finite_part(xp, v: Array) -> tuple[Array, Array]:
    """``v`` with NaN/inf replaced by 0 (no warnings downstream) and a 0-d "all finite" flag."""
    finite = xp.isfinite(v)
    return xp.where(finite, v, xp.zeros_like(v)), xp.all(finite)


def _as_dtype(xp, value, dtype):
    """A checked scalar option (Python float or 0-d array) in ``dtype``, ready to combine."""
    if isinstance(value, float):
        return value
    return value if value.dtype == dtype else xp.astype(value, dtype)


def _is_zero(value) -> bool:
    return isinstance(value, float) and value == 0.0


def _is_one(value) -> bool:
    return isinstance(value, float) and value == 1.0


def _check_vectors(func: str, *named, dim: int | None = None, dim_of: str = "") -> None:
    """Every named array is a vector of one length (``dim`` when given)."""
    first_name, first = named[0]
    want = dim if dim is not None else (first.shape[0] if first.ndim == 1 else None)
    for name, a in named:
        if a.ndim != 1 or (want is not None and a.shape[0] != want):
            shape = f"({want},)" if want is not None else "(d,)"
            why = f"to match {dim_of}" if dim is not None else f"like {first_name}"
            raise ValueError(
                f"{func}: {name} must be a vector of shape {shape} {why}, got {tuple(a.shape)}"
            )


def _check_mu1(mu1, func: str) -> float:
    if isinstance(mu1, bool) or not isinstance(mu1, Real):
        raise TypeError(f"{func}: mu1 must be a real number in (0, 1), got {mu1!r}")
    if not 0.0 < float(mu1) < 1.0:
        raise ValueError(f"{func}: mu1 must lie in the open interval (0, 1), got {mu1!r}")
    return float(mu1)


def _check_variant(variant, func: str) -> None:
    if variant not in _VARIANTS:
        raise ValueError(f"{func}: variant must be one of {_VARIANTS}, got {variant!r}")


def _check_count(value, name: str, func: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{func}: {name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{func}: {name} must be >= 1, got {value!r}")
    return int(value)


def _check_scalar(value, name: str, func: str, *, like: Array, strict: bool):
    """A finite real number (``> 0`` if ``strict`` else ``>= 0``) or a 0-d real array.

    An array must come from ``like``'s library and device; its value is not inspected (that
    would synchronise).
    """
    bound = "> 0" if strict else ">= 0"
    if isinstance(value, bool) or not (isinstance(value, Real) or hasattr(value, "shape")):
        raise TypeError(
            f"{func}: {name} must be a real number {bound} or a 0-d array, got {value!r}"
        )
    if isinstance(value, Real):
        number = float(value)
        if not math.isfinite(number) or number < 0 or (strict and number == 0):
            raise ValueError(f"{func}: {name} must be finite and {bound}, got {value!r}")
        return number
    try:
        xp = get_backend(like, value).xp
    except TypeError:
        raise TypeError(
            f"{func}: {name} must be a number or an array of the same library as the other "
            f"arguments, got {type(value).__module__}.{type(value).__name__}"
        ) from None
    if value.ndim != 0:
        raise ValueError(
            f"{func}: {name} must be a number or a 0-d array, got shape {tuple(value.shape)}"
        )
    if not xp.isdtype(value.dtype, "real floating"):
        raise TypeError(f"{func}: {name} must have a real floating dtype, got {value.dtype}")
    if _device(value) != _device(like):
        raise ValueError(f"{func}: {name} is on {_device(value)} but the arrays on {_device(like)}")
    return value


def _check_state(state, func: str, name: str) -> Backend:
    """``state`` is an LBFGSState with consistent shapes, of one library; its backend."""
    if not isinstance(state, LBFGSState):
        raise TypeError(
            f"{func}: {name} must be an LBFGSState (see lbfgs_init), got {type(state).__name__}"
        )
    backend = namespace_of(
        (f"{name}.s", state.s), (f"{name}.y", state.y), (f"{name}.rho", state.rho), func=func
    )
    p_d = tuple(state.s.shape)
    if (
        len(p_d) != 2
        or tuple(state.y.shape) != p_d
        or tuple(state.rho.shape) != p_d[:1]
        or tuple(state.valid.shape) != p_d[:1]
    ):
        raise ValueError(
            f"{func}: {name} has inconsistent shapes: s {tuple(state.s.shape)}, y "
            f"{tuple(state.y.shape)}, rho {tuple(state.rho.shape)}, valid "
            f"{tuple(state.valid.shape)} (expected (p, d), (p, d), (p,), (p,))"
        )
    if state.valid.dtype != backend.xp.bool:
        raise TypeError(f"{func}: {name}.valid must be boolean, got {state.valid.dtype}")
    return backend
