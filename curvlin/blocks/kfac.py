"""The KFAC curvature block of one layer: Kronecker factors ``[G, A]``, EMA, refresh, solve.

For a layer ``s = W̄ ā`` with ``W̄ = [W, b]`` of shape (d_out, d_in + bias) the Fisher block is
approximated by ``G ⊗ A`` on row-major ``vec(W̄)``, with

- ``A = (1/R) Σ_r ā_r ā_rᵀ`` over the ``R`` rows of layer inputs (examples, or examples times
  spatial positions for a convolution), ``ā = [a, 1]`` when the layer has a bias;
- ``G = (1/N) Σ_r δ_r δ_rᵀ`` over the same rows, divided by the number of examples ``N``, where
  ``δ`` are per-example output gradients (``N ×`` autograd's gradient of a batch-mean loss).

For a linear layer ``R = N``; for a convolution with ``T`` output positions ``R = N·T``, which
puts the spatial ``1/T`` on ``A`` (curvlinops' "expand" convention; the product ``G ⊗ A`` is the
same under every placement of ``1/T``, the π-split of the damping is not).

The block is pure and follows the :class:`~curvlin.blocks.Block` protocol: :meth:`KFACBlock.init`
makes a :class:`KFACState`, :meth:`~KFACBlock.fold` and :meth:`~KFACBlock.refresh` return new
states, :meth:`~KFACBlock.precondition` returns a direction. Arrays come from any backend.

References
----------
Martens & Grosse (2015), "Optimizing neural networks with Kronecker-factored approximate
curvature", §3 and §6; Grosse & Martens (2016), "A Kronecker-factored approximate Fisher matrix
for convolution layers" (KFC); ``spec/tnt_mbf_smw_kfac.md`` §4.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from array_api_compat import device as _device

from .._validation import check_damping, namespace_of
from ..backends import Array, get_backend
from ..kron import KronFactorization, _apply, kron_factorize
from .base import Block, BlockState, LayerBatch, ema, homogeneous_gram

__all__ = ["KFACBlock", "KFACState"]


@dataclass(frozen=True)
class KFACState(BlockState):
    """State of one layer's KFAC block: fixed-shape arrays and a host-side counter.

    Attributes
    ----------
    g : array, shape (d_out, d_out)
        Output-side factor (EMA of ``δδᵀ``).
    a : array, shape (d_in + bias, d_in + bias)
        Input-side factor (EMA of ``āāᵀ``).
    updates : int
        Number of statistics updates folded into the factors (0: factors not yet estimated).
    inverse : KronFactorization or None
        The damped inverse from the last :meth:`KFACBlock.refresh`, None before the first.
    """

    g: Array
    a: Array
    updates: int = 0
    inverse: KronFactorization | None = None

    def arrays(self) -> dict[str, Array]:
        """Every array of the state by a stable name (for checkpoints and all-reduce)."""
        out = {"g": self.g, "a": self.a}
        inv = self.inverse
        if inv is not None:
            if inv.inverses is not None:
                out.update(g_inv=inv.inverses[0], a_inv=inv.inverses[1])
                out.update(g_damping=inv.dampings[0], a_damping=inv.dampings[1])
            else:
                out.update(g_eigvecs=inv.eigenvectors[0], a_eigvecs=inv.eigenvectors[1])
                out.update(eig_scale=inv.scale)
        return out

    def counters(self) -> dict[str, int]:
        """The number of statistics folded in, ``{"updates": n}``."""
        return {"updates": self.updates}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], counters: dict[str, int]) -> KFACState:
        """Rebuild a state from :meth:`arrays` and :meth:`counters` output."""
        inverse = None
        if "g_inv" in arrays:
            inverse = KronFactorization(
                inverses=(arrays["g_inv"], arrays["a_inv"]),
                dampings=(arrays["g_damping"], arrays["a_damping"]),
            )
        elif "g_eigvecs" in arrays:
            inverse = KronFactorization(
                eigenvectors=(arrays["g_eigvecs"], arrays["a_eigvecs"]), scale=arrays["eig_scale"]
            )
        return cls(g=arrays["g"], a=arrays["a"], updates=int(counters["updates"]), inverse=inverse)


@dataclass(frozen=True)
class KFACBlock(Block):
    """KFAC for one Linear or Conv2d layer, backend-agnostic (the :class:`Block` protocol).

    Parameters
    ----------
    d_out, d_in : int
        Output and input sizes of the layer's weight viewed as a matrix (for a convolution,
        ``d_in = c_in · k_h · k_w``).
    bias : bool
        Whether the layer has a bias; it is folded in as the last column of ``W̄ = [W, b]``.
    decay : float
        EMA decay ``ε`` of the factors, ``F ← ε F + (1 − ε) F_batch``; the first update takes the
        batch estimate as is. ``decay = 0`` keeps only the last batch.
    exact : bool
        False: π-split damping ``(G + γ_G I)⁻¹ ⊗ (A + γ_A I)⁻¹``; True: the exact
        ``(G ⊗ A + λI)⁻¹`` through eigendecompositions.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import KFACBlock, LayerBatch
    >>> rng = np.random.default_rng(0)
    >>> block = KFACBlock(d_out=3, d_in=4, bias=True)
    >>> state = block.init(np.zeros(0))
    >>> batch = LayerBatch(
    ...     inputs=rng.standard_normal((32, 4)), output_grads=rng.standard_normal((32, 3)),
    ...     n_examples=32)
    >>> state = block.fold(state, block.statistics(state, batch), damping=1e-3)
    >>> state = block.refresh(state, damping=1e-3)
    >>> dw, db = block.precondition(state, np.ones((3, 4)), np.ones(3))
    >>> dw.shape, db.shape
    ((3, 4), (3,))
    """

    needs: ClassVar[frozenset[str]] = frozenset({"inputs", "output_grads"})
    symmetric_statistics: ClassVar[bool] = True

    d_out: int
    d_in: int
    bias: bool = True
    decay: float = 0.95
    exact: bool = False

    def __post_init__(self):
        for name in ("d_out", "d_in"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KFACBlock: {name} must be a positive int, got {value!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"KFACBlock: decay must be in [0, 1), got {self.decay!r}")
        if not isinstance(self.exact, bool):
            raise TypeError(f"KFACBlock: exact must be a bool, got {self.exact!r}")

    def init(self, like: Array, /, *, dtype=None) -> KFACState:
        """Zero factors (no inverse until the first refresh).

        ``like`` is any array (typically the layer's weight) whose library and device the state
        uses; ``dtype`` defaults to its dtype.
        """
        xp = get_backend(like).xp
        dtype = like.dtype if dtype is None else dtype
        dev = _device(like)
        return KFACState(
            g=xp.zeros((self.d_out, self.d_out), dtype=dtype, device=dev),
            a=xp.zeros((self.d_a, self.d_a), dtype=dtype, device=dev),
        )

    def statistics(self, state: KFACState, batch: LayerBatch, /) -> dict[str, Array]:
        """One batch's factors ``{"g": G, "a": A}``, in the state's dtype.

        ``A = (1/R) Σ_r ā_r ā_rᵀ`` over the ``R`` input rows (``ā = [a, 1]`` with a bias) and
        ``G = (1/N) Σ_r δ_r δ_rᵀ`` over the output-gradient rows, ``N = batch.n_examples``.
        """
        a, g = batch.inputs, batch.output_grads
        if a is None or g is None:
            raise ValueError("KFACBlock.statistics: the batch needs inputs and output_grads")
        backend = namespace_of(("inputs", a), ("output_grads", g), func="KFACBlock.statistics")
        if (
            a.ndim != 2
            or a.shape[1] != self.d_in
            or g.ndim != 2
            or g.shape != (a.shape[0], self.d_out)
        ):
            raise ValueError(
                f"KFACBlock.statistics: expected inputs of shape (R, {self.d_in}) and "
                f"output_grads of shape (R, {self.d_out}), got {tuple(a.shape)} and "
                f"{tuple(g.shape)}"
            )
        n = _positive_int(batch.n_examples, "n_examples", "KFACBlock.statistics")
        xp = backend.xp
        dtype = state.g.dtype
        return {
            "g": backend.gram(_cast(xp, g, dtype), scale=batch.grad_scale**2 / n),
            "a": homogeneous_gram(_cast(xp, a, dtype), bias=self.bias, scale=1.0 / a.shape[0]),
        }

    def fold(
        self, state: KFACState, stats: dict[str, Array], /, *, damping=None, overwrite=False
    ) -> KFACState:
        """EMA of the factors with one batch's ``{"g": G, "a": A}``; the first is taken as is
        (``overwrite``: in place, see :meth:`Block.fold`)."""
        xp = get_backend(stats["g"]).xp
        g_new = _cast(xp, stats["g"], state.g.dtype)
        a_new = _cast(xp, stats["a"], state.a.dtype)
        if state.updates == 0:  # a host-side counter: no synchronisation
            return replace(state, g=g_new, a=a_new, updates=1)
        return replace(
            state,
            g=ema(state.g, g_new, self.decay, overwrite=overwrite),
            a=ema(state.a, a_new, self.decay, overwrite=overwrite),
            updates=state.updates + 1,
        )

    def refresh(self, state: KFACState, /, *, damping) -> KFACState:
        """Recompute the damped inverse (π-split or exact, see ``exact``) from the factors.

        Before the first statistics there is nothing to invert and the state is returned as is.
        """
        check_damping(damping, "damping", "KFACBlock.refresh")
        if state.updates == 0:
            return state
        inverse = kron_factorize([state.g, state.a], damping=damping, exact=self.exact)
        return replace(state, inverse=inverse)

    def release(self, state: KFACState, /) -> KFACState:
        """The factors without the inverse (rebuilt by the next :meth:`refresh`)."""
        return replace(state, inverse=None)

    def ready(self, state: KFACState, /) -> bool:
        """Whether an inverse exists (after the first :meth:`refresh` with statistics)."""
        return state.inverse is not None

    def _precondition(self, state: KFACState, grad: Array, /) -> Array:
        return _solve(state.inverse, grad)

    def work_dtype(self, state: KFACState, /):
        """The factors' dtype."""
        return state.g.dtype

    def statistics_flops(self, rows: int, examples: int, /) -> float:
        """Two Gram matrices of the rows, ``R·(d_out² + d_a²)`` (symmetric halves)."""
        return float(rows * (self.d_out**2 + self.d_a**2))

    def refresh_flops(self) -> float:
        """A Cholesky inverse per factor, ``d³`` each; exact: an eigendecomposition, ``9·d³``."""
        return (9.0 if self.exact else 1.0) * (self.d_out**3 + self.d_a**3)

    def precondition_flops(self) -> float:
        """The two-sided product; exact: into the eigenbases and back (twice as many)."""
        return (2.0 if self.exact else 1.0) * super().precondition_flops()

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of every array a :class:`KFACState` of this block may hold."""
        go, ga = (self.d_out, self.d_out), (self.d_a, self.d_a)
        return {
            "g": go,
            "a": ga,
            "g_inv": go,
            "a_inv": ga,
            "g_damping": (),
            "a_damping": (),
            "g_eigvecs": go,
            "a_eigvecs": ga,
            "eig_scale": (self.d_out, self.d_a),
        }

    def curvature_operator(self, state: KFACState, /):
        """``G ⊗ A`` as a SciPy ``LinearOperator`` on row-major ``vec([W, b])`` (host copy).

        For NumPy/SciPy tools such as ``scipy.sparse.linalg.eigsh``; the factors are copied to
        the host as float64 once, when the operator is made.
        """
        return _kron_operator([state.g, state.a], inverse=None)

    def inverse_operator(self, state: KFACState, /):
        """The damped inverse of the last :meth:`refresh` as a SciPy ``LinearOperator``."""
        if state.inverse is None:
            raise ValueError("KFACBlock.inverse_operator: no inverse yet; call refresh() first")
        return _kron_operator(None, inverse=state.inverse)


def _positive_int(value, name: str, func: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{func}: {name} must be a positive int, got {value!r}")
    return value


def _cast(xp, a: Array, dtype) -> Array:
    return a if a.dtype == dtype else xp.astype(a, dtype)


def _kron_operator(factors, *, inverse):
    import numpy as np
    from scipy.sparse.linalg import LinearOperator

    def host(x):
        return get_backend(x).to_numpy(x).astype(np.float64)

    if inverse is not None:
        host_inverse = KronFactorization(
            **{
                name: None
                if value is None
                else (tuple(host(v) for v in value) if isinstance(value, tuple) else host(value))
                for name, value in vars(inverse).items()
            }
        )
        dims = host_inverse.dims

        def apply(mat):
            return host_inverse.solve(mat)
    else:
        mats = [host(f) for f in factors]
        dims = tuple(m.shape[0] for m in mats)

        def apply(mat):
            return _apply(get_backend(mat), mats, mat)

    size = dims[0] * dims[1]

    def matmat(x):
        cols = np.asarray(x, dtype=np.float64).reshape(size, -1)
        out = apply(np.ascontiguousarray(cols.T).reshape(-1, *dims))
        return out.reshape(-1, size).T

    return LinearOperator(
        (size, size),
        matvec=lambda v: matmat(v)[:, 0],
        matmat=matmat,
        rmatvec=lambda v: matmat(v)[:, 0],
        dtype=np.float64,
    )


def _solve(inverse: KronFactorization, mat: Array) -> Array:
    # The per-step hot path: no validation, just the mode products.
    if inverse.inverses is not None:
        return _apply(get_backend(mat), list(inverse.inverses), mat)
    return inverse.solve(mat)
