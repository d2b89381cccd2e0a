"""SPD inverses (the KFAC/MBF factor refresh), single and stacked, against a matmul; the summed
Woodbury kernel of SMW-NG against general products."""

from __future__ import annotations

from typing import ClassVar

from curvlin import spd_inverse

from .common import BACKENDS, DTYPES, XPBenchmark, cached, min_times

#: Stack depth of the "stacked" case for each n: many small blocks (MBF), a few large ones.
_STACK = {64: 16, 256: 16, 1024: 4}


def _shape(n: int, layout: str) -> tuple[int, ...]:
    return () if layout == "single" else (_STACK[n],)


class SPDInverse(XPBenchmark):
    """``spd_inverse(m, damping=1e-3)`` for ``m`` of shape (n, n) or (k, n, n).

    ``stacked`` uses k = 16 for n = 64 and 256 and k = 4 for n = 1024. ``time_matmul`` times
    ``m @ m2`` of the same shape on the same backend, and ``track_time_ratio`` reports
    ``t(spd_inverse) / t(matmul)`` measured in one process (min over interleaved repeats), a
    number that is comparable across machines: a Cholesky-based inverse costs about n³ flops
    per matrix against 2n³ for a matmul, so a ratio near 0.5-1 means LAPACK-rate work, and a
    large one means per-call overhead (validation, the success-flag check, small kernels).
    """

    param_names: ClassVar[list[str]] = ["backend", "n", "layout", "dtype"]
    params: ClassVar[list[list]] = [
        list(BACKENDS),
        [64, 256, 1024],
        ["single", "stacked"],
        list(DTYPES),
    ]

    def setup(self, backend, n, layout, dtype):
        if backend == "array_api_strict" and n > 256:
            raise NotImplementedError("array_api_strict is benchmarked up to n=256 only")
        super().setup(backend)

        def build():
            batch = _shape(n, layout)
            m = self.spd(batch, n, dtype, seed=1)
            m2 = self.random((*batch, n, n), dtype, seed=2)  # only a matmul operand
            sync = self.make_sync(m)
            # Warm up (lazy imports such as scipy.linalg, first-call allocations) outside the
            # timed calls, which matters for `asv run --quick`: one call each, no asv warm-up.
            for out in (spd_inverse(m, damping=1e-3), m @ m2):
                sync(out)
            return m, m2, sync

        key = (type(self).__name__, backend, n, layout, dtype)
        self.m, self.m2, self.sync = cached(key, build)

    def time_spd_inverse(self, backend, n, layout, dtype):
        self.sync(spd_inverse(self.m, damping=1e-3))

    def time_matmul(self, backend, n, layout, dtype):
        self.sync(self.m @ self.m2)

    def track_time_ratio(self, backend, n, layout, dtype):
        m, m2 = self.m, self.m2
        t_inv, t_matmul = min_times(
            [lambda: spd_inverse(m, damping=1e-3), lambda: m @ m2], self.sync
        )
        return t_inv / t_matmul

    track_time_ratio.unit = "spd_inverse time / matmul time"


#: The Linear layers (d_in, d_out) of the MNIST autoencoder of ``bench_kfac``.
_AUTOENCODER_LAYERS = tuple(
    zip((784, 1000, 500, 250, 30, 250, 500, 1000), (1000, 500, 250, 30, 250, 500, 1000, 784))
)


class HadamardKernel(XPBenchmark):
    """The summed Woodbury kernel ``Σ_l (A_l A_lᵀ + 1) ∘ (D_l D_lᵀ)`` of SMW-NG (every step).

    ``m`` rows through the eight Linear layers of the MNIST autoencoder (inner widths summing
    to 8628): :meth:`Backend.hadamard_kernel <curvlin.backends.Backend.hadamard_kernel>`
    against ``time_general``, the same sum from general products (two GEMMs, a shift, a
    product and a sum per layer). ``track_time_ratio`` is ``t(hadamard_kernel) / t(general)``
    measured in one process: about 0.56 would be the flops of the lower triangle alone. Torch
    on the CPU computes it in block rows (0.59 at m = 1000, 0.81 at 256, one thread,
    2026-12-02); NumPy hands both forms to BLAS ``syrk`` (0.99); array_api_strict pays the
    generic symmetrisation (1.23).
    """

    param_names: ClassVar[list[str]] = ["backend", "m", "dtype"]
    params: ClassVar[list[list]] = [list(BACKENDS), [256, 1000], list(DTYPES)]

    def setup(self, backend, m, dtype):
        if backend == "array_api_strict" and m > 256:
            raise NotImplementedError("array_api_strict is benchmarked at m=256 only")
        super().setup(backend)

        def build():
            from curvlin.backends import get_backend

            parts = [
                (
                    self.random((m, p), dtype, seed=2 * i),
                    self.random((m, q), dtype, seed=2 * i + 1),
                    1.0,
                )
                for i, (p, q) in enumerate(_AUTOENCODER_LAYERS)
            ]
            backend_ = get_backend(parts[0][0])
            sync = self.make_sync(parts[0][0])
            sync(backend_.hadamard_kernel(parts))  # warm-up outside the timed calls
            return backend_, parts, sync

        key = (type(self).__name__, backend, m, dtype)
        self.backend, self.parts, self.sync = cached(key, build)

    def _general(self):
        xp, total = self.xp, None
        for a, d, shift in self.parts:
            term = (a @ xp.matrix_transpose(a) + shift) * (d @ xp.matrix_transpose(d))
            total = term if total is None else total + term
        return total

    def time_hadamard_kernel(self, backend, m, dtype):
        self.sync(self.backend.hadamard_kernel(self.parts))

    def time_general(self, backend, m, dtype):
        self.sync(self._general())

    def track_time_ratio(self, backend, m, dtype):
        t_kernel, t_general = min_times(
            [lambda: self.backend.hadamard_kernel(self.parts), self._general], self.sync
        )
        return t_kernel / t_general

    track_time_ratio.unit = "hadamard_kernel time / general products time"
