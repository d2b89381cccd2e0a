"""PyTorch backend (CPU and CUDA): native batched kernels, failure reported without a sync."""

from __future__ import annotations

import numpy as np

from ._base import Backend, _checked_parts


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
        torch, n = self._torch, factor.shape[-1]
        if factor.device.type == "cpu" and n <= _SMALL and factor.numel() >= 16 * n * n:
            # Many small matrices (MBF's blocks): potri runs one matrix at a time, a batched
            # triangular solve and product do not (4096 9×9 blocks on two cores: 3.8 ms
            # against 4.8, 160 64×64 blocks: 4.3 against 6.8).
            eye = torch.eye(n, dtype=factor.dtype, device=factor.device).expand_as(factor)
            inv_l = torch.linalg.solve_triangular(factor, eye, upper=False)
            inv = inv_l.mT @ inv_l
            return inv.add_(inv.mT.clone()).mul_(0.5)  # GEMM rounding is not symmetric
        return torch.cholesky_inverse(factor)  # LAPACK potri: exactly symmetric

    def add_diagonal(self, m, value, /):
        if not isinstance(value, float):  # one value per matrix (the stack may broadcast)
            stack = self._torch.broadcast_shapes(m.shape[:-2], value.shape)
            m, value = m.expand(*stack, *m.shape[-2:]), value[..., None]
        out = m.clone(memory_format=self._torch.contiguous_format)
        out.diagonal(dim1=-2, dim2=-1).add_(value)
        return out

    def gram(self, x, /, *, scale=1.0):
        torch = self._torch
        if x.device.type == "cpu":
            out = x.new_empty((x.shape[1], x.shape[1]))
            _lower_gram(torch, x, out)
            return out.mul_(scale)
        product = torch.mm(x.mT, x)  # one GEMM launch on a GPU, mirrored to exact symmetry
        return product.add_(product.mT.clone()).mul_(0.5 * scale)

    def hadamard_kernel(self, parts, /):
        torch, parts = self._torch, _checked_parts(parts)
        first = parts[0][0]
        if any(
            x.device.type != "cpu" or x.requires_grad or x.dtype != first.dtype
            for a, d, _ in parts
            for x in (a, d)
        ):
            # a GPU (whole GEMMs), autograd (no ``out=``), mixed dtypes: the generic sum
            return super().hadamard_kernel(parts)
        m, b = first.shape[0], _GRAM_BLOCK
        out = first.new_zeros((m, m))
        # one scratch block row for each Gram, reused by every block row of every layer
        scratch_a, scratch_d = first.new_empty(b * m), first.new_empty(b * m)
        for a, d, shift in parts:
            for s in range(0, m, b):
                e = min(m, s + b)
                aa = scratch_a[: (e - s) * e].view(e - s, e)
                dd = scratch_d[: (e - s) * e].view(e - s, e)
                torch.mm(a[s:e], a[:e].mT, out=aa)
                if shift:
                    aa.add_(shift)
                torch.mm(d[s:e], d[:e].mT, out=dd)
                out[s:e, :e].addcmul_(aa, dd)
        _mirror_lower(out, b)
        return out

    def ema_(self, old, new, decay, /):
        if decay is None:
            return old.add_(new)
        return old.lerp_(new, 1.0 - decay)  # one pass over both, no temporary

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


#: Matrix size up to which a CPU stack of at least 16 is inverted by a batched solve.
_SMALL = 128

#: Width of the block rows of :func:`_lower_gram`.
_GRAM_BLOCK = 128


def _lower_gram(torch, x, out) -> None:
    """``out = xᵀx`` from the block rows of its lower triangle: about 0.56 of a GEMM's flops
    at n = 1000.

    Torch has no symmetric rank-k update (BLAS ``syrk``). Each block row of
    ``_GRAM_BLOCK`` columns, up to and including its diagonal block, is one GEMM written
    straight into ``out`` (no temporary); the strict lower triangle is then mirrored block by
    block, and each diagonal block to its own lower half (a GEMM's rounding is not
    symmetric). Measured on one core, 784 rows and 1000 columns: 9.3 ms against 10.4 for
    recursive halving and 11.4 for ``x.T @ x``. One row is an outer product (1000 columns:
    0.3 ms against 2.9 in blocks); up to two blocks' width, one GEMM and one mirror.
    """
    n, b = x.shape[1], _GRAM_BLOCK
    if torch.is_grad_enabled() and x.requires_grad:  # ``out=`` products are not differentiable
        out.copy_(x.mT @ x)
    elif x.shape[0] == 1:  # an outer product (a bias's or a vector's mode): exactly symmetric
        torch.outer(x[0], x[0], out=out)
        return
    elif n <= 2 * b:  # one GEMM: blocks would cost more in calls than they save in flops
        torch.mm(x.mT, x, out=out)
    else:
        for s in range(0, n, b):
            e = min(n, s + b)
            torch.mm(x[:, s:e].mT, x[:, :e], out=out[s:e, :e])
    _mirror_lower(out, b)


def _mirror_lower(out, b) -> None:
    """Copy the lower triangle of the square ``out`` onto its upper one, in blocks of ``b``
    (each diagonal block to its own upper half): exactly symmetric, in place."""
    n = out.shape[0]
    for s in range(0, n, b):
        e = min(n, s + b)
        out[:s, s:e] = out[s:e, :s].mT
        diag = out[s:e, s:e]
        diag.copy_(diag.tril() + diag.tril(-1).mT)
