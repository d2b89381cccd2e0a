"""MBF (mini-block Fisher) for torch models: an optimizer front on the torch engine.

The mathematics is :class:`curvlin.blocks.MBFBlock` on the partitions of
:mod:`curvlin.miniblock`; this module says which partition each layer gets and documents the
options.
"""

from __future__ import annotations

import torch
from torch import nn

from ...blocks import MBFBlock
from ...miniblock import Partition, conv_kernel_blocks, tiled_blocks, unit_blocks
from ._engine import BEHAVIOUR_DOC, COMMON_DOC, CurvatureOptimizer

__all__ = ["MBF"]

_MBF_DOC = """
    decay : float
        EMA decay of the mini-block matrices.
    max_block_size : int or None
        Linear layers: each output unit's row ``[W_o, b_o]`` is cut into tiles of at most
        this many entries (:func:`curvlin.tiled_blocks`); None gives one block per unit, the
        whole row (:func:`curvlin.unit_blocks`, memory ``d_out·(d_in + 1)²``).
    partition : callable, optional
        ``(name, handler) -> Partition or None``: a layer's mini-blocks (``handler`` knows
        ``d_out``, ``d_in``, ``bias`` and the module); None falls back to the default rule.
    fisher : {"empirical", "mc"}
        ``"empirical"`` (the paper's final method): statistics from the gradients of the
        ordinary ``loss.backward()``. ``"mc"``: the sampled Fisher (the paper's first
        version), one label per example drawn from the model; call :meth:`backward_fisher`
        with the network output before ``loss.backward()`` on each step.
    loss : {"cross_entropy", "bce_with_logits", "mse"}, optional
        The training loss (needed by ``fisher="mc"`` to sample labels).
    loss_reduction : {"mean", "batchmean", "sum"}
        How the training loss reduces. Unless ``"sum"``, captured output gradients are scaled
        by the number of examples to make them per-example and the blocks are means over
        examples; with ``"sum"``, sums.
    seed : int
        Seed of the label sampling of ``fisher="mc"``.
"""


def default_partition(handler, *, max_block_size: int | None = 64) -> Partition:
    """The default mini-blocks of a layer: kernel blocks for a convolution, unit rows (tiled
    to ``max_block_size``) otherwise."""
    bias = handler.bias is not None
    module = handler.module
    if isinstance(module, nn.Conv2d):
        k_h, k_w = module.kernel_size
        return conv_kernel_blocks(handler.d_out, module.in_channels, k_h, k_w, bias=bias)
    if max_block_size is None:
        return unit_blocks(handler.d_out, handler.d_in, bias=bias)
    return tiled_blocks(handler.d_out, handler.d_in, bias=bias, max_size=max_block_size)


class MBF(CurvatureOptimizer):
    """Mini-block Fisher (MBF) as a ``torch.optim.Optimizer``.

    Each supported layer (``nn.Linear``, ``nn.Conv2d`` and registered types) is split into
    many small blocks of parameters, and each block ``β`` gets the direction
    ``Δ[I_β] = (M_β + damping·I)⁻¹ ∇W̄[I_β]`` with ``M_β`` the EMA of the empirical Fisher
    restricted to the block (:class:`curvlin.blocks.MBFBlock`), then momentum. By default a
    convolution gets one block per (output channel, input channel) pair, its ``k_h·k_w``
    kernel entries, and a 1×1 block per bias entry (:func:`curvlin.conv_kernel_blocks`); a
    Linear layer one block per output unit ``[W_o, b_o]``, cut into tiles of at most
    ``max_block_size`` entries (:func:`curvlin.tiled_blocks`).

    Parameters
    ----------
    model : nn.Module
        The model; hooks are registered on its supported layers.
    {common}{mbf}
    Notes
    -----
    The statistics are exact diagonal blocks of the empirical Fisher: a convolution's
    per-example gradient is summed over positions before the outer product. Memory: the
    blocks and their inverses, ``2·b`` numbers per parameter for blocks of size ``b`` (18 for
    3×3 kernels). A refresh is one batched Cholesky and inverse per block size; a step one
    batched product. **Damping** ``λ`` has the units of a squared per-example gradient,
    like the diagonal Fisher's; with ``decay = 0`` a block's step for its batch's own
    gradient is at most ``1/(2√λ)`` in norm. Which partition the paper uses for fully
    connected layers is not verified here; the docs page ``mbf`` records the choice and the
    tuning of the defaults (``lr = 3e-3``, ``damping = 1e-3``, ``momentum = 0.5``: the digits
    autoencoder's best point with damping >= 1e-3, for a batch-mean loss summed over outputs).
    {behaviour}
    References
    ----------
    Bahamou, Goldfarb & Ren (2023), AISTATS, PMLR 206:9191–9220 (arXiv 2202.04124).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlin.adapters.torch import MBF
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> opt = MBF(model, lr=0.1, damping=1e-2, momentum=0.9)
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
    >>> opt.curvature("0").blocks[0].shape  # 16 units, rows [W_o, b_o] of 5 entries
    torch.Size([16, 5, 5])
    """

    default_damping = 1e-3

    def __init__(self, model: nn.Module, lr: float = 3e-3, damping: float = 1e-3,
                 momentum: float = 0.5, weight_decay: float = 0.0, *,
                 momentum_form: str = "gradient", kl_clip: float | None = None,
                 relative_kl_clip: float | None = None, adaptive_damping: bool = False,
                 adapt_every: int = 5, decay: float = 0.95, max_block_size: int | None = 64,
                 partition=None, fisher: str = "empirical",
                 loss: str | None = None, loss_reduction: str = "mean", stats_every: int = 1,
                 refresh_every: int = 1, factor_dtype: torch.dtype | None = None,
                 unsupported="error", seed: int = 0):  # fmt: skip
        make_block, options = self.block_factory(
            decay=decay, max_block_size=max_block_size, partition=partition, fisher=fisher,
            loss=loss, loss_reduction=loss_reduction, seed=seed,
        )  # fmt: skip
        super().__init__(model, make_block, owner="MBF", lr=lr, damping=damping,
                         momentum=momentum, weight_decay=weight_decay, kl_clip=kl_clip,
                         relative_kl_clip=relative_kl_clip, momentum_form=momentum_form,
                         adaptive_damping=adaptive_damping,
                         adapt_every=adapt_every, unsupported=unsupported,
                         stats_every=stats_every, refresh_every=refresh_every,
                         factor_dtype=factor_dtype, **options)  # fmt: skip

    @staticmethod
    def block_factory(
        *, decay: float = 0.95, max_block_size: int | None = 64, partition=None, **engine_options
    ):
        """The block of each layer, and the engine options left over (for the engine)."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MBF: decay must be in [0, 1), got {decay!r}")
        if max_block_size is not None and (
            isinstance(max_block_size, bool)
            or not isinstance(max_block_size, int)
            or max_block_size < 1
        ):
            raise ValueError(
                f"MBF: max_block_size must be a positive int or None, got {max_block_size!r}"
            )
        if partition is not None and not callable(partition):
            raise TypeError(f"MBF: partition must be a callable or None, got {partition!r}")

        def make(name, h):
            chosen = None if partition is None else partition(name, h)
            if chosen is None:
                chosen = default_partition(h, max_block_size=max_block_size)
            elif not isinstance(chosen, Partition):
                raise TypeError(
                    f"MBF: partition({name!r}, handler) must return a curvlin.Partition or "
                    f"None, got {type(chosen).__name__}"
                )
            return MBFBlock(h.d_out, h.d_in, bias=h.bias is not None, partition=chosen,
                            decay=decay)  # fmt: skip

        return make, engine_options


MBF.__doc__ = MBF.__doc__.format(
    common=COMMON_DOC.strip() + "\n",
    mbf=_MBF_DOC.strip("\n") + "\n",
    behaviour=BEHAVIOUR_DOC.strip() + "\n",
)
