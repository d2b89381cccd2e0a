"""Layer-input rows seen through the few reductions a block takes of them.

A convolution's rows are its im2col patches, ``k_h·k_w`` times the size of the layer input. A
block that reads its inputs only through column sums, products with a vector, a Gram matrix
(K-BFGS) and per-example products with output gradients (MBF) can take a :class:`Rows`
instead of the array, and an adapter can then compute those reductions without building every
patch at once: the torch adapter's convolution rows use ``conv2d`` and its weight gradient for
the products (per example: one grouped weight gradient) and build the Gram matrix over chunks
of examples.
"""

from __future__ import annotations

from .backends import Array, get_backend

__all__ = ["Rows", "as_rows"]


class Rows:
    """Rows ``x`` of shape (R, d), given as the array; subclasses compute the same reductions
    without it.

    Parameters
    ----------
    x : array, shape (R, d)

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import Rows
    >>> x = np.arange(6.0).reshape(3, 2)
    >>> rows = Rows(x)
    >>> rows.shape, rows.sum(), rows.matvec(np.array([1.0, -1.0]))
    ((3, 2), array([6., 9.]), array([-1., -1., -1.]))
    >>> bool(np.array_equal(rows.gram(), x.T @ x))
    True
    >>> rows.examples(1, 3, n=3).example_grads(np.ones((2, 1, 1)))  # x_n per example n = 1, 2
    array([[[2., 3.]],
    <BLANKLINE>
           [[4., 5.]]])
    """

    def __init__(self, x: Array, /):
        if x.ndim != 2:
            raise ValueError(f"Rows: x must have shape (R, d), got {tuple(x.shape)}")
        self._x = x

    @property
    def shape(self) -> tuple[int, int]:
        """``(R, d)``."""
        return tuple(self._x.shape)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self):
        return self._x.dtype

    @property
    def like(self) -> Array:
        """An array of the rows' library, device and dtype (for namespace checks)."""
        return self._x

    def array(self) -> Array:
        """The rows as an (R, d) array (built on request by subclasses)."""
        return self._x

    def astype(self, dtype) -> Rows:
        """The rows in ``dtype`` (self if they are in it already)."""
        if dtype == self.dtype:
            return self
        return Rows(get_backend(self._x).xp.astype(self._x, dtype))

    def sum(self) -> Array:
        """Column sums ``xᵀ1``, shape (d,)."""
        return get_backend(self._x).xp.sum(self._x, axis=0)

    def matvec(self, v: Array, /) -> Array:
        """``x v``, shape (R,), for ``v`` of shape (d,)."""
        return self._x @ v

    def rmatvec(self, w: Array, /) -> Array:
        """``xᵀ w``, shape (d,), for ``w`` of shape (R,)."""
        return w @ self._x

    def gram(self, *, scale: float = 1.0) -> Array:
        """``scale · xᵀx``, shape (d, d), exactly symmetric."""
        return get_backend(self._x).gram(self._x, scale=scale)

    def examples(self, start: int, stop: int, /, *, n: int) -> Rows:
        """The rows of examples ``start … stop − 1`` of ``n``, each example's ``R / n`` rows
        contiguous."""
        t = self.shape[0] // n
        return Rows(self._x[start * t : stop * t, ...])

    def example_grads(self, delta: Array, /) -> Array:
        """``γ_n = Σ_t δ_{n,t} x_{n,t}ᵀ`` per example, shape (m, d_out, d), for output
        gradients ``δ`` of shape (m, T, d_out) on these ``m·T`` rows (each example's ``T``
        rows contiguous): the per-example gradients of a linear map's weight."""
        xp = get_backend(self._x).xp
        m, t, _ = delta.shape
        return xp.matrix_transpose(delta) @ xp.reshape(self._x, (m, t, self.shape[1]))


def like_of(x: Array | Rows, /) -> Array:
    """An array of ``x``'s library, device and dtype: ``x`` itself, or a :class:`Rows`'
    :attr:`Rows.like` (for namespace checks and finiteness probes)."""
    return x.like if isinstance(x, Rows) else x


def as_rows(x: Array | Rows, /) -> Rows:
    """``x`` itself if it is a :class:`Rows`, else the (R, d) array ``x`` as one."""
    return x if isinstance(x, Rows) else Rows(x)
