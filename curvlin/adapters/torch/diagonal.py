"""The diagonal empirical Fisher for torch models: an optimizer front on the torch engine.

The mathematics is :class:`curvlin.blocks.DiagonalFisherBlock`; this module says which block
each layer gets and documents the options (the worked example of ``docs/engine.md``).
"""

from __future__ import annotations

import torch
from torch import nn

from ...blocks import DiagonalFisherBlock
from ._engine import BEHAVIOUR_DOC, COMMON_DOC, CurvatureOptimizer

__all__ = ["DiagonalFisher"]

_DIAGONAL_DOC = """
    decay : float
        EMA decay of the diagonal ``F``.
    loss_reduction : {"mean", "batchmean", "sum"}
        How the training loss reduces. Unless ``"sum"``, captured output gradients are
        scaled by the number of examples to make them per-example and ``F`` is the mean of
        the per-example squares; with ``"sum"``, their sum (the curvature of the summed loss).
"""


class DiagonalFisher(CurvatureOptimizer):
    """The diagonal of the empirical Fisher as a preconditioner, as a ``torch.optim.Optimizer``.

    Each supported layer (``nn.Linear``, ``nn.Conv2d`` and registered types) gets the
    direction ``Δ = ∇W̄ / (F + damping)``, elementwise, with ``F`` the EMA of the mean
    squared per-example gradient of ``W̄ = [W, b]`` (:class:`curvlin.blocks.DiagonalFisherBlock`;
    for convolutions and sequences, the row-wise approximation described there), then momentum.

    Parameters
    ----------
    model : nn.Module
        The model; hooks are registered on its supported layers.
    {common}{diagonal}
    Notes
    -----
    **Damping** ``λ`` bounds the step: for a batch's own gradient (one row per example, no
    EMA) every entry of ``Δ`` is at most ``1 / (2√λ)`` in magnitude. ``F`` is the empirical
    Fisher's, not ``√F`` as in Adagrad or Adam: the direction scales like ``1 / gradient``,
    so the step is scale-invariant but large where gradients are small (Kunstner et al., 2019).
    The front needs no closure; the statistics come from the ordinary ``loss.backward()``.
    {behaviour}
    References
    ----------
    Amari (1998), Neural Computation (natural gradient); Duchi, Hazan & Singer (2011), JMLR
    (Adagrad); Kunstner, Hennig & Balles (2019), NeurIPS (the empirical Fisher's limits);
    ``docs/engine.md``, "Adding a method".

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlin.adapters.torch import DiagonalFisher
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> opt = DiagonalFisher(model)
    >>> x = torch.randn(64, 4)
    >>> y = x.sum(dim=1, keepdim=True)
    >>> first = ((model(x) - y) ** 2).mean().item()
    >>> for _ in range(50):
    ...     opt.zero_grad()
    ...     loss = ((model(x) - y) ** 2).mean()
    ...     loss.backward()
    ...     opt.step()
    >>> bool(((model(x) - y) ** 2).mean() < first / 10)
    True
    """

    default_damping = 1e-2

    def __init__(self, model: nn.Module, lr: float = 0.3, damping: float = 1e-2,
                 momentum: float = 0.5, weight_decay: float = 0.0, *,
                 momentum_form: str = "gradient", kl_clip: float | None = None,
                 relative_kl_clip: float | None = None, adaptive_damping: bool = False,
                 adapt_every: int = 5, decay: float = 0.95,
                 loss_reduction: str = "mean", stats_every: int = 1, refresh_every: int = 1,
                 factor_dtype: torch.dtype | None = None, unsupported="error"):  # fmt: skip
        make_block, options = self.block_factory(decay=decay, loss_reduction=loss_reduction)
        super().__init__(model, make_block, owner="DiagonalFisher", lr=lr, damping=damping,
                         momentum=momentum, weight_decay=weight_decay, kl_clip=kl_clip,
                         relative_kl_clip=relative_kl_clip, momentum_form=momentum_form,
                         adaptive_damping=adaptive_damping,
                         adapt_every=adapt_every, unsupported=unsupported,
                         stats_every=stats_every, refresh_every=refresh_every,
                         factor_dtype=factor_dtype, **options)  # fmt: skip

    @staticmethod
    def block_factory(*, decay: float = 0.95, **engine_options):
        """The block of each layer, and the engine options left over (for the engine)."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"DiagonalFisher: decay must be in [0, 1), got {decay!r}")

        def make(name, h):
            return DiagonalFisherBlock(h.d_out, h.d_in, bias=h.bias is not None, decay=decay)

        return make, engine_options


DiagonalFisher.__doc__ = DiagonalFisher.__doc__.format(
    common=COMMON_DOC.strip() + "\n",
    diagonal=_DIAGONAL_DOC.strip("\n") + "\n",
    behaviour=BEHAVIOUR_DOC.strip() + "\n",
)
