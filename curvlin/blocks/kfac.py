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

The block is pure: :meth:`KFACBlock.init` makes a :class:`KFACState`, :meth:`~KFACBlock.update`
and :meth:`~KFACBlock.refresh` return new states, :meth:`~KFACBlock.precondition` returns a
direction. Arrays come from any backend.

References
----------
Martens & Grosse (2015), "Optimizing neural networks with Kronecker-factored approximate
curvature", §3 and §6; Grosse & Martens (2016), "A Kronecker-factored approximate Fisher matrix
for convolution layers" (KFC); ``spec/tnt_mbf_smw_kfac.md`` §4.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .._validation import check_damping, namespace_of
from ..backends import Array, get_backend
from ..kron import KronFactorization, _apply, kron_factorize

__all__ = ["KFACBlock", "KFACState"]


@dataclass(frozen=True)
class KFACState:
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

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], updates: int) -> KFACState:
        """Rebuild a state from :meth:`arrays` output and the update counter."""
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
        return cls(g=arrays["g"], a=arrays["a"], updates=int(updates), inverse=inverse)


@dataclass(frozen=True)
class KFACBlock:
    """KFAC for one Linear or Conv2d layer, backend-agnostic.

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

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import KFACBlock
    >>> rng = np.random.default_rng(0)
    >>> block = KFACBlock(d_out=3, d_in=4, bias=True)
    >>> state = block.init(np.zeros(0))
    >>> a, g = rng.standard_normal((32, 4)), rng.standard_normal((32, 3))
    >>> state = block.update(state, a, g, n_examples=32)
    >>> state = block.refresh(state, damping=1e-3)
    >>> dw, db = block.precondition(state, np.ones((3, 4)), np.ones(3))
    >>> dw.shape, db.shape
    ((3, 4), (3,))
    """

    d_out: int
    d_in: int
    bias: bool = True
    decay: float = 0.95

    def __post_init__(self):
        for name in ("d_out", "d_in"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KFACBlock: {name} must be a positive int, got {value!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"KFACBlock: decay must be in [0, 1), got {self.decay!r}")

    @property
    def d_a(self) -> int:
        """Size of the input-side factor, ``d_in + 1`` with a bias."""
        return self.d_in + int(self.bias)

    def init(self, like: Array, /, *, dtype=None) -> KFACState:
        """Zero factors (no inverse until the first refresh).

        ``like`` is any array (typically the layer's weight) whose library and device the state
        uses; ``dtype`` defaults to its dtype.
        """
        from array_api_compat import device

        xp = get_backend(like).xp
        dtype = like.dtype if dtype is None else dtype
        return KFACState(
            g=xp.zeros((self.d_out, self.d_out), dtype=dtype, device=device(like)),
            a=xp.zeros((self.d_a, self.d_a), dtype=dtype, device=device(like)),
        )

    def statistics(self, a: Array, g: Array, /, *, n_examples: int) -> tuple[Array, Array]:
        """One batch's factors ``(G, A)`` from input rows ``a`` and output-gradient rows ``g``.

        Parameters
        ----------
        a : array, shape (R, d_in)
            Layer inputs, one row per example (or example and spatial position); without the
            homogeneous 1, which is appended here when the layer has a bias.
        g : array, shape (R, d_out)
            Per-example output gradients on the same rows.
        n_examples : int
            ``N``, the number of examples the ``R`` rows come from.
        """
        backend = namespace_of(("a", a), ("g", g), func="KFACBlock.statistics")
        xp = backend.xp
        if (
            a.ndim != 2
            or a.shape[1] != self.d_in
            or g.ndim != 2
            or g.shape != (a.shape[0], self.d_out)
        ):
            raise ValueError(
                f"KFACBlock.statistics: expected a of shape (R, {self.d_in}) and g of shape "
                f"(R, {self.d_out}), got a {tuple(a.shape)} and g {tuple(g.shape)}"
            )
        if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
            raise ValueError(
                f"KFACBlock.statistics: n_examples must be a positive int, got {n_examples!r}"
            )
        rows = a.shape[0]
        if self.bias:
            from array_api_compat import device

            ones = xp.ones((rows, 1), dtype=a.dtype, device=device(a))
            a = xp.concat([a, ones], axis=1)
        return backend.gram(g, scale=1.0 / n_examples), backend.gram(a, scale=1.0 / rows)

    def update(self, state: KFACState, a: Array, g: Array, /, *, n_examples: int) -> KFACState:
        """Fold one batch's statistics into the factors' EMA (see :meth:`statistics`)."""
        g_new, a_new = self.statistics(a, g, n_examples=n_examples)
        return self.fold(state, g_new, a_new)

    def fold(self, state: KFACState, g_new: Array, a_new: Array, /) -> KFACState:
        """EMA of the factors with one batch's ``(G, A)``; the first batch is taken as is."""
        xp = get_backend(g_new).xp
        g_new = xp.astype(g_new, state.g.dtype, copy=False)
        a_new = xp.astype(a_new, state.a.dtype, copy=False)
        if state.updates == 0:  # a host-side counter: no synchronisation
            return replace(state, g=g_new, a=a_new, updates=1)
        eps = self.decay
        return replace(
            state,
            g=eps * state.g + (1.0 - eps) * g_new,
            a=eps * state.a + (1.0 - eps) * a_new,
            updates=state.updates + 1,
        )

    def refresh(self, state: KFACState, /, *, damping, exact: bool = False) -> KFACState:
        """Recompute the damped inverse from the current factors.

        ``exact=False`` uses π-split damping ``(G + γ_G I)⁻¹ ⊗ (A + γ_A I)⁻¹``;
        ``exact=True`` the exact ``(G ⊗ A + λI)⁻¹`` through eigendecompositions.
        """
        if state.updates == 0:
            raise ValueError("KFACBlock.refresh: no statistics yet; call update() first")
        check_damping(damping, "damping", "KFACBlock.refresh")
        inverse = kron_factorize([state.g, state.a], damping=damping, exact=exact)
        return replace(state, inverse=inverse)

    def precondition(self, state: KFACState, grad_w: Array, grad_b: Array | None = None, /):
        """The direction ``(G ⊗ A + damping)⁻¹ vec([∇W, ∇b])``, split back into ``(dW, db)``.

        ``grad_w`` has shape (d_out, d_in); ``grad_b`` shape (d_out,) exactly when the layer has
        a bias. The result has the gradients' dtype; ``db`` is None without a bias.
        """
        if state.inverse is None:
            raise ValueError("KFACBlock.precondition: no inverse yet; call refresh() first")
        if tuple(grad_w.shape) != (self.d_out, self.d_in):
            raise ValueError(
                f"KFACBlock.precondition: grad_w must have shape ({self.d_out}, {self.d_in}), "
                f"got {tuple(grad_w.shape)}"
            )
        if (grad_b is not None) != self.bias or (
            grad_b is not None and tuple(grad_b.shape) != (self.d_out,)
        ):
            want = f"shape ({self.d_out},)" if self.bias else "None (the layer has no bias)"
            got = None if grad_b is None else tuple(grad_b.shape)
            raise ValueError(f"KFACBlock.precondition: grad_b must be {want}, got {got}")
        xp = get_backend(grad_w).xp
        work = state.g.dtype
        mat = xp.astype(grad_w, work, copy=False)
        if self.bias:
            mat = xp.concat([mat, xp.astype(grad_b, work, copy=False)[:, None]], axis=1)
        direction = xp.astype(_solve(state.inverse, mat), grad_w.dtype, copy=False)
        if self.bias:
            return direction[:, : self.d_in], direction[:, self.d_in]
        return direction, None

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
