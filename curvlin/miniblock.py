"""Mini-blocks: partitions of a layer's parameters, their statistics, batched block solves.

A mini-block Fisher (MBF) keeps, for every layer ``s = W̄ ā`` with ``W̄ = [W, b]`` of shape
(d_out, d_a), the empirical Fisher restricted to many small blocks of parameters,

.. code-block:: text

    M_β = (1/N) Σ_n γ_n[I_β] γ_n[I_β]ᵀ,        γ_n = ∂ℓ_n/∂vec(W̄) (per example),

and preconditions with ``(M_β + λI)⁻¹`` on each block ``I_β`` at once. The blocks are data,
not code: a :class:`Partition` is a few :class:`BlockGroup` s, each an index map of shape
``(B, b)`` (B blocks of size b) into the row-major ``vec(W̄)``, so the rule that picks the
blocks can change without touching the solver. Constructors give the common ones:

* :func:`conv_kernel_blocks` — one block per (output channel, input channel) pair, its
  ``k_h·k_w`` kernel entries (and one 1×1 block per bias entry);
* :func:`unit_blocks` — one block per output unit: its row ``[W_o, b_o]`` of ``W̄``;
* :func:`tiled_blocks` — each row of ``W̄`` cut into tiles of at most ``max_size`` entries
  (size 1: the diagonal Fisher; the memory-safe choice for wide layers).

A group whose blocks are such tiles of rows carries that structure (``BlockGroup.tiles``);
the statistics then come from contractions of the rows without the per-example gradients
(one row per example), and the solves from reshapes without a gather. Other groups are
served by index maps through ``take``.

Statistics (:func:`block_statistics`, :func:`gradient_statistics`), the batched damped
inverse (:func:`block_inverse`, :func:`curvlin.spd_inverse` on each group's ``(B, b, b)``
stack) and the batched apply (:func:`block_apply`) run on every array-API backend.

References
----------
Bahamou, Goldfarb & Ren (2023), "A Mini-Block Fisher Method for Deep Neural Networks",
AISTATS, PMLR 206:9191–9220 (arXiv 2202.04124); Roux, Manzagol & Bengio (2008), "Topmoumoute
online natural gradient algorithm" (unit-wise blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from array_api_compat import device as _device

from ._rows import as_rows, like_of
from ._validation import check_damping, namespace_of
from .backends import Array
from .linalg import spd_inverse

__all__ = [
    "BlockGroup",
    "Partition",
    "block_apply",
    "block_inverse",
    "block_statistics",
    "conv_kernel_blocks",
    "gradient_statistics",
    "tiled_blocks",
    "unit_blocks",
]

#: Transient elements one chunk of examples may hold (outer products or per-example
#: gradients): 2**24 float32 numbers are 64 MiB.
_CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True, eq=False)
class BlockGroup:
    """Mini-blocks of one size: an index map into the row-major ``vec(W̄)``.

    Attributes
    ----------
    index : numpy.ndarray of int64, shape (B, b)
        ``index[β]`` are the positions ``o·d_a + j`` of block ``β``'s entries in ``vec(W̄)``,
        in the order of its rows and columns of ``M_β``.
    tiles : tuple (start, size, count) or None
        Set when the blocks are tiles of rows: block ``o·count + t`` holds row ``o``'s
        columns ``start + t·size + [0, size)``. Enables the contraction and reshape paths.
    """

    index: np.ndarray
    tiles: tuple[int, int, int] | None = None

    @property
    def count(self) -> int:
        """B, the number of blocks."""
        return self.index.shape[0]

    @property
    def size(self) -> int:
        """b, the size of each block."""
        return self.index.shape[1]


@dataclass(frozen=True, eq=False)
class Partition:
    """A partition of the entries of ``W̄`` (shape (d_out, d_a)) into mini-blocks.

    Parameters
    ----------
    d_out, d_a : int
        The shape of ``W̄ = [W, b]`` (``d_a = d_in + 1`` with a bias).
    groups : tuple of BlockGroup
        Blocks grouped by size; together they must hold every entry exactly once.

    Examples
    --------
    One block holding the whole layer (the dense layer-wise empirical Fisher):

    >>> import numpy as np
    >>> from curvlin import Partition
    >>> whole = Partition.from_index(2, 3, np.arange(6)[None, :])
    >>> whole.sizes, whole.n_blocks
    ((6,), 1)
    >>> Partition.from_index(2, 3, np.arange(5)[None, :])
    Traceback (most recent call last):
        ...
    ValueError: Partition: 1 of the 2×3 entries of W̄ are in no block and 0 in several
    """

    d_out: int
    d_a: int
    groups: tuple[BlockGroup, ...]

    def __post_init__(self):
        for name in ("d_out", "d_a"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Partition: {name} must be a positive int, got {value!r}")
        if not self.groups:
            raise ValueError("Partition: groups must hold at least one BlockGroup")
        total = self.d_out * self.d_a
        for i, g in enumerate(self.groups):
            if not isinstance(g, BlockGroup):
                raise TypeError(f"Partition: groups[{i}] must be a BlockGroup, got {g!r}")
            idx = g.index
            if not (isinstance(idx, np.ndarray) and idx.ndim == 2 and idx.dtype.kind in "iu"):
                raise ValueError(
                    f"Partition: groups[{i}].index must be a 2-D integer NumPy array (B, b), "
                    f"got {type(idx).__name__} {getattr(idx, 'shape', '')}"
                )
            if idx.size == 0 or idx.min() < 0 or idx.max() >= total:
                raise ValueError(
                    f"Partition: groups[{i}].index must be non-empty with entries in "
                    f"[0, {total}), got shape {idx.shape}"
                )
            if g.tiles is not None:
                want = _row_tiles(self.d_out, self.d_a, *g.tiles).index
                if want.shape != idx.shape or not np.array_equal(want, idx):
                    raise ValueError(
                        f"Partition: groups[{i}].tiles={g.tiles} does not describe its index"
                    )
        hits = np.bincount(self.order, minlength=total)
        if hits.shape[0] != total or not np.all(hits == 1):
            raise ValueError(
                f"Partition: {int(np.sum(hits == 0))} of the {self.d_out}×{self.d_a} entries "
                f"of W̄ are in no block and {int(np.sum(hits > 1))} in several"
            )

    @classmethod
    def from_index(cls, d_out: int, d_a: int, *index: np.ndarray) -> Partition:
        """A partition from index maps ``(B_g, b_g)``, one per block size."""
        return cls(d_out, d_a, tuple(BlockGroup(np.asarray(i, dtype=np.int64)) for i in index))

    @property
    def order(self) -> np.ndarray:
        """The entries of ``vec(W̄)`` in block order (group by group, block by block)."""
        return np.concatenate([g.index.reshape(-1) for g in self.groups])

    @property
    def sizes(self) -> tuple[int, ...]:
        """Block size of each group."""
        return tuple(g.size for g in self.groups)

    @property
    def n_blocks(self) -> int:
        """Total number of blocks."""
        return sum(g.count for g in self.groups)

    @property
    def n_entries(self) -> int:
        """Entries of all the blocks' matrices together, ``Σ_g B_g b_g²`` (the memory)."""
        return sum(g.count * g.size**2 for g in self.groups)

    def shapes(self) -> tuple[tuple[int, int, int], ...]:
        """The ``(B, b, b)`` shape of each group's stack of block matrices."""
        return tuple((g.count, g.size, g.size) for g in self.groups)

    @property
    def _all_tiles(self) -> bool:
        return all(g.tiles is not None for g in self.groups)


def _row_tiles(d_out: int, d_a: int, start: int, size: int, count: int) -> BlockGroup:
    """Blocks ``o·count + t`` = row ``o``'s columns ``start + t·size + [0, size)``."""
    cols = start + np.arange(count * size, dtype=np.int64).reshape(count, size)
    index = (np.arange(d_out, dtype=np.int64)[:, None, None] * d_a + cols).reshape(-1, size)
    return BlockGroup(index, (start, size, count))


def _check_dims(func: str, **dims) -> None:
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{func}: {name} must be a positive int, got {value!r}")


def conv_kernel_blocks(c_out: int, c_in: int, k_h: int, k_w: int, *, bias: bool = True):
    """One block per (output channel, input channel) pair: its ``k_h·k_w`` kernel entries.

    ``W̄`` is the convolution weight viewed as ``(c_out, c_in·k_h·k_w)`` (the order of
    ``weight.reshape(c_out, -1)`` and of im2col patches) with the bias as its last column.
    The bias entries get one 1×1 block each (the diagonal Fisher of the bias): a bias entry
    shares no kernel slice, and per-channel blocks keep the partition local to a channel.

    Returns
    -------
    Partition
        ``c_out·c_in`` blocks of size ``k_h·k_w``, then (with ``bias``) ``c_out`` of size 1.

    Examples
    --------
    >>> from curvlin import conv_kernel_blocks
    >>> p = conv_kernel_blocks(4, 3, 3, 3)
    >>> p.shapes()
    ((12, 9, 9), (4, 1, 1))
    >>> p.groups[0].index[1]  # channel pair (0, 1): columns 9..17 of row 0
    array([ 9, 10, 11, 12, 13, 14, 15, 16, 17])
    """
    _check_dims("conv_kernel_blocks", c_out=c_out, c_in=c_in, k_h=k_h, k_w=k_w)
    kk = k_h * k_w
    d_a = c_in * kk + int(bias)
    groups = [_row_tiles(c_out, d_a, 0, kk, c_in)]
    if bias:
        groups.append(_row_tiles(c_out, d_a, c_in * kk, 1, 1))
    return Partition(c_out, d_a, tuple(groups))


def unit_blocks(d_out: int, d_in: int, *, bias: bool = True) -> Partition:
    """One block per output unit: row ``o`` of ``W̄``, its weights and bias (``d_in + 1``).

    The unit-wise Fisher: ``M_o = (1/N) Σ_n δ_no² ā_n ā_nᵀ`` for one row per example. Its
    memory is ``d_out·d_a²``, which grows with the square of the layer's width (616 million
    entries for a 784→1000 layer); :func:`tiled_blocks` bounds it.

    Examples
    --------
    >>> from curvlin import unit_blocks
    >>> unit_blocks(3, 4).shapes()
    ((3, 5, 5),)
    """
    _check_dims("unit_blocks", d_out=d_out, d_in=d_in)
    d_a = d_in + int(bias)
    return Partition(d_out, d_a, (_row_tiles(d_out, d_a, 0, d_a, 1),))


def tiled_blocks(d_out: int, d_in: int, *, bias: bool = True, max_size: int = 64) -> Partition:
    """Each row of ``W̄`` cut into consecutive tiles of ``max_size`` entries (the last shorter).

    A unit's row ``[W_o, b_o]`` splits into ``⌈d_a / max_size⌉`` tiles, so the memory is at
    most ``d_out·d_a·max_size`` (``max_size`` times the parameters) whatever the width.
    ``max_size = 1`` is the diagonal Fisher; ``max_size >= d_a`` is :func:`unit_blocks`.

    Examples
    --------
    >>> from curvlin import tiled_blocks
    >>> tiled_blocks(2, 9, max_size=4).shapes()  # rows of 10 entries: tiles of 4, 4 and 2
    ((4, 4, 4), (2, 2, 2))
    >>> tiled_blocks(2, 3, max_size=1).shapes()  # the diagonal
    ((8, 1, 1),)
    """
    _check_dims("tiled_blocks", d_out=d_out, d_in=d_in, max_size=max_size)
    d_a = d_in + int(bias)
    size = min(max_size, d_a)
    full, rest = divmod(d_a, size)
    groups = [_row_tiles(d_out, d_a, 0, size, full)]
    if rest:
        groups.append(_row_tiles(d_out, d_a, full * size, rest, 1))
    return Partition(d_out, d_a, tuple(groups))


# -- statistics ---------------------------------------------------------------------------


def _check_rows(partition, inputs, output_grads, examples, func, *, bias=False):
    if not isinstance(partition, Partition):
        raise TypeError(f"{func}: partition must be a Partition, got {type(partition).__name__}")
    backend = namespace_of(("inputs", like_of(inputs)), ("output_grads", output_grads), func=func)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"{func}: examples must be a positive int, got {examples!r}")
    d_out, d_a = partition.d_out, partition.d_a
    rows = inputs.shape[0] if inputs.ndim == 2 else -1
    cols = d_a - int(bias)
    if inputs.ndim != 2 or inputs.shape[1] != cols or output_grads.shape[-1] != d_out:
        raise ValueError(
            f"{func}: expected inputs (R, {cols}) ({'without' if bias else 'with'} the bias's "
            f"1) and output_grads (R, {d_out}) or (N, T, {d_out}), got {tuple(inputs.shape)} and "
            f"{tuple(output_grads.shape)}"
        )
    if math.prod(output_grads.shape[:-1]) != rows or rows % examples:
        raise ValueError(
            f"{func}: inputs and output_grads must have the same number of rows, a multiple of "
            f"examples={examples} (each example's rows contiguous), got {tuple(inputs.shape)} "
            f"and {tuple(output_grads.shape)}"
        )
    return backend


def _weight(weight, examples):
    return 1.0 / examples if weight is None else float(weight)


def _chunks(n: int, per_example: int):
    """Ranges of examples whose transient holds at most ``_CHUNK_ELEMENTS`` numbers."""
    step = max(1, _CHUNK_ELEMENTS // max(1, per_example))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def block_statistics(
    partition: Partition,
    inputs: Array,
    output_grads: Array,
    /,
    *,
    examples: int,
    weight: float | None = None,
    bias: bool = False,
) -> tuple[Array, ...]:
    """Each group's stack ``w · Σ_n γ_n[I_β] γ_n[I_β]ᵀ`` from a layer's rows.

    Parameters
    ----------
    partition : Partition
    inputs : array, shape (R, d_a), or Rows
        Input rows ``ā`` with the bias's 1 as the last column (see
        :func:`curvlin.blocks.homogeneous`): one per example, or ``T = R / examples`` per
        example (convolution patches, sequence positions), each example's rows contiguous.
        A :class:`~curvlin.blocks.Rows` is read through
        :meth:`~curvlin.blocks.Rows.example_grads` (a convolution's patches are never built).
    output_grads : array, shape (R, d_out) or (examples, T, d_out)
        Output-gradient rows ``δ`` on the same rows; the per-example gradient is
        ``γ_n = Σ_{t} δ_{n,t} ā_{n,t}ᵀ``. Their scale is the caller's: ``weight`` applies to
        the result.
    examples : int
        The number of examples ``N`` the rows come from.
    weight : float, optional
        ``w``; default ``1 / examples`` (the mean over examples).
    bias : bool
        True: ``inputs`` are ``(R, d_a − 1)`` without the 1, and the last column of ``W̄`` is
        the bias (its per-example gradient ``Σ_t δ_{n,t}``); the rows are then never copied
        to append the 1 when there are several per example.

    Returns
    -------
    tuple of arrays, shapes ``partition.shapes()``
        One ``(B, b, b)`` stack per group, in ``inputs``' dtype.

    Notes
    -----
    With one row per example and row-tile groups (:func:`unit_blocks`, :func:`tiled_blocks`,
    :func:`conv_kernel_blocks`), a tile's statistic is ``w Σ_n δ_no² ā_n[s] ā_n[s]ᵀ``: one
    matrix product of the squared output gradients with the rows' outer products, no
    per-example gradient formed (cost ``N·d_out·d_a·b``). Otherwise the per-example
    gradients are formed by one batched product, in chunks of examples that bound the
    transient memory, and passed to :func:`gradient_statistics`.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import block_statistics, unit_blocks
    >>> a = np.array([[1.0, 2.0, 1.0], [0.0, 1.0, 1.0]])  # two examples, the 1 last
    >>> d = np.array([[1.0], [2.0]])
    >>> block_statistics(unit_blocks(1, 2), a, d, examples=2)[0][0]  # Σ_n δ² ā āᵀ / N, unit 0
    array([[0.5, 1. , 0.5],
           [1. , 4. , 3. ],
           [0.5, 3. , 2.5]])
    """
    func = "block_statistics"
    if not isinstance(bias, bool):
        raise TypeError(f"{func}: bias must be a bool, got {bias!r}")
    backend = _check_rows(partition, inputs, output_grads, examples, func, bias=bias)
    xp = backend.xp
    w = _weight(weight, examples)
    n, d_out, d_a = examples, partition.d_out, partition.d_a
    t = inputs.shape[0] // n
    if t == 1 and partition._all_tiles:
        inputs = as_rows(inputs).array()
        if bias:  # one row per example: appending the 1 copies no more than the rows
            ones = xp.ones((inputs.shape[0], 1), dtype=inputs.dtype, device=_device(inputs))
            inputs = xp.concat([inputs, ones], axis=1)
        delta = xp.reshape(output_grads, (n, d_out))
        return tuple(_tile_statistics(xp, g, inputs, delta, w) for g in partition.groups)
    # per-example gradients γ_n = δ_nᵀ ā_n, one batched product per chunk of examples
    delta = xp.reshape(output_grads, (n, t, d_out))
    rows = as_rows(inputs)
    total = None
    for lo, hi in _chunks(n, d_out * d_a):
        grads = rows.examples(lo, hi, n=n).example_grads(delta[lo:hi, ...])
        if bias:  # the bias column: Σ_t δ_{n,t}
            part = _split_statistics(xp, partition, grads, xp.sum(delta[lo:hi, ...], axis=1), w)
        else:
            part = gradient_statistics(partition, grads, weight=w)
        total = part if total is None else tuple(x + y for x, y in zip(total, part))
    return total


def _split_statistics(xp, partition: Partition, grads: Array, bias_grads: Array, w: float):
    """:func:`gradient_statistics` of ``[grads, bias_grads]`` (the bias column last) without
    joining them: a group of tiles of the weight columns (a convolution's kernels) reads
    ``grads`` alone, the bias's 1×1 tiles ``bias_grads`` alone; any other group the join."""
    d_out, d_w = partition.d_out, partition.d_a - 1
    joined, out = None, []
    for g in partition.groups:
        if g.tiles is not None and g.tiles[0] + g.tiles[1] * g.tiles[2] <= d_w:
            x = _gather(xp, g, grads, d_out, d_w)
        elif g.tiles == (d_w, 1, 1):
            x = bias_grads[:, :, None]  # (N, d_out, 1): block o is row o's bias
        else:
            if joined is None:
                joined = xp.concat([grads, bias_grads[:, :, None]], axis=2)
            x = _gather(xp, g, joined, d_out, d_w + 1)
        out.append(_block_grams(xp, x, w))
    return tuple(out)


def _tile_statistics(xp, group: BlockGroup, inputs: Array, delta: Array, w: float) -> Array:
    """``w Σ_n δ_no² ā_n[s] ā_n[s]ᵀ`` for every tile ``s`` of every row ``o`` of one group
    (``delta`` of shape (N, d_out)), by the cheaper of two products with the same flops:

    - few output rows (``d_out < size``): the Gram matrices of the tile's rows scaled by
      ``|δ_no|``, one batched product per chunk of rows ``o`` (a transient of ``d_out·N·size``
      per tile; a Linear(1024, 10) in tiles of 64, 128 examples, two cores: 0.9 ms);
    - else one product of ``δ²`` with the rows' outer products (a transient of
      ``N·size²`` per tile; 10 ms on that layer). Multiplying only their upper triangles
      would halve the flops, but gathering them costs more than it saves (torch, one core:
      1.0 s for the gather against 0.45 s for the half of the product it saves).
    """
    start, size, count = group.tiles
    n, d_out = delta.shape
    piece = xp.reshape(inputs[:, start : start + size * count], (n, count, size))
    if d_out < size:
        rows = xp.permute_dims(piece, (1, 2, 0))[None, ...]  # (1, count, size, N)
        scale = xp.matrix_transpose(xp.abs(delta))[:, None, None, :]  # (d_out, 1, 1, N)
        parts = []
        for lo, hi in _chunks(d_out, count * size * n):
            x = xp.reshape(rows * scale[lo:hi, ...], ((hi - lo) * count, size, n))
            parts.append(x @ xp.matrix_transpose(x))
        total = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
        return total * w
    g2 = delta * delta
    total = None
    for lo, hi in _chunks(n, count * size * size):
        a = piece[lo:hi, ...]
        outer = xp.reshape(a[:, :, :, None] * a[:, :, None, :], (hi - lo, -1))
        part = xp.matrix_transpose(g2[lo:hi, :]) @ outer
        total = part if total is None else total + part
    return xp.reshape(total, (d_out * count, size, size)) * w


def gradient_statistics(
    partition: Partition, grads: Array, /, *, weight: float | None = None
) -> tuple[Array, ...]:
    """Each group's stack ``w · Σ_n γ_n[I_β] γ_n[I_β]ᵀ`` from per-example gradients.

    Parameters
    ----------
    partition : Partition
    grads : array, shape (N, d_out, d_a)
        Per-example gradients ``γ_n`` of ``W̄`` (bias last column).
    weight : float, optional
        ``w``; default ``1 / N``.

    Returns
    -------
    tuple of arrays, shapes ``partition.shapes()``

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import gradient_statistics, tiled_blocks
    >>> g = np.arange(8.0).reshape(2, 2, 2)  # two examples of a 2×2 W̄
    >>> gradient_statistics(tiled_blocks(2, 2, bias=False, max_size=1), g)[0][:, 0, 0]
    array([ 8., 13., 20., 29.])
    """
    func = "gradient_statistics"
    if not isinstance(partition, Partition):
        raise TypeError(f"{func}: partition must be a Partition, got {type(partition).__name__}")
    xp = namespace_of(("grads", grads), func=func).xp
    d_out, d_a = partition.d_out, partition.d_a
    if grads.ndim != 3 or tuple(grads.shape[1:]) != (d_out, d_a):
        raise ValueError(
            f"{func}: grads must have shape (N, {d_out}, {d_a}), got {tuple(grads.shape)}"
        )
    n = grads.shape[0]
    w = 1.0 / n if weight is None else float(weight)
    out = []
    for g in partition.groups:
        x = _gather(xp, g, grads, d_out, d_a)  # (N, B, b)
        out.append(_block_grams(xp, x, w))
    return tuple(out)


def _block_grams(xp, x: Array, w: float) -> Array:
    """``w Σ_n x_n[β] x_n[β]ᵀ`` for ``x`` of shape (N, B, b): one batched product, (B, b, b)."""
    x = xp.permute_dims(x, (1, 2, 0))  # (B, b, N): one product per block
    return (x @ xp.matrix_transpose(x)) * w


def _gather(xp, group: BlockGroup, values: Array, d_out: int, d_a: int) -> Array:
    """``values (..., d_out, d_a)`` at the group's blocks, as ``(..., B, b)``."""
    lead = tuple(values.shape[:-2])
    if group.tiles is not None:
        start, size, count = group.tiles
        piece = values[..., start : start + size * count]
        return xp.reshape(piece, (*lead, d_out * count, size))
    flat = xp.reshape(values, (*lead, d_out * d_a))
    index = xp.asarray(group.index.reshape(-1), device=_device(values))
    return xp.reshape(xp.take(flat, index, axis=flat.ndim - 1), (*lead, *group.index.shape))


# -- solves -------------------------------------------------------------------------------


def block_inverse(stats, /, *, damping) -> tuple[Array, ...]:
    """``(M_β + λI)⁻¹`` for every block of every group: :func:`curvlin.spd_inverse` per stack.

    Parameters
    ----------
    stats : sequence of arrays, shapes (B_g, b_g, b_g)
        The blocks' symmetric positive semidefinite matrices (only the lower triangle is read).
    damping : float or array
        ``λ``; an all-zero block (a dead unit or channel) needs ``λ > 0``.

    Returns
    -------
    tuple of arrays
        The inverses, each stack exactly symmetric.

    Notes
    -----
    One batched Cholesky and one batched triangular inverse per group, and the one host
    look of :func:`curvlin.spd_inverse` per group to decide on recovery; no loop over blocks.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import block_inverse
    >>> (inv,) = block_inverse([np.zeros((2, 3, 3))], damping=0.5)  # two dead blocks
    >>> inv[1]
    array([[2., 0., 0.],
           [0., 2., 0.],
           [0., 0., 2.]])
    """
    if hasattr(stats, "shape") or not isinstance(stats, list | tuple) or not stats:
        raise TypeError(
            f"block_inverse: stats must be a non-empty sequence of (B, b, b) arrays, "
            f"got {type(stats).__name__}"
        )
    out = []
    for i, m in enumerate(stats):
        if getattr(m, "ndim", 0) != 3:
            raise ValueError(
                f"block_inverse: stats[{i}] must have shape (B, b, b), "
                f"got {tuple(getattr(m, 'shape', ()))}"
            )
        check_damping(damping, "damping", "block_inverse", like=m)
        out.append(spd_inverse(m, damping=damping))
    return tuple(out)


def block_apply(partition: Partition, matrices, grad: Array, /) -> Array:
    """``M_β g[I_β]`` for every block β: a block-diagonal matrix times ``vec(grad)``.

    Parameters
    ----------
    partition : Partition
    matrices : sequence of arrays, shapes ``partition.shapes()``
        One stack per group (typically :func:`block_inverse`'s result).
    grad : array, shape (d_out, d_a)
        ``∇W̄`` (bias last column).

    Returns
    -------
    array, shape (d_out, d_a)
        In ``grad``'s layout; entries of a block depend only on that block's entries of
        ``grad``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin import block_apply, block_inverse, block_statistics, unit_blocks
    >>> p = unit_blocks(2, 1)
    >>> inv = block_inverse([np.zeros((2, 2, 2))], damping=2.0)
    >>> block_apply(p, inv, np.array([[2.0, 4.0], [6.0, 8.0]]))
    array([[1., 2.],
           [3., 4.]])
    """
    func = "block_apply"
    if not isinstance(partition, Partition):
        raise TypeError(f"{func}: partition must be a Partition, got {type(partition).__name__}")
    xp = namespace_of(("grad", grad), func=func).xp
    d_out, d_a = partition.d_out, partition.d_a
    if tuple(grad.shape) != (d_out, d_a):
        raise ValueError(f"{func}: grad must have shape ({d_out}, {d_a}), got {tuple(grad.shape)}")
    matrices = tuple(matrices)
    if tuple(tuple(m.shape) for m in matrices) != partition.shapes():
        raise ValueError(
            f"{func}: matrices must have shapes {partition.shapes()}, "
            f"got {tuple(tuple(m.shape) for m in matrices)}"
        )
    pieces = []
    for g, m in zip(partition.groups, matrices):
        v = _gather(xp, g, grad, d_out, d_a)
        pieces.append((m @ v[:, :, None])[:, :, 0])
    if partition._all_tiles:  # tiles of rows: put the column ranges side by side
        ranked = sorted(zip(partition.groups, pieces), key=lambda gp: gp[0].tiles[0])
        cols = [xp.reshape(p, (d_out, g.size * g.tiles[2])) for g, p in ranked]
        return cols[0] if len(cols) == 1 else xp.concat(cols, axis=1)
    flat = xp.concat([xp.reshape(p, (-1,)) for p in pieces])
    back = xp.asarray(np.argsort(partition.order), device=_device(grad))
    return xp.reshape(xp.take(flat, back, axis=0), (d_out, d_a))
