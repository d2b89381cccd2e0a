"""CuPy backend: cuSOLVER/cuBLAS through CuPy, failures read from the factor, not from a sync."""

from __future__ import annotations

from ._base import Backend, _finite_with_positive_diagonal


class CuPyBackend(Backend):
    name = "cupy"

    def __init__(self, xp):
        super().__init__(xp)
        import cupy

        self._cupy = cupy

    def cholesky_ex(self, a):
        # By default (cupyx.errstate(linalg="ignore")) CuPy does not sync to check the
        # factorisation; a failed one holds NaN, which the mask below catches.
        try:
            factor = self._cupy.linalg.cholesky(a)
        except self._cupy.linalg.LinAlgError:
            return self._cholesky_one_by_one(a)
        return factor, _finite_with_positive_diagonal(self.xp, factor)

    def solve_triangular(self, t, b, /, *, lower):
        from cupyx.scipy.linalg import solve_triangular

        if t.ndim == 2:
            return solve_triangular(t, b, lower=lower, check_finite=False)
        # cupyx's solve_triangular is not batched: a general batched solve keeps one launch.
        return self._cupy.linalg.solve(t, b)

    def einsum(self, subscripts, /, *operands):
        return self._cupy.einsum(subscripts, *operands)

    def synchronize(self, x=None):
        self._cupy.cuda.get_current_stream().synchronize()

    def to_numpy(self, x):
        return self._cupy.asnumpy(x)
