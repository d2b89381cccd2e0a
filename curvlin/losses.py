"""The loss functions curvature methods know: their scales and output-Hessian square roots.

A batch-mean training loss is ``L = (1/N) Σ_n ℓ_n`` with ``ℓ_n = c · (−log p(y_n | f_n))`` for
the network's output ``f_n`` of ``D`` entries. The scale ``c`` follows torch's reductions
(:func:`loss_scale`): ``c = 1`` for ``cross_entropy``, and for ``bce_with_logits`` and ``mse``
``c = 1/D`` with ``reduction="mean"`` (torch's default, the mean over all ``N·D`` entries) and
``c = 1`` with ``"sum"`` or ``"batchmean"`` (summed over the outputs).

The output Hessians ``H_n = ∇²_f ℓ_n`` (the generalised Gauss–Newton's middle factor, and for
these losses also the Fisher's, ``E_ŷ[δ δᵀ]`` over sampled targets) are

- ``cross_entropy``: ``c (diag(p) − p pᵀ)`` with ``p = softmax(f)``;
- ``bce_with_logits``: ``c diag(p (1 − p))`` with ``p = σ(f)``;
- ``mse`` (``ℓ_n = c ‖f − y‖²``): ``2c I``.

:func:`output_hessian_sqrt` returns ``Q_n`` with ``Q_n Q_nᵀ = H_n`` without a factorisation;
for the softmax ``Q = √c (diag(√p) − p √pᵀ)``, which uses ``Σ p = 1``. The sampled Fisher of
the torch adapter (``curvlin.adapters.torch.sample_output_grad``) draws from the same
distributions with the same scales.

References
----------
Martens (2020), "New insights and perspectives on the natural gradient method", JMLR, §9;
Ren & Goldfarb (2019), arXiv:1906.02353 (the square root of the softmax Hessian);
``spec/tnt_mbf_smw_kfac.md`` §0 and §3.
"""

from __future__ import annotations

import math

from array_api_compat import device as _device

from ._validation import namespace_of
from .backends import Array

__all__ = ["LOSSES", "REDUCTIONS", "loss_scale", "output_hessian", "output_hessian_sqrt"]

#: The losses curvature methods know.
LOSSES = ("cross_entropy", "bce_with_logits", "mse")
#: How a training loss reduces over examples and outputs (see the module docstring).
REDUCTIONS = ("mean", "batchmean", "sum")


def loss_scale(loss: str, reduction: str, n_outputs: int, /) -> float:
    """``c`` of ``ℓ_n = c · (−log p(y_n | f_n))`` for a loss reduced as ``reduction``.

    Examples
    --------
    >>> from curvlin.losses import loss_scale
    >>> loss_scale("mse", "mean", 4), loss_scale("mse", "batchmean", 4)
    (0.25, 1.0)
    """
    if loss not in LOSSES:
        raise ValueError(f"loss_scale: loss must be one of {LOSSES}, got {loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss_scale: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    per_example = reduction != "mean" or loss == "cross_entropy"
    return 1.0 if per_example else 1.0 / n_outputs


def _checked(logits, loss, reduction, func):
    backend = namespace_of(("logits", logits), func=func)
    if logits.ndim != 2:
        raise ValueError(f"{func}: logits must have shape (N, D), got {tuple(logits.shape)}")
    if loss not in LOSSES:
        raise ValueError(f"{func}: loss must be one of {LOSSES}, got {loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{func}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return backend.xp, loss_scale(loss, reduction, logits.shape[1])


def _probs(xp, f, loss):
    if loss == "cross_entropy":
        e = xp.exp(f - xp.max(f, axis=1, keepdims=True))
        return e / xp.sum(e, axis=1, keepdims=True)
    return 1.0 / (1.0 + xp.exp(-f))


def output_hessian_sqrt(logits: Array, /, *, loss: str, reduction: str = "mean") -> Array:
    """``Q`` of shape (N, D, D) with ``Q_n Q_nᵀ = ∇²_f ℓ_n``, per example, in closed form.

    Parameters
    ----------
    logits : array, shape (N, D)
        The network's outputs (logits for the classification losses).
    loss : {"cross_entropy", "bce_with_logits", "mse"}
    reduction : {"mean", "batchmean", "sum"}
        How the training loss reduces (sets the scale ``c``, see the module docstring).

    Returns
    -------
    array, shape (N, D, D)
        Column ``a`` of ``Q_n`` is the ``a``-th output direction of example ``n``: the
        Gauss–Newton matrix is ``(1/N) Σ_n Σ_a (J_nᵀ q_na)(J_nᵀ q_na)ᵀ``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.losses import output_hessian, output_hessian_sqrt
    >>> f = np.array([[0.5, -1.0, 2.0]])
    >>> q = output_hessian_sqrt(f, loss="cross_entropy")
    >>> bool(np.allclose(q @ np.swapaxes(q, 1, 2), output_hessian(f, loss="cross_entropy")))
    True
    """
    xp, c = _checked(logits, loss, reduction, "output_hessian_sqrt")
    n, d = logits.shape
    eye = xp.eye(d, dtype=logits.dtype, device=_device(logits))
    if loss == "mse":
        return xp.broadcast_to(math.sqrt(2.0 * c) * eye, (n, d, d))
    p = _probs(xp, logits, loss)
    if loss == "bce_with_logits":
        return xp.sqrt(c * p * (1.0 - p))[:, :, None] * eye
    s = xp.sqrt(p)
    return math.sqrt(c) * (s[:, :, None] * eye - p[:, :, None] * s[:, None, :])


def output_hessian(logits: Array, /, *, loss: str, reduction: str = "mean") -> Array:
    """The output Hessians ``∇²_f ℓ_n``, shape (N, D, D) (for references and tests).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.losses import output_hessian
    >>> output_hessian(np.zeros((1, 2)), loss="bce_with_logits", reduction="sum")
    array([[[0.25, 0.  ],
            [0.  , 0.25]]])
    """
    xp, c = _checked(logits, loss, reduction, "output_hessian")
    n, d = logits.shape
    eye = xp.eye(d, dtype=logits.dtype, device=_device(logits))
    if loss == "mse":
        return xp.broadcast_to(2.0 * c * eye, (n, d, d))
    p = _probs(xp, logits, loss)
    if loss == "bce_with_logits":
        return (c * p * (1.0 - p))[:, :, None] * eye
    return c * (p[:, :, None] * eye - p[:, :, None] * p[:, None, :])
