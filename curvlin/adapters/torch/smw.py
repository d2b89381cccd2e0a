"""SMW-NG and SMW-GN for torch models: subsampled natural gradient and Gauss–Newton fronts.

Both run :class:`curvlin.blocks.LinearKernelBlock` on every supported layer; the engine
preconditions all layers together in one Woodbury solve (:func:`curvlin.blocks.kernel_solve`,
``Block.coupled``). This module says which block each layer gets, where the output gradients
come from (``fisher``), and folds the L2 term into the damping.
"""

from __future__ import annotations

from torch import nn

from ...blocks import LinearKernelBlock
from ._engine import BEHAVIOUR_DOC, COMMON_DOC, CurvatureOptimizer

__all__ = ["SMWGN", "SMWNG"]

_SMW_DOC = """
    subsample : int, optional
        ``m``: the curvature uses the first ``m`` examples of each batch (shuffle the data),
        the gradient the whole batch; None: every example. The solve is ``m × m`` for SMW-NG
        and ``m·k × m·k`` for SMW-GN with ``k`` network outputs. Hand
        :meth:`backward_fisher` a forward pass of the subsample alone,
        ``model(x[:subsample])``, and its output directions are backpropagated through the
        ``m`` examples in one batched backward, instead of one backward per direction
        through the whole batch's graph (the same step; what SMW-GN with many outputs, or
        the sampled Fisher of a small subsample, should do).
    loss : {"cross_entropy", "bce_with_logits", "mse"}
        The training loss: where the sampled labels come from, or whose output Hessian the
        Gauss–Newton matrix uses.
    loss_reduction : {"mean", "batchmean"}
        How the training loss reduces: torch's ``"mean"`` (over all elements) or
        ``"batchmean"`` (summed over outputs, averaged over the batch).
    seed : int
        Seed of the label sampling (``fisher="mc"``).
"""

#: The engine options the SMW fronts take (statistics and the solve happen on every step).
_TAKEN = ("lr", "damping", "momentum", "weight_decay", "momentum_form", "kl_clip",
          "relative_kl_clip", "adaptive_damping", "adapt_every", "unsupported")  # fmt: skip


def _entries(doc: str, names) -> str:
    """The numpydoc entries of ``names`` in a parameter list (4-space names, deeper text)."""
    out, keep = [], False
    for line in doc.strip("\n").splitlines():
        if line.startswith("    ") and not line.startswith("     "):
            keep = line.split(":")[0].strip() in names
        if keep:
            out.append(line)
    return "\n".join(out).strip() + "\n"


class _SMW(CurvatureOptimizer):
    """What SMW-NG and SMW-GN share: the block, the L2 fold, fixed per-step statistics."""

    default_damping = 0.1
    _fisher_choices: tuple[str, ...] = ()
    #: Labels drawn per example for ``fisher="mc"`` when ``fisher_samples`` is not given.
    default_fisher_samples = 1

    def __init__(self, model: nn.Module, lr, damping, momentum, weight_decay, *, owner, fisher,
                 loss, loss_reduction, subsample, momentum_form, kl_clip, relative_kl_clip,
                 adaptive_damping, adapt_every, unsupported, seed,
                 fisher_samples=None):  # fmt: skip
        make_block, options = self.block_factory(
            fisher=fisher, loss=loss, loss_reduction=loss_reduction, subsample=subsample,
            seed=seed, fisher_samples=fisher_samples,
        )  # fmt: skip
        super().__init__(model, make_block, owner=owner, lr=lr, damping=damping,
                         momentum=momentum, weight_decay=weight_decay,
                         momentum_form=momentum_form, kl_clip=kl_clip,
                         relative_kl_clip=relative_kl_clip,
                         adaptive_damping=adaptive_damping, adapt_every=adapt_every,
                         unsupported=unsupported, **options)  # fmt: skip

    @classmethod
    def block_factory(cls, *, fisher=None, fisher_samples=None, loss=None, loss_reduction="mean",
                      **engine_options):  # fmt: skip
        """The block of each layer, and the engine options (for the engine)."""
        fisher = cls._fisher_choices[0] if fisher is None else fisher
        if fisher_samples is None:
            fisher_samples = cls.default_fisher_samples if fisher == "mc" else 1
        if fisher not in cls._fisher_choices:
            raise ValueError(
                f"{cls.__name__}: fisher must be one of {cls._fisher_choices}, got {fisher!r}"
            )
        if loss_reduction == "sum":
            raise ValueError(
                f"{cls.__name__}: loss_reduction must be 'mean' or 'batchmean' (the curvature "
                "is a mean over the subsample)"
            )

        def make(name, h):
            return LinearKernelBlock(h.d_out, h.d_in, bias=h.bias is not None)

        return make, {"fisher": fisher, "fisher_samples": fisher_samples, "loss": loss,
                      "loss_reduction": loss_reduction, **engine_options}  # fmt: skip

    @staticmethod
    def curvature_damping(group) -> float:
        """``λ + τ``: the L2 term ``τ/2 ‖θ‖²`` has the exact curvature ``τI``."""
        return group["damping"] + group["weight_decay"]


class SMWNG(_SMW):
    """Subsampled natural gradient through the Sherman–Morrison–Woodbury identity (SMW-NG).

    All supported layers (``nn.Linear``, ``nn.Conv2d`` and registered types) are
    preconditioned together by the subsampled Fisher of the whole network,

    ``Δ = (F + (λ + τ) I)⁻¹ M``,   ``F = (1/m) Σ_n u_n u_nᵀ``,

    with ``u_n`` example ``n``'s gradient of every parameter (at a sampled label, or the true
    one for the empirical Fisher) over the ``m`` examples of the curvature subsample, ``M`` the
    momentum of the gradient with L2 (``τ = weight_decay``, whose curvature ``τI`` is exact and
    so joins the damping). The ``P × P`` solve is one ``m × m`` Cholesky solve
    (:func:`curvlin.woodbury_coefficients`); the ``u_n`` are never formed
    (:class:`curvlin.woodbury.LinearTerms`). Every step uses the current batch's curvature.

    Parameters
    ----------
    model : nn.Module
        The model; hooks are registered on its supported layers.
    {common}
    fisher : {{"mc", "empirical"}}
        ``"mc"``: the sampled Fisher (labels drawn from the model's prediction, as in Ren &
        Goldfarb; needs ``loss``, and :meth:`backward_fisher` called with the network output
        before ``loss.backward()`` on each step). ``"empirical"``: the true labels' gradients
        of the ordinary ``loss.backward()`` (a plain loop works; ASDL's variant).
    fisher_samples : int, optional
        Labels drawn per example for ``fisher="mc"`` (default 4; Ren & Goldfarb draw one):
        the Fisher is the mean over the draws (``m·fisher_samples`` columns of ``U`` and
        rows of the kernel), an estimate of the exact Fisher that improves with the number
        of draws, for ``fisher_samples`` backward passes (batched over the whole batch, or
        one at a time with a ``subsample``). At ``m·fisher_samples`` rows it costs what
        :class:`SMWGN` with ``m·fisher_samples/k`` examples does.
    {smw}
    Notes
    -----
    **Defaults** come from the digits-autoencoder grid (docs page ``smw``): the sampled
    Fisher with four labels per example, heavy-ball momentum 0.5 after the preconditioner
    (``momentum_form="direction"``, unlike the engine's default: the ``"gradient"`` form
    applies the current batch's curvature to earlier gradients, which lie off its span and
    are scaled by ``1/(λ + τ)``), and ``kl_clip=0.01``, which keeps the fit of one batch
    bounded (without it the loss of a small CNN fitting one batch rises a million-fold).
    ``adaptive_damping`` needs ``momentum_form="gradient"``.

    **Cost** per step: the sampled Fisher's ``fisher_samples`` extra backward passes, the
    kernels ``O(r² Σ_l (d_in + d_out))`` for Linear layers with ``r = m·fisher_samples``
    rows (``m`` for the empirical Fisher), one ``O(r³)`` Cholesky and two products with
    each layer's rows; memory ``O(r Σ_l (d_in + d_out) + r²)``. It beats a Kronecker
    method when the layers are wide and ``r`` small (``P ≫ r``); see the docs page ``smw``.
    The solve looks once at the host (the Cholesky's success flag).
    {behaviour}
    References
    ----------
    Ren & Goldfarb (2019), "Efficient subsampled Gauss–Newton and natural gradient methods for
    training neural networks", arXiv:1906.02353.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from torch.nn import functional as F
    >>> from curvlin.adapters.torch import SMWNG
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> opt = SMWNG(model, lr=1.0, damping=0.1, momentum=0.0, loss="mse", kl_clip=None)
    >>> x = torch.randn(64, 4)
    >>> y = x.sum(dim=1, keepdim=True)
    >>> def closure():
    ...     opt.zero_grad()
    ...     out = model(x)
    ...     opt.backward_fisher(out)  # the sampled Fisher's labels
    ...     loss = F.mse_loss(out, y)
    ...     loss.backward()
    ...     return loss
    >>> first = closure().item()
    >>> for _ in range(30):
    ...     loss = opt.step(closure)
    >>> bool(F.mse_loss(model(x), y) < first / 100)
    True
    """

    _fisher_choices = ("mc", "empirical")
    default_fisher_samples = 4

    default_damping = 0.05

    def __init__(self, model: nn.Module, lr: float = 0.1, damping: float = 0.05,
                 momentum: float = 0.5, weight_decay: float = 0.0, *,
                 fisher: str = "mc", fisher_samples: int | None = None,
                 loss: str | None = None,
                 loss_reduction: str = "mean", subsample: int | None = None,
                 momentum_form: str = "direction",
                 kl_clip: float | None = 0.01, relative_kl_clip: float | None = None,
                 adaptive_damping: bool = False, adapt_every: int = 1, unsupported="error",
                 seed: int = 0):  # fmt: skip
        super().__init__(model, lr, damping, momentum, weight_decay, owner="SMWNG",
                         fisher=fisher, loss=loss, loss_reduction=loss_reduction,
                         subsample=subsample, momentum_form=momentum_form, kl_clip=kl_clip,
                         relative_kl_clip=relative_kl_clip,
                         adaptive_damping=adaptive_damping, adapt_every=adapt_every,
                         unsupported=unsupported, seed=seed,
                         fisher_samples=fisher_samples)  # fmt: skip


class SMWGN(_SMW):
    """Subsampled Gauss–Newton through the Sherman–Morrison–Woodbury identity (SMW-GN).

    As :class:`SMWNG` with the exact (generalised) Gauss–Newton matrix of the subsample in
    place of the Fisher,

    ``Δ = (B + (λ + τ) I)⁻¹ M``,   ``B = (1/m) Σ_n J_nᵀ H_n J_n = (1/m) Σ_n Σ_a u_na u_naᵀ``,

    with ``J_n`` the Jacobian of example ``n``'s ``k`` outputs, ``H_n = Q_n Q_nᵀ`` the loss's
    output Hessian (:func:`curvlin.output_hessian_sqrt`, closed form) and ``u_na = J_nᵀ q_na``.
    :meth:`backward_fisher` (call it with the network output before ``loss.backward()``, or
    with the output of a forward pass of the subsample alone) backpropagates the ``k``
    columns of ``Q`` in one batched backward; the solve is
    ``m·k × m·k``, sample-major. For these losses ``B`` is also the exact Fisher.

    Parameters
    ----------
    model : nn.Module
        The model; hooks are registered on its supported layers.
    {common}
    {smw}
    Notes
    -----
    **Defaults** are the best of the digits-autoencoder grid (docs page ``smw``), at
    ``subsample`` 32 and 64 of 256 examples: heavy-ball momentum 0.5 after the
    preconditioner, and ``kl_clip=0.01``, which keeps the neighbouring smaller dampings
    finite (at ``damping=0.03`` the unclipped run diverges). Off the subsample's span the
    step is ``lr·g/λ``.

    **Cost** per step: ``k`` extra backward passes (batched), kernels of size ``m·k`` and an
    ``O((m k)³)`` Cholesky. Use it for few outputs (classifiers); for wide outputs (an
    autoencoder's pixels) the kernel grows with ``k²`` and :class:`SMWNG` is the method.
    {behaviour}
    References
    ----------
    Ren & Goldfarb (2019), arXiv:1906.02353; Schraudolph (2002), "Fast curvature matrix-vector
    products for second-order gradient descent" (the generalised Gauss–Newton matrix).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from torch.nn import functional as F
    >>> from curvlin.adapters.torch import SMWGN
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> opt = SMWGN(model, lr=1.0, damping=0.01, loss="mse")
    >>> x = torch.randn(64, 4)
    >>> y = x.sum(dim=1, keepdim=True)
    >>> def closure():
    ...     opt.zero_grad()
    ...     out = model(x)
    ...     opt.backward_fisher(out)  # the output-Hessian directions
    ...     loss = F.mse_loss(out, y)
    ...     loss.backward()
    ...     return loss
    >>> first = closure().item()
    >>> for _ in range(30):
    ...     loss = opt.step(closure)
    >>> bool(F.mse_loss(model(x), y) < first / 1000)  # Gauss–Newton steps
    True
    """

    _fisher_choices = ("ggn",)

    default_damping = 0.05

    def __init__(self, model: nn.Module, lr: float = 0.1, damping: float = 0.05,
                 momentum: float = 0.5, weight_decay: float = 0.0, *,
                 loss: str | None = None, loss_reduction: str = "mean",
                 subsample: int | None = None, momentum_form: str = "direction",
                 kl_clip: float | None = 0.01, relative_kl_clip: float | None = None,
                 adaptive_damping: bool = False, adapt_every: int = 1, unsupported="error",
                 seed: int = 0):  # fmt: skip
        super().__init__(model, lr, damping, momentum, weight_decay, owner="SMWGN",
                         fisher="ggn", loss=loss, loss_reduction=loss_reduction,
                         subsample=subsample, momentum_form=momentum_form, kl_clip=kl_clip,
                         relative_kl_clip=relative_kl_clip,
                         adaptive_damping=adaptive_damping, adapt_every=adapt_every,
                         unsupported=unsupported, seed=seed)  # fmt: skip


for _cls in (SMWNG, SMWGN):
    _cls.__doc__ = _cls.__doc__.format(
        common=_entries(COMMON_DOC, _TAKEN),
        smw=_SMW_DOC.strip("\n") + "\n",
        behaviour=BEHAVIOUR_DOC.strip() + "\n",
    )
