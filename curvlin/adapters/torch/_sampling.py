"""Seeded sampling of per-example output gradients for the Monte Carlo (sampled) Fisher.

For a batch-mean loss ``L = (1/N) Σ_n ℓ_n`` with ``ℓ_n = c · (−log p(y_n | f_n))``, the sampled
Fisher draws ``ŷ_n ~ p(· | f_n)`` and uses ``δ_n = √c · ∇_f(−log p(ŷ_n | f_n))``, so that
``E[δ_n δ_nᵀ]`` is the output Hessian of ``ℓ_n`` (the generalised Gauss–Newton's). The scale
``c`` follows torch's reductions:

- ``cross_entropy`` (logits of shape (N, C)): ``c = 1``; ``ŷ ~ softmax(f)``;
  ``δ = softmax(f) − onehot(ŷ)``.
- ``bce_with_logits``: ``ŷ ~ Bernoulli(σ(f))``, ``δ = √c (σ(f) − ŷ)``.
- ``mse``: ``ℓ_n = c‖f − y‖²`` is a unit-variance Gaussian's NLL times ``2c``, so
  ``ŷ = f + ε``, ``δ = √(2c) · ε`` up to sign.

For the last two, ``c = 1/D`` with ``reduction="mean"`` (torch's default: the mean over all
``N·D`` elements) and ``c = 1`` with ``"sum"`` or ``"batchmean"`` (summed over the ``D``
outputs, averaged over the batch, the convention of the second-order literature). The scales
and the exact output Hessians these draws estimate live in :mod:`curvlin.losses`.

References
----------
Martens & Grosse (2015), §5 (sampling targets from the model's predictive distribution);
``spec/tnt_mbf_smw_kfac.md`` §0.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ...losses import LOSSES, REDUCTIONS, loss_scale

__all__ = ["LOSSES", "REDUCTIONS", "sample_output_grad"]


def sample_output_grad(
    output: torch.Tensor,
    /,
    *,
    loss: str,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-example output gradients ``δ`` at sampled targets, shaped like ``output``.

    Parameters
    ----------
    output : Tensor, shape (N, D)
        The network's output (logits for the classification losses).
    loss : {"cross_entropy", "bce_with_logits", "mse"}
        The training loss the Fisher belongs to.
    reduction : {"mean", "batchmean", "sum"}
        How the training loss reduces: torch's ``"mean"`` (over all elements) or ``"sum"``, or
        ``"batchmean"`` (sum over outputs, mean over the batch).
    generator : torch.Generator, optional
        The source of randomness, on ``output``'s device, for reproducible draws.

    Examples
    --------
    >>> import torch
    >>> from curvlin.adapters.torch import sample_output_grad
    >>> g = torch.Generator().manual_seed(0)
    >>> d = sample_output_grad(torch.zeros(4, 3), loss="cross_entropy", generator=g)
    >>> d.shape, bool(torch.allclose(d.sum(dim=1), torch.zeros(4), atol=1e-6))
    (torch.Size([4, 3]), True)
    """
    if loss not in LOSSES:
        raise ValueError(f"sample_output_grad: loss must be one of {LOSSES}, got {loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"sample_output_grad: reduction must be one of {REDUCTIONS}, got {reduction!r}"
        )
    if output.ndim != 2:
        raise ValueError(
            f"sample_output_grad: output must have shape (N, D), got {tuple(output.shape)}"
        )
    f = output.detach()
    c = loss_scale(loss, reduction, f.shape[1])
    if loss == "cross_entropy":
        probs = F.softmax(f.float(), dim=1)
        # Inverse-CDF draws: NaN logits give NaN δ (and a skipped step), never an exception.
        u = torch.rand((f.shape[0], 1), generator=generator, device=f.device)
        labels = (torch.cumsum(probs, dim=1) < u).sum(dim=1).clamp_(max=f.shape[1] - 1)
        return (probs - F.one_hot(labels, f.shape[1]).to(probs.dtype)).to(f.dtype)
    if loss == "bce_with_logits":
        probs = torch.sigmoid(f.float())
        u = torch.rand(probs.shape, generator=generator, device=f.device)
        delta = probs.sub_(u.lt_(probs))  # p − 1[u < p], in place: no batch-sized temporaries
        return (delta if c == 1.0 else delta.mul_(math.sqrt(c))).to(f.dtype)
    noise = torch.randn(f.shape, generator=generator, device=f.device, dtype=torch.float32)
    return (math.sqrt(2.0 * c) * noise).to(f.dtype)
