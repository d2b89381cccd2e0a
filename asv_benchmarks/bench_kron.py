"""Cached Kronecker solves (the per-step KFAC preconditioning) against a plain GEMM."""

from __future__ import annotations

from typing import ClassVar

from curvlin import kron_factorize

from .common import BACKENDS, DTYPES, XPBenchmark, cached, min_times

#: Flops of ``fact.solve(x)`` for two n×n factors and x of shape (n, n), in units of n³:
#: π-damped (cached inverses): 2 GEMMs; exact (cached eigenvectors): 4 GEMMs (the elementwise
#: scaling, n² flops, is not counted).
_SOLVE_FLOPS_N3 = 4
_SOLVE_EXACT_FLOPS_N3 = 8
#: Flops of an n×n @ n×n matmul, in units of n³.
_MATMUL_FLOPS_N3 = 2


def _skip_unsupported(backend: str, n: int, dtype: str) -> None:
    if backend == "array_api_strict" and n > 256:
        # array-api-strict wraps NumPy: at large n it times NumPy's BLAS again; its wrapper
        # overhead, which is what it adds, shows at small n.
        raise NotImplementedError("array_api_strict is benchmarked up to n=256 only")


class KronSolve(XPBenchmark):
    """``KronFactorization.solve`` with two cached n×n factors on x of shape (n, n).

    This is the per-step cost of KFAC preconditioning of an n×n weight: the factorisation is
    refreshed every few steps (and is not timed here); the solve is ``G⁻¹ x A⁻ᵀ``, two GEMMs
    for π-damping (``exact=False``), four GEMMs and an elementwise product for exact damping.
    ``time_matmul`` times a plain ``x @ y`` of n×n matrices on the same backend, the yardstick.

    The ``track_*_gemm_fraction`` methods report the solve's achieved flop rate as a fraction
    of the matmul's, both timed in the same process (min over interleaved repeats):
    ``(flops_solve / t_solve) / (2n³ / t_matmul)``, with ``flops_solve`` = 4n³ (π) or 8n³
    (exact). It is 1.0 when a solve runs at GEMM speed, and comparable across machines.

    Goal (a target to watch, never asserted in a test): a cached π-damped ``kron_solve`` with
    two 1024×1024 factors on a 1024×1024 x runs at >= 70% of the GFLOP/s of a 1024³ matmul on
    the same backend, i.e. ``track_solve_gemm_fraction(backend, 1024, "float32") >= 0.7``.
    """

    param_names: ClassVar[list[str]] = ["backend", "n", "dtype"]
    params: ClassVar[list[list]] = [list(BACKENDS), [64, 256, 1024], list(DTYPES)]

    def setup(self, backend, n, dtype):
        _skip_unsupported(backend, n, dtype)
        super().setup(backend)

        def build():
            g = self.spd((), n, dtype, seed=1)
            a = self.spd((), n, dtype, seed=2)
            x = self.random((n, n), dtype, seed=3)
            y = self.random((n, n), dtype, seed=4)
            fact = kron_factorize([g, a], damping=1e-3)
            fact_exact = kron_factorize([g, a], damping=1e-3, exact=True)
            sync = self.make_sync(x)
            # Warm up (lazy imports, first-call allocations) outside the timed calls, which
            # matters for `asv run --quick`: one call each, no asv warm-up.
            for out in (fact.solve(x), fact_exact.solve(x), x @ y):
                sync(out)
            return x, y, fact, fact_exact, sync

        key = (type(self).__name__, backend, n, dtype)
        self.x, self.y, self.fact, self.fact_exact, self.sync = cached(key, build)

    # -- timed calls: synchronise inside, so a GPU times the work, not the launch ----------
    def time_solve(self, backend, n, dtype):
        self.sync(self.fact.solve(self.x))

    def time_solve_exact(self, backend, n, dtype):
        self.sync(self.fact_exact.solve(self.x))

    def time_matmul(self, backend, n, dtype):
        self.sync(self.x @ self.y)

    # -- achieved fraction of the GEMM rate --------------------------------------------
    def _gemm_fraction(self, fact, flops_n3):
        x, y = self.x, self.y
        t_solve, t_matmul = min_times([lambda: fact.solve(x), lambda: x @ y], self.sync)
        return (flops_n3 / t_solve) / (_MATMUL_FLOPS_N3 / t_matmul)

    def track_solve_gemm_fraction(self, backend, n, dtype):
        return self._gemm_fraction(self.fact, _SOLVE_FLOPS_N3)

    track_solve_gemm_fraction.unit = "fraction of GEMM rate"

    def track_solve_exact_gemm_fraction(self, backend, n, dtype):
        return self._gemm_fraction(self.fact_exact, _SOLVE_EXACT_FLOPS_N3)

    track_solve_exact_gemm_fraction.unit = "fraction of GEMM rate"
