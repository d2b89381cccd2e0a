"""PyTorch backend (CPU and CUDA): native batched kernels, failure reported without a sync."""

from __future__ import annotations

import numpy as np

from ._base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, xp):
        super().__init__(xp)
        import torch

        self._torch = torch

    def cholesky_ex(self, a):
        factor, info = self._torch.linalg.cholesky_ex(a)
        # A NaN or inf anywhere in the lower triangle reaches the diagonal of its row.
        diag = factor.diagonal(dim1=-2, dim2=-1)
        return factor, (info == 0) & self._torch.isfinite(diag).all(dim=-1)

    def solve_triangular(self, t, b, /, *, lower):
        return self._torch.linalg.solve_triangular(t, b, upper=not lower)

    def cholesky_solve(self, factor, b, /):
        return self._torch.cholesky_solve(b, factor)

    def cholesky_inverse(self, factor, /):
        return self._torch.cholesky_inverse(factor)  # LAPACK potri: exactly symmetric

    def einsum(self, subscripts, /, *operands):
        return self._torch.einsum(subscripts, *operands)

    def synchronize(self, x=None):
        torch = self._torch
        if x is None:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        elif x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    def to_numpy(self, x):
        x = x.detach().cpu()
        if x.dtype == self._torch.bfloat16:  # NumPy has no bfloat16
            x = x.float()
        return np.asarray(x)
