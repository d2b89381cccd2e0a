"""The second protocol: methods that couple all layers through one m×m kernel (SMW-NG, SMW-GN).

A per-layer block (:class:`~curvlin.blocks.Block`) preconditions each layer on its own. A
Sherman–Morrison–Woodbury method instead solves with the curvature of all layers at once,

``(λ I + (1/m) U Uᵀ)⁻¹ g = (1/λ) (g − U (λ m I + UᵀU)⁻¹ Uᵀ g)``,

where the columns of ``U`` are the ``m`` per-example gradients of every parameter stacked (so
``(1/m) U Uᵀ`` is the empirical Fisher of the batch) and ``g`` is the gradient. Only the
``m × m`` kernel ``UᵀU = Σ_l U_lᵀ U_l`` is ever formed: each layer contributes its kernel, the
products ``U_lᵀ v`` (``J·v``) and ``U_l c`` (``Jᵀ·u``) without forming ``U_l``, and
:func:`kernel_solve` adds them up and does the one solve.

A :class:`KernelBlock` is that per-layer part; :class:`LinearKernelBlock` implements it for a
layer ``s = W̄ ā`` whose per-example gradient is ``Σ_{r ∈ n} δ_r ā_rᵀ`` over the example's rows
(one row for a Linear layer on vectors, several for sequences or convolution patches), on the
primitives of :mod:`curvlin.woodbury`. A kernel block is also a :class:`~curvlin.blocks.Block`
with an empty state and ``coupled = True``, so the :class:`~curvlin.blocks.Driver` runs it
like any other (schedule, skip, checkpoints) and preconditions all kernel layers together in
one :func:`kernel_solve` (:meth:`~curvlin.blocks.Driver.precondition`).

For exact Gauss–Newton the output gradients carry a leading axis of ``k`` output directions,
``(k, R, d_out)`` (``output_directions = True``): the rows of ``Q_nᵀ J_n`` for an output-Hessian
square root ``Q_n``; the kernel is then ``m·k × m·k``, sample-major.

References
----------
Ren & Goldfarb (2019), "Efficient subsampled Gauss–Newton and natural gradient methods for
training neural networks", arXiv:1906.02353; ``spec/tnt_mbf_smw_kfac.md`` §3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..backends import Array, get_backend
from ..woodbury import LinearTerms, linear_terms, woodbury_coefficients
from .base import Block, BlockState, LayerBatch

__all__ = ["KernelBlock", "KernelState", "LinearKernelBlock", "kernel_solve"]


@dataclass(frozen=True)
class KernelState(BlockState):
    """The state of a kernel block: empty (the curvature is the current batch's)."""

    def arrays(self) -> dict[str, Array]:
        """No arrays."""
        return {}

    def counters(self) -> dict[str, int]:
        """No counters."""
        return {}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], counters: dict[str, int]) -> KernelState:
        """The empty state."""
        return cls()


class KernelBlock(Block):
    """One layer's part of a kernel method: its kernel, ``U_lᵀ v`` and ``U_l c``.

    ``U_l`` has one column per example (per example and output direction for Gauss–Newton):
    the example's gradient of ``W̄ = [W, b]``, flattened row-major, at the per-example scale
    (``batch.grad_scale`` applied). Subclasses implement :meth:`terms`.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"inputs", "output_grads"})
    coupled: ClassVar[bool] = True
    output_directions: ClassVar[bool] = True

    def init(self, like: Array, /, *, dtype=None) -> KernelState:
        """The empty state."""
        return KernelState()

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """No arrays."""
        return {}

    def statistics_flops(self, rows: int, examples: int, /) -> float:
        """The layer's share of the coupled solve, all of it read from the batch: the kernel
        ``(X̄X̄ᵀ)∘(ΔΔᵀ)``, ``R²·(d_a + d_out)``, and one ``J·v`` and one ``Jᵀ·u``,
        ``4·R·d_out·d_a`` (``R = m·k`` rows with ``k`` output directions)."""
        return float(rows**2 * (self.d_a + self.d_out) + 4 * rows * self.d_out * self.d_a)

    def precondition_flops(self) -> float:
        """None apart from the solve counted in :meth:`statistics_flops`."""
        return 0.0

    def terms(self, batch: LayerBatch, /) -> LinearTerms:
        """The layer's kernel, ``J·v`` and ``Jᵀ·u`` on ``batch`` (a :class:`LinearTerms`)."""
        raise NotImplementedError

    def kernel(self, batch: LayerBatch, /) -> Array:
        """``U_lᵀ U_l``, shape (r, r) with ``r = m`` (``m·k`` with ``k`` output directions)."""
        return self.terms(batch).kernel()

    def jvp(self, batch: LayerBatch, v: Array, /) -> Array:
        """``U_lᵀ vec(v)``, shape (r,), for ``v`` of shape (d_out, d_a)."""
        return self.terms(batch).jvp(v)

    def vjp(self, batch: LayerBatch, c: Array, /) -> Array:
        """``U_l c`` as a (d_out, d_a) matrix, for ``c`` of shape (r,)."""
        return self.terms(batch).vjp(c)

    def _precondition(self, state, grad, /):
        raise RuntimeError(
            f"{type(self).__name__} couples all layers: precondition them together with "
            "kernel_solve (Driver.precondition with the step's batches)"
        )


@dataclass(frozen=True)
class LinearKernelBlock(KernelBlock):
    """The kernel part of a layer ``s = W̄ ā``, rows grouped by example.

    The ``R`` rows of a batch belong to ``m = batch.n_examples`` examples, ``T = R / m`` each
    and consecutively (what the torch handlers produce: a Linear layer has ``T = 1``; a
    convolution's im2col rows are ordered by example, then position). With ``D`` and ``Ā``
    the output-gradient and homogeneous input rows,

    - the kernel is ``K_nk = Σ_{t,t'} (δ_nt · δ_kt')(ā_nt · ā_kt')``, for ``T = 1`` the
      Hadamard product ``(D Dᵀ) ∘ (Ā Āᵀ)``;
    - ``U_lᵀ vec(V)`` is ``Σ_t δ_ntᵀ V ā_nt``;
    - ``U_l c`` is ``Σ_{n,t} c_n δ_nt ā_ntᵀ``

    (:class:`curvlin.woodbury.LinearTerms`, which also picks the cheaper of the double sum
    and the per-example gradients when ``T > 1``).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import LayerBatch, LinearKernelBlock
    >>> rng = np.random.default_rng(0)
    >>> block = LinearKernelBlock(d_out=2, d_in=3)
    >>> batch = LayerBatch(inputs=rng.standard_normal((5, 3)),
    ...                    output_grads=rng.standard_normal((5, 2)), n_examples=5)
    >>> block.kernel(batch).shape, block.jvp(batch, np.ones((2, 4))).shape
    ((5, 5), (5,))
    """

    d_out: int
    d_in: int
    bias: bool = True

    def terms(self, batch: LayerBatch, /) -> LinearTerms:
        """The layer's :class:`~curvlin.woodbury.LinearTerms` on ``batch``."""
        a, d = batch.inputs, batch.output_grads
        m = batch.n_examples
        if a is None or d is None:
            raise ValueError("LinearKernelBlock: the batch needs inputs and output_grads")
        rows = a.shape[0]
        if (
            a.ndim != 2
            or a.shape[1] != self.d_in
            or d.ndim not in (2, 3)
            or tuple(d.shape[-2:]) != (rows, self.d_out)
            or rows % m
        ):
            raise ValueError(
                f"LinearKernelBlock: expected inputs (R, {self.d_in}) and output_grads "
                f"(R, {self.d_out}) or (k, R, {self.d_out}) with R a multiple of "
                f"n_examples={m}, got {tuple(a.shape)} and {tuple(d.shape)}"
            )
        xp = get_backend(a).xp
        t = rows // m
        if xp.finfo(a.dtype).bits < 32:  # half precision: the kernel and its solve in float32
            a, d = xp.astype(a, xp.float32), xp.astype(d, xp.float32)
        d = d * batch.grad_scale if batch.grad_scale != 1.0 else d
        lead = tuple(d.shape[:-2])
        return linear_terms(
            xp.reshape(a, (m, t, self.d_in)),
            xp.reshape(d, (*lead, m, t, self.d_out)),
            bias=self.bias,
        )


def kernel_solve(parts, /, *, damping) -> list[Array]:
    """``(λ I + (1/m) U Uᵀ)⁻¹ g`` for the stacked layers, through one m×m solve.

    Parameters
    ----------
    parts : sequence of (KernelBlock, LayerBatch, array)
        Each layer's block, batch (the same ``m`` examples, and output directions, for every
        layer) and gradient ``g_l`` as a (d_out, d_a) matrix.
    damping : float
        ``λ > 0``.

    Returns
    -------
    list of arrays
        The direction of each layer, shaped like its ``g_l``, in the dtype of the kernel (that
        of the rows; float32 for half-precision rows).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import LayerBatch, LinearKernelBlock, kernel_solve
    >>> rng = np.random.default_rng(0)
    >>> block = LinearKernelBlock(d_out=2, d_in=3, bias=False)
    >>> a, d = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    >>> batch = LayerBatch(inputs=a, output_grads=d, n_examples=4)
    >>> g = rng.standard_normal((2, 3))
    >>> (step,) = kernel_solve([(block, batch, g)], damping=0.1)
    >>> u = np.stack([np.outer(d[n], a[n]).ravel() for n in range(4)], axis=1)  # dense check
    >>> dense = np.linalg.solve(0.1 * np.eye(6) + u @ u.T / 4, g.ravel())
    >>> bool(np.allclose(step.ravel(), dense))
    True
    """
    parts = list(parts)
    if not parts:
        raise ValueError("kernel_solve: parts must hold at least one layer")
    terms = [block.terms(batch) for block, batch, _ in parts]
    m, rows = terms[0].n_examples, terms[0].rows
    if any((t.n_examples, t.rows) != (m, rows) for t in terms):
        raise ValueError(
            "kernel_solve: every layer's batch must hold the same examples (and output directions)"
        )
    xp = get_backend(parts[0][2]).xp
    grads = [xp.astype(g, t.dtype, copy=False) for t, (_, _, g) in zip(terms, parts)]
    kernel = LinearTerms.kernel_sum(terms)
    rhs = sum(t.jvp(g) for t, g in zip(terms, grads))
    c = woodbury_coefficients(kernel, rhs, damping=damping, n_examples=m)
    lam = float(damping)
    return [(g - t.vjp(c)) / lam for t, g in zip(terms, grads)]
