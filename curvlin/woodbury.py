"""Sherman–Morrison–Woodbury solves with a subsampled Fisher or Gauss–Newton matrix.

With the ``m`` per-example gradients (or, for Gauss–Newton, the ``m·k`` rows ``Q_nᵀ J_n``) as
the columns of ``U`` (``P × m``), the curvature ``(1/m) U Uᵀ`` has rank at most ``m``, and

``(λ I + (1/m) U Uᵀ)⁻¹ g = (1/λ) (g − U c)``,   ``c = (λ m I + UᵀU)⁻¹ Uᵀg``,

costs one ``m × m`` Cholesky solve instead of a ``P × P`` one. :func:`woodbury_coefficients`
is that solve, given the kernel ``UᵀU`` and ``Uᵀg``; :func:`woodbury_solve` does all of it for an
explicit ``U``. A network never forms ``U``: each layer ``s = W̄ ā`` contributes its kernel and
the products ``U_lᵀ v`` (``J·v``) and ``U_l c`` (``Jᵀ·u``) from its input rows ``ā`` and
output-gradient rows ``δ`` (:func:`linear_terms`, :func:`linear_gram`, :func:`patch_gram`,
:func:`linear_jvp`, :func:`linear_vjp`), and the kernels of all layers add up.

Shapes: inputs ``a`` are ``(m, d_in)`` (one row per example, a Linear layer) or
``(m, T, d_in)`` (``T`` rows per example: convolution patches, sequence positions), without the
homogeneous 1 (``bias=True`` appends it). Output gradients ``delta`` have ``a``'s leading axes
and ``d_out`` entries, optionally with one more leading axis of ``k`` output directions per
example (the columns of an output-Hessian square root, :func:`curvlin.losses.output_hessian_sqrt`):
``(k, m, d_out)`` or ``(k, m, T, d_out)``. The kernel then has ``m·k`` rows in sample-major order,
row ``n·k + a`` for example ``n`` and direction ``a``, and so do ``J·v`` and the ``c`` of ``Jᵀ·u``.
Gradients ``v`` of ``W̄ = [W, b]`` are ``(d_out, d_in + bias)`` matrices, flattened row-major
where ``U`` is explicit.

References
----------
Ren & Goldfarb (2019), "Efficient subsampled Gauss–Newton and natural gradient methods for
training neural networks", arXiv:1906.02353; ``spec/tnt_mbf_smw_kfac.md`` §3.
"""

from __future__ import annotations

from ._validation import check_damping, namespace_of
from .backends import Array, get_backend
from .linalg import spd_solve

__all__ = [
    "LinearTerms",
    "linear_gram",
    "linear_jvp",
    "linear_terms",
    "linear_vjp",
    "patch_gram",
    "woodbury_coefficients",
    "woodbury_solve",
]

#: How :class:`LinearTerms` forms the kernel of several rows per example.
KERNEL_METHODS = ("auto", "double_sum", "per_example")


def _positive(damping, func):
    lam = check_damping(damping, "damping", func)
    if not isinstance(lam, float) or not lam > 0:
        raise ValueError(f"{func}: damping must be a number > 0, got {damping!r}")
    return lam


def woodbury_coefficients(kernel: Array, ug: Array, /, *, damping, n_examples=None) -> Array:
    """``c = (λ m I + K)⁻¹ Uᵀg``: the Woodbury solve, given the kernel and ``Uᵀg``.

    The direction is then ``(λ I + (1/m) U Uᵀ)⁻¹ g = (g − U c) / λ``.

    Parameters
    ----------
    kernel : array, shape (r, r)
        ``K = UᵀU``, symmetric positive semidefinite (only the lower triangle is read).
    ug : array, shape (r,) or (r, j)
        ``Uᵀg`` for one or ``j`` right-hand sides.
    damping : float
        ``λ > 0``.
    n_examples : int, optional
        ``m``, the normaliser of the curvature ``(1/m) U Uᵀ``; by default ``r`` (one column
        per example). Gauss–Newton with ``k`` output directions per example has ``r = m·k``.

    Returns
    -------
    array, shaped like ``ug``

    Raises
    ------
    LinAlgError
        If ``K`` or ``Uᵀg`` hold NaN or inf (one host look, that of :func:`curvlin.spd_solve`).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import woodbury_coefficients
    >>> rng = np.random.default_rng(0)
    >>> u, g = rng.standard_normal((6, 2)), rng.standard_normal(6)
    >>> c = woodbury_coefficients(u.T @ u, u.T @ g, damping=0.5)
    >>> d = (g - u @ c) / 0.5
    >>> bool(np.allclose((0.5 * np.eye(6) + u @ u.T / 2) @ d, g))
    True
    """
    func = "woodbury_coefficients"
    namespace_of(("kernel", kernel), ("ug", ug), func=func)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"{func}: kernel must have shape (r, r), got {tuple(kernel.shape)}")
    r = kernel.shape[0]
    if ug.ndim not in (1, 2) or ug.shape[0] != r:
        raise ValueError(f"{func}: ug must have shape ({r},) or ({r}, j), got {tuple(ug.shape)}")
    lam = _positive(damping, func)
    m = r if n_examples is None else n_examples
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"{func}: n_examples must be a positive int, got {n_examples!r}")
    return spd_solve(kernel, ug, damping=lam * m)


def woodbury_solve(u: Array, g: Array, /, *, damping) -> Array:
    """``(λ I + (1/m) U Uᵀ)⁻¹ g`` for ``U`` of shape (P, m), through the m×m kernel.

    Parameters
    ----------
    u : array, shape (P, m)
        One column per example (the per-example gradients).
    g : array, shape (P,) or (P, j)
    damping : float
        ``λ > 0``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import woodbury_solve
    >>> rng = np.random.default_rng(0)
    >>> u, g = rng.standard_normal((50, 4)), rng.standard_normal(50)
    >>> d = woodbury_solve(u, g, damping=0.1)
    >>> bool(np.allclose(d, np.linalg.solve(0.1 * np.eye(50) + u @ u.T / 4, g)))
    True
    """
    func = "woodbury_solve"
    xp = namespace_of(("u", u), ("g", g), func=func).xp
    if u.ndim != 2:
        raise ValueError(f"{func}: u must have shape (P, m), got {tuple(u.shape)}")
    if g.ndim not in (1, 2) or g.shape[0] != u.shape[0]:
        raise ValueError(
            f"{func}: g must have shape ({u.shape[0]},) or ({u.shape[0]}, j), got {tuple(g.shape)}"
        )
    lam = _positive(damping, func)
    ut = xp.matrix_transpose(u)
    kernel = ut @ u
    c = woodbury_coefficients(0.5 * (kernel + kernel.T), ut @ g, damping=lam)
    return (g - u @ c) / lam


class LinearTerms:
    """A layer ``s = W̄ ā``'s part of ``U``: its kernel, ``J·v`` and ``Jᵀ·u``, ``U`` never formed.

    Build it with :func:`linear_terms`. With one row per example the kernel is the Hadamard
    product ``(D Dᵀ) ∘ (A Aᵀ + 1)``; with ``T`` rows per example it is the exact double sum
    ``K_nk = Σ_{t,t'} (δ_nt · δ_kt')(ā_nt · ā_kt')``, computed either so (``(m T)²`` entries)
    or through the per-example gradients ``Σ_t δ_nt ā_ntᵀ`` (``m · d_out · d_a`` entries),
    whichever costs fewer flops (``method="auto"``). Per-example gradients, once formed, also
    serve :meth:`jvp` and :meth:`vjp`.

    Attributes
    ----------
    rows : int
        ``r = m·k``, the kernel's size.
    n_examples : int
        ``m``.
    """

    def __init__(self, xp, a, delta, bias, method):
        self._xp, self._a, self._d, self.bias = xp, a, delta, bias
        k, m, t, _ = delta.shape
        self.n_examples, self.rows, self._k, self._t = m, m * k, k, t
        self._grads = None
        if method == "auto":
            d_out, d_a = delta.shape[-1], a.shape[-1] + int(bias)
            double = (m * t) ** 2 * d_a + (k * m * t) ** 2 * d_out
            per_example = k * m * t * d_out * d_a + (k * m) ** 2 * d_out * d_a
            method = "per_example" if t > 1 and per_example < double else "double_sum"
        self.method = method

    @property
    def dtype(self):
        """The dtype of the rows, and of every result."""
        return self._a.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_a)``: the shape of ``W̄`` and of the ``v`` of :meth:`jvp`."""
        return self._d.shape[-1], self._a.shape[-1] + int(self.bias)

    def per_example_grads(self) -> Array:
        """The columns of ``U`` as rows: shape (m·k, d_out·d_a), sample-major."""
        if self._grads is None:
            xp, a, d = self._xp, self._a, self._d
            g = get_backend(a).einsum("kntj,nti->nkji", d, a)
            if self.bias:
                bias_col = xp.permute_dims(xp.sum(d, axis=2), (1, 0, 2))[
                    ..., None
                ]  # (m, k, d_out, 1)
                g = xp.concat([g, bias_col], axis=3)
            self._grads = xp.reshape(g, (self.rows, -1))
        return self._grads

    def kernel(self) -> Array:
        """``U_lᵀ U_l``, shape (m·k, m·k), exactly symmetric, in a new array."""
        xp, a, d = self._xp, self._a, self._d
        k, m, t = self._k, self.n_examples, self._t
        backend = get_backend(a)
        if self.method == "per_example":
            return backend.gram(xp.matrix_transpose(self.per_example_grads()))
        part = self._hadamard_part()
        if part is not None:
            return backend.hadamard_kernel([part])
        if t == 1:
            # the Gram matrices through the backend's symmetric product (half a GEMM's flops
            # where the library allows; fresh arrays, so the products are taken in place)
            aa = backend.gram(xp.matrix_transpose(a[:, 0, :]))
            if self.bias:
                aa += 1.0
            rows = xp.reshape(xp.permute_dims(d[:, :, 0, :], (1, 0, 2)), (self.rows, -1))
            dd = xp.reshape(backend.gram(xp.matrix_transpose(rows)), (m, k, m, k))
            dd *= aa[:, None, :, None]
            return xp.reshape(dd, (self.rows, self.rows))
        aa = xp.reshape(backend.gram(xp.matrix_transpose(xp.reshape(a, (m * t, -1)))), (m, t, m, t))
        if self.bias:
            aa += 1.0
        flat_d = xp.matrix_transpose(xp.reshape(d, (k * m * t, -1)))
        dd = xp.reshape(backend.gram(flat_d), (k, m, t, k, m, t))
        out = backend.einsum("antbks,ntks->nakb", dd, aa)
        out = xp.reshape(out, (self.rows, self.rows))
        return 0.5 * (out + xp.matrix_transpose(out))

    def _hadamard_part(self):
        """This layer as a part of :meth:`Backend.hadamard_kernel` (one row per example, one
        output direction), or None."""
        if self._t != 1 or self._k != 1 or self.method == "per_example":
            return None
        return self._a[:, 0, :], self._d[0, :, 0, :], 1.0 if self.bias else 0.0

    @staticmethod
    def kernel_sum(terms) -> Array:
        """``Σ_l U_lᵀ U_l`` over several layers' terms (the same examples), in a new array.

        The Linear layers' kernels (one row per example, no output directions) are summed in
        one :meth:`Backend.hadamard_kernel <curvlin.backends.Backend.hadamard_kernel>` (on the
        torch CPU backend: without an m × m temporary per layer), the others added to it.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlin import LinearTerms, linear_terms
        >>> rng = np.random.default_rng(0)
        >>> terms = [linear_terms(rng.standard_normal((4, 3)), rng.standard_normal((4, 2)))
        ...          for _ in range(2)]
        >>> total = LinearTerms.kernel_sum(terms)
        >>> bool(np.allclose(total, terms[0].kernel() + terms[1].kernel()))
        True
        """
        terms = list(terms)
        if not terms:
            raise ValueError("LinearTerms.kernel_sum: terms must hold at least one layer")
        if len({t.dtype for t in terms}) > 1:  # mixed dtypes: promoted, layer by layer
            return sum(t.kernel() for t in terms)
        parts = [t._hadamard_part() for t in terms]
        fused = [p for p in parts if p is not None]
        total = get_backend(terms[0]._a).hadamard_kernel(fused) if fused else None
        for t, part in zip(terms, parts):
            if part is None:
                if total is None:
                    total = t.kernel()
                else:
                    total += t.kernel()  # a new array each: summed in place
        return total

    def jvp(self, v: Array, /) -> Array:
        """``U_lᵀ vec(v)``, shape (m·k,), for ``v`` of shape (d_out, d_a)."""
        xp = self._xp
        if tuple(v.shape) != self.shape:
            raise ValueError(
                f"LinearTerms.jvp: v must have shape {self.shape}, got {tuple(v.shape)}"
            )
        if self._grads is not None:
            return self._grads @ xp.reshape(v, (-1,))
        a, d, d_in = self._a, self._d, self._a.shape[-1]
        out = xp.sum((d @ v[:, :d_in]) * a, axis=(2, 3))  # (k, m)
        if self.bias:
            out = out + xp.sum(d @ v[:, d_in], axis=2)
        return xp.reshape(xp.matrix_transpose(out), (-1,))

    def vjp(self, c: Array, /) -> Array:
        """``U_l c`` as a (d_out, d_a) matrix, for ``c`` of shape (m·k,)."""
        xp = self._xp
        if tuple(c.shape) != (self.rows,):
            raise ValueError(
                f"LinearTerms.vjp: c must have shape ({self.rows},), got {tuple(c.shape)}"
            )
        if self._grads is not None:
            return xp.reshape(c @ self._grads, self.shape)
        a, d = self._a, self._d
        k, m, t = self._k, self.n_examples, self._t
        if k == 1 and t == 1:  # Dᵀ diag(c) A, the weights on the narrower of D and A
            a, d = a[:, 0, :], d[0, :, 0, :]
            dt = xp.matrix_transpose(d)
            if a.shape[1] <= d.shape[1]:
                wa = dt @ (a * c[:, None])
            else:
                wa = xp.matrix_transpose(d * c[:, None]) @ a
            return xp.concat([wa, (dt @ c)[:, None]], axis=1) if self.bias else wa
        weights = xp.matrix_transpose(xp.reshape(c, (m, k)))  # (k, m)
        w = xp.reshape(xp.sum(d * weights[:, :, None, None], axis=0), (m * t, -1))
        wa = xp.matrix_transpose(w) @ xp.reshape(a, (m * t, -1))
        if not self.bias:
            return wa
        return xp.concat([wa, xp.sum(w, axis=0)[:, None]], axis=1)


def linear_terms(
    a: Array, delta: Array, /, *, bias: bool = True, method: str = "auto"
) -> LinearTerms:
    """A layer's kernel, ``J·v`` and ``Jᵀ·u`` from its rows (see the module docstring for shapes).

    Parameters
    ----------
    a : array, shape (m, d_in) or (m, T, d_in)
        Layer inputs without the homogeneous 1.
    delta : array, shape ``a.shape[:-1] + (d_out,)``, or with a leading axis of ``k`` directions
        Per-example output gradients (or output-Hessian directions).
    bias : bool
        Whether ``W̄`` has the bias column (the 1 appended to ``a``).
    method : {"auto", "double_sum", "per_example"}
        How the kernel of several rows per example is formed (see :class:`LinearTerms`).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import linear_terms
    >>> rng = np.random.default_rng(0)
    >>> a, delta = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    >>> terms = linear_terms(a, delta)
    >>> terms.kernel().shape, terms.jvp(np.ones((2, 4))).shape, terms.vjp(np.ones(5)).shape
    ((5, 5), (5,), (2, 4))
    """
    func = "linear_terms"
    xp = namespace_of(("a", a), ("delta", delta), func=func).xp
    if method not in KERNEL_METHODS:
        raise ValueError(f"{func}: method must be one of {KERNEL_METHODS}, got {method!r}")
    if a.ndim not in (2, 3) or delta.ndim not in (a.ndim, a.ndim + 1):
        raise ValueError(
            f"{func}: a must be (m, d_in) or (m, T, d_in) and delta the same leading shape "
            f"(optionally after k directions), got {tuple(a.shape)} and {tuple(delta.shape)}"
        )
    lead = tuple(delta.shape[delta.ndim - a.ndim : -1])
    if lead != tuple(a.shape[:-1]):
        raise ValueError(
            f"{func}: delta's rows {lead} do not match a's rows {tuple(a.shape[:-1])} "
            f"(shapes {tuple(a.shape)} and {tuple(delta.shape)})"
        )
    if not isinstance(bias, bool):
        raise TypeError(f"{func}: bias must be a bool, got {bias!r}")
    if a.ndim == 2:
        a = a[:, None, :]
        delta = delta[..., None, :]
    if delta.ndim == 3:
        delta = xp.expand_dims(delta, axis=0)
    return LinearTerms(xp, a, delta, bias, method)


def linear_gram(a: Array, delta: Array, /, *, bias: bool = True) -> Array:
    """The kernel ``U_lᵀ U_l = (D Dᵀ) ∘ (A Aᵀ + 1)`` of a Linear layer (one row per example).

    ``delta`` may carry a leading axis of ``k`` output directions (the kernel is then
    ``m·k × m·k``, sample-major).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import linear_gram
    >>> a, delta = np.array([[1.0, 2.0]]), np.array([[3.0]])
    >>> linear_gram(a, delta)  # ‖δ‖² (‖a‖² + 1)
    array([[54.]])
    """
    if getattr(a, "ndim", None) != 2:
        raise ValueError(f"linear_gram: a must have shape (m, d_in), got {getattr(a, 'shape', a)}")
    return linear_terms(a, delta, bias=bias).kernel()


def patch_gram(
    patches: Array, delta: Array, /, *, bias: bool = True, method: str = "auto"
) -> Array:
    """The exact kernel of a layer with ``T`` rows per example (a Conv2d's im2col patches).

    ``K_nk = Σ_{t,t'} (δ_nt · δ_kt')(ā_nt · ā_kt')``, by the double sum or through the
    per-example gradients, whichever is cheaper (``method``, see :class:`LinearTerms`).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import patch_gram
    >>> rng = np.random.default_rng(0)
    >>> p, d = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 2))
    >>> k1 = patch_gram(p, d, method="double_sum")
    >>> bool(np.allclose(k1, patch_gram(p, d, method="per_example")))
    True
    """
    if getattr(patches, "ndim", None) != 3:
        raise ValueError(
            "patch_gram: patches must have shape (m, T, d_in), got "
            f"{getattr(patches, 'shape', patches)}"
        )
    return linear_terms(patches, delta, bias=bias, method=method).kernel()


def linear_jvp(a: Array, delta: Array, v: Array, /, *, bias: bool = True) -> Array:
    """``J·v = U_lᵀ vec(v)``: each example's gradient dotted with ``v`` (d_out, d_a).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import linear_jvp
    >>> linear_jvp(np.array([[1.0, 2.0]]), np.array([[3.0]]), np.array([[1.0, 1.0, 1.0]]))
    array([12.])
    """
    return linear_terms(a, delta, bias=bias).jvp(v)


def linear_vjp(a: Array, delta: Array, c: Array, /, *, bias: bool = True) -> Array:
    """``Jᵀ·u = U_l c``: the ``c``-weighted sum of the per-example gradients, (d_out, d_a).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import linear_vjp
    >>> linear_vjp(np.array([[1.0, 2.0]]), np.array([[3.0]]), np.array([2.0]))
    array([[ 6., 12.,  6.]])
    """
    return linear_terms(a, delta, bias=bias).vjp(c)
