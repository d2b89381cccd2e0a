"""Per-layer-type views of a torch module as a matrix layer ``s = W̄ ā``.

A handler knows how to turn a module's input into rows ``a`` (without the homogeneous 1), its
output gradient into rows ``δ``, and its weight gradient into the matrix ``∇W`` of shape
(d_out, d_in) whose column order matches the rows of ``a``. Register more layer types with
:func:`register_layer`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...backends import get_backend
from ...blocks import Rows

__all__ = ["Conv2dHandler", "LayerHandler", "LinearHandler", "handler_for", "register_layer"]


class LayerHandler:
    """Base class: a module seen as ``s = W̄ ā`` with ``W`` reshaped to (d_out, d_in)."""

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def params(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        """``(weight, bias)``, the bias None if the module has none (frozen or not)."""
        return self.module.weight, self.module.bias

    @property
    def bias(self) -> nn.Parameter | None:
        """The trainable bias, or None (no bias, or a frozen one: then ``ā`` has no 1)."""
        bias = self.module.bias
        return bias if bias is not None and bias.requires_grad else None

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.weight[0].numel()

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of layer inputs, shape (R, d_in)."""
        raise NotImplementedError

    def rows(self, x: torch.Tensor) -> Rows:
        """The rows of :meth:`input_rows` as a :class:`~curvlin.blocks.Rows` (for blocks with
        ``inputs_as_rows``); by default the built array."""
        return Rows(self.input_rows(x))

    def output_rows(self, grad: torch.Tensor) -> torch.Tensor:
        """Rows of output gradients, shape (R, d_out), matching :meth:`input_rows`."""
        raise NotImplementedError

    def output_view(self, out: torch.Tensor) -> torch.Tensor:
        """Outputs or output gradients as ``(..., d_out)`` without a copy where the layout
        allows (for blocks with ``flat_outputs = False``); by default :meth:`output_rows`."""
        return self.output_rows(out)

    def n_examples(self, x: torch.Tensor) -> int:
        """The number of examples in a batch input (its leading axis)."""
        return x.shape[0]

    def weight_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor viewed as (d_out, d_in)."""
        return grad.reshape(self.d_out, -1)


class LinearHandler(LayerHandler):
    """``nn.Linear``: extra leading axes (sequence positions) become more rows."""

    def input_rows(self, x):
        """Inputs ``(N, ..., d_in)`` as rows ``(N·…, d_in)``."""
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, grad):
        """Output gradients ``(N, ..., d_out)`` as rows ``(N·…, d_out)``."""
        return grad.reshape(-1, grad.shape[-1])


class Conv2dHandler(LayerHandler):
    """``nn.Conv2d`` with ``groups=1`` and zero padding: rows are im2col patches.

    Patches come from ``F.unfold`` in the order ``(c_in, k_h, k_w)`` of
    ``weight.reshape(c_out, -1)``, one row per example and output position.
    """

    def __init__(self, module: nn.Conv2d):
        if module.groups != 1:
            raise ValueError(
                f"curvlin: Conv2d with groups={module.groups} is not supported (only 1)"
            )
        if module.padding_mode != "zeros":
            raise ValueError(
                f"curvlin: Conv2d with padding_mode={module.padding_mode!r} is not supported "
                "(only 'zeros')"
            )
        super().__init__(module)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the module's zero padding applied (``x`` itself without padding)."""
        m = self.module
        if isinstance(m.padding, str):  # "same"/"valid": torch stores the explicit (maybe odd) pads
            pads = m._reversed_padding_repeated_twice
        else:
            pads = (m.padding[1], m.padding[1], m.padding[0], m.padding[0])
        return F.pad(x, pads) if any(pads) else x

    def rows(self, x):
        """The patches of ``x`` as :class:`ConvRows`: products by convolutions, the Gram
        matrix over chunks of examples; no batch of patches is built whole."""
        return ConvRows(self, self.padded(x))

    def input_rows(self, x):
        """Patches of ``(N, c_in, H, W)`` as rows ``(N·T, c_in·k_h·k_w)``, T output positions.

        The rows are written straight into their (N, H', W', c_in, k_h, k_w) layout, one
        strided copy per kernel offset: the same values as ``F.unfold`` transposed, without
        its (N, c_in·k_h·k_w, T) intermediate (a second copy of every patch) and about twice
        as fast on a CPU.
        """
        return self.patches(self.padded(x))

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`input_rows` of an input already padded (:meth:`padded`)."""
        m = self.module
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        n, c, height, width = x.shape
        h_out = (height - dh * (kh - 1) - 1) // sh + 1
        w_out = (width - dw * (kw - 1) - 1) // sw + 1
        rows = x.new_empty((n, h_out, w_out, c, kh, kw))
        for i in range(kh):
            top = i * dh
            for j in range(kw):
                left = j * dw
                shifted = x[:, :, top : top + (h_out - 1) * sh + 1 : sh,
                            left : left + (w_out - 1) * sw + 1 : sw]  # fmt: skip
                rows[:, :, :, :, i, j] = shifted.permute(0, 2, 3, 1)
        return rows.view(n * h_out * w_out, c * kh * kw)

    def output_rows(self, grad):
        """Output gradients ``(N, c_out, H', W')`` as rows ``(N·T, c_out)``."""
        return grad.flatten(2).transpose(1, 2).reshape(-1, grad.shape[1])

    def output_view(self, out):
        """Outputs ``(N, c_out, H', W')`` as a ``(N, T, c_out)`` view: rows on two axes."""
        return out.flatten(2).transpose(1, 2)


class ConvRows(Rows):
    """A convolution's im2col patches ``P`` (R = N·T rows of ``c_in·k_h·k_w``) known through
    the input: ``P v`` is a convolution with one output channel, ``Pᵀw`` the weight gradient
    of that convolution for the output gradient ``w``, the per-example gradients one grouped
    weight gradient (each example its own group), and ``PᵀP`` is summed over chunks of
    examples whose patches take about as much memory as the input.

    Parameters
    ----------
    handler : Conv2dHandler
    x : tensor, shape (N, c_in, H, W)
        The layer input, already padded (:meth:`Conv2dHandler.padded`).
    """

    def __init__(self, handler: Conv2dHandler, x: torch.Tensor):
        m = handler.module
        self.handler, self.x = handler, x
        self.kernel = (1, x.shape[1], *m.kernel_size)
        self.conv = {"stride": m.stride, "dilation": m.dilation}
        h_out, w_out = (
            (size - d * (k - 1) - 1) // s + 1
            for size, k, s, d in zip(x.shape[2:], m.kernel_size, m.stride, m.dilation)
        )
        self.positions = (h_out, w_out)
        self._shape = (x.shape[0] * h_out * w_out, x.shape[1] * m.kernel_size[0] * m.kernel_size[1])

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def like(self):
        return self.x

    def array(self):
        return self.handler.patches(self.x)

    def astype(self, dtype):
        return self if dtype == self.dtype else ConvRows(self.handler, self.x.to(dtype))

    def sum(self):
        return self.rmatvec(self.x.new_ones(self._shape[0]))

    def matvec(self, v):
        out = F.conv2d(self.x, v.to(self.x.dtype).view(self.kernel), **self.conv)
        return out.reshape(-1)

    def rmatvec(self, w):
        w = w.to(self.x.dtype).view(self.x.shape[0], 1, *self.positions)
        return torch.nn.grad.conv2d_weight(self.x, self.kernel, w, **self.conv).reshape(-1)

    def examples(self, start, stop, /, *, n):
        return ConvRows(self.handler, self.x[start:stop])

    def example_grads(self, delta):
        # (m, T, c_out) → (1, m·c_out, H', W'), the input (1, m·c_in, H, W): with m groups
        # the weight gradient is every example's own, and no patch is built (2-3× faster
        # than patches and a batched product on a CPU).
        m, _, c_out = delta.shape
        c_in = self.x.shape[1]
        grad = delta.to(self.x.dtype).transpose(1, 2).reshape(1, m * c_out, *self.positions)
        x = self.x.reshape(1, m * c_in, *self.x.shape[2:])
        size = (m * c_out, *self.kernel[1:])
        out = torch.nn.grad.conv2d_weight(x, size, grad, **self.conv, groups=m)
        return out.view(m, c_out, self._shape[1])

    def gram(self, *, scale=1.0):
        # Chunks of examples whose patches take at most the memory of the whole input.
        n = self.x.shape[0]
        chunk = max(1, self.x.numel() // (self._shape[0] // n * self._shape[1]))
        backend = get_backend(self.x)
        out = None
        for start in range(0, n, chunk):
            part = backend.gram(self.handler.patches(self.x[start : start + chunk]), scale=scale)
            out = part if out is None else out.add_(part)
        return out


_HANDLERS: dict[type[nn.Module], type[LayerHandler]] = {
    nn.Linear: LinearHandler,
    nn.Conv2d: Conv2dHandler,
}


def register_layer(module_type: type[nn.Module], handler: type[LayerHandler], /) -> None:
    """Teach curvlin a new layer type (used for it and its subclasses).

    Examples
    --------
    >>> from torch import nn
    >>> from curvlin.adapters.torch import LinearHandler, handler_for, register_layer
    >>> class MyLinear(nn.Linear):
    ...     pass
    >>> type(handler_for(MyLinear(2, 3))).__name__  # subclasses already match
    'LinearHandler'
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(
            f"register_layer: module_type must be an nn.Module class, got {module_type!r}"
        )
    if not (isinstance(handler, type) and issubclass(handler, LayerHandler)):
        raise TypeError(f"register_layer: handler must be a LayerHandler subclass, got {handler!r}")
    _HANDLERS[module_type] = handler


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler for ``module``'s most specific registered type, or None."""
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls](module)
    return None
