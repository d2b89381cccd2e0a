"""K-BFGS and K-BFGS(L) for torch models: optimizer fronts on the torch engine.

The curvature mathematics lives in :class:`curvlin.blocks.KBFGSBlock`; the engine
(:mod:`._engine`) runs the closure twice on statistics steps and hands the blocks both passes.
"""

from __future__ import annotations

import torch
from torch import nn

from ...blocks import KBFGSBlock
from ._engine import BEHAVIOUR_DOC, COMMON_DOC, CurvatureOptimizer
from ._layers import Conv2dHandler

__all__ = ["KBFGS", "KBFGSL"]

_VARIANTS = (None, "convex", "additive")

_KBFGS_DOC = """
    variant : {None, "convex", "additive"}
        The Levenberg–Marquardt step of the double damping; None picks ``"convex"`` (DD-v1)
        for linear layers and ``"additive"`` (DD-v2) for convolutions. Use ``"additive"`` when
        ``damping >= 1``.
    mu1 : float
        Powell threshold of the double damping.
    a_decay, pair_decay : float
        EMA decays of ``A`` and of the pair ``(s, y)``.
    skip_threshold : float
        ``c`` of the skip rule ``s̃ᵀỹ <= c·‖ḡ‖·s̃ᵀs̃``.
"""

_NOTES_DOC = """
    **Damping.** ``λ > 0``: the input side inverts ``A + √λ I`` and the double damping of the
    output-side pairs uses ``μ2 = √λ``. Assumes per-example pre-activation gradients of a
    batch-mean loss (K-BFGS's convention). **Statistics steps** (every ``stats_every``
    steps, always the first, which warm-starts ``H_a``) run the second pass and the ``H_g``,
    ``H_a`` and ``A`` updates; the other steps call the closure once and precondition with
    the current factors.

    **The closure drives two passes.** :meth:`step` needs a closure that zeroes the
    gradients, runs the forward pass on the current minibatch, calls ``loss.backward()`` and
    returns the loss. It is called once at ``θ_k`` (layer inputs ``x̄``, pre-activations ``h``
    and their gradients ``g`` are recorded), the parameters are updated, and on statistics
    steps it is called again on the same minibatch at ``θ_{k+1}`` to record ``h⁺`` and ``g⁺``;
    then ``H_g`` is updated from ``s = mean(h − h⁺)``, ``y = mean(g − g⁺)`` and ``H_a`` by the
    Hessian-action update (which needs only the first pass: it runs between the parameter
    update and the second call, so the input rows are freed before the second forward pass,
    except on ``check_every`` steps, whose repair reads them). The loss must be a mean over
    the examples of the batch (any mean
    over other axes too); per-example gradients are autograd's times the batch size. The
    second pass runs with every parameter frozen (``requires_grad=False``), so its backward
    computes output gradients only, no weight gradient; after :meth:`step`, ``.grad`` is what
    the closure's ``zero_grad`` left on statistics steps. If the closure raises in the second
    pass, the step stands as a step without its second-pass update (parameters, momentum,
    the first pass's ``A`` and the counters agree) and the exception propagates.

    **Dropout and BatchNorm.** The two passes must compute the same function of the
    parameters, or ``y`` measures noise. Make the closure deterministic per step: reseed the
    random number generator inside it with a seed drawn once per step (e.g. ``seed =
    torch.randint(2**62, ()).item()`` before ``step`` and ``torch.manual_seed(seed)`` at the
    top of the closure, or ``torch.random.fork_rng`` around it), so both passes draw the same
    dropout masks. BatchNorm's batch statistics are the same in both passes (same batch), but
    its running averages are updated twice; freeze them (momentum 0 in the second pass) or
    accept the double update. BatchNorm's own affine parameters are not Linear/Conv2d
    parameters: pass ``unsupported="sgd"`` or ``"adam"``, or freeze them.

    A non-finite pair from the second pass is skipped on the device (no synchronisation).
    Over long float32 runs, rank-two updates can round ``H_a`` or a dense ``H_g`` into a
    matrix that is not positive definite (``spec/kbfgs.md`` §9.6). Every ``check_every``
    statistics steps each is tested by a Cholesky factorisation (one host synchronisation per
    layer); a failed ``H_a`` is re-inverted from ``A + √λ I`` (the EMA ``A``, or the batch's
    for the minibatch variant), a failed ``H_g`` reset to ``I``, with a ``RuntimeWarning``;
    :attr:`repaired_factors` counts them.
"""


class _KBFGSFront(CurvatureOptimizer):
    """What K-BFGS and K-BFGS(L) share: the block factory and the constructor."""

    default_damping = 0.3
    _owner_name = "KBFGS"

    def _setup(self, model, common, block_options, engine_options):
        """``common``: the optimizer options every front takes (lr, damping, momentum, ...)."""
        make_block, options = self.block_factory(**block_options, **engine_options)
        super().__init__(model, make_block, owner=self._owner_name, **common, **options)

    @staticmethod
    def block_factory(
        *,
        memory: int | None = None,
        a_update: str = "minibatch",
        variant: str | None = None,
        mu1: float = 0.2,
        a_decay: float = 0.9,
        pair_decay: float = 0.9,
        skip_threshold: float = 1e-4,
        lbfgs_method: str = "compact",
        **engine_options,
    ):
        """The block of each layer, and the engine options left over (for the engine)."""
        if variant not in _VARIANTS:
            raise ValueError(f"KBFGS: variant must be one of {_VARIANTS}, got {variant!r}")
        if engine_options.get("fisher", "empirical") != "empirical":
            raise ValueError("KBFGS: the curvature comes from the loss's own gradients only")

        def make(name, h):
            conv = isinstance(h, Conv2dHandler)
            return KBFGSBlock(
                h.d_out,
                h.d_in,
                bias=h.bias is not None,
                memory=memory,
                a_update=a_update,
                a_decay=a_decay,
                pair_decay=pair_decay,
                mu1=mu1,
                variant=variant or ("additive" if conv else "convex"),
                skip_threshold=skip_threshold,
                lbfgs_method=lbfgs_method,
            )

        return make, engine_options


class KBFGS(_KBFGSFront):
    """K-BFGS: Kronecker-factored BFGS with double damping, as a ``torch.optim.Optimizer``.

    Each supported layer's direction is ``Δ = H_g (∇W̄ + τW̄) H_a`` with ``H_a ≈ (A + √λ I)⁻¹``
    (warm-started from the first batch, then Hessian-action BFGS updates against an EMA of
    ``A``) and a dense ``H_g ≈ G⁻¹`` learned by double-damped BFGS from pre-activation
    changes between two passes on the same minibatch (:class:`curvlin.blocks.KBFGSBlock`);
    then momentum.

    Parameters
    ----------
    model : nn.Module
        The model; hooks are registered on its supported layers (``nn.Linear``, ``nn.Conv2d``
        and registered types).
    {common}    a_update : {{"minibatch", "ema"}}
        ``"minibatch"`` (the 2021 method) uses the batch's ``A`` matrix-free in the Hessian
        action and never stores ``A``; ``"ema"`` (K-BFGS of 2020) keeps an EMA of ``A``. On
        the digits protocol the minibatch form reached 0.643 against the EMA's 0.98
        (docs/benchmarks.md), and it stores and computes less.
    {kbfgs}
    Notes
    -----
    {notes}
    {behaviour}
    References
    ----------
    Goldfarb, Ren & Bahamou (2020), "Practical quasi-Newton methods for training deep neural
    networks", NeurIPS, Algorithm 1; ``spec/kbfgs.md``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlin.adapters.torch import KBFGS
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> opt = KBFGS(model, lr=0.03, damping=0.3)
    >>> x = torch.randn(64, 4)
    >>> y = x.sum(dim=1, keepdim=True)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = ((model(x) - y) ** 2).mean()
    ...     loss.backward()
    ...     return loss
    >>> first = closure().item()
    >>> for _ in range(30):
    ...     loss = opt.step(closure)
    >>> bool(closure() < first / 10)
    True
    """

    _owner_name = "KBFGS"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        damping: float = 0.3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        momentum_form: str = "gradient",
        kl_clip: float | None = None,
        relative_kl_clip: float | None = None,
        adaptive_damping: bool = False,
        adapt_every: int = 5,
        a_update: str = "minibatch",
        stats_every: int = 1,
        check_every: int | None = 100,
        variant: str | None = None,
        mu1: float = 0.2,
        a_decay: float = 0.9,
        pair_decay: float = 0.9,
        skip_threshold: float = 1e-4,
        factor_dtype: torch.dtype | None = None,
        unsupported="error",
    ):
        block = dict(memory=None, a_update=a_update, variant=variant, mu1=mu1)
        block.update(a_decay=a_decay, pair_decay=pair_decay, skip_threshold=skip_threshold)
        engine = dict(stats_every=stats_every, check_every=check_every, factor_dtype=factor_dtype)
        common = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        common.update(momentum_form=momentum_form, kl_clip=kl_clip, unsupported=unsupported)
        common.update(adaptive_damping=adaptive_damping, adapt_every=adapt_every)
        common.update(relative_kl_clip=relative_kl_clip)
        self._setup(model, common, block, engine)


class KBFGSL(_KBFGSFront):
    """K-BFGS(L): K-BFGS with ``H_g`` as an L-BFGS memory, as a ``torch.optim.Optimizer``.

    As :class:`KBFGS`, except that ``H_g`` is the L-BFGS operator of the last ``memory``
    accepted double-damped pairs (initial matrix ``I``) and, by default, the Hessian action on
    the input side uses each batch's ``A`` matrix-free, so ``A`` is never stored
    (:class:`curvlin.blocks.KBFGSLBlock`).

    Parameters
    ----------
    model : nn.Module
        The model; hooks are registered on its supported layers.
    {common}    memory : int
        ``p``, the number of pairs kept per layer.
    a_update : {{"minibatch", "ema"}}
        As in :class:`KBFGS`; default ``"minibatch"``.
    lbfgs_method : {{"compact", "two-loop"}}
        How the L-BFGS operator is applied (:func:`curvlin.lbfgs_apply`). Both give the same
        operator; the compact form is a few matrix products instead of ``2p`` small steps
        (2.6× faster per K-BFGS(L) step on the demo's autoencoder on a 2-core CPU).
    {kbfgs}
    Notes
    -----
    {notes}
    {behaviour}
    References
    ----------
    Goldfarb, Ren & Bahamou (2020), NeurIPS (K-BFGS(L)); Ren, Bahamou & Goldfarb (2021),
    arXiv:2102.06737 (minibatch Hessian action, convolutions); ``spec/kbfgs.md``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlin.adapters.torch import KBFGSL
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> opt = KBFGSL(model, lr=0.01, memory=10)
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = ((model(x) - y) ** 2).mean()
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)
    >>> opt.curvature("0").h_g.s.shape
    torch.Size([10, 8])
    """

    _owner_name = "KBFGSL"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        damping: float = 0.3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        momentum_form: str = "gradient",
        kl_clip: float | None = None,
        relative_kl_clip: float | None = None,
        adaptive_damping: bool = False,
        adapt_every: int = 5,
        memory: int = 100,
        a_update: str = "minibatch",
        stats_every: int = 1,
        check_every: int | None = 100,
        variant: str | None = None,
        mu1: float = 0.2,
        a_decay: float = 0.9,
        pair_decay: float = 0.9,
        skip_threshold: float = 1e-4,
        lbfgs_method: str = "compact",
        factor_dtype: torch.dtype | None = None,
        unsupported="error",
    ):
        block = dict(memory=memory, a_update=a_update, variant=variant, mu1=mu1)
        block.update(a_decay=a_decay, pair_decay=pair_decay, skip_threshold=skip_threshold)
        block.update(lbfgs_method=lbfgs_method)
        engine = dict(stats_every=stats_every, check_every=check_every, factor_dtype=factor_dtype)
        common = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        common.update(momentum_form=momentum_form, kl_clip=kl_clip, unsupported=unsupported)
        common.update(adaptive_damping=adaptive_damping, adapt_every=adapt_every)
        common.update(relative_kl_clip=relative_kl_clip)
        self._setup(model, common, block, engine)

    @staticmethod
    def block_factory(*, memory: int = 100, **options):
        """As :meth:`KBFGS.block_factory`, with K-BFGS(L)'s memory."""
        return _KBFGSFront.block_factory(memory=memory, **options)


for _cls in (KBFGS, KBFGSL):
    _cls.__doc__ = _cls.__doc__.format(
        common=COMMON_DOC.strip() + "\n",
        kbfgs=_KBFGS_DOC.strip("\n") + "\n",
        notes=_NOTES_DOC.strip() + "\n",
        behaviour=BEHAVIOUR_DOC.strip() + "\n",
    )
