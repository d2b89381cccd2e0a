"""Mini-block primitives (``curvlin.miniblock``) against dense float64 references, every backend.

The references form the explicit per-example gradients, the dense empirical Fisher
``(1/N) Σ_n vec γ_n vec γ_nᵀ`` and the block-diagonal matrix in block order; the library never
does. Property tests of the spec's §2: batched inverse = per-block inverse = dense
block-diagonal inverse; statistics = diagonal blocks of the dense EF; fast contraction = brute
force; locality; degenerate partitions; dead blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import PROPERTY
from hypothesis import given
from hypothesis import strategies as st

import curvlin.miniblock as mb
from curvlin import (
    BlockGroup,
    Partition,
    block_apply,
    block_inverse,
    block_statistics,
    conv_kernel_blocks,
    gradient_statistics,
    tiled_blocks,
    unit_blocks,
)


def _shuffled(d_out, d_a, seed=0):
    """A partition without structure: a random permutation of the entries in blocks of 3
    and one remainder block."""
    perm = np.random.default_rng(seed).permutation(d_out * d_a)
    cut = (len(perm) // 3) * 3
    maps = [perm[:cut].reshape(-1, 3)] + ([perm[cut:][None, :]] if cut < len(perm) else [])
    return Partition.from_index(d_out, d_a, *maps)


# (name, partition) over W̄ of shape (3, d_a): every constructor, the degenerate cases and an
# unstructured index map
def _partitions():
    return {
        "conv": conv_kernel_blocks(3, 2, 2, 2, bias=True),  # d_a = 9
        "conv-nobias": conv_kernel_blocks(3, 3, 1, 3, bias=False),  # d_a = 9
        "unit": unit_blocks(3, 8),
        "tiled": tiled_blocks(3, 8, max_size=4),  # tiles 4, 4, 1
        "diagonal": tiled_blocks(3, 8, max_size=1),
        "whole": Partition.from_index(3, 9, np.arange(27)[None, :]),
        "shuffled": _shuffled(3, 9),
    }


PARTITIONS = list(_partitions())


def _dense_blockdiag(partition, blocks):
    """The dense matrix in vec(W̄) order whose blocks are ``blocks`` (numpy float64)."""
    size = partition.d_out * partition.d_a
    dense = np.zeros((size, size))
    for g, stack in zip(partition.groups, blocks):
        for idx, m in zip(g.index, stack):
            dense[np.ix_(idx, idx)] = m
    return dense


def _per_example(x, delta, n):
    """γ_n = Σ_t δ_{n,t} ā_{n,t}ᵀ, shape (N, d_out, d_a)."""
    t = len(x) // n
    return np.einsum("nto,nta->noa", delta.reshape(n, t, -1), x.reshape(n, t, -1))


def _rows(rng, n, t, d_out, d_a):
    x = rng.standard_normal((n * t, d_a))
    x[:, -1] = 1.0
    return x, rng.standard_normal((n * t, d_out))


@pytest.mark.parametrize("name", PARTITIONS)
@pytest.mark.parametrize("t", [1, 3], ids=["rows1", "rows3"])
def test_statistics_are_diagonal_blocks_of_dense_empirical_fisher(name, t, xp, to_xp, to_np, rng):
    p = _partitions()[name]
    n = 5
    x, delta = _rows(rng, n, t, p.d_out, p.d_a)
    grads = _per_example(x, delta, n).reshape(n, -1)
    fisher = grads.T @ grads / n  # dense EF of vec(W̄), row-major
    got = block_statistics(p, to_xp(x), to_xp(delta), examples=n)
    assert tuple(tuple(g.shape) for g in got) == p.shapes()
    for g, stack in zip(p.groups, got):
        want = np.stack([fisher[np.ix_(idx, idx)] for idx in g.index])
        np.testing.assert_allclose(to_np(stack), want, rtol=1e-10, atol=1e-12)
    # (N, T, d_out) output gradients (a convolution's view) give the same
    again = block_statistics(p, to_xp(x), to_xp(delta.reshape(n, t, -1)), examples=n, weight=2.0)
    for a, b in zip(got, again):
        np.testing.assert_allclose(to_np(b), 2 * n * to_np(a), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["conv", "unit", "shuffled"])
@pytest.mark.parametrize("t", [1, 4], ids=["rows1", "rows4"])
def test_implicit_bias_column_equals_explicit_one(name, t, xp, to_xp, to_np, rng):
    p = _partitions()[name]
    x, delta = _rows(rng, 3, t, p.d_out, p.d_a)
    explicit = block_statistics(p, to_xp(x), to_xp(delta), examples=3)
    implicit = block_statistics(p, to_xp(x[:, :-1]), to_xp(delta), examples=3, bias=True)
    for a, b in zip(explicit, implicit):
        np.testing.assert_allclose(to_np(b), to_np(a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["conv", "unit", "tiled", "diagonal"])
def test_fast_contraction_equals_brute_force(name, xp, to_xp, to_np, rng):
    """Row tiles with one row per example (no per-example gradient) = the index-map path."""
    p = _partitions()[name]
    brute = Partition(p.d_out, p.d_a, tuple(BlockGroup(g.index) for g in p.groups))
    assert not brute._all_tiles
    x, delta = _rows(rng, 7, 1, p.d_out, p.d_a)
    fast = block_statistics(p, to_xp(x), to_xp(delta), examples=7)
    slow = block_statistics(brute, to_xp(x), to_xp(delta), examples=7)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t", [1, 2])
def test_chunked_statistics_equal_one_chunk(t, monkeypatch, xp, to_xp, to_np, rng):
    p = tiled_blocks(3, 8, max_size=4)
    x, delta = _rows(rng, 9, t, p.d_out, p.d_a)
    whole = block_statistics(p, to_xp(x), to_xp(delta), examples=9)
    monkeypatch.setattr(mb, "_CHUNK_ELEMENTS", 40)  # a few examples per chunk
    chunked = block_statistics(p, to_xp(x), to_xp(delta), examples=9)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-12, atol=1e-12)


def _spd_stacks(rng, p, rank=2):
    """Rank-deficient PSD blocks (damping makes them SPD)."""
    out = []
    for b in p.sizes:
        count = next(g.count for g in p.groups if g.size == b)
        f = rng.standard_normal((count, b, rank))
        out.append(f @ np.swapaxes(f, 1, 2))
    return out


@pytest.mark.parametrize("name", PARTITIONS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batched_inverse_equals_per_block_and_dense_block_diagonal(
    name, dtype, xp, to_xp, to_np, rng
):
    p = _partitions()[name]
    stacks = [s for s in _spd_stacks(rng, p)]
    lam = 0.3
    inv = block_inverse([to_xp(s, dtype) for s in stacks], damping=lam)
    rtol = 1e-10 if dtype == "float64" else 1e-4
    for s, i in zip(stacks, inv):  # per block
        assert i.dtype == getattr(xp, dtype)
        eye = np.eye(s.shape[-1])
        per_block = np.stack([np.linalg.inv(m + lam * eye) for m in s])
        np.testing.assert_allclose(to_np(i), per_block, rtol=rtol, atol=rtol)
    grad = rng.standard_normal((p.d_out, p.d_a))
    got = to_np(block_apply(p, inv, to_xp(grad, dtype)))
    # dense: permute vec(W̄) into block order, solve with the block-diagonal matrix, permute back
    order = p.order
    dense = _dense_blockdiag(p, stacks)[np.ix_(order, order)]
    x = np.linalg.solve(dense + lam * np.eye(len(order)), grad.reshape(-1)[order])
    want = np.empty_like(x)
    want[order] = x
    np.testing.assert_allclose(got, want.reshape(grad.shape), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("name", PARTITIONS)
def test_locality(name, xp, to_xp, to_np, rng):
    """Changing the gradient outside a block leaves that block's direction unchanged."""
    p = _partitions()[name]
    inv = block_inverse([to_xp(s) for s in _spd_stacks(rng, p)], damping=0.1)
    grad = rng.standard_normal((p.d_out, p.d_a))
    base = to_np(block_apply(p, inv, to_xp(grad))).reshape(-1)
    block = p.groups[-1].index[-1]
    other = np.setdiff1d(np.arange(grad.size), block)
    bumped = grad.reshape(-1).copy()
    bumped[other] += rng.standard_normal(other.size)
    moved = to_np(block_apply(p, inv, to_xp(bumped.reshape(grad.shape)))).reshape(-1)
    np.testing.assert_array_equal(moved[block], base[block])
    if other.size:  # (the whole-layer block has no outside)
        assert not np.allclose(moved[other], base[other])


def test_degenerate_partitions(xp, to_xp, to_np, rng):
    """Block size 1 is the diagonal Fisher; one block is the dense layer solve."""
    d_out, d_in, n, lam = 3, 4, 6, 0.2
    x, delta = _rows(rng, n, 2, d_out, d_in + 1)
    grads = _per_example(x, delta, n).reshape(n, -1)
    fisher = grads.T @ grads / n
    g = rng.standard_normal((d_out, d_in + 1))
    diag = tiled_blocks(d_out, d_in, max_size=1)
    whole = Partition.from_index(d_out, d_in + 1, np.arange(g.size)[None, :])
    for p, want in [
        (diag, g.reshape(-1) / (np.diag(fisher) + lam)),
        (whole, np.linalg.solve(fisher + lam * np.eye(g.size), g.reshape(-1))),
    ]:
        stats = block_statistics(p, to_xp(x), to_xp(delta), examples=n)
        got = block_apply(p, block_inverse(stats, damping=lam), to_xp(g))
        np.testing.assert_allclose(to_np(got).reshape(-1), want, rtol=1e-9)


def test_dead_blocks_are_finite(xp, to_xp, to_np):
    """A dead channel (zero inputs and output gradients) gives zero blocks, and λ⁻¹ g there."""
    p = conv_kernel_blocks(2, 2, 3, 3)
    x = np.zeros((8, p.d_a))
    x[:, -1] = 1.0
    x[:, :9] = np.random.default_rng(0).standard_normal((8, 9))  # input channel 1 is dead
    delta = np.zeros((8, 2))
    delta[:, 0] = 1.0  # output channel 1 is dead
    stats = block_statistics(p, to_xp(x), to_xp(delta), examples=4)
    inv = block_inverse(stats, damping=0.5)
    g = np.ones((2, p.d_a))
    d = to_np(block_apply(p, inv, to_xp(g)))
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(d[1], 2.0)  # dead output channel: g / λ
    np.testing.assert_allclose(d[0, 9:18], 2.0)  # dead input channel of a live output


def test_large_damping_limit(xp, to_xp, to_np, rng):
    p = conv_kernel_blocks(2, 3, 3, 3)
    inv = block_inverse([to_xp(s) for s in _spd_stacks(rng, p)], damping=1e8)
    g = rng.standard_normal((p.d_out, p.d_a))
    np.testing.assert_allclose(to_np(block_apply(p, inv, to_xp(g))) * 1e8, g, rtol=1e-6, atol=1e-6)


def test_partition_constructors():
    p = conv_kernel_blocks(4, 3, 3, 2)
    assert p.shapes() == ((12, 6, 6), (4, 1, 1))
    assert p.n_blocks == 16
    assert p.n_entries == 12 * 36 + 4
    assert tiled_blocks(2, 7, max_size=100).shapes() == unit_blocks(2, 7).shapes()
    assert np.array_equal(tiled_blocks(2, 3, bias=False, max_size=2).groups[1].index, [[2], [5]])
    np.testing.assert_array_equal(np.sort(_shuffled(3, 5).order), np.arange(15))


def test_partition_rejects_bad_data():
    with pytest.raises(ValueError, match="in no block and 1 in several"):
        Partition.from_index(1, 3, np.array([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="entries in"):
        Partition.from_index(1, 3, np.array([[0, 1, 3]]))
    with pytest.raises(ValueError, match="2-D integer"):
        Partition(1, 2, (BlockGroup(np.array([0.0, 1.0])),))
    with pytest.raises(ValueError, match="does not describe"):
        Partition(1, 2, (BlockGroup(np.array([[1, 0]]), (0, 2, 1)),))
    with pytest.raises(ValueError, match="d_out must be a positive int"):
        Partition(0, 2, (BlockGroup(np.array([[0, 1]])),))
    with pytest.raises(ValueError, match="max_size must be a positive int"):
        tiled_blocks(2, 3, max_size=0)
    with pytest.raises(ValueError, match="k_h must be a positive int"):
        conv_kernel_blocks(2, 3, 0, 3)


def test_functions_reject_bad_arguments(xp, to_xp):
    p = unit_blocks(2, 3)
    x, d = to_xp(np.ones((4, 4))), to_xp(np.ones((4, 2)))
    with pytest.raises(ValueError, match="expected inputs"):
        block_statistics(p, to_xp(np.ones((4, 3))), d, examples=4)
    with pytest.raises(ValueError, match=r"expected inputs \(R, 3\) \(without"):
        block_statistics(p, x, d, examples=4, bias=True)
    with pytest.raises(ValueError, match="multiple of examples=3"):
        block_statistics(p, x, d, examples=3)
    with pytest.raises(ValueError, match="examples must be a positive int"):
        block_statistics(p, x, d, examples=0)
    with pytest.raises(TypeError, match="partition must be a Partition"):
        block_statistics("unit", x, d, examples=4)
    with pytest.raises(TypeError, match="mixed dtypes"):
        block_statistics(p, x, to_xp(np.ones((4, 2)), "float32"), examples=4)
    with pytest.raises(ValueError, match="grads must have shape"):
        gradient_statistics(p, to_xp(np.ones((4, 2, 3))))
    with pytest.raises(ValueError, match=r"stats\[0\] must have shape"):
        block_inverse([to_xp(np.ones((3, 3)))], damping=0.1)
    with pytest.raises(ValueError, match="damping must be finite"):
        block_inverse([to_xp(np.ones((1, 3, 3)))], damping=-1.0)
    with pytest.raises(ValueError, match="grad must have shape"):
        block_apply(p, [to_xp(np.ones((2, 4, 4)))], to_xp(np.ones((4, 2))))
    with pytest.raises(ValueError, match="matrices must have shapes"):
        block_apply(p, [to_xp(np.ones((2, 3, 3)))], to_xp(np.ones((2, 4))))


@PROPERTY
@given(
    d_out=st.integers(1, 4),
    d_a=st.integers(1, 6),
    size=st.integers(1, 5),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_random_partitions_match_dense_references(d_out, d_a, size, rows, seed, xp, to_xp, to_np):
    """Any partition (a random permutation cut into blocks of ``size`` and a remainder):
    statistics = dense EF blocks, and the batched solve = the dense block-diagonal solve."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(d_out * d_a)
    cut = (len(perm) // size) * size
    maps = [perm[:cut].reshape(-1, size)] if cut else []
    maps += [perm[cut:][None, :]] if cut < len(perm) else []
    p = Partition.from_index(d_out, d_a, *maps)
    n = 4
    x, delta = _rows(rng, n, rows, d_out, d_a)
    grads = _per_example(x, delta, n).reshape(n, -1)
    fisher = grads.T @ grads / n
    stats = block_statistics(p, to_xp(x), to_xp(delta), examples=n)
    for g, stack in zip(p.groups, stats):
        want = np.stack([fisher[np.ix_(i, i)] for i in g.index])
        np.testing.assert_allclose(to_np(stack), want, rtol=1e-10, atol=1e-12)
    grad = rng.standard_normal((d_out, d_a))
    got = to_np(block_apply(p, block_inverse(stats, damping=0.1), to_xp(grad))).reshape(-1)
    dense = _dense_blockdiag(p, [to_np(m) for m in stats]) + 0.1 * np.eye(grad.size)
    np.testing.assert_allclose(got, np.linalg.solve(dense, grad.reshape(-1)), rtol=1e-9)
