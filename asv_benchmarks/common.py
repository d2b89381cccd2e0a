"""Shared machinery for the curvlin asv benchmarks.

Modelled on SciPy's ``benchmarks/benchmarks/common.py`` (``XPBenchmark``): every benchmark
class takes the array backend as its first parameter, over a fixed list of labels so that
results from different machines line up; a label that is not usable here is skipped the asv
way, by raising ``NotImplementedError`` from ``setup``; and every timed call synchronises the
device before it returns, so a GPU benchmark times the work and not just the launch.

Backend labels are those of :func:`curvlin.backends.available_backends`: ``numpy``,
``array_api_strict``, ``torch`` (CPU), ``torch-cuda`` and ``cupy``.

Two things keep a full ``asv run`` (one fresh process per benchmark and parameter set) cheap:

- Skipping is decided from cheap probes first (is the module installed, is there a GPU driver)
  before anything heavy is imported: ``available_backends()`` imports torch, which alone costs
  about a second per process. The host backends ``numpy`` and ``array_api_strict`` are built
  exactly as ``available_backends()`` builds them, without importing torch.
- ``setup`` memoises the arrays it builds (:func:`cached`). asv re-runs ``setup`` before every
  timed call when a class has one, so the expensive part (random SPD factors, factorisations)
  must be built once per process. The timed calls never modify that state.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from functools import cache
from typing import ClassVar

import numpy as np

#: ``CURVLIN_ASV_SMOKE=1`` (CI's dry run, which only checks that every benchmark runs): the
#: tracks that repeat work internally (interleaved ratios, peak-memory windows) do it once.
SMOKE = os.environ.get("CURVLIN_ASV_SMOKE", "") == "1"

if SMOKE and importlib.util.find_spec("torch") is not None:
    # CI's dry run launches benchmarks from a fork server (``--launch-method forkserver``),
    # which imports this suite once and forks one process per benchmark and parameter set:
    # importing torch here, and torch._dynamo (which torch.optim imports when the first
    # optimizer is built), spares each of those ~400 processes seconds of imports. Only
    # there: a spawned process would pay the import even for the NumPy benchmarks, and a
    # forked one's peak memory (``peakmem_``) would count the parent's pages.
    import torch._dynamo  # noqa: F401

__all__ = [
    "BACKENDS",
    "DTYPES",
    "SMOKE",
    "XPBenchmark",
    "backend_or_skip",
    "cached",
    "min_times",
]

#: Every backend label, in a fixed order: the first asv parameter of each benchmark class.
BACKENDS = ("numpy", "array_api_strict", "torch", "torch-cuda", "cupy")

#: The dtypes benchmarked: float32, the practical one. Every (backend, size, dtype) point costs
#: one asv process per benchmark method, skipped points included, so float64 (doubling the
#: grid) is left out; add it here to benchmark it.
DTYPES = ("float32",)

_GPU_BACKENDS = frozenset({"torch-cuda", "cupy"})
#: The module whose absence rules a label out without importing anything.
_MODULE_OF = {
    "array_api_strict": "array_api_strict",
    "torch": "torch",
    "torch-cuda": "torch",
    "cupy": "cupy",
}


def _gpu_driver_present() -> bool:
    """A cheap guess whether any GPU could answer (NVIDIA, WSL or ROCm driver files)."""
    paths = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
    return any(os.path.exists(p) for p in paths) or shutil.which("nvidia-smi") is not None


@cache
def _available_backends() -> dict:
    from curvlin.backends import available_backends

    return available_backends()


@cache
def _host_backend(label: str):
    # The same (namespace, device) pairs that available_backends() returns for these labels.
    if label == "numpy":
        import array_api_compat

        return array_api_compat.array_namespace(np.empty(0)), "cpu"
    import array_api_strict

    return array_api_strict, array_api_strict.Device("CPU_DEVICE")


def backend_or_skip(label: str):
    """``(namespace, device)`` for a backend label, or raise ``NotImplementedError`` (asv: skip)."""
    if label not in BACKENDS:
        raise ValueError(f"unknown backend label {label!r}; expected one of {BACKENDS}")
    module = _MODULE_OF.get(label)
    if module is not None and importlib.util.find_spec(module) is None:
        raise NotImplementedError(f"{label}: {module} is not installed")
    if label in ("numpy", "array_api_strict"):
        return _host_backend(label)
    if label in _GPU_BACKENDS and not _gpu_driver_present():
        raise NotImplementedError(f"{label}: no GPU driver on this machine")
    found = _available_backends()
    if label not in found:
        raise NotImplementedError(f"{label}: not usable on this machine")
    return found[label]


_CACHE: dict = {}


def cached(key, build: Callable[[], object]):
    """``build()``, memoised under ``key``; only the latest key is kept (one per process)."""
    hit = _CACHE.get(key)
    if hit is None:
        _CACHE.clear()
        hit = _CACHE[key] = build()
    return hit


def min_times(
    funcs: Sequence[Callable[[], object]],
    sync: Callable[[object], None],
    *,
    repeat: int = 7,
    min_time: float = 0.02,
) -> list[float]:
    """Seconds per call of each of ``funcs``: the minimum over ``repeat`` timeit-style batches.

    Each function runs once to warm up, then in batches of ``number`` calls chosen so that a
    batch lasts at least ``min_time``; ``sync`` is applied to the last result of a batch before
    the clock stops (and to the warm-up result before it starts), so a batch measures
    throughput on an asynchronous device. The functions' batches are interleaved, so that they
    see the same machine state (clock, other load) and their ratio is meaningful. Garbage
    collection is off while timing, as in :mod:`timeit`.
    """
    numbers = []
    for f in funcs:
        sync(f())  # warm up: first-call allocations, lazy library initialisation
        start = time.perf_counter()
        sync(f())
        once = time.perf_counter() - start
        numbers.append(max(1, math.ceil(min_time / max(once, 1e-9))))
    best = [math.inf] * len(funcs)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            for i, (f, number) in enumerate(zip(funcs, numbers)):
                start = time.perf_counter()
                for _ in range(number):
                    out = f()
                sync(out)
                best[i] = min(best[i], (time.perf_counter() - start) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return best


class XPBenchmark:
    """Base class: ``backend`` is the first parameter; ``setup`` resolves it or skips.

    Subclasses extend ``param_names``/``params`` and call ``super().setup(backend)`` first in
    their ``setup``. After it, ``self.xp`` and ``self.device`` are the backend's namespace and
    device, and :meth:`asarray` and :meth:`spd` build inputs on it.
    """

    param_names: ClassVar[list[str]] = ["backend"]
    params: ClassVar[list[list]] = [list(BACKENDS)]
    #: asv: seconds before a single benchmark process is killed.
    timeout = 120

    def setup(self, backend, *args):
        self.backend_label = backend
        self.xp, self.device = backend_or_skip(backend)

    def asarray(self, a: np.ndarray, dtype: str):
        """A NumPy array converted to ``dtype`` on this benchmark's backend and device."""
        return self.xp.asarray(np.ascontiguousarray(a, dtype=dtype), device=self.device)

    def random(self, shape, dtype: str, *, seed: int):
        """Standard normal entries (generated with NumPy in ``dtype``, then converted)."""
        return self.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=dtype), dtype)

    def spd(self, batch: tuple[int, ...], n: int, dtype: str, *, seed: int):
        """Well-conditioned SPD matrices ``B Bᵀ/n + 0.1 I`` (spectrum in about [0.1, 4.1]).

        Built with NumPy in ``dtype`` (cheap setup) and symmetrised exactly.
        """
        b = np.random.default_rng(seed).standard_normal((*batch, n, n), dtype=dtype)
        m = b @ np.swapaxes(b, -1, -2) / n
        m = 0.5 * (m + np.swapaxes(m, -1, -2)) + 0.1 * np.eye(n, dtype=dtype)
        return self.asarray(m, dtype)

    def make_sync(self, example) -> Callable[[object], None]:
        """The backend's ``synchronize``, bound to the device of ``example``."""
        from curvlin.backends import get_backend

        return get_backend(example).synchronize
