"""The mini-block Fisher (MBF) block of one layer: many small empirical-Fisher blocks.

For a layer ``s = W̄ ā`` with ``W̄ = [W, b]`` of shape (d_out, d_a) and a
:class:`curvlin.Partition` of its entries into mini-blocks ``I_β``, the block keeps the EMA of

.. code-block:: text

    M_β = (1/N) Σ_n γ_n[I_β] γ_n[I_β]ᵀ,        γ_n = Σ_{t ∈ n} δ_t ā_tᵀ (per example),

the empirical Fisher restricted to each mini-block, and preconditions with
``d[I_β] = (M_β + λI)⁻¹ ∇W̄[I_β]`` for all blocks at once (one batched inverse per block size
on refresh steps, one batched product per step). Unlike the diagonal Fisher and KFAC, the
per-example gradient of a convolution is summed over its positions before the outer product:
the statistics are the exact diagonal blocks of the empirical Fisher.

References
----------
Bahamou, Goldfarb & Ren (2023), "A Mini-Block Fisher Method for Deep Neural Networks",
AISTATS, PMLR 206:9191–9220 (arXiv 2202.04124); the docs page ``mbf``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from array_api_compat import device as _device

from .._rows import like_of
from .._validation import check_damping, namespace_of
from ..backends import Array, get_backend
from ..miniblock import Partition, block_apply, block_inverse, block_statistics
from .base import Block, BlockState, LayerBatch, as_rows, ema

__all__ = ["MBFBlock", "MBFState"]


@dataclass(frozen=True)
class MBFState(BlockState):
    """State of one layer's MBF block.

    Attributes
    ----------
    blocks : tuple of arrays, shapes ``partition.shapes()``
        The EMA of each group's block matrices ``M_β`` (per-example scale), ``(B, b, b)``.
    updates : int
        Batches folded in (0: none yet).
    inverses : tuple of arrays, or None
        ``(M_β + λI)⁻¹`` from the last :meth:`MBFBlock.refresh`; None before it.
    """

    blocks: tuple[Array, ...]
    updates: int = 0
    inverses: tuple[Array, ...] | None = None

    def arrays(self) -> dict[str, Array]:
        """``{"m0": …, "m1": …}`` per group, and ``"inv0"``, … once refreshed."""
        out = {f"m{i}": m for i, m in enumerate(self.blocks)}
        if self.inverses is not None:
            out.update({f"inv{i}": m for i, m in enumerate(self.inverses)})
        return out

    def counters(self) -> dict[str, int]:
        """``{"updates": n}``."""
        return {"updates": self.updates}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], counters: dict[str, int]) -> MBFState:
        """Rebuild a state from :meth:`arrays` and :meth:`counters` output."""
        count = sum(1 for k in arrays if k.startswith("m"))
        blocks = tuple(arrays[f"m{i}"] for i in range(count))
        inverses = tuple(arrays[f"inv{i}"] for i in range(count)) if "inv0" in arrays else None
        return cls(blocks=blocks, updates=int(counters["updates"]), inverses=inverses)


@dataclass(frozen=True)
class MBFBlock(Block):
    """Mini-block empirical Fisher for one Linear or Conv2d layer (the :class:`Block` protocol).

    Parameters
    ----------
    d_out, d_in : int
        Output and input sizes of the weight viewed as a matrix (``c_in · k_h · k_w`` for a
        convolution).
    bias : bool
        Whether the layer has a bias (the last column of ``W̄ = [W, b]``).
    partition : Partition
        The mini-blocks of ``W̄`` (shape ``(d_out, d_in + bias)``), e.g.
        :func:`curvlin.conv_kernel_blocks` or :func:`curvlin.tiled_blocks`.
    decay : float
        EMA decay ``ε`` of ``M ← ε M + (1 − ε) M_batch``; the first batch is taken as is.

    Notes
    -----
    The statistics need the rows of each example together: ``batch.examples`` (or
    ``n_examples``) examples, each with ``R / examples`` contiguous rows. For one row per
    example and row-tile partitions no per-example gradient is formed
    (:func:`curvlin.block_statistics`). The memory is ``partition.n_entries`` numbers twice
    (the blocks and their inverses), ``b`` times the parameters for blocks of size ``b``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import unit_blocks
    >>> from curvlin.blocks import LayerBatch, MBFBlock
    >>> block = MBFBlock(d_out=2, d_in=1, bias=True, partition=unit_blocks(2, 1))
    >>> state = block.init(np.zeros(0))
    >>> batch = LayerBatch(inputs=np.ones((4, 1)), output_grads=np.full((4, 2), 0.5),
    ...                    n_examples=4, grad_scale=4.0)  # per-example δ = 2
    >>> state = block.fold(state, block.statistics(state, batch), damping=0.0)
    >>> state.blocks[0][0]  # δ² ā āᵀ with ā = [1, 1]
    array([[4., 4.],
           [4., 4.]])
    >>> state = block.refresh(state, damping=1.0)
    >>> dw, db = block.precondition(state, np.full((2, 1), 9.0), np.full(2, 9.0))
    >>> float(dw[0, 0]), float(db[0])  # (M + I)⁻¹ [9, 9] = [1, 1]
    (1.0, 1.0)
    """

    needs: ClassVar[frozenset[str]] = frozenset({"inputs", "output_grads"})
    symmetric_statistics: ClassVar[bool] = True
    #: A convolution's output gradients come as their ``(N, T, c_out)`` view (no copy).
    flat_outputs: ClassVar[bool] = False
    #: Inputs are read as :class:`~curvlin.blocks.Rows`: a convolution's per-example
    #: gradients come from its input without building the patches.
    inputs_as_rows: ClassVar[bool] = True

    d_out: int
    d_in: int
    bias: bool = True
    partition: Partition | None = None
    decay: float = 0.95

    def __post_init__(self):
        for name in ("d_out", "d_in"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MBFBlock: {name} must be a positive int, got {value!r}")
        if not isinstance(self.partition, Partition):
            raise TypeError(
                f"MBFBlock: partition must be a curvlin.Partition, got {self.partition!r}"
            )
        if (self.partition.d_out, self.partition.d_a) != (self.d_out, self.d_a):
            raise ValueError(
                f"MBFBlock: partition is for W̄ of shape "
                f"({self.partition.d_out}, {self.partition.d_a}), the layer's is "
                f"({self.d_out}, {self.d_a})"
            )
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"MBFBlock: decay must be in [0, 1), got {self.decay!r}")

    def init(self, like: Array, /, *, dtype=None) -> MBFState:
        """Zero blocks on ``like``'s library and device, in ``dtype`` (default ``like``'s)."""
        xp = get_backend(like).xp
        dtype = like.dtype if dtype is None else dtype
        blocks = tuple(
            xp.zeros(shape, dtype=dtype, device=_device(like)) for shape in self.partition.shapes()
        )
        return MBFState(blocks=blocks)

    def statistics(self, state: MBFState, batch: LayerBatch, /) -> dict[str, Array]:
        """``{"m0": …}``: each group's ``(grad_scale² / N) Σ_n γ_n[I_β] γ_n[I_β]ᵀ``."""
        func, a, g = "MBFBlock.statistics", batch.inputs, batch.output_grads
        if a is None or g is None:
            raise ValueError(f"{func}: the batch needs inputs and output_grads")
        xp = namespace_of(("inputs", like_of(a)), ("output_grads", g), func=func).xp
        if a.ndim != 2 or a.shape[1] != self.d_in:
            raise ValueError(f"{func}: expected inputs (R, {self.d_in}), got {tuple(a.shape)}")
        n = batch.n_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{func}: n_examples must be a positive int, got {n!r}")
        examples = n if batch.examples is None else batch.examples
        dtype = state.blocks[0].dtype
        a = as_rows(a).astype(dtype)
        g = xp.astype(g, dtype, copy=False)
        weight = batch.grad_scale**2 / n
        stats = block_statistics(
            self.partition, a, g, examples=examples, weight=weight, bias=self.bias
        )
        return {f"m{i}": m for i, m in enumerate(stats)}

    def fold(self, state: MBFState, stats, /, *, damping=None, overwrite=False) -> MBFState:
        """EMA of the blocks with one batch's statistics; the first batch is taken as is
        (``overwrite``: in place, see :meth:`Block.fold`)."""
        xp = get_backend(state.blocks[0]).xp
        new = tuple(
            xp.astype(stats[f"m{i}"], old.dtype, copy=False) for i, old in enumerate(state.blocks)
        )
        if state.updates:  # a host-side counter: no synchronisation
            new = tuple(
                ema(old, m, self.decay, overwrite=overwrite) for old, m in zip(state.blocks, new)
            )
        return replace(state, blocks=new, updates=state.updates + 1)

    def refresh(self, state: MBFState, /, *, damping) -> MBFState:
        """Cache ``(M_β + λI)⁻¹`` for every block (``λ > 0``); nothing before the first batch."""
        damping = check_damping(damping, "damping", "MBFBlock.refresh")
        if isinstance(damping, float) and damping == 0.0:  # a dead block is all zeros
            raise ValueError("MBFBlock.refresh: damping must be > 0, got 0.0")
        if state.updates == 0:
            return state
        return replace(state, inverses=block_inverse(state.blocks, damping=damping))

    def release(self, state: MBFState, /) -> MBFState:
        """The block statistics without the inverses (rebuilt by the next :meth:`refresh`)."""
        return replace(state, inverses=None)

    def ready(self, state: MBFState, /) -> bool:
        """Whether :meth:`refresh` has cached the inverses."""
        return state.inverses is not None

    def _precondition(self, state: MBFState, grad: Array, /) -> Array:
        return block_apply(self.partition, state.inverses, grad)

    def statistics_flops(self, rows: int, examples: int, /) -> float:
        """Per-example gradients, ``2·R·d_out·d_a``, and each block's Gram matrix over the
        ``N`` examples, ``N·Σ_β b²``."""
        squares = sum(g.count * g.size**2 for g in self.partition.groups)
        return 2.0 * rows * self.d_out * self.d_a + examples * squares

    def refresh_flops(self) -> float:
        """One Cholesky and one triangular inverse per block: ``Σ_β b³``."""
        return float(sum(g.count * g.size**3 for g in self.partition.groups))

    def precondition_flops(self) -> float:
        """One matrix-vector product per block: ``2·Σ_β b²``."""
        return 2.0 * sum(g.count * g.size**2 for g in self.partition.groups)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """``m{i}`` and ``inv{i}`` have group ``i``'s ``(B, b, b)`` shape."""
        out = {}
        for i, shape in enumerate(self.partition.shapes()):
            out[f"m{i}"] = out[f"inv{i}"] = shape
        return out
