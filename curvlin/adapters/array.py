"""The array adapter: curvlin's per-layer methods for models written in plain array code.

A model written directly in an array library (NumPy, CuPy, torch tensors through
array-api-compat, any array-API namespace) declares its layers (:class:`Linear`,
:class:`Conv2d`), computes its own forward and backward passes, and hands each step's
per-layer inputs and output gradients to an :class:`ArrayPreconditioner`, which returns the
preconditioned gradients. The curvature runs on the same :class:`~curvlin.blocks.Driver` as
the torch adapter (same schedule, non-finite skip, checks and checkpoint layout); the methods
are found by name in :data:`METHODS` (:func:`register_method` adds one).

Nothing here imports a framework: the arrays' own namespace does the work, so the code that
runs on NumPy in CPU CI is the code that runs on CuPy (:mod:`curvlin.adapters.cupy`).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import array_api_compat
import numpy as np

from ..blocks import (
    Block,
    DiagonalFisherBlock,
    Driver,
    KBFGSBlock,
    KFACBlock,
    LayerBatch,
    MBFBlock,
    Schedule,
)
from ..miniblock import conv_kernel_blocks, tiled_blocks, unit_blocks

__all__ = [
    "METHODS",
    "ArrayPreconditioner",
    "Conv2d",
    "Linear",
    "Method",
    "from_dlpack",
    "im2col",
    "register_method",
]

#: The ``"curvlin"`` layout version of :meth:`ArrayPreconditioner.state_dict`.
STATE_FORMAT = 1
LOSS_REDUCTIONS = ("mean", "sum")


# -- layers ---------------------------------------------------------------------------------
def _positive(owner: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _pair(owner: str, name: str, value, *, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not (
        isinstance(pair, tuple | list)
        and len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)
    ):
        raise ValueError(
            f"{owner}: {name} must be an int >= {minimum} or a pair of them, got {value!r}"
        )
    return tuple(pair)


@dataclass(frozen=True)
class Linear:
    """A dense layer ``s = x Wᵀ + b`` with ``W`` of shape ``(d_out, d_in)``.

    Its inputs are ``(N, d_in)`` (or ``(N, ..., d_in)``: extra axes become more rows), its
    output gradients ``(N, ..., d_out)``.

    Examples
    --------
    >>> from curvlin.adapters.array import Linear
    >>> Linear(4, 3).weight_shape
    (3, 4)
    """

    d_in: int
    d_out: int
    bias: bool = True

    def __post_init__(self):
        _positive("Linear", d_in=self.d_in, d_out=self.d_out)
        if not isinstance(self.bias, bool):
            raise TypeError(f"Linear: bias must be a bool, got {self.bias!r}")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.d_out, self.d_in)

    @property
    def matrix_in(self) -> int:
        """Columns of the weight viewed as a matrix."""
        return self.d_in

    def check_input(self, shape: tuple[int, ...]) -> str | None:
        """Why an input of ``shape`` does not fit (None if it does)."""
        if len(shape) < 2 or shape[-1] != self.d_in:
            return f"must have shape (N, ..., {self.d_in})"
        return None

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output's shape for an input of ``shape``."""
        return (*shape[:-1], self.d_out)

    def check_output(self, shape: tuple[int, ...]) -> str | None:
        """Why an output (gradient) of ``shape`` does not fit (None if it does)."""
        if len(shape) < 2 or shape[-1] != self.d_out:
            return f"must have shape (N, ..., {self.d_out})"
        return None

    def input_rows(self, x, xp):
        return xp.reshape(x, (-1, self.d_in))

    def output_rows(self, g, xp):
        return xp.reshape(g, (-1, self.d_out))


@dataclass(frozen=True)
class Conv2d:
    """A 2-D convolution (cross-correlation, ``groups = 1``, zero padding), NCHW layout.

    Its weight has shape ``(c_out, c_in, k_h, k_w)`` and is seen as the ``(c_out,
    c_in·k_h·k_w)`` matrix of ``weight.reshape(c_out, -1)``; its inputs are ``(N, c_in, H,
    W)`` and its output gradients ``(N, c_out, H', W')``.

    Examples
    --------
    >>> from curvlin.adapters.array import Conv2d
    >>> conv = Conv2d(3, 8, kernel_size=3, padding=1)
    >>> conv.weight_shape, conv.output_shape((2, 3, 5, 5))
    ((8, 3, 3, 3), (2, 8, 5, 5))
    """

    c_in: int
    c_out: int
    kernel_size: tuple[int, int] | int
    stride: tuple[int, int] | int = 1
    padding: tuple[int, int] | int = 0
    bias: bool = True
    dilation: tuple[int, int] | int = 1

    def __post_init__(self):
        _positive("Conv2d", c_in=self.c_in, c_out=self.c_out)
        for name, minimum in (("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1)):
            object.__setattr__(
                self, name, _pair("Conv2d", name, getattr(self, name), minimum=minimum)
            )
        if not isinstance(self.bias, bool):
            raise TypeError(f"Conv2d: bias must be a bool, got {self.bias!r}")

    @property
    def d_out(self) -> int:
        return self.c_out

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.c_out, self.c_in, *self.kernel_size)

    @property
    def matrix_in(self) -> int:
        return self.c_in * self.kernel_size[0] * self.kernel_size[1]

    def _spatial(self, height: int, width: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
        )
        return (
            (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
            (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1,
        )

    def check_input(self, shape):
        if len(shape) != 4 or shape[1] != self.c_in:
            return f"must have shape (N, {self.c_in}, H, W)"
        if min(self._spatial(shape[2], shape[3])) < 1:
            return f"of spatial size {shape[2:]} is smaller than the kernel"
        return None

    def output_shape(self, shape):
        return (shape[0], self.c_out, *self._spatial(shape[2], shape[3]))

    def check_output(self, shape):
        if len(shape) != 4 or shape[1] != self.c_out:
            return f"must have shape (N, {self.c_out}, H', W')"
        return None

    def input_rows(self, x, xp):
        return im2col(
            x,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            xp=xp,
        )

    def output_rows(self, g, xp):
        n, c = g.shape[:2]
        return xp.reshape(xp.permute_dims(xp.reshape(g, (n, c, -1)), (0, 2, 1)), (-1, c))


def im2col(x, kernel_size, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), xp=None):
    """Patches of ``x`` of shape ``(N, C, H, W)`` as rows ``(N·H'·W', C·k_h·k_w)``.

    The rows are example-major (each example's ``H'·W'`` positions consecutive) and the
    columns in the order ``(C, k_h, k_w)`` of ``weight.reshape(c_out, -1)``: torch's
    ``F.unfold`` transposed. Array-API code: one strided copy per kernel offset.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.adapters.array import im2col
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> im2col(x, (2, 2), stride=(2, 2))
    array([[ 0.,  1.,  4.,  5.],
           [ 2.,  3.,  6.,  7.],
           [ 8.,  9., 12., 13.],
           [10., 11., 14., 15.]])
    """
    xp = xp or array_api_compat.array_namespace(x)
    dev = array_api_compat.device(x)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    n, c, height, width = x.shape
    if ph or pw:
        padded = xp.zeros((n, c, height + 2 * ph, width + 2 * pw), dtype=x.dtype, device=dev)
        padded[:, :, ph : ph + height, pw : pw + width] = x
        x, height, width = padded, height + 2 * ph, width + 2 * pw
    h_out = (height - dh * (kh - 1) - 1) // sh + 1
    w_out = (width - dw * (kw - 1) - 1) // sw + 1
    rows = xp.empty((n, h_out, w_out, c, kh, kw), dtype=x.dtype, device=dev)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dh, j * dw
            shifted = x[
                :, :, top : top + (h_out - 1) * sh + 1 : sh, left : left + (w_out - 1) * sw + 1 : sw
            ]
            rows[:, :, :, :, i, j] = xp.permute_dims(shifted, (0, 2, 3, 1))
    return xp.reshape(rows, (n * h_out * w_out, c * kh * kw))


Layer = Linear | Conv2d


def from_dlpack(tree, xp):
    """Arrays of another library (torch tensors, any DLPack producer on the same device) as
    arrays of namespace ``xp``, sharing their memory: no copy. Dicts, tuples and lists
    (``grads``, ``inputs``) are converted entry by entry; None stays None.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from curvlin.adapters.array import from_dlpack
    >>> t = torch.ones(2, 3, dtype=torch.float64)
    >>> x = from_dlpack({"fc": (t, None)}, np)["fc"][0]
    >>> type(x).__name__, np.shares_memory(x, t.numpy())
    ('ndarray', True)
    """
    if tree is None:
        return None
    if isinstance(tree, Mapping):
        return {k: from_dlpack(v, xp) for k, v in tree.items()}
    if isinstance(tree, tuple | list):
        return tuple(from_dlpack(v, xp) for v in tree)
    return xp.from_dlpack(tree)


def _layer_from_dict(d: Mapping) -> Layer:
    kind = d.get("type")
    args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k != "type"}
    return {"Linear": Linear, "Conv2d": Conv2d}[kind](**args)


def _layer_to_dict(layer: Layer) -> dict:
    return {
        "type": type(layer).__name__,
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(layer).items()},
    }


# -- methods --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A method the adapter can run: ``make(layer, **options) -> Block`` and its default
    damping (the torch front's). The options are ``make``'s keyword-only parameters."""

    make: Callable[..., Block]
    default_damping: float

    @property
    def options(self) -> tuple[str, ...]:
        """The names of the options ``make`` takes."""
        params = list(inspect.signature(self.make).parameters.values())[1:]  # after the layer
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return tuple(p.name for p in params if p.kind in kinds)


def _kfac(layer, *, decay=0.9, exact_damping=False):
    return KFACBlock(
        layer.d_out, layer.matrix_in, bias=layer.bias, decay=decay, exact=exact_damping
    )


def _kbfgs(
    layer,
    *,
    memory=None,
    a_update="minibatch",
    variant=None,
    mu1=0.2,
    a_decay=0.9,
    pair_decay=0.9,
    skip_threshold=1e-4,
    lbfgs_method="compact",
):
    variant = variant or ("additive" if isinstance(layer, Conv2d) else "convex")
    return KBFGSBlock(
        layer.d_out,
        layer.matrix_in,
        bias=layer.bias,
        memory=memory,
        a_update=a_update,
        a_decay=a_decay,
        pair_decay=pair_decay,
        mu1=mu1,
        variant=variant,
        skip_threshold=skip_threshold,
        lbfgs_method=lbfgs_method,
    )


def _diagonal(layer, *, decay=0.95):
    return DiagonalFisherBlock(layer.d_out, layer.matrix_in, bias=layer.bias, decay=decay)


def _mbf(layer, *, decay=0.95, max_block_size=64):
    if isinstance(layer, Conv2d):
        part = conv_kernel_blocks(layer.c_out, layer.c_in, *layer.kernel_size, bias=layer.bias)
    elif max_block_size is None:
        part = unit_blocks(layer.d_out, layer.d_in, bias=layer.bias)
    else:
        part = tiled_blocks(layer.d_out, layer.d_in, bias=layer.bias, max_size=max_block_size)
    return MBFBlock(layer.d_out, layer.matrix_in, bias=layer.bias, partition=part, decay=decay)


#: Method name → :class:`Method`. TNT and Shampoo are parameter blocks (one tensor and its
#: gradient, ``needs = {"grad"}`` or ``{"sampled_grad"}``: a bias is its own unit) and the
#: SMW methods couple all layers through one kernel solve over per-example rows; neither has
#: the per-layer input/output-gradient interface this adapter hands a block.
METHODS: dict[str, Method] = {
    "kfac": Method(_kfac, 1e-2),
    "kbfgs": Method(_kbfgs, 0.3),
    "kbfgsl": Method(functools.partial(_kbfgs, memory=100), 0.3),  # K-BFGS(L): 100 pairs
    "diagonal": Method(_diagonal, 1e-2),
    "mbf": Method(_mbf, 1e-3),
}


def register_method(name: str, method: Method, /) -> None:
    """Make ``method`` available to :class:`ArrayPreconditioner` as ``name``.

    The block ``method.make(layer, **options)`` returns must take the rows this adapter hands
    (``inputs``, ``outputs``, ``output_grads`` and a second pass; not ``grad`` nor a coupled
    solve).

    Examples
    --------
    >>> from curvlin.adapters.array import METHODS, Method, register_method
    >>> from curvlin.blocks import KFACBlock
    >>> register_method("kfac-fast-decay", Method(
    ...     lambda layer: KFACBlock(layer.d_out, layer.matrix_in, bias=layer.bias, decay=0.5),
    ...     default_damping=1e-2))
    >>> del METHODS["kfac-fast-decay"]
    """
    if not isinstance(name, str) or not isinstance(method, Method):
        raise TypeError("register_method: expected a name (str) and a Method")
    METHODS[name] = method


# -- the preconditioner ---------------------------------------------------------------------
def _owner(method: str) -> str:
    return f"ArrayPreconditioner({method!r})"


class ArrayPreconditioner:
    """A curvlin method for a model written in array code: gradients in, directions out.

    Parameters
    ----------
    layers : mapping of str to Linear or Conv2d
        The model's layers by name (the name is used in errors and checkpoints).
    method : str
        A key of :data:`METHODS`: ``"kfac"``, ``"kbfgs"``, ``"kbfgsl"``, ``"diagonal"``,
        ``"mbf"``.
    damping : float, optional
        The damping (an attribute you may change between steps); by default the method's.
    like : array, optional
        An array whose library, device and floating dtype every step's arrays use (e.g.
        ``cupy.empty(0, dtype=cupy.float32)``); NumPy float64 by default.
    factor_dtype : dtype, optional
        The curvature's dtype (the directions come back in ``like``'s): by default ``like``'s,
        float32 for a float16 or bfloat16 model, as in the torch adapter.
    loss_reduction : {"mean", "sum"}
        ``"mean"``: ``output_grads`` are gradients of the batch-mean loss (``δ/N``); the blocks
        are told ``N`` and rescale them. ``"sum"``: gradients of the summed loss.
    stats_every, refresh_every, check_every
        The :class:`~curvlin.blocks.Schedule`, as for the torch optimizers.
    **options
        The method's block options (e.g. ``decay`` for KFAC, ``memory`` for K-BFGS(L)).

    Notes
    -----
    A step::

        if precond.stats_due:  # inputs and output gradients only on statistics steps
            d = precond.precondition(grads, inputs=a, output_grads=g, outputs=s)
        else:
            d = precond.precondition(grads)
        if d is not None:  # None: a NaN/inf step was skipped and nothing changed
            params -= lr * d
            if precond.second_pass_due:  # K-BFGS: the same batch at the new parameters
                precond.second_pass(outputs=s_plus, output_grads=g_plus)

    ``grads[name]`` is ``(dW, db)`` with ``dW`` of the layer's weight shape and ``db`` of
    shape ``(d_out,)`` (None without a bias); ``inputs[name]`` the layer's input,
    ``output_grads[name]`` the loss's gradient with respect to its output (pre-activation),
    ``outputs[name]`` that output (K-BFGS only). Every array is checked (library, device,
    dtype, shape, presence) before anything changes, with an error naming the layer and the
    argument. The checks read shapes, dtypes and devices only: what a step reads on the host
    is the core's (the driver's one finiteness check, and on refresh steps the SPD routines'
    look at their factorisations).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.adapters.array import ArrayPreconditioner, Linear
    >>> rng = np.random.default_rng(0)
    >>> precond = ArrayPreconditioner({"fc": Linear(4, 3)}, "kfac", damping=0.1)
    >>> x, g = rng.standard_normal((8, 4)), rng.standard_normal((8, 3)) / 8
    >>> grads = {"fc": (g.T @ x, g.sum(axis=0))}
    >>> dw, db = precond.precondition(grads, inputs={"fc": x}, output_grads={"fc": g})["fc"]
    >>> dw.shape, db.shape, precond.step_count
    ((3, 4), (3,), 1)
    """

    def __init__(
        self,
        layers: Mapping[str, Layer],
        method: str = "kfac",
        damping: float | None = None,
        *,
        like=None,
        factor_dtype=None,
        loss_reduction: str = "mean",
        stats_every: int = 1,
        refresh_every: int = 1,
        check_every: int | None = None,
        **options,
    ):
        if method not in METHODS:
            raise ValueError(
                f"ArrayPreconditioner: unknown method {method!r}; known: {sorted(METHODS)}"
            )
        owner = self.owner = _owner(method)
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError(f"{owner}: layers must be a non-empty dict of name → Linear/Conv2d")
        for name, layer in layers.items():
            if not isinstance(name, str) or not isinstance(layer, Linear | Conv2d):
                raise TypeError(
                    f"{owner}: layer {name!r} must be a Linear or a Conv2d, got "
                    f"{type(layer).__name__}"
                )
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"{owner}: loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}"
            )
        spec = METHODS[method]
        unknown = sorted(set(options) - set(spec.options))
        if unknown:
            raise TypeError(
                f"{owner}: unknown options {unknown}; {method!r} takes {list(spec.options)}"
            )
        like = np.empty(0) if like is None else like
        self.xp = array_api_compat.array_namespace(like)
        if not self.xp.isdtype(like.dtype, "real floating"):
            raise TypeError(f"{owner}: like must have a real floating dtype, got {like.dtype}")
        self.device, self.dtype = array_api_compat.device(like), like.dtype
        half = [getattr(self.xp, n) for n in ("float16", "bfloat16") if hasattr(self.xp, n)]
        if factor_dtype is None:
            factor_dtype = self.xp.float32 if any(self.dtype == h for h in half) else self.dtype
        elif not self.xp.isdtype(factor_dtype, "real floating"):
            raise TypeError(
                f"{owner}: factor_dtype must be a real floating dtype, got {factor_dtype!r}"
            )
        self.factor_dtype = factor_dtype
        self.method, self.options = method, dict(options)
        self.layers = dict(layers)
        self.loss_reduction = loss_reduction
        self.damping = spec.default_damping if damping is None else damping
        _check_damping(owner, self.damping)
        blocks = {name: spec.make(layer, **options) for name, layer in self.layers.items()}
        for name, block in blocks.items():
            if block.coupled or "output_grads" not in block.needs:
                raise ValueError(
                    f"{owner}: layer {name!r}: {type(block).__name__} does not take a layer's rows"
                )
        states = {name: b.init(like, dtype=factor_dtype) for name, b in blocks.items()}
        schedule = Schedule(
            stats_every=stats_every, refresh_every=refresh_every, check_every=check_every
        )
        self.driver = Driver(blocks, states, schedule=schedule, owner=owner)
        self.needs = self.driver.needs
        self._pending = None

    # -- counters and schedule --------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Steps taken (skipped ones not counted)."""
        return self.driver.step

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because their gradients or statistics held NaN or inf."""
        return self.driver.skipped

    @property
    def stats_due(self) -> bool:
        """Whether the next :meth:`precondition` needs ``inputs`` and ``output_grads``."""
        return self.driver.stats_due()

    @property
    def second_pass_due(self) -> bool:
        """Whether :meth:`second_pass` is expected (K-BFGS, after a statistics step)."""
        return self._pending is not None

    def curvature(self, name: str):
        """One layer's current state (with ``refresh_every = 1`` the inverse is rebuilt)."""
        if name not in self.layers:
            raise KeyError(f"{name!r} is not a layer here; known: {list(self.layers)}")
        return self.driver.current(name, damping=self.damping)

    # -- checks ---------------------------------------------------------------------------
    def _check_array(self, where: str, a, shape: tuple[int, ...] | None = None) -> None:
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{where} must be an array, got {type(a).__name__}")
        try:
            xp = array_api_compat.array_namespace(a)
        except TypeError:
            xp = None
        if xp is not self.xp:
            raise TypeError(
                f"{where} is a {type(a).__module__}.{type(a).__name__}; this "
                f"optimizer's state is in {self.xp.__name__} (hand arrays over with "
                "from_dlpack, see curvlin.adapters.cupy)"
            )
        if array_api_compat.device(a) != self.device:
            raise ValueError(
                f"{where} is on device {array_api_compat.device(a)}, the state on {self.device}"
            )
        if a.dtype != self.dtype:
            raise TypeError(f"{where} has dtype {a.dtype}, expected {self.dtype}")
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise ValueError(f"{where} has shape {tuple(a.shape)}, expected {tuple(shape)}")

    def _named(self, arg: str, value) -> dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise TypeError(f"{self.owner}: {arg} must be a dict of layer name → array")
        unknown = sorted(set(value) - set(self.layers))
        if unknown:
            raise KeyError(
                f"{self.owner}: {arg} names unknown layers {unknown}; known: {list(self.layers)}"
            )
        return dict(value)

    def _check_grads(self, grads) -> dict:
        grads = self._named("grads", grads)
        out = {}
        for name, pair in grads.items():
            layer, where = self.layers[name], f"{self.owner}: layer {name!r}: grads"
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise TypeError(f"{where} must be a pair (dW, db), db None without a bias")
            gw, gb = pair
            self._check_array(f"{where}[0] (dW)", gw, layer.weight_shape)
            if layer.bias:
                if gb is None:
                    raise ValueError(f"{where}[1] (db) is missing: the layer has a bias")
                self._check_array(f"{where}[1] (db)", gb, (layer.d_out,))
            elif gb is not None:
                raise ValueError(f"{where}[1] (db) must be None: the layer has no bias")
            out[name] = (self.xp.reshape(gw, (layer.d_out, layer.matrix_in)), gb)
        return out

    def _batches(self, grads, inputs, outputs, output_grads, *, plus=None) -> dict:
        """Checked :class:`LayerBatch` per layer: the first pass's (``plus`` None) or the
        second pass's against the first (``plus`` the pending batches)."""
        inputs = self._named("inputs", inputs)
        outputs = self._named("outputs", outputs)
        output_grads = self._named("output_grads", output_grads)
        names = list(grads) if plus is None else list(plus)
        batches = {}
        for name in names:
            layer, block = self.layers[name], self.driver.blocks[name]
            needs = block.needs if plus is None else {"outputs", "output_grads"} & block.needs
            where = f"{self.owner}: layer {name!r}: "
            given = {"inputs": inputs, "outputs": outputs, "output_grads": output_grads}
            for arg in ("inputs", "outputs", "output_grads"):
                if arg in needs and name not in given[arg]:
                    call = "second_pass" if plus is not None else "precondition"
                    raise ValueError(
                        f"{where}{arg} is missing: {self.method!r} needs it in "
                        f"{call}() on this step"
                    )
            x = inputs.get(name) if "inputs" in needs else None
            out_shape = None if plus is None else plus[name]  # the second pass: the first's
            if x is not None:
                self._check_array(f"{where}inputs", x)
                why = layer.check_input(tuple(x.shape))
                if why:
                    raise ValueError(f"{where}inputs {why}, got {tuple(x.shape)}")
                out_shape = layer.output_shape(tuple(x.shape))
            for arg in ("outputs", "output_grads"):
                if arg in needs:
                    a = given[arg][name]
                    self._check_array(f"{where}{arg}", a, out_shape)
                    if out_shape is None:  # no inputs to say the shape: the layer's kind does
                        why = layer.check_output(tuple(a.shape))
                        if why:
                            raise ValueError(f"{where}{arg} {why}, got {tuple(a.shape)}")
                        out_shape = tuple(a.shape)
            n = out_shape[0]
            mean = self.loss_reduction == "mean"
            xp = self.xp
            rows = {
                arg: layer.output_rows(given[arg][name], xp)
                for arg in ("outputs", "output_grads")
                if arg in needs
            }
            batch = LayerBatch(
                inputs=None if x is None else layer.input_rows(x, xp),
                outputs=rows.get("outputs"),
                output_grads=rows.get("output_grads"),
                n_examples=n if mean else 1,
                grad_scale=float(n) if mean else 1.0,
                examples=n,
            )
            batches[name] = _Batch(batch, out_shape)
        return batches

    # -- the step ---------------------------------------------------------------------------
    def precondition(self, grads, *, inputs=None, outputs=None, output_grads=None):
        """One step: fold this batch's statistics (on statistics steps), refresh when due, and
        return the directions ``{name: (dW, db)}`` (weight-shaped, new arrays), or None when
        the step was skipped (NaN or inf in a gradient or statistic: nothing changed but
        :attr:`skipped_steps`, and a ``RuntimeWarning`` says so).

        Layers without an entry in ``grads`` are left alone. On statistics steps every layer
        in ``grads`` needs ``inputs`` and ``output_grads`` (and ``outputs`` for K-BFGS); on the
        others they are not read.
        """
        _check_damping(self.owner, self.damping)
        driver, damping = self.driver, dict.fromkeys(self.layers, self.damping)
        grads = self._check_grads(grads)
        stats_step = driver.stats_due()
        checked = self._batches(grads, inputs, outputs, output_grads) if stats_step else {}
        self._pending = None  # a second pass not taken is dropped (as the torch adapter does)
        batches = {name: b.batch for name, b in checked.items()}
        stats = driver.statistics(batches) if batches else None
        second = "second_pass" in self.needs and bool(batches)
        probes = [a for pair in grads.values() for a in pair if a is not None]
        probes += driver.probes(stats)
        if second or driver.coupled:
            probes += [a for b in batches.values() for a in b.arrays()]
        if not driver.all_finite(probes):
            driver.skip()
            return None
        del probes  # diagonals are views: they would keep every statistic alive
        if not (second or driver.check_due() or driver.coupled):
            checked = batches = {}  # the rows are consumed: freed before the refresh
        # Past the verdict the step commits whatever follows (as in the torch adapter): each
        # layer's new state replaces the old one as it is made, so two never coexist.
        states = driver.fold_refresh(stats, damping=damping, consume=True, install=True)
        directions = driver.precondition(states, grads, batches=batches, damping=damping)
        rebuilt = {}
        if batches and driver.check_due() and not second:
            states, rebuilt = driver.check(states, batches, damping=damping)
            driver.warn_rebuilt(rebuilt)
        driver.commit(states, repaired=sum(len(v) for v in rebuilt.values()))
        if second:
            self._pending = (checked, damping)
        xp = self.xp
        return {
            name: (xp.reshape(dw, self.layers[name].weight_shape), db)
            for name, (dw, db) in directions.items()
        }

    def second_pass(self, *, outputs=None, output_grads=None) -> bool:
        """The same batch after the parameter update (methods with a second pass, K-BFGS):
        ``outputs`` and ``output_grads`` of every layer of the last statistics step, at the new
        parameters. Returns False (and does nothing) when none is due (:attr:`second_pass_due`),
        or when these arrays hold NaN or inf (a ``RuntimeWarning`` then says the second-pass
        update was left out)."""
        if self._pending is None:
            return False
        checked, damping = self._pending
        shapes = {name: b.shape for name, b in checked.items()}
        plus = self._batches(None, None, outputs, output_grads, plus=shapes)
        self._pending = None
        driver = self.driver
        plus = {name: b.batch for name, b in plus.items()}
        if not driver.all_finite([a for b in plus.values() for a in b.arrays()]):
            import warnings

            warnings.warn(
                f"{self.owner}: second pass of step {driver.step - 1} left out, its "
                "outputs or output gradients hold NaN or inf",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        batches = {name: b.batch for name, b in checked.items()}
        driver.second_pass_after_commit(batches, plus, damping=damping)
        return True

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything to continue bit for bit: the method, options, layers, damping and the
        driver's counters and states, every array copied to NumPy (JSON-able otherwise)."""
        if self._pending is not None:
            raise RuntimeError(
                f"{self.owner}.state_dict: a second pass is pending; call second_pass() first"
            )
        to_numpy = _to_numpy
        return {
            "format": STATE_FORMAT,
            "method": self.method,
            "options": dict(self.options),
            "loss_reduction": self.loss_reduction,
            "layers": {name: _layer_to_dict(layer) for name, layer in self.layers.items()},
            "damping": self.damping,
            "driver": self.driver.state_dict(convert=to_numpy),
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore a :meth:`state_dict` (arrays as NumPy, put on this optimizer's device)
        after checking all of it; on any error nothing changes."""
        where = f"{self.owner}.load_state_dict"
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{where}: not an ArrayPreconditioner state_dict of format {STATE_FORMAT}"
            )
        for key, mine in (
            ("method", self.method),
            ("options", self.options),
            ("loss_reduction", self.loss_reduction),
        ):
            if state_dict.get(key) != mine:
                raise ValueError(
                    f"{where}: the checkpoint's {key} is {state_dict.get(key)!r}, "
                    f"this optimizer's {mine!r}"
                )
        layers = state_dict.get("layers")
        mine = {name: _layer_to_dict(layer) for name, layer in self.layers.items()}
        if layers != mine:
            raise ValueError(f"{where}: the checkpoint's layers {layers!r} are not {mine!r}")
        damping = state_dict.get("damping")
        _check_damping(where, damping)
        xp, dev = self.xp, self.device

        def convert(layer, key, value):
            if not isinstance(value, np.ndarray):
                raise ValueError(
                    f"{where}: layer {layer!r}: buffer {key!r} must be a NumPy "
                    f"array, got {type(value).__name__}"
                )
            return xp.asarray(value, device=dev, copy=True)

        self.driver.restore(self.driver.validated(state_dict.get("driver"), convert))
        self.damping = damping
        self._pending = None

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` with ``numpy.savez``: arrays, and the rest as JSON."""
        sd = self.state_dict()
        driver = sd["driver"]
        arrays, index = {}, []
        for name, layer in driver["layers"].items():
            for key, value in layer["arrays"].items():
                arrays[f"a{len(index)}"] = value
                index.append([name, key])
        meta = {
            **sd,
            "driver": {
                **driver,
                "layers": {
                    name: {"counters": layer["counters"]}
                    for name, layer in driver["layers"].items()
                },
            },
            "arrays": index,
        }
        with open(path, "wb") as f:  # at ``path`` exactly (savez would add ``.npz`` to a name)
            np.savez(f, meta=np.asarray(json.dumps(meta)), **arrays)

    def load(self, path: str | os.PathLike) -> None:
        """Read a :meth:`save` file (``numpy.load(allow_pickle=False)``) and restore it."""
        where = f"{self.owner}.load"
        with np.load(path, allow_pickle=False) as f:
            if "meta" not in f:
                raise ValueError(f"{where}: {path} is not an ArrayPreconditioner checkpoint")
            meta = json.loads(str(f["meta"]))
            layers = meta["driver"]["layers"]
            for layer in layers.values():
                layer["arrays"] = {}
            for i, (name, key) in enumerate(meta.pop("arrays")):
                layers[name]["arrays"][key] = f[f"a{i}"]
        self.load_state_dict(meta)


@dataclass(frozen=True)
class _Batch:
    batch: LayerBatch
    shape: tuple[int, ...]  # the layer output's shape (what the second pass must match)


def _check_damping(owner: str, damping) -> None:
    if (
        isinstance(damping, bool)
        or not isinstance(damping, int | float)
        or not (math.isfinite(damping) and damping > 0)
    ):
        raise ValueError(f"{owner}: damping must be a finite number > 0, got {damping!r}")


def _to_numpy(a) -> np.ndarray:
    from ..backends import get_backend

    return np.array(get_backend(a).to_numpy(a), copy=True)
