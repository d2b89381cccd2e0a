"""SPD inverses (the KFAC/MBF factor refresh), single and stacked, against a matmul."""

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
