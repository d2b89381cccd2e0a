"""Parameter blocks for tensors of any order: TNT and Shampoo.

Unlike the layer blocks, these see one trainable tensor ``W`` of any shape (a bias or norm
scale, a weight matrix, a convolution kernel, an embedding) and only its gradient: they
declare ``needs = {"sampled_grad"}`` (TNT: the gradient of the loss at labels sampled from the
model) or ``{"grad"}`` (Shampoo, and TNT's empirical variant: the ordinary gradient), and the
engine hands them a :class:`~curvlin.blocks.LayerBatch` whose ``grad`` is that tensor. Both
keep one factor per mode of ``W`` viewed as ``modes`` (a reshape: a 4-D convolution kernel as
``(c_out, c_in, k_h·k_w)`` or ``(c_out, c_in·k_h·k_w)``, see :func:`tensor_modes`); a mode
larger than ``max_dim`` keeps only its diagonal.

- :class:`TNTBlock`: ``C_i`` = EMA of the mode covariances of the sampled gradient; refresh
  normalises them to equal mean eigenvalue (:func:`curvlin.trace_normalize`) and inverts
  ``U_i + εI``; the direction is ``(⊗(U_i + εI))⁻¹ vec(M)``.
- :class:`ShampooBlock`: ``H_i`` = running sum (or EMA) of the mode covariances of the
  gradient; refresh takes ``(H_i + ε_i I)^(-1/(2k))`` with ``ε_i = ε · tr(H_i)/d_i`` (or ``ε``);
  the direction is ``⊗(H_i + ε_i I)^(-1/(2k)) vec(M)``, optionally grafted to the norm of an
  SGD or Adam step.

References
----------
Ren & Goldfarb (2021), "Tensor normal training for deep learning models", NeurIPS; Gupta,
Koren & Singer (2018), "Shampoo: preconditioned stochastic tensor optimization", ICML;
Agarwal et al. (2020), "Disentangling adaptive gradient methods from learning rates"
(grafting); ``spec/tnt_mbf_smw_kfac.md`` §1 and §4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from array_api_compat import device as _device

from .._validation import check_damping, namespace_of
from ..backends import Array, get_backend
from ..kron import KronFactorization
from ..tensor_normal import mode_covariances, mode_factorize, trace_normalize
from .base import Block, BlockState, LayerBatch, ema

__all__ = [
    "CONV_RESHAPES",
    "GRAFTS",
    "ShampooBlock",
    "TNTBlock",
    "TensorBlock",
    "TensorState",
    "tensor_modes",
]

#: How a 4-D convolution kernel ``(c_out, c_in, k_h, k_w)`` is seen: ``"filter"`` as
#: ``(c_out, c_in, k_h·k_w)`` (TNT's CIFAR runs), ``"kfac"`` as ``(c_out, c_in·k_h·k_w)``
#: (KFAC's matrix), ``"none"`` as its four axes.
CONV_RESHAPES = ("filter", "kfac", "none")
#: Shampoo's grafting: none, the norm of the (momentum) gradient, or of an Adam step.
GRAFTS = (None, "sgd", "adam")


def tensor_modes(shape, /, *, conv: str = "filter") -> tuple[int, ...]:
    """The modes a parameter of ``shape`` is preconditioned in.

    A 0-d parameter is one mode of size 1, a 4-D one a convolution kernel reshaped by
    ``conv`` (:data:`CONV_RESHAPES`); any other shape is its own modes.

    Examples
    --------
    >>> from curvlin.blocks import tensor_modes
    >>> tensor_modes((16, 3, 3, 3)), tensor_modes((16, 3, 3, 3), conv="kfac"), tensor_modes(())
    ((16, 3, 9), (16, 27), (1,))
    """
    shape = tuple(int(d) for d in shape)
    if conv not in CONV_RESHAPES:
        raise ValueError(f"tensor_modes: conv must be one of {CONV_RESHAPES}, got {conv!r}")
    if not shape:
        return (1,)
    if len(shape) == 4 and conv == "filter":
        return (shape[0], shape[1], shape[2] * shape[3])
    if len(shape) == 4 and conv == "kfac":
        return (shape[0], shape[1] * shape[2] * shape[3])
    return shape


@dataclass(frozen=True)
class TensorState(BlockState):
    """State of one parameter block: one factor per mode, their refreshed inverses or roots.

    Attributes
    ----------
    factors : tuple of arrays
        One per mode, ``(d_i, d_i)``, or ``(d_i,)`` for a mode kept as its diagonal: TNT's EMA
        of the mode covariances ``C_i``, Shampoo's ``H_i``.
    updates : int
        Statistics folded in (0: none yet).
    inverses : tuple of arrays, or None
        ``(U_i + εI)⁻¹`` (TNT) or ``(H_i + εI)^(-1/(2k))`` (Shampoo), shaped like the factors,
        from the last refresh; None before it.
    graft : array or None
        Shampoo's Adam grafting: the EMA of the squared gradient (the parameter's shape).
    """

    factors: tuple
    updates: int = 0
    inverses: tuple | None = None
    graft: Array | None = None

    def arrays(self) -> dict[str, Array]:
        """``f0 … f{k-1}``, ``inv0 …`` once refreshed, and ``graft`` (Adam grafting)."""
        out = {f"f{i}": f for i, f in enumerate(self.factors)}
        for i, inv in enumerate(self.inverses or ()):
            out[f"inv{i}"] = inv
        return out | ({} if self.graft is None else {"graft": self.graft})

    def counters(self) -> dict[str, int]:
        """``{"updates": n}``."""
        return {"updates": self.updates}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], counters: dict[str, int]) -> TensorState:
        """Rebuild a state from :meth:`arrays` and :meth:`counters` output."""
        k = sum(1 for key in arrays if key.startswith("f"))
        factors = tuple(arrays[f"f{i}"] for i in range(k))
        inverses = tuple(arrays[f"inv{i}"] for i in range(k)) if "inv0" in arrays else None
        return cls(factors, int(counters["updates"]), inverses, arrays.get("graft"))


@dataclass(frozen=True)
class TensorBlock(Block):
    """The part TNT and Shampoo share: a parameter of ``shape`` seen in ``modes``.

    Subclasses set :attr:`needs` and implement :meth:`fold` and :meth:`refresh`. The
    direction is the refreshed mode products applied to the gradient reshaped to ``modes``
    (:meth:`_direction`), in the parameter's shape; :meth:`precondition` takes the gradient
    as ``grad_w`` (any shape equal to ``shape``) and ``grad_b = None``, and returns
    ``(direction, None)``, so the :class:`~curvlin.blocks.Driver` runs these blocks like
    layer blocks.
    """

    #: Parameter blocks have no separate bias.
    bias: ClassVar[bool] = False
    #: The mode covariances are Gram matrices (Adam grafting's ``g2`` is one row).
    symmetric_statistics: ClassVar[bool] = True

    shape: tuple[int, ...]
    modes: tuple[int, ...] = ()
    decay: float | None = 0.9
    max_dim: int | None = 4096

    def __post_init__(self):
        name = type(self).__name__
        shape = tuple(self.shape)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"{name}: shape must hold positive ints, got {self.shape!r}")
        modes = tuple(self.modes) or tensor_modes(shape)
        if math.prod(modes) != math.prod(shape) or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in modes
        ):
            raise ValueError(
                f"{name}: modes {self.modes!r} must be positive ints with the size of shape {shape}"
            )
        if self.decay is not None and not (
            isinstance(self.decay, int | float) and 0.0 <= self.decay < 1.0
        ):
            raise ValueError(f"{name}: decay must be None or in [0, 1), got {self.decay!r}")
        if self.max_dim is not None and (
            isinstance(self.max_dim, bool) or not isinstance(self.max_dim, int) or self.max_dim < 1
        ):
            raise ValueError(
                f"{name}: max_dim must be None or a positive int, got {self.max_dim!r}"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "modes", modes)

    @property
    def d_out(self) -> int:
        """The first mode (for the Block protocol's bookkeeping)."""
        return self.modes[0]

    @property
    def d_in(self) -> int:
        """The product of the other modes."""
        return math.prod(self.modes[1:])

    def diagonal(self, i: int) -> bool:
        """Whether mode ``i`` keeps only its diagonal (``d_i > max_dim``)."""
        return self.max_dim is not None and self.modes[i] > self.max_dim

    def factor_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Each mode's factor shape: ``(d_i, d_i)``, or ``(d_i,)`` if diagonal."""
        return tuple((d,) if self.diagonal(i) else (d, d) for i, d in enumerate(self.modes))

    # -- life cycle ----------------------------------------------------------------------
    def init(self, like: Array, /, *, dtype=None) -> TensorState:
        """Zero factors on ``like``'s library and device, in ``dtype`` (default ``like``'s)."""
        xp = get_backend(like).xp
        dtype = like.dtype if dtype is None else dtype
        zeros = tuple(xp.zeros(s, dtype=dtype, device=_device(like)) for s in self.factor_shapes())
        return TensorState(zeros)

    def statistics(self, state: TensorState, batch: LayerBatch, /) -> dict[str, Array]:
        """``{"c0": …}``: the mode covariances of ``batch.grad`` in the state's dtype."""
        return self._covariances(state, batch)

    def _covariances(self, state: TensorState, batch: LayerBatch, scale: float = 1.0):
        func, g = f"{type(self).__name__}.statistics", batch.grad
        if g is None:
            raise ValueError(f"{func}: the batch needs grad (the parameter's gradient)")
        xp = namespace_of(("grad", g), func=func).xp
        if math.prod(g.shape) != math.prod(self.shape) or tuple(g.shape) not in (
            self.shape,
            self.modes,
        ):
            raise ValueError(f"{func}: grad must have shape {self.shape}, got {tuple(g.shape)}")
        g = xp.reshape(xp.astype(g, state.factors[0].dtype, copy=False), self.modes)
        covs = mode_covariances(g, max_dim=self.max_dim, scale=scale)
        return {f"c{i}": c for i, c in enumerate(covs)}

    def fold(self, state: TensorState, stats, /, *, damping=None, overwrite=False) -> TensorState:
        """Fold one batch's mode covariances into the factors (EMA or running sum; the first
        batch as is; ``overwrite``: in place, see :meth:`Block.fold`)."""
        if state.updates:  # a host-side counter: no synchronisation
            factors = tuple(
                ema(f, stats[f"c{i}"], self.decay, overwrite=overwrite)
                for i, f in enumerate(state.factors)
            )
        else:
            factors = tuple(stats[f"c{i}"] for i in range(len(state.factors)))
        return replace(state, factors=factors, updates=state.updates + 1)

    def ready(self, state: TensorState, /) -> bool:
        """Whether a refresh has cached the inverses (or roots)."""
        return state.inverses is not None

    def _refreshed(self, state: TensorState, factors, damping, power, relative=False):
        damping = check_damping(damping, "damping", f"{type(self).__name__}.refresh")
        if state.updates == 0:
            return state
        fact = mode_factorize(list(factors), damping=damping, power=power, relative=relative)
        return replace(state, inverses=tuple(fact.inverses))

    # -- the direction --------------------------------------------------------------------
    def precondition(self, state: TensorState, grad_w: Array, grad_b: Array | None = None, /):
        """``(direction, None)`` for the gradient ``grad_w`` of the parameter's shape."""
        func = f"{type(self).__name__}.precondition"
        if tuple(grad_w.shape) != self.shape:
            raise ValueError(
                f"{func}: grad must have shape {self.shape}, got {tuple(grad_w.shape)}"
            )
        if grad_b is not None:
            raise ValueError(f"{func}: a parameter block has no bias gradient, got one")
        if not self.ready(state):
            raise ValueError(f"{func}: the state is not ready yet (no statistics or refresh)")
        xp = get_backend(grad_w).xp
        work = self.work_dtype(state)
        g = grad_w if grad_w.dtype == work else xp.astype(grad_w, work)
        d = xp.reshape(self._direction(state, xp.reshape(g, self.modes)), self.shape)
        return (d if d.dtype == grad_w.dtype else xp.astype(d, grad_w.dtype)), None

    def _direction(self, state: TensorState, grad: Array, /) -> Array:
        """The mode products with the refreshed inverses (or roots), on ``grad`` in ``modes``."""
        return KronFactorization(inverses=state.inverses).solve(grad)

    def statistics_flops(self, rows: int, examples: int, /) -> float:
        """A Gram matrix per full mode, ``P·d_i`` (``P`` the parameter's size), ``2·P`` per
        diagonal mode."""
        size = math.prod(self.modes)
        return float(
            sum(2 * size if self.diagonal(i) else size * d for i, d in enumerate(self.modes))
        )

    def refresh_flops(self) -> float:
        """One inverse per full mode, ``Σ d_i³``."""
        return float(sum(d**3 for i, d in enumerate(self.modes) if not self.diagonal(i)))

    def precondition_flops(self) -> float:
        """One mode product per mode: ``2·P·d_i`` for a full mode, ``P`` for a diagonal one."""
        size = math.prod(self.modes)
        return float(
            sum(size if self.diagonal(i) else 2 * size * d for i, d in enumerate(self.modes))
        )

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """``f{i}`` and ``inv{i}`` per mode."""
        out = {}
        for i, s in enumerate(self.factor_shapes()):
            out[f"f{i}"] = out[f"inv{i}"] = s
        return out


@dataclass(frozen=True)
class TNTBlock(TensorBlock):
    """Tensor-normal training for one parameter tensor (the :class:`~curvlin.blocks.Block`
    protocol).

    Statistics are the mode covariances ``C_i = N · G̃_(i) G̃_(i)ᵀ`` of the gradient ``G̃`` of
    the batch-mean loss at sampled labels (``needs = {"sampled_grad"}``; ``empirical=True``: at
    the true labels, ``{"grad"}``), with ``N = batch.n_examples``, folded by an EMA with
    ``decay`` (the first batch as is). A
    refresh normalises them to equal mean eigenvalue, ``U_i`` (:func:`curvlin.trace_normalize`),
    and inverts ``U_i + εI`` with the same ``ε`` (``damping``) on every mode; the direction is
    ``M ×_1 (U_1 + εI)⁻¹ … ×_k (U_k + εI)⁻¹``.

    Parameters
    ----------
    shape : tuple of int
        The parameter's shape.
    modes : tuple of int, optional
        The shape it is preconditioned in (same size; default :func:`tensor_modes`).
    decay : float
        EMA decay ``β`` of the ``C_i``.
    max_dim : int or None
        Modes larger than this keep only the diagonal of ``C_i`` (None: no limit).
    empirical : bool
        Statistics from the ordinary gradient instead of the sampled one.

    Notes
    -----
    Since ``E[∇ℓ_n(ŷ_n)] = 0``, the batch-mean sampled gradient has covariance ``F̄ / N`` (``F̄``
    the mean per-example Fisher), so ``⊗U_i`` estimates ``F̄`` itself, the scale of KFAC's
    factors (curvlin's per-example convention; the paper's ``G̃G̃ᵀ`` is ``F̄ / N`` and puts the
    batch size into ``damping`` and ``lr``). An adapter that does not know ``N`` hands
    ``n_examples = 1``: the statistics are then at the paper's scale.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import LayerBatch, TNTBlock
    >>> block = TNTBlock((2, 3))
    >>> state = block.init(np.zeros(0))
    >>> g = np.arange(6.0).reshape(2, 3)
    >>> state = block.fold(state, block.statistics(state, LayerBatch(grad=g)))
    >>> state = block.refresh(state, damping=1e-3)
    >>> d, _ = block.precondition(state, g)
    >>> d.shape
    (2, 3)
    """

    empirical: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.empirical, bool):
            raise TypeError(f"TNTBlock: empirical must be True or False, got {self.empirical!r}")

    @property
    def needs(self) -> frozenset[str]:
        """``{"sampled_grad"}``, or ``{"grad"}`` for the empirical variant."""
        return frozenset({"grad" if self.empirical else "sampled_grad"})

    def statistics(self, state: TensorState, batch: LayerBatch, /) -> dict[str, Array]:
        """``{"c0": …}``: ``N`` times the mode covariances of ``batch.grad`` (per-example)."""
        n = batch.n_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"TNTBlock.statistics: n_examples must be a positive int, got {n!r}")
        return self._covariances(state, batch, scale=float(n))

    def refresh(self, state: TensorState, /, *, damping) -> TensorState:
        """``(U_i + εI)⁻¹`` for the trace-normalised factors; nothing before any statistics."""
        if state.updates == 0:
            return self._refreshed(state, (), damping, 1)
        return self._refreshed(state, trace_normalize(list(state.factors)), damping, 1)


@dataclass(frozen=True)
class ShampooBlock(TensorBlock):
    """Shampoo for one parameter tensor (the :class:`~curvlin.blocks.Block` protocol).

    Statistics are the mode covariances ``G_(i) G_(i)ᵀ`` of the ordinary gradient
    (``needs = {"grad"}``), summed (``decay=None``, the paper's ``H_i``) or averaged by an
    EMA; a refresh takes the inverse roots ``(H_i + ε_i I)^(-1/(2k))`` by eigendecomposition,
    with ``ε_i = damping · tr(H_i)/d_i`` (``relative_damping``, the default: the direction is
    then invariant to the gradient's scale) or ``ε_i = damping``; the direction is
    ``M ×_1 (H_1 + ε_1 I)^(-1/(2k)) … ×_k …``. With
    ``graft="sgd"`` (``"adam"``) the direction is rescaled, per parameter, to the norm of
    ``M`` (of the Adam step ``M / (√v + 1e-8)``, ``v`` the EMA of the squared gradient with
    decay 0.999, folded on statistics steps).

    Parameters
    ----------
    shape, modes, max_dim
        As in :class:`TNTBlock`.
    decay : float or None
        EMA decay of the ``H_i``; None sums them (the paper's AdaGrad-like accumulation).
    graft : {None, "sgd", "adam"}
        Grafting of the step norm.
    relative_damping : bool
        Scale the damping by each factor's mean eigenvalue.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import LayerBatch, ShampooBlock
    >>> block = ShampooBlock((2, 3), decay=None, relative_damping=False)
    >>> state = block.init(np.zeros(0))
    >>> g = np.diag([2.0, 1.0])[:, :2] @ np.eye(2, 3)
    >>> state = block.fold(state, block.statistics(state, LayerBatch(grad=g)))
    >>> state = block.refresh(state, damping=1e-12)
    >>> np.round(block.precondition(state, g)[0], 6)  # one gradient: its polar factor U Vᵀ
    array([[1., 0., 0.],
           [0., 1., 0.]])
    """

    needs: ClassVar[frozenset[str]] = frozenset({"grad"})
    graft: str | None = None
    relative_damping: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.graft not in GRAFTS:
            raise ValueError(f"ShampooBlock: graft must be one of {GRAFTS}, got {self.graft!r}")
        if not isinstance(self.relative_damping, bool):
            raise TypeError(
                f"ShampooBlock: relative_damping must be True or False, got "
                f"{self.relative_damping!r}"
            )

    def statistics(self, state: TensorState, batch: LayerBatch, /) -> dict[str, Array]:
        """The mode covariances ``c{i}`` and, for Adam grafting, ``g2``, the squared gradient."""
        out = super().statistics(state, batch)
        if self.graft == "adam":
            xp = get_backend(batch.grad).xp
            g = xp.astype(batch.grad, state.factors[0].dtype, copy=False)
            out["g2"] = xp.reshape(g * g, (1, math.prod(self.shape)))  # not square: probed whole
        return out

    def fold(self, state: TensorState, stats, /, *, damping=None, overwrite=False) -> TensorState:
        """The factors as in :class:`TensorBlock`; Adam's ``v`` by an EMA with decay 0.999."""
        new = super().fold(state, stats, damping=damping, overwrite=overwrite)
        if self.graft != "adam":
            return new
        g2 = get_backend(stats["g2"]).xp.reshape(stats["g2"], self.shape)
        v = g2 if state.graft is None else ema(state.graft, g2, 0.999, overwrite=overwrite)
        return replace(new, graft=v)

    def refresh(self, state: TensorState, /, *, damping) -> TensorState:
        """``(H_i + ε_i I)^(-1/(2k))``; nothing before any statistics."""
        power = 2 * len(self.modes)
        return self._refreshed(state, state.factors, damping, power, self.relative_damping)

    def _direction(self, state: TensorState, grad: Array, /) -> Array:
        d = super()._direction(state, grad)
        if self.graft is None:
            return d
        xp = get_backend(grad).xp
        if self.graft == "sgd":
            target = grad
        else:
            v = xp.reshape(state.graft, self.modes)
            target = grad / (xp.sqrt(v) + 1e-8)
        norm_d = xp.linalg.vector_norm(d)
        ratio = xp.linalg.vector_norm(target) / xp.where(norm_d > 0, norm_d, xp.ones_like(norm_d))
        return d * ratio

    def refresh_flops(self) -> float:
        """An eigendecomposition with vectors (about ``9·d_i³``) and the root's product
        ``Q·diag·Qᵀ`` (``2·d_i³``) per full mode."""
        return 11.0 * super().refresh_flops()

    def ready(self, state: TensorState, /) -> bool:
        """Refreshed, and with Adam grafting the squared-gradient EMA exists."""
        return state.inverses is not None and (self.graft != "adam" or state.graft is not None)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """``f{i}``, ``inv{i}`` per mode, and ``graft`` (the parameter's shape) for Adam."""
        out = super().state_shapes()
        return out | ({"graft": self.shape} if self.graft == "adam" else {})
