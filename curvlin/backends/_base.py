"""The backend protocol and the pure-standard implementation every backend inherits."""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any


class Backend:
    """Linear algebra that the array API standard lacks, for one array library.

    The pure-standard methods here work on any array-API namespace (they are what the
    ``generic`` backend uses, exercised with array-api-strict); library backends override them
    with native kernels. Every method takes and returns arrays of the backend's library and
    keeps the input's device and dtype.

    Parameters
    ----------
    xp : namespace
        The array-API-compatible namespace (as returned by ``array_api_compat.array_namespace``).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from curvlin.backends import Backend
    >>> generic = Backend(xp)
    >>> a = xp.asarray([[4.0, 2.0], [2.0, 3.0]])
    >>> factor, ok = generic.cholesky_ex(a)
    >>> bool(ok), float(generic.cholesky_solve(factor, xp.asarray([[6.0], [5.0]]))[0, 0])
    (True, 1.0)
    """

    #: Short name shown by ``python -m curvlin`` and in error messages.
    name = "generic"

    def __init__(self, xp):
        self.xp = xp

    def __repr__(self) -> str:
        return f"<curvlin backend {self.name!r}>"

    # -- factorisations -----------------------------------------------------------------
    def cholesky_ex(self, a: Array) -> tuple[Array, Array]:
        """Lower Cholesky factors of a stack ``(..., n, n)`` and a success mask ``(...)``.

        Never raises for a matrix that is not positive definite: its mask entry is False and
        its factor is unspecified. Native backends report failure without a host
        synchronisation where the library can (torch's ``cholesky_ex``).
        """
        xp = self.xp
        try:
            factor = xp.linalg.cholesky(a)
        except Exception:  # the standard leaves the failure mode open; find the bad ones
            return self._cholesky_one_by_one(a)
        return factor, _finite_with_positive_diagonal(xp, factor)

    def _cholesky_one_by_one(self, a: Array) -> tuple[Array, Array]:
        # Failure path only: a Python loop over matrices (never over elements).
        xp = self.xp
        n = a.shape[-1]
        flat = xp.reshape(a, (-1, n, n))
        factors, ok = [], []
        for i in range(flat.shape[0]):
            try:
                factors.append(xp.linalg.cholesky(flat[i, ...]))
                ok.append(True)
            except Exception:
                factors.append(xp.zeros_like(flat[i, ...]))
                ok.append(False)
        factor = xp.reshape(xp.stack(factors), a.shape)
        mask = xp.reshape(xp.asarray(ok, device=_device(a)), a.shape[:-2])
        return factor, xp.logical_and(mask, _finite_with_positive_diagonal(xp, factor))

    # -- triangular and Cholesky solves -------------------------------------------------
    def solve_triangular(self, t: Array, b: Array, /, *, lower: bool) -> Array:
        """Solve ``t @ x = b`` for triangular ``t`` ``(..., n, n)`` and ``b`` ``(..., n, k)``."""
        # The standard has no triangular solve; a general solve is correct, only slower.
        return self.xp.linalg.solve(t, b)

    def cholesky_solve(self, factor: Array, b: Array, /) -> Array:
        """Solve ``(L Lᵀ) x = b`` from the lower Cholesky factor ``L``; ``b`` is ``(..., n, k)``."""
        y = self.solve_triangular(factor, b, lower=True)
        return self.solve_triangular(self.xp.linalg.matrix_transpose(factor), y, lower=False)

    def cholesky_inverse(self, factor: Array, /) -> Array:
        """``(L Lᵀ)⁻¹`` from the lower Cholesky factor ``L``, exactly symmetric."""
        xp = self.xp
        n = factor.shape[-1]
        eye = xp.eye(n, dtype=factor.dtype, device=_device(factor))
        linv = self.solve_triangular(factor, xp.broadcast_to(eye, factor.shape), lower=True)
        inv = xp.linalg.matrix_transpose(linv) @ linv
        return 0.5 * (inv + xp.linalg.matrix_transpose(inv))  # GEMM rounding is not symmetric

    def add_diagonal(self, m: Array, value, /) -> Array:
        """``m + value·I`` in a new array, for matrices ``m`` of shape (..., n, n).

        ``value`` is a float or an array of the stack's shape (one value per matrix). The
        off-diagonal entries are ``m``'s own bits. Native backends copy ``m`` once and add
        to its diagonal in place, without the identity matrix and its product.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlin.backends import get_backend
        >>> m = np.ones((2, 2))
        >>> get_backend(m).add_diagonal(m, 0.5), m
        (array([[1.5, 1. ],
               [1. , 1.5]]), array([[1., 1.],
               [1., 1.]]))
        """
        xp = self.xp
        if not isinstance(value, float):
            value = value[..., None, None]
        return m + value * xp.eye(m.shape[-1], dtype=m.dtype, device=_device(m))

    # -- in-place updates ----------------------------------------------------------------
    def ema_(self, old: Array, new: Array, decay: float | None, /) -> Array:
        """``old ← decay · old + (1 − decay) · new`` in place (``decay=None``: ``old += new``).

        Returns ``old``; ``new`` (same shape and dtype) is unchanged. For a running average
        whose previous value nobody reads again: one temporary ``(1 − decay) · new`` instead of
        three new arrays. The torch backend interpolates in one pass, ``old + (1 − decay) ·
        (new − old)`` (``Tensor.lerp_``), with no temporary at all; the rounding differs from
        the two products' by an ulp. :func:`curvlin.blocks.ema` runs this on a copy when
        ``old`` must be kept, so a fold in place and one out of place give the same bits.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlin.backends import get_backend
        >>> old = np.ones(3)
        >>> get_backend(old).ema_(old, np.full(3, 3.0), 0.5)
        array([2., 2., 2.])
        >>> old
        array([2., 2., 2.])
        """
        if decay is None:
            old += new
        else:
            old *= decay
            old += (1.0 - decay) * new
        return old

    # -- contractions -------------------------------------------------------------------
    def gram(self, x: Array, /, *, scale: float = 1.0) -> Array:
        """``scale · xᵀx`` for a matrix ``x`` of shape (rows, n): an (n, n) Gram matrix.

        The result is exactly symmetric. Native backends skip work where the library lets
        them: NumPy hands ``x.T @ x`` to the BLAS symmetric rank-k update (``syrk``, half the
        flops of a general product), torch on the CPU computes the lower triangle in blocks.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlin.backends import get_backend
        >>> x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> get_backend(x).gram(x, scale=0.5)
        array([[17.5, 22. ],
               [22. , 28. ]])
        """
        xp = self.xp
        product = xp.matrix_transpose(x) @ x
        return scale * 0.5 * (product + xp.matrix_transpose(product))

    def hadamard_kernel(self, parts, /) -> Array:
        """``Σ (a aᵀ + s) ∘ (d dᵀ)`` over ``parts``: the summed kernels of Linear layers.

        Each part is a triple ``(a, d, s)`` of row matrices ``a`` (m, p) and ``d`` (m, q), the
        same ``m`` rows in every part, and a float ``s`` (1.0 for a layer with a bias, whose
        inputs get a homogeneous 1; :mod:`curvlin.woodbury`). The result is a new (m, m)
        array, exactly symmetric. Native backends compute only the lower triangle (torch on
        the CPU: in block rows, without an m × m temporary per layer).

        Examples
        --------
        >>> import numpy as np
        >>> from curvlin.backends import get_backend
        >>> a, d = np.array([[1.0], [2.0]]), np.array([[1.0], [-1.0]])
        >>> get_backend(a).hadamard_kernel([(a, d, 1.0)])
        array([[ 2., -3.],
               [-3.,  5.]])
        """
        xp, out = self.xp, None
        for a, d, shift in _checked_parts(parts):
            aa = self.gram(xp.matrix_transpose(a))
            if shift:
                aa += shift
            dd = self.gram(xp.matrix_transpose(d))
            dd *= aa
            if out is None:
                out = dd
            else:
                out += dd
        return out

    def einsum(self, subscripts: str, /, *operands: Array) -> Array:
        """Einstein summation over explicit subscripts (``"ij,jk->ik"``; no ellipsis).

        The pure-standard version broadcasts every operand to the joint index set and sums, so
        it is meant for small problems and references; native backends call the library's.
        """
        return _broadcast_einsum(self.xp, subscripts, operands)

    # -- device -------------------------------------------------------------------------
    def synchronize(self, x: Array | None = None) -> None:
        """Block until work queued on ``x``'s device has finished (a no-op on the CPU)."""

    def to_numpy(self, x: Array) -> np.ndarray:
        """Copy ``x`` to a NumPy array on the host (for tests, references and reports)."""
        return np.from_dlpack(x)


def _checked_parts(parts) -> list:
    """The ``(a, d, s)`` triples of :meth:`Backend.hadamard_kernel`, as a list, checked for
    matrices with the same number of rows."""
    parts = list(parts)
    if not parts:
        raise ValueError("hadamard_kernel: parts must hold at least one (a, d, s) triple")
    m = parts[0][0].shape[0]
    for i, (a, d, _) in enumerate(parts):
        if a.ndim != 2 or d.ndim != 2 or a.shape[0] != m or d.shape[0] != m:
            raise ValueError(
                f"hadamard_kernel: part {i} must hold two matrices of {m} rows, got shapes "
                f"{tuple(a.shape)} and {tuple(d.shape)}"
            )
    return parts


def _device(x: Array):
    from array_api_compat import device

    return device(x)


def _finite_with_positive_diagonal(xp, factor: Array) -> Array:
    diag = xp.linalg.diagonal(factor)
    finite = xp.all(xp.isfinite(factor), axis=(-2, -1))
    return xp.logical_and(finite, xp.all(diag > 0, axis=-1))


def _broadcast_einsum(xp, subscripts: str, operands) -> Array:
    spec = subscripts.replace(" ", "")
    if "..." in spec:
        raise ValueError(
            f"einsum: ellipsis is not supported by the generic backend, got {subscripts!r}"
        )
    if "->" in spec:
        inputs, output = spec.split("->")
    else:
        inputs = spec
        letters = inputs.replace(",", "")
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    terms = inputs.split(",")
    if len(terms) != len(operands):
        raise ValueError(
            f"einsum: subscripts {subscripts!r} name {len(terms)} operands, got {len(operands)}"
        )
    order = list(dict.fromkeys(output + "".join(terms)))
    sizes: dict[str, int] = {}
    product = None
    for term, op in zip(terms, operands):
        if len(term) != op.ndim:
            raise ValueError(f"einsum: term {term!r} does not match an operand of shape {op.shape}")
        if len(set(term)) != len(term):
            raise ValueError(f"einsum: repeated index in {term!r} is not supported")
        for c, n in zip(term, op.shape):
            if sizes.setdefault(c, n) != n and n != 1 and sizes[c] != 1:
                raise ValueError(f"einsum: index {c!r} has sizes {sizes[c]} and {n}")
            sizes[c] = max(sizes[c], n)
        present = [c for c in order if c in term]
        aligned = xp.permute_dims(op, tuple(term.index(c) for c in present))
        aligned = xp.reshape(
            aligned, tuple(op.shape[term.index(c)] if c in term else 1 for c in order)
        )
        product = aligned if product is None else product * aligned
    summed = tuple(i for i, c in enumerate(order) if c not in output)
    if summed:
        product = xp.sum(product, axis=summed)
    remaining = [c for c in order if c in output]
    result = xp.permute_dims(product, tuple(remaining.index(c) for c in output))
    return xp.broadcast_to(result, tuple(sizes[c] for c in output))
