"""KFAC for torch models: the optimizer front and the preconditioner front.

Both run :class:`curvlin.blocks.KFACBlock` on the torch engine (:mod:`._engine`); this module
only says which block each layer gets and documents the options.
"""

from __future__ import annotations

import torch
from torch import nn

from ...blocks import KFACBlock
from ._engine import BEHAVIOUR_DOC, COMMON_DOC, CurvatureOptimizer, Preconditioner

__all__ = ["KFAC", "KFACPreconditioner"]

_KFAC_DOC = """
    decay : float
        EMA decay of the Kronecker factors. KFAC's ``kl_clip`` defaults to ``1e-2`` (the
        other methods': None): see docs/kfac.md for the protocol these defaults come from.
    exact_damping : bool
        False: π-split damping ``(G + γ_G I)⁻¹ ⊗ (A + γ_A I)⁻¹``; True: ``(G ⊗ A + λI)⁻¹``.
    fisher : {"empirical", "mc"}
        ``"empirical"``: curvature from the gradients of the ordinary ``loss.backward()``
        (true labels), so a plain training loop works. ``"mc"``: the sampled Fisher, one label
        per example drawn from the model's prediction; call :meth:`backward_fisher` with the
        network output before ``loss.backward()`` on each step.
    loss : {"cross_entropy", "bce_with_logits", "mse"}, optional
        The training loss (needed by ``fisher="mc"`` to sample labels).
    loss_reduction : {"mean", "batchmean", "sum"}
        How the training loss reduces: torch's ``"mean"`` (over all elements), ``"batchmean"``
        (summed over outputs, averaged over the batch) or ``"sum"``. Unless ``"sum"``, captured
        output gradients are scaled by the number of examples to make them per-example
        (all forward passes since the last step count, so gradient accumulation works) and
        ``G`` is their mean; with ``"sum"``, ``G = Σ δδᵀ``, the curvature of the summed loss.
        The sampled Fisher also uses it to scale its draws (see :func:`sample_output_grad`).
    seed : int
        Seed of the label sampling of ``fisher="mc"``.
"""


class KFAC(CurvatureOptimizer):
    """Kronecker-factored approximate curvature (KFAC) as a ``torch.optim.Optimizer``.

    Each supported layer (``nn.Linear``, ``nn.Conv2d`` and registered types) gets the
    direction ``Δ = (G ⊗ A + damping)⁻¹ vec([∇W, ∇b])``
    (:class:`curvlin.blocks.KFACBlock`), then momentum.

    Parameters
    ----------
    model : nn.Module
        The model; hooks are registered on its supported layers.
    {common}{kfac}
    Notes
    -----
    The statistics are gathered from the forward and backward passes that precede
    :meth:`step`, only on statistics steps and only while the model is in training mode.
    {behaviour}
    References
    ----------
    Martens & Grosse (2015), ICML; Grosse & Martens (2016), ICML (convolutions).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlin.adapters.torch import KFAC
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> opt = KFAC(model, lr=0.3, damping=0.1)
    >>> x = torch.randn(64, 4)
    >>> y = x.sum(dim=1, keepdim=True)
    >>> first = ((model(x) - y) ** 2).mean().item()
    >>> for _ in range(40):
    ...     opt.zero_grad()
    ...     loss = ((model(x) - y) ** 2).mean()
    ...     loss.backward()
    ...     opt.step()
    >>> bool(((model(x) - y) ** 2).mean() < first / 10)
    True
    """

    default_damping = 1e-2

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        momentum_form: str = "gradient",
        kl_clip: float | None = 1e-2,
        relative_kl_clip: float | None = None,
        adaptive_damping: bool = False,
        adapt_every: int = 5,
        decay: float = 0.9,
        exact_damping: bool = False,
        fisher: str = "empirical",
        loss: str | None = None,
        loss_reduction: str = "mean",
        stats_every: int = 1,
        refresh_every: int = 1,
        check_every: int | None = None,
        factor_dtype: torch.dtype | None = None,
        unsupported="error",
        seed: int = 0,
    ):
        make_block, options = self.block_factory(
            decay=decay,
            exact_damping=exact_damping,
            fisher=fisher,
            loss=loss,
            loss_reduction=loss_reduction,
            stats_every=stats_every,
            refresh_every=refresh_every,
            check_every=check_every,
            factor_dtype=factor_dtype,
            seed=seed,
        )
        super().__init__(
            model,
            make_block,
            owner="KFAC",
            lr=lr,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            momentum_form=momentum_form,
            kl_clip=kl_clip,
            relative_kl_clip=relative_kl_clip,
            adaptive_damping=adaptive_damping,
            adapt_every=adapt_every,
            unsupported=unsupported,
            **options,
        )

    @staticmethod
    def block_factory(*, decay: float = 0.9, exact_damping: bool = False, **engine_options):
        """The block of each layer, and the engine options left over (for the engine)."""
        if not isinstance(exact_damping, bool):
            raise TypeError(f"KFAC: exact_damping must be a bool, got {exact_damping!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"KFAC: decay must be in [0, 1), got {decay!r}")

        def make(name, h):
            bias = h.bias is not None
            return KFACBlock(h.d_out, h.d_in, bias=bias, decay=decay, exact=exact_damping)

        return make, engine_options

    def curvature_operator(self, layer: str):
        """``G ⊗ A`` of one layer as a SciPy ``LinearOperator`` on ``vec([W, b])``."""
        block = self._curv.driver.blocks[self._layer(layer)]
        return block.curvature_operator(self.curvature(layer))

    def inverse_operator(self, layer: str):
        """One layer's damped inverse as a SciPy ``LinearOperator`` on ``vec([W, b])``."""
        block = self._curv.driver.blocks[self._layer(layer)]
        return block.inverse_operator(self.curvature(layer))


class KFACPreconditioner(Preconditioner):
    """KFAC in front of any torch optimizer: :meth:`step` rewrites ``.grad`` in place.

    ``KFACPreconditioner(model, damping, **options)`` is
    ``Preconditioner(model, KFAC, damping, **options)`` (see :class:`Preconditioner` for the
    loop); ``options`` are :class:`KFAC`'s ``decay``, ``exact_damping``, ``fisher``,
    ``loss``, ``loss_reduction``, ``stats_every``, ``refresh_every``, ``factor_dtype`` and
    ``seed``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlin.adapters.torch import KFACPreconditioner
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> precond = KFACPreconditioner(model, damping=1e-2)
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> opt.zero_grad()
    >>> ((model(x) - y) ** 2).mean().backward()
    >>> if precond.step():  # gradients are now KFAC directions; False: skip this step
    ...     opt.step()
    """

    def __init__(self, model: nn.Module, damping: float = KFAC.default_damping, **options):
        super().__init__(model, KFAC, damping, **options)

    def curvature_operator(self, layer: str):
        """As :meth:`KFAC.curvature_operator`."""
        return self._curv.driver.blocks[layer].curvature_operator(self.curvature(layer))

    def inverse_operator(self, layer: str):
        """As :meth:`KFAC.inverse_operator`."""
        return self._curv.driver.blocks[layer].inverse_operator(self.curvature(layer))


KFAC.__doc__ = KFAC.__doc__.format(
    common=COMMON_DOC.strip() + "\n",
    kfac=_KFAC_DOC.strip("\n") + "\n",
    behaviour=BEHAVIOUR_DOC.strip() + "\n",
)
