"""The K-BFGS and K-BFGS(L) curvature blocks of one layer: ``H_g ⊗ H_a`` by quasi-Newton updates.

For a layer ``h = W̄ x̄`` with ``W̄ = [W, b]`` of shape (d_g, d_a) (bias as the last column,
``x̄ = [x, 1]``), K-BFGS approximates the layer's Hessian block by ``G ⊗ A`` on row-major
``vec(W̄)`` and keeps two inverse factors:

- ``H_a ≈ (A + λ_A I)⁻¹`` (``d_a × d_a``, input side), with ``A = (1/m) Σ_i x̄_i x̄_iᵀ``. It is
  warm-started once by an explicit inverse of the first batch's ``A + λ_A I``
  (:func:`curvlin.spd_inverse`, the only inversion) and afterwards corrected by the
  Hessian-action BFGS update with the pair ``s_a = H_a u``, ``y_a = (A + λ_A I) s_a``, where
  ``u`` is the batch's mean input with the homogeneous entry 1. ``A`` is either an EMA
  (``a_update="ema"``, K-BFGS of Goldfarb, Ren & Bahamou 2020) or not stored at all, the
  action of the current batch's ``A`` being computed matrix-free (``a_update="minibatch"``,
  Ren, Bahamou & Goldfarb 2021).
- ``H_g ≈ G⁻¹`` (``d_g × d_g``, output side), learned by BFGS from the change of the mean
  pre-activation ``s = mean(h − h⁺)`` and of the mean per-example pre-activation gradient
  ``y = mean(g − g⁺)`` between two forward/backward passes on the same batch, before and after
  the parameter update. The pairs are smoothed by an EMA, double damped
  (:func:`curvlin.double_damping`) and then used for a dense BFGS update (K-BFGS) or pushed
  into an L-BFGS memory (K-BFGS(L), ``memory`` pairs).

The direction for a gradient matrix ``M`` is ``P = H_g M H_a``. With damping ``λ``, both
``λ_A`` and the Levenberg–Marquardt damping ``μ2`` are ``√λ``.

For a convolution the rows are im2col patches, one per example and output position: ``A`` is
the spatial *sum* ``(1/m) Σ_i Σ_t x̄_{i,t} x̄_{i,t}ᵀ`` (pass ``n_examples = m``), and ``s``, ``y``
and ``u`` are means over all ``m·|T|`` rows.

All updates are free of host synchronisation: skip rules (``sᵀy <= 0``, the curvature
threshold, NaN or inf) are masks. The blocks are pure: every method returns a new
:class:`KBFGSState`.

References
----------
Goldfarb, Ren & Bahamou (2020), "Practical quasi-Newton methods for training deep neural
networks", NeurIPS; Ren, Bahamou & Goldfarb (2021), "Kronecker-factored quasi-Newton methods
for deep learning", arXiv:2102.06737; ``spec/kbfgs.md`` §2–§6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from array_api_compat import device as _device

from .._rows import like_of
from .._validation import namespace_of
from ..backends import Array, get_backend
from ..linalg import spd_inverse
from ..quasi_newton import (
    LBFGSState,
    bfgs_inverse_update,
    double_damping,
    hessian_action_update,
    hessian_action_update_minibatch,
    lbfgs_apply,
    lbfgs_init,
    lbfgs_push,
)
from .base import Block, BlockState, LayerBatch, Rows, ema, homogeneous, homogeneous_gram

__all__ = ["KBFGSBlock", "KBFGSLBlock", "KBFGSState"]

_A_UPDATES = ("ema", "minibatch")
_VARIANTS = ("convex", "additive")


@dataclass(frozen=True)
class KBFGSState(BlockState):
    """State of one layer's K-BFGS block: fixed-shape arrays and host-side counters.

    Attributes
    ----------
    h_a : array, shape (d_a, d_a)
        ``H_a ≈ (A + λ_A I)⁻¹`` (the identity until the first :meth:`KBFGSBlock.update_a`).
    h_g : array of shape (d_g, d_g), or LBFGSState
        ``H_g ≈ G⁻¹``: a dense matrix (K-BFGS, starts at ``I``) or an L-BFGS memory
        (K-BFGS(L), starts empty, i.e. ``I``).
    s_bar, y_bar : arrays, shape (d_g,)
        EMAs of the pre-activation pair ``(s, y)``, undamped, starting at 0.
    a : array of shape (d_a, d_a), or None
        The EMA of ``A`` (``a_update="ema"``); None for the matrix-free minibatch variant.
    a_updates : int
        Number of input-side statistics folded in (0: ``H_a`` not warm-started yet).
    g_updates : int
        Number of ``(s, y)`` pairs offered to ``H_g`` (accepted or skipped: acceptance is decided
        on the device and not counted, to avoid a synchronisation).
    """

    h_a: Array
    h_g: Array | LBFGSState
    s_bar: Array
    y_bar: Array
    a: Array | None = None
    a_updates: int = 0
    g_updates: int = 0

    def arrays(self) -> dict[str, Array]:
        """Every array of the state by a stable name (for checkpoints and all-reduce)."""
        out = {"h_a": self.h_a, "s_bar": self.s_bar, "y_bar": self.y_bar}
        if self.a is not None:
            out["a"] = self.a
        if isinstance(self.h_g, LBFGSState):
            out.update(
                lbfgs_s=self.h_g.s,
                lbfgs_y=self.h_g.y,
                lbfgs_rho=self.h_g.rho,
                lbfgs_valid=self.h_g.valid,
            )
        else:
            out["h_g"] = self.h_g
        return out

    def counters(self) -> dict[str, int]:
        """``{"a_updates": …, "g_updates": …}``."""
        return {"a_updates": self.a_updates, "g_updates": self.g_updates}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], counters: dict[str, int]) -> KBFGSState:
        """Rebuild a state from :meth:`arrays` and :meth:`counters` output."""
        if "h_g" in arrays:
            h_g = arrays["h_g"]
        else:
            h_g = LBFGSState(
                s=arrays["lbfgs_s"],
                y=arrays["lbfgs_y"],
                rho=arrays["lbfgs_rho"],
                valid=arrays["lbfgs_valid"],
            )
        return cls(
            h_a=arrays["h_a"],
            h_g=h_g,
            s_bar=arrays["s_bar"],
            y_bar=arrays["y_bar"],
            a=arrays.get("a"),
            a_updates=int(counters["a_updates"]),
            g_updates=int(counters["g_updates"]),
        )


@dataclass(frozen=True)
class KBFGSBlock(Block):
    """K-BFGS for one Linear or Conv2d layer (dense BFGS ``H_g``), backend-agnostic.

    One iteration (``spec/kbfgs.md`` §2), for a batch with input rows ``x`` (without the 1),
    pre-activations ``h`` and per-example pre-activation gradients ``g`` at ``θ_k``, and
    ``h⁺``, ``g⁺`` from a second pass on the same batch at ``θ_{k+1}``:

    1. :meth:`update_a` (EMA of ``A``; on the first call, ``H_a ← (A + √λ I)⁻¹``);
    2. :meth:`precondition` of the (momentum) gradient, ``P = H_g M H_a``; the caller updates
       the parameters;
    3. :meth:`pair` and :meth:`update_g` (EMA of ``(s, y)``, double damping, BFGS or L-BFGS);
    4. :meth:`update_h_a` (Hessian-action BFGS update of ``H_a``);
    5. every so many iterations, :meth:`repair` (rebuild a factor that rounding has made
       indefinite; one host synchronisation).

    On the :class:`~curvlin.blocks.Block` protocol that the driver runs, step 1 is
    :meth:`statistics` + :meth:`fold`, step 4 :meth:`before_second_pass`, steps 3 (and 4
    when the rows are kept for a check) :meth:`second_pass`, step 5 :meth:`check`; the
    methods above remain the building blocks, each usable on its own.

    Parameters
    ----------
    d_out, d_in : int
        Output size ``d_g`` and input size (without bias) of the weight viewed as a matrix; for
        a convolution ``d_in = c_in · k_h · k_w``.
    bias : bool
        Whether the layer has a bias, folded in as the last column of ``W̄`` (``d_a = d_in + 1``).
    memory : int or None
        None: dense ``H_g`` (K-BFGS). An int ``p >= 1``: an L-BFGS memory of ``p`` pairs
        (K-BFGS(L)), initial matrix ``I``.
    a_update : {"ema", "minibatch"}
        ``"ema"``: keep ``A ← a_decay·A + (1 − a_decay)·A_batch`` and use it in the Hessian
        action. ``"minibatch"``: do not store ``A``; the Hessian action uses the batch's
        ``(1/m) X̄ᵀ(X̄ s_a)`` (``O(R·d_a)`` instead of ``O(R·d_a²)``).
    a_decay : float
        EMA decay ``β`` of ``A``, in ``[0, 1)``.
    pair_decay : float
        EMA decay of ``(s, y)``, in ``[0, 1)``; 0 uses each batch's pair as is.
    mu1 : float
        Powell threshold of the double damping, in ``(0, 1)``.
    variant : {"convex", "additive"}
        The Levenberg–Marquardt step of the double damping (DD-v1 or DD-v2, see
        :func:`curvlin.lm_damping`). Prefer ``"additive"`` when ``√λ >= 1``.
    skip_threshold : float
        ``c`` of the skip rule ``s̃ᵀỹ <= c·‖ḡ‖·s̃ᵀs̃`` for ``H_g`` (and ``c·‖u‖`` for ``H_a``).
    lbfgs_method : {"compact", "two-loop"}
        How the L-BFGS operator is applied (see :func:`curvlin.lbfgs_apply`); the compact
        form (default) is a few matrix products, the two-loop recursion ``2p`` small steps.

    Notes
    -----
    Scales: ``g`` is per-example (``m ×`` autograd's gradient of a batch-mean loss), the
    convention the default damping assumes. The counters are host integers, so the first call
    of :meth:`update_a` (the only one with an explicit inverse, whose Cholesky may check its
    result) is chosen without reading an array.

    References
    ----------
    Goldfarb, Ren & Bahamou (2020), NeurIPS, Algorithm 1 and §3–§4; ``spec/kbfgs.md``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import KBFGSBlock
    >>> rng = np.random.default_rng(0)
    >>> block = KBFGSBlock(d_out=3, d_in=4)
    >>> state = block.init(np.zeros(0))
    >>> x = rng.standard_normal((32, 4))  # layer inputs at θ_k, one row per example
    >>> state = block.update_a(state, x, n_examples=32, damping=0.3)
    >>> dw, db = block.precondition(state, rng.standard_normal((3, 4)), np.ones(3))
    >>> dw.shape, db.shape
    ((3, 4), (3,))
    >>> h, g = rng.standard_normal((32, 3)), rng.standard_normal((32, 3))  # at θ_k
    >>> h_plus, g_plus = h - 0.1, g - 0.1 * rng.standard_normal((32, 3)) - 0.2  # at θ_k+1
    >>> s, y = block.pair(h, h_plus, g, g_plus)
    >>> state = block.update_g(state, s, y, g.mean(axis=0), damping=0.3)
    >>> state = block.update_h_a(state, x, n_examples=32, damping=0.3)
    >>> bool(np.all(np.linalg.eigvalsh(state.h_g) > 0))
    True
    """

    needs: ClassVar[frozenset[str]] = frozenset(
        {"inputs", "outputs", "output_grads", "second_pass"}
    )
    #: Outputs and their gradients are only averaged over rows (the pair, ``ḡ``).
    row_means: ClassVar[bool] = True
    #: Inputs are read through their Gram matrix (the first batch, a repair), their mean
    #: and two products with a vector (the minibatch ``H_a`` update).
    inputs_as_rows: ClassVar[bool] = True
    symmetric_statistics: ClassVar[bool] = True

    d_out: int
    d_in: int
    bias: bool = True
    memory: int | None = None
    a_update: str = "ema"
    a_decay: float = 0.9
    pair_decay: float = 0.9
    mu1: float = 0.2
    variant: str = "convex"
    skip_threshold: float = 1e-4
    lbfgs_method: str = "compact"

    def __post_init__(self):
        name = type(self).__name__
        for field in ("d_out", "d_in"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {field} must be a positive int, got {value!r}")
        if self.memory is not None and (
            isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1
        ):
            raise ValueError(f"{name}: memory must be None or a positive int, got {self.memory!r}")
        if self.a_update not in _A_UPDATES:
            raise ValueError(f"{name}: a_update must be one of {_A_UPDATES}, got {self.a_update!r}")
        if self.variant not in _VARIANTS:
            raise ValueError(f"{name}: variant must be one of {_VARIANTS}, got {self.variant!r}")
        if self.lbfgs_method not in ("two-loop", "compact"):
            raise ValueError(
                f"{name}: lbfgs_method must be 'two-loop' or 'compact', got {self.lbfgs_method!r}"
            )
        for field in ("a_decay", "pair_decay"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: {field} must be in [0, 1), got {value!r}")
        if not 0.0 < self.mu1 < 1.0:
            raise ValueError(f"{name}: mu1 must be in (0, 1), got {self.mu1!r}")
        if not self.skip_threshold >= 0.0:
            raise ValueError(f"{name}: skip_threshold must be >= 0, got {self.skip_threshold!r}")

    # -- state ------------------------------------------------------------------------------
    def init(self, like: Array, /, *, dtype=None) -> KBFGSState:
        """``H_a = I``, ``H_g = I`` (or an empty L-BFGS memory), zero EMAs and ``A``.

        ``like`` is any array (typically the layer's weight) whose library and device the state
        uses; ``dtype`` defaults to its dtype.
        """
        xp = get_backend(like).xp
        dtype = like.dtype if dtype is None else dtype
        dev = _device(like)
        if self.memory is None:
            h_g = xp.eye(self.d_out, dtype=dtype, device=dev)
        else:
            h_g = lbfgs_init(self.d_out, self.memory, xp=xp, dtype=dtype, device=dev)
        a = None
        if self.a_update == "ema":
            a = xp.zeros((self.d_a, self.d_a), dtype=dtype, device=dev)
        return KBFGSState(
            h_a=xp.eye(self.d_a, dtype=dtype, device=dev),
            h_g=h_g,
            s_bar=xp.zeros((self.d_out,), dtype=dtype, device=dev),
            y_bar=xp.zeros((self.d_out,), dtype=dtype, device=dev),
            a=a,
        )

    # -- input side -------------------------------------------------------------------------
    def homogeneous(self, x: Array, /) -> Array:
        """Input rows ``x`` of shape (R, d_in) as ``x̄`` of shape (R, d_a) (a 1 appended if bias)."""
        self._check_rows(x, "homogeneous")
        return homogeneous(x, bias=self.bias)

    def _check_rows(self, x: Array | Rows, /, method: str) -> None:
        namespace_of(("x", like_of(x)), func=f"{type(self).__name__}.{method}")
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(
                f"{type(self).__name__}: x must have shape (R, {self.d_in}), got {tuple(x.shape)}"
            )

    def update_a(self, state: KBFGSState, x: Array, /, *, n_examples: int, damping) -> KBFGSState:
        """Step 3: fold the batch's ``A = (1/n_examples) X̄ᵀX̄`` in; warm-start ``H_a`` once.

        The same as :meth:`fold` of :meth:`statistics` for a batch with these inputs.

        Parameters
        ----------
        state : KBFGSState
        x : array, shape (R, d_in)
            Input rows at ``θ_k`` without the homogeneous 1 (examples, or examples × output
            positions for a convolution).
        n_examples : int
            The number of examples ``m`` the rows come from (``A`` is a spatial sum for a
            convolution).
        damping : float
            The damping ``λ > 0``; the warm start inverts ``A + √λ I``.

        Returns
        -------
        KBFGSState
            On the first call ``A`` is the batch's and ``H_a = (A + √λ I)⁻¹`` (the only
            explicit inversion; in the minibatch variant ``A`` is then dropped). Later calls
            update the EMA of ``A`` (``"ema"``) or only the counter (``"minibatch"``).
        """
        batch = LayerBatch(inputs=x, n_examples=n_examples)
        return self.fold(state, self.statistics(state, batch), damping=damping)

    @property
    def input_means(self) -> bool:  # type: ignore[override]
        """With the EMA ``A``, the second pass and the check read the inputs only through
        their mean ``u`` (the minibatch variant applies the batch's ``A`` from the rows)."""
        return self.a_update == "ema"

    def statistics(self, state: KBFGSState, batch: LayerBatch, /) -> dict[str, Array]:
        """``{"a": (1/N) X̄ᵀX̄}`` when it is used (EMA variant, or the first batch); else ``{}``.

        The minibatch variant needs ``A`` only for the warm start: afterwards its Hessian
        action uses the rows matrix-free in :meth:`second_pass`.
        """
        owner = type(self).__name__
        _check_examples(batch.n_examples, owner)
        if batch.inputs is None:
            raise ValueError(f"{owner}.statistics: the batch needs inputs")
        if self.a_update == "minibatch" and state.a_updates > 0:  # a host counter
            self._check_rows(batch.inputs, "statistics")
            return {}
        self._check_rows(batch.inputs, "statistics")
        x = _cast(get_backend(state.h_a).xp, batch.inputs, state.h_a.dtype)
        return {"a": homogeneous_gram(x, bias=self.bias, scale=1.0 / batch.n_examples)}

    def fold(
        self, state: KBFGSState, stats: dict[str, Array], /, *, damping, overwrite=False
    ) -> KBFGSState:
        """EMA of ``A`` (first batch: ``H_a ← (A + √λ I)⁻¹``); counts the batch
        (``overwrite``: in place, see :meth:`Block.fold`)."""
        lam_a = _sqrt_damping(damping, type(self).__name__)
        if "a" not in stats:
            return replace(state, a_updates=state.a_updates + 1)
        a_batch = stats["a"]
        if state.a_updates == 0:
            h_a = spd_inverse(a_batch, damping=lam_a)
            a = a_batch if self.a_update == "ema" else None
            return replace(state, h_a=h_a, a=a, a_updates=1)
        a = ema(state.a, a_batch, self.a_decay, overwrite=overwrite)
        return replace(state, a=a, a_updates=state.a_updates + 1)

    def second_pass(
        self, state: KBFGSState, batch: LayerBatch, batch_plus: LayerBatch, /, *, damping
    ) -> KBFGSState:
        """Steps 5–7: the pair from the two passes, the ``H_g`` update, the ``H_a`` update.

        ``batch`` holds inputs, outputs ``h`` and output gradients ``g`` at ``θ_k``;
        ``batch_plus`` the outputs ``h⁺`` and output gradients ``g⁺`` on the same rows at
        ``θ_{k+1}`` (same ``grad_scale``). With ``batch.inputs`` None the ``H_a`` update is
        left out: :meth:`before_second_pass` has done it (it needs only ``batch``, and the two
        updates are independent, so the order does not change the result).
        """
        s, y = self.pair(
            batch.outputs, batch_plus.outputs, batch.output_grads, batch_plus.output_grads
        )
        xp = get_backend(s).xp
        scale = batch.grad_scale
        g_mean = xp.mean(batch.output_grads, axis=_leading(batch.output_grads))
        if scale != 1.0:  # per-example scale on the means, not on every row
            y, g_mean = y * scale, g_mean * scale
        state = self.update_g(state, s, y, g_mean, damping=damping)
        if batch.inputs is None:
            return state
        return self.update_h_a(state, batch.inputs, n_examples=batch.n_examples, damping=damping)

    def before_second_pass(self, state: KBFGSState, batch: LayerBatch, /, *, damping) -> KBFGSState:
        """Step 7, the ``H_a`` update (:meth:`update_h_a`), from the first pass's inputs.

        The adapter runs it before the second pass and then frees the input rows (for a
        convolution, im2col patches several times the size of the layer input).
        """
        return self.update_h_a(state, batch.inputs, n_examples=batch.n_examples, damping=damping)

    def check(
        self, state: KBFGSState, batch: LayerBatch, /, *, damping
    ) -> tuple[KBFGSState, tuple[str, ...]]:
        """:meth:`repair` with this batch's inputs."""
        return self.repair(state, batch.inputs, n_examples=batch.n_examples, damping=damping)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of every array a :class:`KBFGSState` of this block may hold."""
        p = self.memory or 0
        return {
            "h_a": (self.d_a, self.d_a),
            "a": (self.d_a, self.d_a),
            "s_bar": (self.d_out,),
            "y_bar": (self.d_out,),
            "h_g": (self.d_out, self.d_out),
            "lbfgs_s": (p, self.d_out),
            "lbfgs_y": (p, self.d_out),
            "lbfgs_rho": (p,),
            "lbfgs_valid": (p,),
        }

    def update_h_a(self, state: KBFGSState, x: Array, /, *, n_examples: int, damping) -> KBFGSState:
        """Step 7: the Hessian-action BFGS update of ``H_a`` from the batch's mean input.

        ``u`` is the mean row of ``x̄`` (its last entry 1 with a bias), ``s_a = H_a u`` and
        ``y_a = (A + √λ I) s_a`` with the EMA ``A`` (``"ema"``, as updated by :meth:`update_a`
        at this iteration) or the batch's ``(1/n_examples) X̄ᵀX̄`` applied matrix-free
        (``"minibatch"``). Pairs with ``s_aᵀy_a <= skip_threshold·‖u‖·s_aᵀs_a`` are skipped.
        Arguments as in :meth:`update_a`.
        """
        lam_a = _sqrt_damping(damping, type(self).__name__)
        n = _check_examples(n_examples, type(self).__name__)
        xp = get_backend(state.h_a).xp
        self._check_rows(x, "update_h_a")
        x = _cast(xp, x, state.h_a.dtype)  # the 1s of x̄ stay implicit: no copy of the rows
        u = (x.sum() / float(x.shape[0])) if isinstance(x, Rows) else xp.mean(x, axis=0)
        if self.bias:
            u = xp.concat([u, xp.ones((1,), dtype=u.dtype, device=_device(u))])
        min_curvature = self.skip_threshold * xp.linalg.vector_norm(u)
        if self.a_update == "ema":
            if state.a_updates == 0:
                raise ValueError(f"{type(self).__name__}.update_h_a: call update_a() first")
            h_a = hessian_action_update(
                state.h_a, state.a, u, damping=lam_a, min_curvature=min_curvature
            )
        else:
            h_a = hessian_action_update_minibatch(
                state.h_a,
                x,
                u,
                n_examples=n,
                damping=lam_a,
                min_curvature=min_curvature,
                homogeneous=self.bias,
            )
        return replace(state, h_a=h_a)

    def repair(
        self, state: KBFGSState, x: Array, /, *, n_examples: int, damping
    ) -> tuple[KBFGSState, tuple[str, ...]]:
        """Rebuild the factors that are no longer positive definite (``spec/kbfgs.md`` §9.6).

        In float32, rank-two updates can, over long runs, round ``H_a`` (or a dense ``H_g``)
        into a matrix that is not positive definite. Each is tested by a Cholesky
        factorisation in its own dtype. A failed ``H_a`` is re-inverted, ``(A + √λ I)⁻¹`` with
        the EMA ``A`` (``"ema"``) or this batch's ``(1/n_examples) X̄ᵀX̄`` (``"minibatch"``); a
        failed dense ``H_g`` is reset to ``I``. The L-BFGS ``H_g`` is positive definite by
        construction (every stored pair has ``sᵀy > 0``) and is not tested.

        Parameters
        ----------
        state : KBFGSState
        x : array, shape (R, d_in)
            This batch's input rows, as in :meth:`update_a` (read only by the minibatch
            variant, and only when ``H_a`` fails).
        n_examples : int
        damping : float
            As in :meth:`update_a`.

        Returns
        -------
        state : KBFGSState
            The state with the failed factors rebuilt (the same object if none failed).
        rebuilt : tuple of str
            The names of the rebuilt factors, ``"h_a"`` and/or ``"h_g"``.

        Notes
        -----
        One host synchronisation (to read the two test results), so call it every so many
        steps, not on every step: the optimizers do it every ``check_every`` statistics steps.

        Examples
        --------
        >>> import dataclasses
        >>> import numpy as np
        >>> from curvlin.blocks import KBFGSBlock
        >>> x = np.random.default_rng(0).standard_normal((32, 4))
        >>> block = KBFGSBlock(d_out=3, d_in=4)
        >>> state = block.update_a(block.init(x), x, n_examples=32, damping=0.3)
        >>> block.repair(state, x, n_examples=32, damping=0.3)[1]  # healthy: nothing rebuilt
        ()
        >>> broken = dataclasses.replace(state, h_a=-state.h_a)  # as if rounding had broken it
        >>> fixed, rebuilt = block.repair(broken, x, n_examples=32, damping=0.3)
        >>> rebuilt, np.allclose(fixed.h_a, state.h_a)  # re-inverted from A + √λ I
        (('h_a',), True)
        """
        owner = type(self).__name__
        lam_a = _sqrt_damping(damping, owner)
        n = _check_examples(n_examples, owner)
        if state.a_updates == 0:
            raise ValueError(f"{owner}.repair: call update_a() first")
        self._check_rows(x, "repair")
        backend = get_backend(state.h_a)
        xp = backend.xp
        dense_g = not isinstance(state.h_g, LBFGSState)
        ok = backend.cholesky_ex(state.h_a)[1]
        if dense_g:
            ok = xp.stack([ok, backend.cholesky_ex(state.h_g)[1]])
        ok = [bool(v) for v in backend.to_numpy(xp.reshape(ok, (-1,)))]  # the one sync
        rebuilt = []
        if not ok[0]:
            if self.a_update == "ema":
                a = state.a
            else:
                xc = _cast(xp, x, state.h_a.dtype)
                a = homogeneous_gram(xc, bias=self.bias, scale=1.0 / n)
            state = replace(state, h_a=spd_inverse(a, damping=lam_a))
            rebuilt.append("h_a")
        if dense_g and not ok[1]:
            eye = xp.eye(self.d_out, dtype=state.h_g.dtype, device=_device(state.h_g))
            state = replace(state, h_g=eye)
            rebuilt.append("h_g")
        return state, tuple(rebuilt)

    # -- output side ------------------------------------------------------------------------
    def pair(self, h: Array, h_plus: Array, g: Array, g_plus: Array, /) -> tuple[Array, Array]:
        """The pair ``s = mean_r(h_r − h⁺_r)``, ``y = mean_r(g_r − g⁺_r)`` over rows.

        Parameters
        ----------
        h, h_plus : arrays, shape (R, d_out)
            Pre-activation rows at ``θ_k`` and at ``θ_{k+1}`` on the same batch; the rows may
            spread over several leading axes, shape ``(..., d_out)`` (a convolution's
            ``(N, T, d_out)``), all four arrays alike.
        g, g_plus : arrays, shape (R, d_out)
            Per-example pre-activation gradient rows at the same two points.

        Returns
        -------
        s, y : arrays, shape (d_out,)
        """
        func = f"{type(self).__name__}.pair"
        namespace_of(("h", h), ("h_plus", h_plus), ("g", g), ("g_plus", g_plus), func=func)
        shape = tuple(h.shape)
        for name, a in (("h", h), ("h_plus", h_plus), ("g", g), ("g_plus", g_plus)):
            if a.ndim < 2 or a.shape[-1] != self.d_out or tuple(a.shape) != shape:
                raise ValueError(
                    f"{func}: {name} must have shape (R, {self.d_out}) like h {shape}, "
                    f"got {tuple(a.shape)}"
                )
        xp = get_backend(h).xp
        axes = _leading(h)
        return xp.mean(h - h_plus, axis=axes), xp.mean(g - g_plus, axis=axes)

    def update_g(self, state: KBFGSState, s: Array, y: Array, g_mean: Array, /, *, damping):
        """Step 6: EMA of the pair, double damping of a copy, BFGS or L-BFGS update of ``H_g``.

        Parameters
        ----------
        state : KBFGSState
        s, y : arrays, shape (d_out,)
            This iteration's pair (:meth:`pair`). A pair holding NaN or inf leaves the EMAs
            and ``H_g`` unchanged (decided on the device).
        g_mean : array, shape (d_out,)
            ``ḡ``, the mean per-example pre-activation gradient at ``θ_k``; the skip threshold
            is ``skip_threshold·‖ḡ‖``.
        damping : float
            ``λ > 0``; the Levenberg–Marquardt damping is ``μ2 = √λ``.

        Returns
        -------
        KBFGSState
            With updated EMAs (undamped) and ``H_g``; the double damping uses ``H_g`` from
            before this update.
        """
        func = f"{type(self).__name__}.update_g"
        mu2 = _sqrt_damping(damping, type(self).__name__)
        namespace_of(("s", s), ("y", y), ("g_mean", g_mean), func=func)
        for name, v in (("s", s), ("y", y), ("g_mean", g_mean)):
            if tuple(v.shape) != (self.d_out,):
                raise ValueError(
                    f"{func}: {name} must have shape ({self.d_out},), got {tuple(v.shape)}"
                )
        xp = get_backend(state.s_bar).xp
        dtype = state.s_bar.dtype
        s, y, g_mean = (_cast(xp, v, dtype) for v in (s, y, g_mean))
        finite = xp.all(xp.isfinite(s)) & xp.all(xp.isfinite(y))
        c = self.pair_decay
        s_bar = xp.where(finite, c * state.s_bar + (1.0 - c) * s, state.s_bar)
        y_bar = xp.where(finite, c * state.y_bar + (1.0 - c) * y, state.y_bar)
        s_d, y_d = double_damping(
            s_bar,
            y_bar,
            state.h_g,
            mu1=self.mu1,
            mu2=mu2,
            variant=self.variant,
            lbfgs_method=self.lbfgs_method,
        )
        # A non-finite pair left the EMAs as they were; offer s = 0 (skipped: sᵀy = 0), or the
        # previous EMA pair would be applied to H_g a second time.
        s_d = xp.where(finite, s_d, xp.zeros_like(s_d))
        g_norm = xp.linalg.vector_norm(xp.where(xp.isfinite(g_mean), g_mean, xp.zeros_like(g_mean)))
        min_curvature = self.skip_threshold * g_norm
        if isinstance(state.h_g, LBFGSState):
            h_g = lbfgs_push(state.h_g, s_d, y_d, min_curvature=min_curvature)
        else:
            h_g = bfgs_inverse_update(state.h_g, s_d, y_d, min_curvature=min_curvature)
        return replace(state, h_g=h_g, s_bar=s_bar, y_bar=y_bar, g_updates=state.g_updates + 1)

    # -- direction --------------------------------------------------------------------------
    def _precondition(self, state: KBFGSState, grad: Array, /) -> Array:
        """``P = H_g M H_a`` for the ``(d_out, d_a)`` matrix ``M`` (momentum plus weight decay)."""
        if isinstance(state.h_g, LBFGSState):
            left = lbfgs_apply(state.h_g, grad, method=self.lbfgs_method)
        else:
            left = state.h_g @ grad
        return left @ state.h_a

    def work_dtype(self, state: KBFGSState, /):
        """The factors' dtype."""
        return state.h_a.dtype

    def statistics_flops(self, rows: int, examples: int, /) -> float:
        """The Gram matrix ``A``, ``R·d_a²`` (none in the minibatch variant, whose second pass
        applies the rows instead, ``4·R·d_a``; the ``H_a`` and ``H_g`` updates of the second
        pass add ``O(d_a² + d_out²)``)."""
        return float(rows * self.d_a**2) if self.a_update == "ema" else 0.0

    def precondition_flops(self) -> float:
        """``H_g M H_a``: two GEMMs; with an L-BFGS ``H_g`` of ``p`` pairs, ``8·p·d_out·d_a``
        for its side."""
        if not self.memory:
            return super().precondition_flops()
        return 8.0 * self.memory * self.d_out * self.d_a + 2.0 * self.d_out * self.d_a**2


@dataclass(frozen=True)
class KBFGSLBlock(KBFGSBlock):
    """K-BFGS(L): :class:`KBFGSBlock` with ``H_g`` as an L-BFGS memory (``memory=100``).

    By default the input side uses the matrix-free minibatch Hessian action
    (``a_update="minibatch"``, Ren, Bahamou & Goldfarb 2021): ``A`` is never stored, only
    ``H_a``, and the per-iteration statistics cost ``O(R·d_a)``. Parameters as in
    :class:`KBFGSBlock`.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import KBFGSLBlock
    >>> block = KBFGSLBlock(d_out=3, d_in=4, memory=10)
    >>> state = block.init(np.zeros(0))
    >>> state.a is None, state.h_g.s.shape
    (True, (10, 3))
    """

    memory: int | None = 100
    a_update: str = "minibatch"


def _leading(a: Array):
    """The row axes of ``(..., d)``: 0 for rows, all but the last for more leading axes."""
    return 0 if a.ndim == 2 else tuple(range(a.ndim - 1))


def _sqrt_damping(damping, owner: str) -> float:
    if isinstance(damping, bool) or not isinstance(damping, int | float) or not damping > 0:
        raise ValueError(f"{owner}: damping must be a number > 0, got {damping!r}")
    if not math.isfinite(damping):
        raise ValueError(f"{owner}: damping must be finite, got {damping!r}")
    return math.sqrt(float(damping))


def _check_examples(n, owner: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{owner}: n_examples must be a positive int, got {n!r}")
    return n


def _cast(xp, a: Array | Rows, dtype) -> Array | Rows:
    if a.dtype == dtype:
        return a
    return a.astype(dtype) if isinstance(a, Rows) else xp.astype(a, dtype)
