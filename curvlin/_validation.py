"""Eager argument checks shared by the public functions.

Every check looks at shapes, dtypes, devices and Python scalars only, never at array values,
so none of them synchronises with a GPU.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
from array_api_compat import device as _device

from .backends import Array, Backend, get_backend


def namespace_of(*named: tuple[str, Array], func: str):
    """Backend and namespace shared by named arrays; TypeError naming them if they disagree."""
    arrays = [a for _, a in named]
    for name, a in named:
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{func}: {name} must be an array, got {type(a).__name__}")
    try:
        backend = get_backend(*arrays)
    except TypeError:
        kinds = ", ".join(f"{name}: {type(a).__module__}.{type(a).__name__}" for name, a in named)
        raise TypeError(f"{func}: arrays must come from one array library, got {kinds}") from None
    xp = backend.xp
    first_name, first = named[0]
    if not xp.isdtype(first.dtype, "real floating"):
        raise TypeError(f"{func}: {first_name} must have a real floating dtype, got {first.dtype}")
    for name, a in named[1:]:
        if a.dtype != first.dtype:
            raise TypeError(
                f"{func}: mixed dtypes, {first_name} is {first.dtype} but {name} is {a.dtype}; "
                "cast them to one dtype first"
            )
        if _device(a) != _device(first):
            raise ValueError(
                f"{func}: arrays on different devices, {first_name} on {_device(first)} but "
                f"{name} on {_device(a)}"
            )
    return backend


def check_square(m: Array, name: str, func: str, *, stacked: bool = True) -> int:
    """Size ``n`` of a square matrix (or stack of them, ``(..., n, n)``)."""
    if m.ndim < 2 or (not stacked and m.ndim != 2) or m.shape[-1] != m.shape[-2]:
        want = "(..., n, n)" if stacked else "(n, n)"
        raise ValueError(
            f"{func}: {name} must be a square matrix of shape {want}, got {tuple(m.shape)}"
        )
    return m.shape[-1]


def check_damping(damping, name: str, func: str, *, like: Array | None = None):
    """Validate a damping: a finite number >= 0, or an array (not checked for sign: no sync).

    With ``like`` (a stack ``(..., n, n)``), an array damping must come from the same library
    and device and broadcast against the stack shape ``like.shape[:-2]`` (the result takes
    the broadcast stack shape).
    """
    if isinstance(damping, bool) or not (isinstance(damping, Real) or hasattr(damping, "shape")):
        raise TypeError(f"{func}: {name} must be a real number or an array, got {damping!r}")
    if isinstance(damping, Real):
        if not math.isfinite(damping) or damping < 0:
            raise ValueError(f"{func}: {name} must be finite and >= 0, got {damping!r}")
        return float(damping)
    if like is not None:
        try:
            get_backend(like, damping)
        except TypeError:
            raise TypeError(
                f"{func}: {name} must be a number or an array of the same library as the "
                f"matrices, got {type(damping).__module__}.{type(damping).__name__}"
            ) from None
        if _device(damping) != _device(like):
            raise ValueError(
                f"{func}: {name} is on {_device(damping)} but the matrices on {_device(like)}"
            )
        stack = tuple(like.shape[:-2])
        try:
            np.broadcast_shapes(tuple(damping.shape), stack)
        except ValueError:
            raise ValueError(
                f"{func}: {name} of shape {tuple(damping.shape)} must broadcast against the stack "
                f"shape {stack} of matrices of shape {tuple(like.shape)}"
            ) from None
    return damping


def factor_list(factors, func: str, *, square: bool = True) -> tuple[list[Array], Backend]:
    """Validate a sequence of Kronecker factors; returns them as a list and their backend."""
    if hasattr(factors, "shape") or not isinstance(factors, list | tuple):
        raise TypeError(
            f"{func}: factors must be a list or tuple of 2-D arrays, got {type(factors).__name__}"
        )
    if len(factors) == 0:
        raise ValueError(f"{func}: factors must hold at least one matrix, got an empty sequence")
    factors = list(factors)
    named = [(f"factors[{i}]", f) for i, f in enumerate(factors)]
    backend = namespace_of(*named, func=func)
    for name, f in named:
        if square:
            check_square(f, name, func, stacked=False)
        elif f.ndim != 2:
            raise ValueError(f"{func}: {name} must be a 2-D matrix, got shape {tuple(f.shape)}")
    return factors, backend


def check_kron_operand(factors: list[Array], x: Array, func: str, *, name: str = "x") -> None:
    """``x`` must end in the factors' column sizes ``(..., d_1, ..., d_k)`` and match them."""
    namespace_of(("factors[0]", factors[0]), (name, x), func=func)
    dims = tuple(f.shape[-1] for f in factors)
    k = len(dims)
    if x.ndim < k or tuple(x.shape[x.ndim - k :]) != dims:
        shapes = ", ".join(str(tuple(f.shape)) for f in factors)
        raise ValueError(
            f"{func}: {name} must have trailing axes {dims} to match factors of shapes [{shapes}], "
            f"got {name} of shape {tuple(x.shape)}"
        )
