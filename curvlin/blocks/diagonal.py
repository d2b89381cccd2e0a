"""The diagonal empirical Fisher block of one layer: the worked example of the block protocol.

For a layer ``s = W̄ ā`` with ``W̄ = [W, b]`` of shape (d_out, d_a) the empirical Fisher's
diagonal is ``F_ij = (1/N) Σ_n (∂ℓ_n/∂W̄_ij)²``, the mean square of the per-example gradients.
With one row per example (a Linear layer on vectors) ``∂ℓ_n/∂W̄_ij = δ_ni ā_nj``, so
``F = (δ∘δ)ᵀ(ā∘ā) / N``: one contraction of the squared rows, and the per-example gradients are
never formed. The direction is ``∇W̄ / (F + λ)``, elementwise.

An example with several rows (a convolution: one per output position; a sequence: one per
token) has the per-example gradient ``Σ_{r ∈ n} δ_r ā_rᵀ``, whose exact square needs the
per-example gradients (``N · d_out · d_a`` numbers). The block uses the row-wise
``F_ij = (1/N) Σ_r δ_ri² ā_rj²`` over all ``R`` rows instead: it drops the cross terms between
rows of one example, which is KFC's assumption of spatially uncorrelated derivatives (the one
KFAC makes for convolutions), so it is the exact diagonal of the Fisher that KFC factorises.
It is the same single contraction for every layer, and exact when ``R = N``.

References
----------
Duchi, Hazan & Singer (2011), "Adaptive subgradient methods" (Adagrad: a diagonal from squared
gradients); Amari (1998), "Natural gradient works efficiently in learning" (``F⁻¹∇``); Grosse &
Martens (2016), "A Kronecker-factored approximate Fisher matrix for convolution layers", §3
(spatially uncorrelated derivatives); Kunstner, Hennig & Balles (2019), "Limitations of the
empirical Fisher approximation"; the docs page ``engine``, "Adding a method".
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from array_api_compat import device as _device

from .._validation import check_damping, namespace_of
from ..backends import Array, get_backend
from .base import Block, BlockState, LayerBatch, ema, homogeneous

__all__ = ["DiagonalFisherBlock", "DiagonalFisherState"]


@dataclass(frozen=True)
class DiagonalFisherState(BlockState):
    """State of one layer's diagonal Fisher block.

    Attributes
    ----------
    f : array, shape (d_out, d_in + bias)
        The EMA of the batches' diagonal ``F`` (per-example scale).
    updates : int
        Batches folded into ``f`` (0: none yet).
    inverse : array of ``f``'s shape, or None
        ``1 / (F + λ)`` from the last :meth:`DiagonalFisherBlock.refresh`; None before it.
    """

    f: Array
    updates: int = 0
    inverse: Array | None = None

    def arrays(self) -> dict[str, Array]:
        """``{"f": F}``, and ``"inverse"`` once refreshed."""
        return {"f": self.f} | ({} if self.inverse is None else {"inverse": self.inverse})

    def counters(self) -> dict[str, int]:
        """``{"updates": n}``."""
        return {"updates": self.updates}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], counters: dict[str, int]):
        """Rebuild a state from :meth:`arrays` and :meth:`counters` output."""
        return cls(f=arrays["f"], updates=int(counters["updates"]), inverse=arrays.get("inverse"))


@dataclass(frozen=True)
class DiagonalFisherBlock(Block):
    """Diagonal empirical Fisher for one Linear or Conv2d layer (the :class:`Block` protocol).

    Parameters
    ----------
    d_out, d_in : int
        Output and input sizes of the weight viewed as a matrix (``c_in · k_h · k_w`` for a
        convolution).
    bias : bool
        Whether the layer has a bias (the last column of ``W̄ = [W, b]``).
    decay : float
        EMA decay ``ε`` of ``F ← ε F + (1 − ε) F_batch``; the first batch is taken as is.

    Notes
    -----
    With ``decay = 0`` and one row per example, Cauchy–Schwarz bounds every entry of the
    direction for the batch's own mean gradient: ``|∇_ij| / (F_ij + λ) <= 1 / (2√λ)``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import DiagonalFisherBlock, LayerBatch
    >>> block = DiagonalFisherBlock(d_out=2, d_in=3, bias=True)
    >>> state = block.init(np.zeros(0))
    >>> batch = LayerBatch(inputs=np.ones((4, 3)), output_grads=np.full((4, 2), 0.5),
    ...                    n_examples=4, grad_scale=4.0)  # per-example δ = 4 · 0.5 = 2
    >>> state = block.fold(state, block.statistics(state, batch), damping=0.0)
    >>> state.f  # δ² ā² = 4 for every entry, the bias column included
    array([[4., 4., 4., 4.],
           [4., 4., 4., 4.]])
    >>> state = block.refresh(state, damping=1.0)
    >>> dw, db = block.precondition(state, np.full((2, 3), 10.0), np.full(2, 10.0))
    >>> dw[0, 0], db[0]  # 10 / (4 + 1)
    (np.float64(2.0), np.float64(2.0))
    """

    needs: ClassVar[frozenset[str]] = frozenset({"inputs", "output_grads"})

    d_out: int
    d_in: int
    bias: bool = True
    decay: float = 0.95

    def __post_init__(self):
        for name in ("d_out", "d_in"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"DiagonalFisherBlock: {name} must be a positive int, got {value!r}"
                )
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"DiagonalFisherBlock: decay must be in [0, 1), got {self.decay!r}")

    def init(self, like: Array, /, *, dtype=None) -> DiagonalFisherState:
        """``F = 0`` on ``like``'s library and device, in ``dtype`` (default ``like``'s)."""
        xp = get_backend(like).xp
        shape, dtype = (self.d_out, self.d_a), like.dtype if dtype is None else dtype
        return DiagonalFisherState(f=xp.zeros(shape, dtype=dtype, device=_device(like)))

    def statistics(self, state: DiagonalFisherState, batch: LayerBatch, /) -> dict[str, Array]:
        """``{"f": (grad_scale² / N) (δ∘δ)ᵀ(ā∘ā)}`` over the batch's rows, in the state's dtype."""
        func, a, g = "DiagonalFisherBlock.statistics", batch.inputs, batch.output_grads
        if a is None or g is None:
            raise ValueError(f"{func}: the batch needs inputs and output_grads")
        xp = namespace_of(("inputs", a), ("output_grads", g), func=func).xp
        if a.ndim != 2 or a.shape[1] != self.d_in or tuple(g.shape) != (a.shape[0], self.d_out):
            raise ValueError(
                f"{func}: expected inputs (R, {self.d_in}) and output_grads (R, {self.d_out}), "
                f"got {tuple(a.shape)} and {tuple(g.shape)}"
            )
        n = batch.n_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{func}: n_examples must be a positive int, got {n!r}")
        a = homogeneous(xp.astype(a, state.f.dtype, copy=False), bias=self.bias)
        g = xp.astype(g, state.f.dtype, copy=False)
        return {"f": ((g * g).T @ (a * a)) * (batch.grad_scale**2 / n)}

    def fold(
        self, state: DiagonalFisherState, stats, /, *, damping=None, overwrite=False
    ) -> DiagonalFisherState:
        """EMA of ``F`` with one batch's ``{"f": F}``; the first batch is taken as is
        (``overwrite``: in place, see :meth:`Block.fold`)."""
        f = get_backend(stats["f"]).xp.astype(stats["f"], state.f.dtype, copy=False)
        if state.updates:  # a host-side counter: no synchronisation
            f = ema(state.f, f, self.decay, overwrite=overwrite)
        return replace(state, f=f, updates=state.updates + 1)

    def refresh(self, state: DiagonalFisherState, /, *, damping) -> DiagonalFisherState:
        """Cache ``1 / (F + λ)``; nothing to do before the first statistics. ``λ > 0``."""
        damping = check_damping(damping, "damping", "DiagonalFisherBlock.refresh")
        if isinstance(damping, float) and damping == 0.0:  # F = 0 for a dead unit: 0/0
            raise ValueError("DiagonalFisherBlock.refresh: damping must be > 0, got 0.0")
        if state.updates == 0:
            return state
        return replace(state, inverse=1.0 / (state.f + damping))

    def release(self, state: DiagonalFisherState, /) -> DiagonalFisherState:
        """``F`` without its inverse (rebuilt by the next :meth:`refresh`)."""
        return replace(state, inverse=None)

    def ready(self, state: DiagonalFisherState, /) -> bool:
        """Whether :meth:`refresh` has cached an inverse."""
        return state.inverse is not None

    def _precondition(self, state: DiagonalFisherState, grad: Array, /) -> Array:
        return grad * state.inverse

    def statistics_flops(self, rows: int, examples: int, /) -> float:
        """The product ``(δ∘δ)ᵀ(ā∘ā)``, ``2·R·d_out·d_a``."""
        return 2.0 * rows * self.d_out * self.d_a

    def refresh_flops(self) -> float:
        """One elementwise pass over ``F``."""
        return float(self.d_out * self.d_a)

    def precondition_flops(self) -> float:
        """One elementwise product."""
        return float(self.d_out * self.d_a)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """``f`` and ``inverse`` both have the shape of ``W̄``."""
        return dict.fromkeys(("f", "inverse"), (self.d_out, self.d_a))
