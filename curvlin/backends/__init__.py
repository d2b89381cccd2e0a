"""Pluggable backends: what the array API standard lacks, per array library.

A backend is chosen from the arrays a function is given, never by a global switch, and is
looked up lazily: ``import curvlin`` imports neither torch nor CuPy, and a library's backend
module is imported only once an array of that library arrives.

Third parties add a backend with :func:`register_backend`, or from an installed package through
an entry point in the group ``curvlin.backends`` whose object is a callable ``(xp) -> Backend |
None`` (return None for namespaces it does not handle).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata

import array_api_compat

from ._base import Array, Backend

__all__ = [
    "Backend",
    "available_backends",
    "get_backend",
    "get_namespace",
    "register_backend",
    "unregister_backend",
]

BackendFactory = Callable[[object], "Backend | None"]

_registered: list[BackendFactory] = []
_plugins: list[BackendFactory] | None = None  # entry points, loaded on first need
_cache: dict[int, tuple[object, Backend]] = {}


def register_backend(factory: BackendFactory, /) -> BackendFactory:
    """Register a backend factory, consulted before the built-in backends.

    Parameters
    ----------
    factory : callable
        ``factory(xp)`` receives the array-API namespace of the input arrays and returns a
        :class:`Backend` for it, or None when it does not handle that namespace.

    Returns
    -------
    callable
        ``factory`` itself, so this can be used as a decorator.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.backends import Backend, get_backend, register_backend, unregister_backend
    >>> class Loud(Backend):
    ...     name = "loud-numpy"
    >>> def factory(xp):
    ...     return Loud(xp) if "numpy" in xp.__name__ else None
    >>> _ = register_backend(factory)
    >>> get_backend(np.zeros(2)).name
    'loud-numpy'
    >>> unregister_backend(factory)
    >>> get_backend(np.zeros(2)).name
    'numpy'
    """
    if not callable(factory):
        raise TypeError(f"register_backend: factory must be callable, got {type(factory).__name__}")
    _registered.insert(0, factory)
    _cache.clear()
    return factory


def unregister_backend(factory: BackendFactory, /) -> None:
    """Remove a factory added with :func:`register_backend` (a no-op if it is absent).

    Parameters
    ----------
    factory : callable
        The factory given to :func:`register_backend`.

    Examples
    --------
    >>> from curvlin.backends import register_backend, unregister_backend
    >>> factory = register_backend(lambda xp: None)
    >>> unregister_backend(factory)
    >>> unregister_backend(factory)  # already gone: nothing happens
    """
    if factory in _registered:
        _registered.remove(factory)
        _cache.clear()


def get_namespace(*arrays: Array):
    """The array-API namespace shared by ``arrays``; a clear TypeError if they disagree.

    Parameters
    ----------
    *arrays : arrays
        Arrays of one library (NumPy, torch, CuPy, array-api-strict, ...).

    Returns
    -------
    namespace
        The array-API-compatible namespace (``array_api_compat`` wrappers for NumPy, torch and
        CuPy).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.backends import get_namespace
    >>> get_namespace(np.ones(3)).__name__
    'array_api_compat.numpy'
    """
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        kinds = sorted({f"{type(a).__module__}.{type(a).__qualname__}" for a in arrays})
        raise TypeError(
            f"arrays must come from one array library, got {', '.join(kinds)} ({exc})"
        ) from None


def get_backend(*arrays: Array) -> Backend:
    """The :class:`Backend` for the library that ``arrays`` belong to.

    Parameters
    ----------
    *arrays : arrays
        Arrays of one library.

    Returns
    -------
    Backend
        Registered factories are asked first, then the built-in backends, then entry points
        of the group ``curvlin.backends``; the generic pure-standard backend is the fallback.
        The answer is cached per namespace.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.backends import get_backend
    >>> get_backend(np.eye(2))
    <curvlin backend 'numpy'>
    """
    xp = get_namespace(*arrays)
    hit = _cache.get(id(xp))
    if hit is not None and hit[0] is xp:
        return hit[1]
    backend = _make_backend(xp)
    _cache[id(xp)] = (xp, backend)
    return backend


def _make_backend(xp) -> Backend:
    """Registered factories first, then the built-ins, then entry points, then generic."""
    global _plugins
    for factory in _registered:
        backend = factory(xp)
        if backend is not None:
            return backend
    builtin = _builtin_backend(xp)
    if builtin is not None:
        return builtin
    if _plugins is None:
        _plugins = [ep.load() for ep in metadata.entry_points(group="curvlin.backends")]
    for factory in _plugins:
        backend = factory(xp)
        if backend is not None:
            return backend
    return Backend(xp)


def _builtin_backend(xp) -> Backend | None:
    # The is_*_namespace checks only look at the namespace object; nothing is imported.
    if array_api_compat.is_numpy_namespace(xp):
        from ._numpy import NumPyBackend

        return NumPyBackend(xp)
    if array_api_compat.is_torch_namespace(xp):
        from ._torch import TorchBackend

        return TorchBackend(xp)
    if array_api_compat.is_cupy_namespace(xp):
        from ._cupy import CuPyBackend

        return CuPyBackend(xp)
    return None


def available_backends() -> dict[str, tuple[object, object]]:
    """Return the backends usable on this machine, as ``{label: (namespace, device)}``.

    Imports each candidate library (so call it from tools and tests, not from the core). Labels:
    ``numpy``, ``array_api_strict``, ``torch``, ``torch-cuda``, ``cupy``; the GPU ones only where a
    GPU answers.

    Returns
    -------
    dict
        ``{label: (namespace, device)}`` in the order above.

    Examples
    --------
    >>> from curvlin.backends import available_backends
    >>> "numpy" in available_backends()
    True
    """
    import numpy as np

    found: dict[str, tuple[object, object]] = {
        "numpy": (array_api_compat.array_namespace(np.empty(0)), "cpu")
    }
    try:
        import array_api_strict

        found["array_api_strict"] = (array_api_strict, array_api_strict.Device("CPU_DEVICE"))
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        xp = array_api_compat.array_namespace(torch.empty(0))
        found["torch"] = (xp, torch.device("cpu"))
        if torch.cuda.is_available():
            found["torch-cuda"] = (xp, torch.device("cuda"))
    try:
        import cupy

        if cupy.cuda.is_available():
            found["cupy"] = (array_api_compat.array_namespace(cupy.empty(0)), None)
    except Exception:  # an installed CuPy without a driver fails in many ways
        pass
    return found
