"""The protocol every per-layer curvature block implements, and what a step hands it.

A block is the curvature mathematics of one layer ``s = W̄ ā`` with ``W̄ = [W, b]`` of shape
(``d_out``, ``d_a``), written once against the array API. It declares in :attr:`Block.needs`
what a step must capture for it, and offers a fixed life cycle that the
:class:`~curvlin.blocks.Driver` runs for every method alike:

1. :meth:`Block.init` makes a state of fixed-shape arrays;
2. on statistics steps, :meth:`Block.statistics` turns a :class:`LayerBatch` into a dictionary
   of arrays that are means over examples (so ranks can average them) and :meth:`Block.fold`
   folds them into the state (an EMA, a warm start);
3. on refresh steps, :meth:`Block.refresh` does the amortised, expensive part (inverses,
   roots, eigenbases); when every step refreshes, :meth:`Block.release` drops it again at the
   commit, so that it is scratch memory of the step rather than state;
4. on every step, :meth:`Block.precondition` turns a gradient into a direction;
5. methods that need it (``"second_pass" in needs``) get the same batch again after the
   parameter update, in :meth:`Block.second_pass`;
6. every ``check_every`` statistics steps, :meth:`Block.check` may repair a state that rounding
   has spoiled (one host synchronisation).

Bias handling lives here and nowhere else: :meth:`Block.precondition` appends the bias
gradient as the last column of ``∇W̄`` and splits the direction back, :func:`homogeneous` appends
the 1 to input rows. A block implements the private :meth:`Block._precondition` on the
``(d_out, d_a)`` matrix only.

States are frozen dataclasses that derive from :class:`BlockState`: they list their arrays and
host-side integer counters and are rebuilt from them, which is what checkpoints save and what a
distributor all-reduces or broadcasts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from array_api_compat import device as _device

from .._rows import Rows, as_rows, like_of
from ..backends import Array, get_backend

__all__ = [
    "NEEDS",
    "Block",
    "BlockState",
    "LayerBatch",
    "Rows",
    "as_rows",
    "ema",
    "homogeneous",
    "homogeneous_gram",
]

#: What a block may need from a step: the layer's input rows, its output (pre-activation)
#: rows, per-example output-gradient rows, and a second forward/backward pass on the same batch
#: after the parameter update; or, for a parameter block (one tensor, no layer), the
#: parameter's gradient (``"grad"``) or its gradient at sampled labels (``"sampled_grad"``).
NEEDS = frozenset({"inputs", "outputs", "output_grads", "second_pass", "grad", "sampled_grad"})


@dataclass(frozen=True)
class LayerBatch:
    """One step's captured quantities for one layer, as rows.

    Attributes
    ----------
    inputs : array of shape (R, d_in), Rows, or None
        Layer inputs without the homogeneous 1: one row per example, or per example and
        spatial position for a convolution (im2col patches); a :class:`Rows` for a block with
        ``inputs_as_rows``.
    outputs : array of shape (R, d_out), or None
        The layer's outputs (pre-activations) on the same rows (for a block with
        ``row_means``, possibly their mean over the rows, shape ``(1, d_out)``).
    output_grads : array of shape (R, d_out), or None
        Output gradients on the same rows (the same shape as ``outputs``);
        ``grad_scale · output_grads`` are per-example gradients (``N ×`` autograd's gradient
        of a batch-mean loss, or sampled ones for a sampled Fisher).
    n_examples : int
        ``N``, the number of examples the ``R`` rows come from (the normaliser of a mean over
        examples; 1 for a summed loss).
    grad_scale : float
        The factor that makes ``output_grads`` per-example. Blocks apply it to the statistics
        they compute (a Gram matrix's scale, a mean), never to every row: one pass fewer.
    grad : array of the parameter's shape, or None
        For a parameter block (``"grad"`` or ``"sampled_grad"`` in its needs): the gradient of
        the batch's loss (batch-mean or summed, as the loss reduces) with respect to the one
        parameter, at the true or at sampled labels. No rows; ``n_examples`` is then the
        batch size behind a batch-mean gradient where the adapter knows it (the sampled
        one), else 1.
    examples : int or None
        How many examples the rows come from, whatever the loss's reduction: the rows are
        example-major, each example's ``R / examples`` rows contiguous (a convolution's
        positions, a sequence's tokens), for blocks that form per-example gradients. None
        when unknown: then ``n_examples``.
    """

    inputs: Array | None = None
    outputs: Array | None = None
    output_grads: Array | None = None
    n_examples: int = 1
    grad_scale: float = 1.0
    grad: Array | None = None
    examples: int | None = None

    def arrays(self) -> list[Array]:
        """The arrays that are set (for a finiteness check)."""
        inputs = None if self.inputs is None else like_of(self.inputs)
        items = (inputs, self.outputs, self.output_grads, self.grad)
        return [a for a in items if a is not None]


class BlockState:
    """Base of every block state: a frozen dataclass of fixed-shape arrays and int counters.

    Subclasses implement :meth:`arrays`, :meth:`counters` and :meth:`from_arrays` so that
    ``type(s).from_arrays(s.arrays(), s.counters())`` rebuilds ``s``.
    """

    def arrays(self) -> dict[str, Array]:
        """Every array of the state by a stable name (for checkpoints and all-reduce)."""
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        """Host-side integer counters by name."""
        raise NotImplementedError

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], counters: dict[str, int]) -> BlockState:
        """Rebuild a state from :meth:`arrays` and :meth:`counters` output."""
        raise NotImplementedError


def homogeneous(x: Array, /, *, bias: bool) -> Array:
    """Input rows ``x`` of shape (R, d) as ``x̄ = [x, 1]`` of shape (R, d + 1) when ``bias``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import homogeneous
    >>> homogeneous(np.zeros((2, 3)), bias=True)
    array([[0., 0., 0., 1.],
           [0., 0., 0., 1.]])
    """
    if not bias:
        return x
    xp = get_backend(x).xp
    return xp.concat([x, xp.ones((x.shape[0], 1), dtype=x.dtype, device=_device(x))], axis=1)


def homogeneous_gram(x: Array | Rows, /, *, bias: bool, scale: float = 1.0) -> Array:
    """``scale · x̄ᵀx̄`` for ``x̄ = [x, 1]`` (``bias``) or ``x̄ = x``, without forming ``x̄``.

    ``x̄ᵀx̄ = [[xᵀx, xᵀ1], [1ᵀx, R]]``: the Gram matrix of the ``R`` rows ``x``, their column
    sums and ``R``, assembled in one (d + 1, d + 1) array. The rows are never copied, so a
    large batch of im2col patches costs no second copy; the result equals the Gram matrix of
    the concatenated rows up to rounding, and is exactly symmetric. ``x`` may be a
    :class:`Rows` (its :meth:`Rows.gram` and :meth:`Rows.sum` are used).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import homogeneous, homogeneous_gram
    >>> x = np.arange(6.0).reshape(3, 2)
    >>> xb = homogeneous(x, bias=True)
    >>> np.array_equal(homogeneous_gram(x, bias=True), xb.T @ xb)
    True
    """
    rows = as_rows(x)
    if not bias:
        return rows.gram(scale=scale)
    gram = rows.gram(scale=scale)
    xp = get_backend(gram).xp
    d = rows.shape[1]
    out = xp.empty((d + 1, d + 1), dtype=gram.dtype, device=_device(gram))
    out[:d, :d] = gram
    col = rows.sum() * scale
    out[:d, d] = col
    out[d, :d] = col
    out[d, d] = float(rows.shape[0]) * scale
    return out


def ema(old: Array, new: Array, decay: float | None, /, *, overwrite: bool = False) -> Array:
    """``decay · old + (1 − decay) · new``, a factor's running average (``decay=None``: the
    running sum ``old + new``), in a new array, or with ``overwrite`` written into ``old``.

    What a :meth:`Block.fold` called with ``overwrite=True`` uses: the previous factor is read
    by nobody again, so it is updated in place (:meth:`Backend.ema_
    <curvlin.backends.Backend.ema_>`: one pass on torch, no temporary). Without
    ``overwrite`` the same update runs on a copy of ``old``, so both give the same bits.
    ``new`` is never changed.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import ema
    >>> old = np.zeros(2)
    >>> ema(old, np.ones(2), 0.9), old
    (array([0.1, 0.1]), array([0., 0.]))
    >>> ema(old, np.ones(2), 0.9, overwrite=True) is old, old
    (True, array([0.1, 0.1]))
    """
    backend = get_backend(old)
    if not overwrite:
        old = backend.xp.asarray(old, copy=True)
    return backend.ema_(old, new, decay)


class Block:
    """One layer's curvature block: the protocol (see the module docstring).

    Subclasses are frozen dataclasses with at least the fields ``d_out``, ``d_in`` and ``bias``
    and implement :meth:`init` and :meth:`_precondition`; every other method has a default
    that does nothing, so a method overrides only what it computes.

    Examples
    --------
    A diagonal preconditioner that needs nothing but the gradient:

    >>> from dataclasses import dataclass
    >>> import numpy as np
    >>> from curvlin.blocks import Block, BlockState
    >>> @dataclass(frozen=True)
    ... class Empty(BlockState):
    ...     def arrays(self):
    ...         return {}
    ...     def counters(self):
    ...         return {}
    ...     @classmethod
    ...     def from_arrays(cls, arrays, counters):
    ...         return cls()
    >>> @dataclass(frozen=True)
    ... class Halve(Block):
    ...     d_out: int
    ...     d_in: int
    ...     bias: bool = True
    ...     def init(self, like, /, *, dtype=None):
    ...         return Empty()
    ...     def _precondition(self, state, grad):
    ...         return grad / 2
    >>> block = Halve(2, 3)
    >>> dw, db = block.precondition(block.init(None), np.ones((2, 3)), np.ones(2))
    >>> dw[0, 0], db[0]
    (np.float64(0.5), np.float64(0.5))
    """

    #: What the block needs from a step, a subset of :data:`NEEDS`.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: Whether the block reads ``outputs`` and ``output_grads`` only through their means over
    #: rows (K-BFGS's pairs). Then an adapter may reduce them as they are captured and hand
    #: one row, the mean, of shape ``(1, d_out)``: no pre-activation or output gradient
    #: outlives the hook that sees it. Such a block must also accept full rows.
    row_means: ClassVar[bool] = False
    #: Whether the block reads ``inputs`` only through the reductions of :class:`Rows` (column
    #: sums, products with a vector, the Gram matrix, per-example products). Then an adapter
    #: may hand a :class:`Rows` that never builds the rows whole (a convolution's im2col
    #: patches). Such a block must also accept the (R, d_in) array.
    inputs_as_rows: ClassVar[bool] = False
    #: Whether ``outputs`` and ``output_grads`` must be 2-D rows ``(R, d_out)``. A block that
    #: accepts ``(..., d_out)`` arrays with several leading row axes (a convolution's
    #: ``(N, T, d_out)`` view of its ``(N, d_out, H, W)`` output) sets False, which spares the
    #: adapter a copy.
    flat_outputs: ClassVar[bool] = True
    #: Whether the block is part of one solve that couples all layers (a
    #: :class:`~curvlin.blocks.KernelBlock`): the driver then preconditions every such layer
    #: together from the step's batches (:meth:`Driver.precondition`), not one by one.
    coupled: ClassVar[bool] = False
    #: Whether :meth:`before_second_pass`, :meth:`second_pass` and :meth:`check` read the
    #: inputs only through their mean over rows (K-BFGS with an EMA ``A``): a distributor then
    #: averages that mean instead of gathering the rows.
    input_means: ClassVar[bool] = False
    #: Whether every square statistic of :meth:`statistics` is symmetric (a Gram matrix): a
    #: distributor may then send only its upper triangle.
    symmetric_statistics: ClassVar[bool] = False
    #: Whether ``output_grads`` may carry a leading axis of ``k`` output directions per example,
    #: ``(k, R, d_out)`` (the columns of an output-Hessian square root: exact Gauss–Newton).
    output_directions: ClassVar[bool] = False

    d_out: int
    d_in: int
    bias: bool

    @property
    def d_a(self) -> int:
        """Columns of ``W̄ = [W, b]``: ``d_in + 1`` with a bias."""
        return self.d_in + int(self.bias)

    # -- life cycle ----------------------------------------------------------------------
    def init(self, like: Array, /, *, dtype=None) -> BlockState:
        """The initial state, on ``like``'s library and device, in ``dtype`` (default its own)."""
        raise NotImplementedError

    def statistics(self, state: BlockState, batch: LayerBatch, /) -> dict[str, Array]:
        """This batch's statistics: arrays that are means over examples (ranks average them)."""
        return {}

    def fold(
        self, state: BlockState, stats: dict[str, Array], /, *, damping, overwrite: bool = False
    ) -> BlockState:
        """Fold one batch's :meth:`statistics` into the state (EMA, warm start).

        With ``overwrite`` the caller never reads ``state`` again (the driver installs the
        result past the step's finiteness verdict), so its arrays may be updated in place
        (:func:`ema`) instead of allocating new ones; ``stats`` are never changed.
        """
        return state

    def refresh(self, state: BlockState, /, *, damping) -> BlockState:
        """The amortised part: recompute inverses, roots or eigenbases from the state."""
        return state

    def release(self, state: BlockState, /) -> BlockState:
        """The state without what :meth:`refresh` alone rebuilds from the rest (inverses,
        roots): with ``refresh_every = 1`` every step refreshes before it preconditions, so
        the driver drops these between steps and a step never holds two sets of them. By
        default the state itself."""
        return state

    def ready(self, state: BlockState, /) -> bool:
        """Whether :meth:`precondition` can be called (e.g. an inverse exists). No sync."""
        return True

    def before_second_pass(self, state: BlockState, batch: LayerBatch, /, *, damping) -> BlockState:
        """The part of the second-pass update that needs only the first pass's ``batch``.

        Run after the parameter update and before the second forward/backward pass, so that
        the adapter can free ``batch.inputs`` before that pass (it then hands
        :meth:`second_pass` the batch with ``inputs=None``). By default nothing.
        """
        return state

    def second_pass(
        self, state: BlockState, batch: LayerBatch, batch_plus: LayerBatch, /, *, damping
    ) -> BlockState:
        """Update from the same batch seen before (``batch``) and after the parameter update."""
        raise NotImplementedError(f"{type(self).__name__} needs no second pass")

    def check(
        self, state: BlockState, batch: LayerBatch, /, *, damping
    ) -> tuple[BlockState, tuple[str, ...]]:
        """Test the state and rebuild what rounding has spoiled; returns the names rebuilt."""
        return state, ()

    # -- cost formulas (leading terms, in flops: a multiply-add counts 2) ------------------
    def statistics_flops(self, rows: int, examples: int, /) -> float:
        """Flops of one :meth:`statistics` (and fold) on ``rows`` rows from ``examples``
        examples; by default none."""
        return 0.0

    def refresh_flops(self) -> float:
        """Flops of one :meth:`refresh`; by default none."""
        return 0.0

    def precondition_flops(self) -> float:
        """Flops of one direction; by default the two-sided product ``L ∇W̄ R`` of a
        ``(d_out, d_out)`` and a ``(d_a, d_a)`` factor, ``2·d_out·d_a·(d_out + d_a)``."""
        return 2.0 * self.d_out * self.d_a * (self.d_out + self.d_a)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every array a state may hold, by :meth:`BlockState.arrays` name."""
        raise NotImplementedError

    # -- the direction --------------------------------------------------------------------
    def precondition(self, state: BlockState, grad_w: Array, grad_b: Array | None = None, /):
        """The direction for ``∇W̄ = [grad_w, grad_b]``, split back into ``(dW, db)``.

        ``grad_w`` has shape (d_out, d_in); ``grad_b`` shape (d_out,) exactly when the layer
        has a bias. The result has ``grad_w``'s dtype; ``db`` is None without a bias. Both are
        views of one new array, which the caller may overwrite.
        """
        func = f"{type(self).__name__}.precondition"
        if tuple(grad_w.shape) != (self.d_out, self.d_in):
            raise ValueError(
                f"{func}: grad_w must have shape ({self.d_out}, {self.d_in}), "
                f"got {tuple(grad_w.shape)}"
            )
        if (grad_b is not None) != self.bias or (
            grad_b is not None and tuple(grad_b.shape) != (self.d_out,)
        ):
            want = f"shape ({self.d_out},)" if self.bias else "None (the layer has no bias)"
            got = None if grad_b is None else tuple(grad_b.shape)
            raise ValueError(f"{func}: grad_b must be {want}, got {got}")
        if not self.ready(state):
            raise ValueError(f"{func}: the state is not ready yet (no statistics or refresh)")
        mat = self.joined(grad_w, grad_b, dtype=self.work_dtype(state))
        return self.split(self._precondition(state, mat), dtype=grad_w.dtype)

    def joined(self, grad_w: Array, grad_b: Array | None = None, /, *, dtype=None) -> Array:
        """``∇W̄ = [grad_w, grad_b]`` as one (d_out, d_a) matrix, in ``dtype`` (default its own).

        Shapes are checked by :meth:`precondition`; a coupled solve calls this directly.
        """
        xp = get_backend(grad_w).xp
        mat = _cast(xp, grad_w, dtype)
        if self.bias:
            mat = xp.concat([mat, _cast(xp, grad_b, dtype)[:, None]], axis=1)
        return mat

    def split(self, direction: Array, /, *, dtype=None):
        """A (d_out, d_a) direction as ``(dW, db)`` (``db`` None without a bias), in ``dtype``."""
        direction = _cast(get_backend(direction).xp, direction, dtype)
        if self.bias:
            return direction[:, : self.d_in], direction[:, self.d_in]
        return direction, None

    def _precondition(self, state: BlockState, grad: Array, /) -> Array:
        """The mathematics: the direction for the ``(d_out, d_a)`` matrix ``grad``.

        It must return a new array, never ``grad`` or a view of it: an adapter scales the
        direction in place (the KL clip).
        """
        raise NotImplementedError

    def work_dtype(self, state: BlockState, /):
        """The dtype :meth:`precondition` computes in: that of the state's first array."""
        arrays = state.arrays()
        return next(iter(arrays.values())).dtype if arrays else None


def _cast(xp, a: Array, dtype) -> Array:
    return a if dtype is None or a.dtype == dtype else xp.astype(a, dtype)
