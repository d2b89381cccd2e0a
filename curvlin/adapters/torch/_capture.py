"""Hooks that capture layer inputs and output gradients, only while asked to.

Inputs come from forward pre-hooks; output gradients from a tensor hook registered on the
layer's output inside a forward hook (module full-backward hooks break on in-place operations
that follow a layer). Nothing is recorded unless :attr:`LayerCapture.active` is set, the module
is in training mode and gradients are enabled, so evaluation passes never disturb statistics.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn

from ._layers import LayerHandler, handler_for

__all__ = ["UNSUPPORTED", "LayerCapture", "Record", "check_unsupported", "find_layers"]


class Record:
    """One call of one layer: its input, output and (later) output gradient."""

    __slots__ = ("__weakref__", "grad", "input", "output", "rows")

    def __init__(self, input: torch.Tensor):
        self.input = input
        self.output: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None
        #: Rows of a layer whose output and gradient are kept as means (else None).
        self.rows: int | None = None


class _Root(torch.autograd.Function):
    """A copy of ``x`` that is a root of the backward graph with every parameter frozen.

    ``anchor`` is a 0-d leaf that requires grad, so the copy requires grad and the backward
    reaches it; its gradient hook captures the output gradient and the backward stops here
    (nothing is computed for ``x`` or ``anchor``). The copy is not a leaf, so in-place
    operations after the layer stay legal, and nothing is saved for the backward: the
    original output is freed at once (a clone of a leaf would keep both, and autograd would
    store a third copy as the leaf's ``.grad``).
    """

    @staticmethod
    def forward(ctx, x, anchor):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None


#: What ``unsupported=`` accepts besides a torch optimizer factory.
UNSUPPORTED = ("error", "sgd", "adam")


def check_unsupported(unsupported, owner: str = "curvlin") -> None:
    """``unsupported`` must be one of :data:`UNSUPPORTED` or a callable optimizer factory."""
    if not (callable(unsupported) or unsupported in UNSUPPORTED):
        raise ValueError(
            f"{owner}: unsupported must be one of {UNSUPPORTED} or a callable that makes a torch "
            f"optimizer from a list of parameters, got {unsupported!r}"
        )


def find_layers(
    model: nn.Module, *, unsupported="error", owner: str = "curvlin"
) -> tuple[dict[str, LayerHandler], list[nn.Parameter]]:
    """Supported layers by name, and the trainable parameters outside them.

    A layer is supported when a handler is registered for its type (``nn.Linear``,
    ``nn.Conv2d``, ...) and its weight is trainable. Two exceptions are never claimed: the
    projections inside ``nn.MultiheadAttention`` (its ``out_proj`` is a Linear whose weight is
    used without calling the module, so no hook would ever see it), and layers whose weight or
    bias is shared with another layer (they raise: one curvature per weight is all a block
    can hold). With ``unsupported="error"`` a trainable parameter outside a supported layer
    raises a ValueError listing them; otherwise they are returned for the fallback update.
    """
    check_unsupported(unsupported, owner)
    inside_attention = {
        id(sub)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
        for sub in module.modules()
        if sub is not module
    }
    layers: dict[str, LayerHandler] = {}
    owners: dict[int, str] = {}
    for name, module in model.named_modules():  # a module registered twice comes once
        if id(module) in inside_attention:
            continue
        handler = handler_for(module)
        if handler is None or not module.weight.requires_grad:
            continue
        for p in module.parameters(recurse=False):
            if id(p) in owners:
                raise ValueError(
                    f"{owner}: layers {owners[id(p)]!r} and {name!r} share a parameter of shape "
                    f"{tuple(p.shape)}; a shared weight cannot carry two curvatures. Use one "
                    "module called twice, or freeze one of them"
                )
            owners[id(p)] = name
        layers[name] = handler
    others = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in owners
    ]
    if others and unsupported == "error":
        names = ", ".join(f"{n} {tuple(p.shape)}" for n, p in others)
        raise ValueError(
            f"{owner}: trainable parameters outside supported layers (Linear, Conv2d and "
            f"registered types): {names}. Pass unsupported='sgd', 'adam' or an optimizer "
            "factory to give them a first-order update, freeze them, or register a handler "
            "for their layer type"
        )
    if not layers:
        raise ValueError(f"{owner}: the model has no supported layer (Linear, Conv2d, ...)")
    return layers, [p for _, p in others]


class LayerCapture:
    """Forward pre-hooks and output tensor hooks on a set of layers.

    Parameters
    ----------
    layers : mapping of name to LayerHandler
    root : nn.Module, optional
        The whole model: a pre-hook on it counts the examples of every recorded forward pass
        (its first argument's leading axis), the per-example scale of a batch-mean loss.
    """

    def __init__(self, layers: Mapping[str, LayerHandler], root: nn.Module | None = None):
        self.layers = dict(layers)
        self._active = False
        self.removed = False
        #: Also hook the outputs' gradients in the next backward (empirical Fisher).
        self.capture_grads = True
        #: Make a recorded output that needs no gradient (its layer's parameters frozen, its
        #: input constant) a root of the backward graph, so that output gradients are captured
        #: with every parameter frozen: a backward without any weight-gradient GEMM.
        self.root_outputs = False
        #: Names of the layers whose outputs the blocks read (None: every layer). The others'
        #: outputs are dropped once their gradient is in (or, for the empirical Fisher, not
        #: kept at all: the gradient hook lives on the tensor), so no pre-activation outlives
        #: the backward pass that needs it.
        self.keep_outputs: set[str] | None = None
        #: Names of the layers whose outputs and output gradients are kept only as their
        #: means over rows (``Block.row_means``), reduced in the hooks.
        self.mean_outputs: set[str] = set()
        self.records: dict[str, list[Record]] = {}
        #: Examples seen by the root module while recording (0 if it could not tell).
        self.examples = 0
        self._handles = []
        if root is not None:
            self._handles.append(root.register_forward_pre_hook(self._count_examples))
        for name, handler in self.layers.items():
            module = handler.module
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook(name)))

    @property
    def active(self) -> bool:
        """Whether forward passes are recorded now (always False once removed)."""
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = bool(value) and not self.removed

    def _recording(self, module: nn.Module) -> bool:
        return self._active and module.training and torch.is_grad_enabled()

    def _count_examples(self, module, args):
        if self._recording(module) and args and torch.is_tensor(args[0]) and args[0].ndim:
            self.examples += args[0].shape[0]

    def _pre_hook(self, name):
        def hook(module, args):
            if self._recording(module):
                self.records.setdefault(name, []).append(Record(args[0].detach()))

        return hook

    def _post_hook(self, name):
        def hook(module, args, output):
            if not self._recording(module):
                return
            record = self.records[name][-1]
            replaced = self.root_outputs and not output.requires_grad
            if replaced:
                output = _Root.apply(output, self._anchor(output))
            view = self.layers[name].output_view
            mean = self.capture_grads and name in self.mean_outputs
            if mean:
                rows = view(output.detach())
                record.output, record.rows = _row_mean(rows), rows.numel() // rows.shape[-1]
            elif self.keep_outputs is None or name in self.keep_outputs or not self.capture_grads:
                record.output = output  # the sampled Fisher's backward needs every output
            if self.capture_grads and output.requires_grad:
                # A weak reference: the hook lives on the output, which the record holds, and
                # the garbage collector cannot see references held by a tensor's hooks, so a
                # strong one would keep every record and its tensors alive forever.
                ref = weakref.ref(record)

                def store(grad, ref=ref):
                    alive = ref()
                    if alive is not None:
                        alive.grad = _row_mean(view(grad)) if mean else grad

                output.register_hook(store)
            return output if replaced else None

        return hook

    @staticmethod
    def _anchor(like: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=like.dtype, device=like.device).requires_grad_()

    def clear(self) -> None:
        """Forget everything recorded (call after the statistics are consumed)."""
        self.records = {}
        self.examples = 0

    def remove(self) -> None:
        """Remove every hook; the capture is unusable afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.records = {}
        self.removed = True
        self._active = False


def _row_mean(rows: torch.Tensor) -> torch.Tensor:
    """The mean of ``(..., d)`` rows over every leading axis, shape (d,), in their dtype
    (a float64 accumulation costs about nine times as much on the CPU)."""
    return rows.mean(dim=tuple(range(rows.ndim - 1)))
