"""TNT and Shampoo for torch: optimizer fronts whose units are single parameters.

The mathematics is :class:`curvlin.blocks.TNTBlock` and :class:`curvlin.blocks.ShampooBlock`;
the engine runs them with ``units="parameters"`` (every trainable tensor its own block, fed its
gradient; no hooks), so every parameter of any shape is supported: biases, norm scales,
embeddings, attention projections, convolution kernels.
"""

from __future__ import annotations

import torch

from ...blocks import CONV_RESHAPES, GRAFTS, ShampooBlock, TNTBlock, tensor_modes
from ._engine import BEHAVIOUR_DOC, COMMON_DOC, CurvatureOptimizer

__all__ = ["TNT", "Shampoo"]

#: The options every front shares, without ``unsupported`` (every parameter is supported).
_COMMON = COMMON_DOC.split("    unsupported :")[0].strip() + "\n"

_TENSOR_DOC = """
    conv : {"filter", "kfac", "none"}
        How a 4-D convolution kernel ``(c_out, c_in, k_h, k_w)`` is seen: three modes
        ``(c_out, c_in, k_h·k_w)``, two ``(c_out, c_in·k_h·k_w)``, or its four axes.
    max_dim : int or None
        Modes larger than this keep only the diagonal of their factor (an embedding's
        vocabulary axis), so no ``d × d`` matrix is formed for them; None: no limit.
"""

_TNT_DOC = """
    decay : float
        EMA decay of the mode covariances.
    fisher : {"mc", "empirical"}
        ``"mc"`` (TNT): statistics from the gradient at labels sampled from the model, one
        extra backward per statistics step through :meth:`backward_fisher`; ``"empirical"``:
        from the ordinary gradient.
    loss : {"cross_entropy", "bce_with_logits", "mse"}
        The training loss, for sampling (needed with ``fisher="mc"``).
    loss_reduction : {"mean", "batchmean", "sum"}
        How the loss reduces (the sampled gradient is that of the same reduction).
    seed : int
        Seed of the sampling generator (saved in the ``state_dict``).
"""

_SHAMPOO_DOC = """
    decay : float or None
        EMA decay of the factors ``H_i``; None sums them (the paper's accumulation).
    graft : {None, "sgd", "adam"}
        Rescale each parameter's direction to the norm of the momentum gradient (``"sgd"``)
        or of an Adam step on it (``"adam"``, second-moment decay 0.999, ``ε = 1e-8``;
        needs ``stats_every=1``, as the second moment is folded with the statistics).
    relative_damping : bool
        ``damping`` times each factor's mean eigenvalue ``tr(H_i)/d_i`` is added to ``H_i``
        (the default: the direction is then invariant to the scale of the loss), or
        ``damping`` itself.
"""


def _check_conv(owner: str, conv) -> None:
    if conv not in CONV_RESHAPES:
        raise ValueError(f"{owner}: conv must be one of {CONV_RESHAPES}, got {conv!r}")


class TNT(CurvatureOptimizer):
    """Tensor-normal training as a ``torch.optim.Optimizer``: one Kronecker-factored Fisher
    block per parameter tensor, of any shape.

    Each parameter ``W`` of shape ``(d_1, …, d_k)`` gets ``Δ = (⊗(U_i + εI))⁻¹ vec(M)``:
    ``U_i`` are the trace-normalised EMAs of the mode covariances ``G̃_(i) G̃_(i)ᵀ`` of the
    gradient ``G̃`` of the batch-mean loss at sampled labels (:class:`curvlin.blocks.TNTBlock`),
    ``ε = damping`` on every mode, ``M`` the momentum of the true gradient.

    Parameters
    ----------
    params : nn.Module, or iterable of parameters, ``(name, parameter)`` pairs or dicts
        What ``torch.optim`` optimizers take (parameter groups may set ``lr``, ``damping``,
        ``momentum``, ``weight_decay``), or a model (its trainable parameters, by name).
    {common}{tnt}{tensor}
    Notes
    -----
    The loop calls :meth:`backward_fisher` on the model's output before ``loss.backward()``
    (a no-op on steps without statistics); no hook is registered. The default step bound,
    ``relative_kl_clip=1e-2``, reads the loss ``opt.step(closure)`` returns; a plain
    ``opt.step()`` loop runs without it (silently, unless you set the value yourself). The
    statistics are ``N · G̃_(i) G̃_(i)ᵀ`` for a batch of ``N`` (``N`` = 1 for a summed loss),
    so ``⊗U_i`` estimates the mean per-example Fisher, the scale of KFAC's factors; the paper's
    ``G̃_(i) G̃_(i)ᵀ`` puts the batch size into ``damping`` and ``lr``. With
    ``fisher="empirical"`` the engine does not know ``N`` and the statistics are the
    paper's. Cost per parameter: memory ``2 Σ d_i²``; statistics
    ``Σ P d_i`` flops and one extra backward per statistics step; refresh ``Σ d_i³``; the
    direction ``Σ P d_i`` per step (``P = ∏ d_i``).
    {behaviour}
    References
    ----------
    Ren & Goldfarb (2021), "Tensor normal training for deep learning models", NeurIPS;
    ``docs/tnt_shampoo.md``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from torch.nn import functional as F
    >>> from curvlin.adapters.torch import TNT
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1))
    >>> opt = TNT(model, loss="mse")
    >>> x = torch.randn(64, 4)
    >>> y = x.sum(dim=1, keepdim=True)
    >>> first = F.mse_loss(model(x), y).item()
    >>> for _ in range(30):
    ...     opt.zero_grad()
    ...     out = model(x)
    ...     opt.backward_fisher(out)
    ...     F.mse_loss(out, y).backward()
    ...     opt.step()
    >>> bool(F.mse_loss(model(x), y) < first / 10)
    True
    """

    default_damping = 0.1
    #: The default loss-relative step bound (``docs/benchmarks.md``, "Fitting one batch"): it
    #: keeps TNT bounded once a batch is fitted and costs nothing on the digits protocol.
    default_relative_kl_clip = 1e-2

    def __init__(self, params, lr: float = 0.01, damping: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, momentum_form: str = "gradient",
                 kl_clip: float | None = None,
                 relative_kl_clip: float | None = default_relative_kl_clip,
                 adaptive_damping: bool = False, adapt_every: int = 5, decay: float = 0.8,
                 fisher: str = "mc",
                 loss: str | None = None, loss_reduction: str = "mean", conv: str = "filter",
                 max_dim: int | None = 4096, stats_every: int = 1, refresh_every: int = 1,
                 factor_dtype: torch.dtype | None = None, seed: int = 0):  # fmt: skip
        make_block, options = self.block_factory(
            decay=decay, fisher=fisher, conv=conv, max_dim=max_dim, loss=loss,
            loss_reduction=loss_reduction, seed=seed,
        )  # fmt: skip
        super().__init__(params, make_block, owner="TNT", lr=lr, damping=damping,
                         momentum=momentum, weight_decay=weight_decay, kl_clip=kl_clip,
                         relative_kl_clip=relative_kl_clip, momentum_form=momentum_form,
                         adaptive_damping=adaptive_damping,
                         adapt_every=adapt_every, stats_every=stats_every,
                         refresh_every=refresh_every, factor_dtype=factor_dtype,
                         **options)  # fmt: skip

    @staticmethod
    def block_factory(*, decay: float = 0.8, fisher: str = "mc", conv: str = "filter",
                      max_dim: int | None = 4096, **engine_options):  # fmt: skip
        """The block of each parameter, and the engine options left over (for the engine)."""
        _check_conv("TNT", conv)
        TNTBlock((1,), decay=decay, max_dim=max_dim)  # validates decay and max_dim

        def make(name, h):
            shape = tuple(h.weight.shape)
            modes = tensor_modes(shape, conv=conv)
            return TNTBlock(shape, modes, decay=decay, max_dim=max_dim,
                            empirical=fisher == "empirical")  # fmt: skip

        return make, {"units": "parameters", "fisher": fisher, **engine_options}


class Shampoo(CurvatureOptimizer):
    """Shampoo as a ``torch.optim.Optimizer``: one Kronecker-factored AdaGrad-like
    preconditioner per parameter tensor, of any shape.

    Each parameter ``W`` of shape ``(d_1, …, d_k)`` gets
    ``Δ = M ×_1 (H_1 + ε_1 I)^(-1/(2k)) … ×_k (H_k + ε_k I)^(-1/(2k))``, with ``H_i`` the EMA
    (or sum) of the mode covariances ``G_(i) G_(i)ᵀ`` of the ordinary gradient
    (:class:`curvlin.blocks.ShampooBlock`), ``ε_i = damping · tr(H_i)/d_i``, ``M`` the
    momentum, optionally grafted to the step norm of SGD or Adam.

    Parameters
    ----------
    params : nn.Module, or iterable of parameters, ``(name, parameter)`` pairs or dicts
        As in :class:`TNT`.
    {common}{shampoo}{tensor}
    Notes
    -----
    No hook and no extra backward: the statistics are the gradient's own, so the plain
    ``loss.backward(); opt.step()`` loop works. ``adaptive_damping=True`` is refused: the
    roots are no inverse curvature, so the Levenberg–Marquardt ratio has no model to test.
    The roots are eigendecompositions at every refresh (``refresh_every``), ``Σ d_i³`` flops
    per parameter; the direction costs ``Σ P d_i`` per step; memory ``2 Σ d_i²``.
    {behaviour}
    References
    ----------
    Gupta, Koren & Singer (2018), "Shampoo: preconditioned stochastic tensor optimization",
    ICML; Agarwal et al. (2020), "Disentangling adaptive gradient methods from learning
    rates" (grafting); ``docs/tnt_shampoo.md``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from torch.nn import functional as F
    >>> from curvlin.adapters.torch import Shampoo
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> opt = Shampoo(model.parameters())
    >>> x = torch.randn(64, 4)
    >>> y = x.sum(dim=1, keepdim=True)
    >>> first = F.mse_loss(model(x), y).item()
    >>> for _ in range(30):
    ...     opt.zero_grad()
    ...     F.mse_loss(model(x), y).backward()
    ...     opt.step()
    >>> bool(F.mse_loss(model(x), y) < first / 10)
    True
    """

    default_damping = 1e-3

    def __init__(self, params, lr: float = 0.01, damping: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, momentum_form: str = "gradient",
                 kl_clip: float | None = None, relative_kl_clip: float | None = None,
                 adaptive_damping: bool = False, adapt_every: int = 5,
                 decay: float | None = 0.99, graft: str | None = None,
                 relative_damping: bool = True, conv: str = "filter",
                 max_dim: int | None = 4096, stats_every: int = 1, refresh_every: int = 1,
                 factor_dtype: torch.dtype | None = None):  # fmt: skip
        if adaptive_damping:
            raise ValueError(
                "Shampoo: adaptive_damping needs a preconditioner that is a damped inverse "
                "curvature (its quadratic model predicts the loss change); Shampoo's inverse "
                "roots are not one"
            )
        make_block, options = self.block_factory(
            decay=decay, graft=graft, relative_damping=relative_damping, conv=conv,
            max_dim=max_dim, stats_every=stats_every,
        )  # fmt: skip
        super().__init__(params, make_block, owner="Shampoo", lr=lr, damping=damping,
                         momentum=momentum, weight_decay=weight_decay, kl_clip=kl_clip,
                         relative_kl_clip=relative_kl_clip, momentum_form=momentum_form,
                         adaptive_damping=adaptive_damping,
                         adapt_every=adapt_every, refresh_every=refresh_every,
                         factor_dtype=factor_dtype, **options)  # fmt: skip

    @staticmethod
    def block_factory(*, decay: float | None = 0.99, graft: str | None = None,
                      relative_damping: bool = True, conv: str = "filter",
                      max_dim: int | None = 4096, **engine_options):  # fmt: skip
        """The block of each parameter, and the engine options left over (for the engine)."""
        _check_conv("Shampoo", conv)
        if graft not in GRAFTS:
            raise ValueError(f"Shampoo: graft must be one of {GRAFTS}, got {graft!r}")
        stats_every = engine_options.get("stats_every", 1)
        if graft == "adam" and stats_every != 1:
            # Adam's second moment is folded on statistics steps only: a stale one divides
            # later gradients by ~1e-8 wherever every gradient it saw was zero (a dead unit
            # coming back), and one such step wrecks the model.
            raise ValueError(
                f"Shampoo: graft='adam' needs stats_every=1 (got {stats_every!r}): its "
                "second moment is a statistic, folded only on statistics steps; use "
                "graft='sgd' or None to amortise the statistics"
            )
        options = {"decay": decay, "max_dim": max_dim, "graft": graft,
                   "relative_damping": relative_damping}  # fmt: skip
        ShampooBlock((1,), **options)  # validates them

        def make(name, h):
            shape = tuple(h.weight.shape)
            return ShampooBlock(shape, tensor_modes(shape, conv=conv), **options)

        return make, {"units": "parameters", **engine_options}


_BEHAVIOUR = (
    BEHAVIOUR_DOC.strip()
    + "\n\n    Every trainable parameter is its own unit, so nothing is unsupported, a shared "
    "weight is\n    one parameter, and no layer needs to be called as a module.\n"
)
TNT.__doc__ = TNT.__doc__.format(
    common=_COMMON,
    tnt=_TNT_DOC.strip("\n") + "\n",
    tensor=_TENSOR_DOC.strip("\n") + "\n",
    behaviour=_BEHAVIOUR,
)
Shampoo.__doc__ = Shampoo.__doc__.format(
    common=_COMMON,
    shampoo=_SHAMPOO_DOC.strip("\n") + "\n",
    tensor=_TENSOR_DOC.strip("\n") + "\n",
    behaviour=_BEHAVIOUR,
)
