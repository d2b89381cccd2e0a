"""The CuPy adapter: curvlin's per-layer methods for models written directly in CuPy.

:class:`CuPyPreconditioner` is :class:`~curvlin.adapters.array.ArrayPreconditioner` with its
state on the current CuPy device: the same code, which CPU CI runs on NumPy. CuPy is imported
when a preconditioner is made, never at import. Every kernel is queued on the current stream
(``cupy.cuda.get_current_stream()``, so ``with stream:`` blocks are respected) and allocates
from CuPy's current memory pool; the adapter reads nothing on the host, so a step
synchronises only where the core does (the driver's finiteness check, a single scalar, and on
refresh steps one look per SPD inverse at its factorisation). Tensors of torch (or any
DLPack producer) on the same GPU are handed over without a copy by :func:`from_dlpack` (the
DLPack protocol orders the producer's stream before CuPy's current one); directions go back
by ``torch.from_dlpack``.

Status: **untested on a GPU**. No run on a GPU has been observed yet; ``scripts/gpu_check.sh``
is the check to run where one is available (see ``docs/array_adapter.md``).
"""

from __future__ import annotations

from collections.abc import Mapping

from . import array
from .array import ArrayPreconditioner, Conv2d, Layer, Linear

__all__ = ["Conv2d", "CuPyPreconditioner", "Linear", "from_dlpack"]


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise ImportError(
            "curvlin.adapters.cupy needs CuPy (pip install cupy-cuda12x, or curvlin[cupy])"
        ) from e
    return cupy


def from_dlpack(x):
    """``x`` (a torch CUDA tensor, or any DLPack producer on the GPU) as a ``cupy.ndarray``
    sharing its memory: no copy. Nested dicts and tuples (``grads``, ``inputs``) are
    converted entry by entry; None stays None."""
    return array.from_dlpack(x, _cupy())


class CuPyPreconditioner(ArrayPreconditioner):
    """:class:`~curvlin.adapters.array.ArrayPreconditioner` on CuPy arrays.

    Parameters
    ----------
    layers, method, damping, **options
        As for :class:`~curvlin.adapters.array.ArrayPreconditioner`.
    dtype : str or dtype
        The floating dtype of the model's arrays and of the curvature (``"float32"``).

    Notes
    -----
    The state lives on the device that is current when the preconditioner is made; every
    array of a step must be a ``cupy.ndarray`` of ``dtype`` on that device (else an error
    naming the layer and the argument). :meth:`state_dict` copies the state to NumPy (a
    device-to-host copy, not on the hot path); :meth:`load_state_dict` puts it back on the
    device.
    """

    def __init__(
        self,
        layers: Mapping[str, Layer],
        method: str = "kfac",
        damping: float | None = None,
        *,
        dtype="float32",
        **options,
    ):
        cupy = _cupy()
        super().__init__(
            layers, method, damping, like=cupy.empty(0, dtype=cupy.dtype(dtype)), **options
        )
