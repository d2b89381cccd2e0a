"""NumPy backend: triangular and Cholesky solves from SciPy (batched since SciPy 1.14)."""

from __future__ import annotations

import numpy as np

from ._base import Backend, _finite_with_positive_diagonal


class NumPyBackend(Backend):
    name = "numpy"

    def cholesky_ex(self, a):
        try:
            factor = np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            return self._cholesky_one_by_one(a)
        return factor, _finite_with_positive_diagonal(self.xp, factor)

    def solve_triangular(self, t, b, /, *, lower):
        from scipy.linalg import solve_triangular

        return solve_triangular(t, b, lower=lower, check_finite=False)

    def cholesky_solve(self, factor, b, /):
        from scipy.linalg import cho_solve

        return cho_solve((factor, True), b, check_finite=False)

    def gram(self, x, /, *, scale=1.0):
        # NumPy's matmul recognises ``x.T @ x`` (one buffer, transposed) and calls BLAS
        # ``syrk``, which computes one triangle (half a GEMM's flops) and mirrors it.
        product = x.T @ x
        product *= scale
        return product

    def einsum(self, subscripts, /, *operands):
        return np.einsum(subscripts, *operands, optimize=len(operands) > 2)

    def to_numpy(self, x):
        return np.asarray(x)
