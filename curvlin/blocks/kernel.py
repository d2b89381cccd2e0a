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
(one row for a Linear layer on vectors, several for sequences or convolution patches).

References
----------
Ren & Goldfarb (2019), "Efficient subsampled Gauss–Newton and natural gradient methods for
training neural networks", arXiv:1906.02353; ``spec/tnt_mbf_smw_kfac.md`` §3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._validation import check_damping
from ..backends import Array, get_backend
from ..linalg import spd_solve
from .base import LayerBatch, homogeneous

__all__ = ["KernelBlock", "LinearKernelBlock", "kernel_solve"]


class KernelBlock:
    """One layer's part of a kernel method: its kernel, ``U_lᵀ v`` and ``U_l c``.

    ``U_l`` has one column per example: the example's gradient of ``W̄ = [W, b]``, flattened
    row-major, at the per-example scale (``batch.grad_scale`` applied).
    """

    #: What the block needs from a step (as :attr:`Block.needs`).
    needs: ClassVar[frozenset[str]] = frozenset({"inputs", "output_grads"})

    def kernel(self, batch: LayerBatch, /) -> Array:
        """``U_lᵀ U_l``, shape (m, m), for the ``m = batch.n_examples`` examples."""
        raise NotImplementedError

    def jvp(self, batch: LayerBatch, v: Array, /) -> Array:
        """``U_lᵀ vec(v)``, shape (m,), for ``v`` of shape (d_out, d_a)."""
        raise NotImplementedError

    def vjp(self, batch: LayerBatch, c: Array, /) -> Array:
        """``U_l c`` as a (d_out, d_a) matrix, for ``c`` of shape (m,)."""
        raise NotImplementedError


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
    - ``U_l c`` is ``Σ_{n,t} c_n δ_nt ā_ntᵀ``.

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

    def _rows(self, batch: LayerBatch):
        a, d = batch.inputs, batch.output_grads
        m = batch.n_examples
        if a is None or d is None:
            raise ValueError("LinearKernelBlock: the batch needs inputs and output_grads")
        rows = a.shape[0]
        if (
            a.ndim != 2
            or a.shape[1] != self.d_in
            or tuple(d.shape) != (rows, self.d_out)
            or rows % m
        ):
            raise ValueError(
                f"LinearKernelBlock: expected inputs (R, {self.d_in}) and output_grads "
                f"(R, {self.d_out}) with R a multiple of n_examples={m}, got "
                f"{tuple(a.shape)} and {tuple(d.shape)}"
            )
        xp = get_backend(a).xp
        abar = homogeneous(a, bias=self.bias)
        t = rows // m
        d = d * batch.grad_scale if batch.grad_scale != 1.0 else d
        return xp, xp.reshape(abar, (m, t, self.d_in + int(self.bias))), xp.reshape(d, (m, t, -1))

    def kernel(self, batch: LayerBatch, /) -> Array:
        """``U_lᵀ U_l``, shape (m, m)."""
        xp, abar, d = self._rows(batch)
        if abar.shape[1] == 1:
            a2, d2 = abar[:, 0, :], d[:, 0, :]
            return (d2 @ d2.T) * (a2 @ a2.T)
        backend = get_backend(abar)
        dd = backend.einsum("nti,ksi->ntks", d, d)
        aa = backend.einsum("nti,ksi->ntks", abar, abar)
        return xp.sum(dd * aa, axis=(1, 3))

    def jvp(self, batch: LayerBatch, v: Array, /) -> Array:
        """``U_lᵀ vec(v)``, shape (m,), for ``v`` of shape (d_out, d_a)."""
        xp, abar, d = self._rows(batch)
        return xp.sum((d @ v) * abar, axis=(1, 2))

    def vjp(self, batch: LayerBatch, c: Array, /) -> Array:
        """``U_l c`` as a (d_out, d_a) matrix, for ``c`` of shape (m,)."""
        xp, abar, d = self._rows(batch)
        m, t = abar.shape[0], abar.shape[1]
        weighted = xp.reshape(d * c[:, None, None], (m * t, -1))
        return weighted.T @ xp.reshape(abar, (m * t, -1))


def kernel_solve(parts, /, *, damping) -> list[Array]:
    """``(λ I + (1/m) U Uᵀ)⁻¹ g`` for the stacked layers, through one m×m solve.

    Parameters
    ----------
    parts : sequence of (KernelBlock, LayerBatch, array)
        Each layer's block, batch (the same ``m`` examples for every layer) and gradient
        ``g_l`` as a (d_out, d_a) matrix.
    damping : float
        ``λ > 0``.

    Returns
    -------
    list of arrays
        The direction of each layer, shaped like its ``g_l``.

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
    lam = check_damping(damping, "damping", "kernel_solve")
    if not lam > 0:
        raise ValueError(f"kernel_solve: damping must be > 0, got {damping!r}")
    m = parts[0][1].n_examples
    if any(batch.n_examples != m for _, batch, _ in parts):
        raise ValueError("kernel_solve: every layer's batch must hold the same examples")
    kernel = sum(block.kernel(batch) for block, batch, _ in parts)
    rhs = sum(block.jvp(batch, g) for block, batch, g in parts)
    c = spd_solve(kernel, rhs[:, None], damping=lam * m)[:, 0]
    return [(g - block.vjp(batch, c)) / lam for block, batch, g in parts]
