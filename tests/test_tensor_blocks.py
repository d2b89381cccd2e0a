"""The parameter-block contract for TNT and Shampoo, on every backend, against dense references.

Parameter blocks do not fit ``tests/test_block_contract.py``: they see one tensor of any shape
and its gradient (``LayerBatch.grad``), not a layer's rows and ``(d_out, d_in)`` gradients.
This file is their equivalent: for each case (bias, matrix, 3- and 4-mode tensors, the
convolution reshapes, diagonal modes) and each backend, ``init`` gives the shapes
``state_shapes`` promises, a statistics step keeps shapes and dtypes, the state rebuilds from
its arrays, ``precondition`` returns the gradient's shape and dtype, and the first direction
matches a dense float64 NumPy reference that unfolds the gradient explicitly and forms the
Kronecker product. Spec §1 tests 6 (EMA) and 7 (reshape round trip) are here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from _helpers import assert_close, dense_kron, reference_inverse_root, tolerance

from curvlin.blocks import Driver, LayerBatch, Schedule, ShampooBlock, TNTBlock, tensor_modes

EPS = 0.3


def _unfold_covs(g: np.ndarray, max_dim=None):
    out = []
    for i in range(g.ndim):
        unfolded = np.moveaxis(g, i, 0).reshape(g.shape[i], -1)
        c = unfolded @ unfolded.T
        out.append(np.diag(np.diag(c)) if max_dim is not None and g.shape[i] > max_dim else c)
    return out


def _tnt_reference(g, modes, max_dim):
    covs = _unfold_covs(g.reshape(modes), max_dim)
    k, total = len(modes), math.prod(modes)
    c = (np.trace(covs[0]) / total) ** (1.0 / k)
    us = [cov / (c ** (k - 1) * total / d) for cov, d in zip(covs, modes)] if k > 1 else covs
    big = dense_kron([u + EPS * np.eye(len(u)) for u in us])
    return np.linalg.solve(big, g.reshape(-1)).reshape(g.shape)


def _shampoo_reference(g, modes, max_dim):
    """With the default relative damping: ``ε_i = ε · tr(H_i)/d_i``."""
    covs = _unfold_covs(g.reshape(modes), max_dim)
    big = dense_kron([h + EPS * np.trace(h) / len(h) * np.eye(len(h)) for h in covs])
    return (reference_inverse_root(big, 2 * len(modes)) @ g.reshape(-1)).reshape(g.shape)


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    conv: str = "filter"
    max_dim: int | None = None

    def __str__(self):
        return self.name

    @property
    def modes(self):
        return tensor_modes(self.shape, conv=self.conv)


CASES = [
    Case("bias", (5,)),
    Case("matrix", (3, 4)),
    Case("tensor3", (2, 3, 2)),
    Case("conv-filter", (3, 2, 2, 2)),
    Case("conv-kfac", (3, 2, 2, 2), conv="kfac"),
    Case("conv-none", (3, 2, 2, 2), conv="none"),
    Case("embedding-diagonal", (9, 3), max_dim=4),
]
METHODS = {"tnt": (TNTBlock, _tnt_reference), "shampoo": (ShampooBlock, _shampoo_reference)}


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parameter_block_contract(case, method, dtype, xp, to_xp, to_np, rng):
    cls, reference = METHODS[method]
    block = cls(case.shape, case.modes, max_dim=case.max_dim)
    like = to_xp(np.zeros(1), dtype)
    state = block.init(like)
    shapes = block.state_shapes()
    for key, a in state.arrays().items():
        assert tuple(a.shape) == shapes[key], key
        assert a.dtype == like.dtype, key
    assert not block.ready(state)
    g = rng.standard_normal(case.shape)
    stats = block.statistics(state, LayerBatch(grad=to_xp(g, dtype)))
    state = block.refresh(block.fold(state, stats, damping=EPS), damping=EPS)
    assert block.ready(state)
    for key, a in state.arrays().items():
        assert tuple(a.shape) == shapes[key], key
        assert a.dtype == like.dtype, key
    rebuilt = type(state).from_arrays(state.arrays(), state.counters())
    assert set(rebuilt.arrays()) == set(state.arrays())
    direction, none = block.precondition(rebuilt, to_xp(g, dtype))
    assert none is None
    assert tuple(direction.shape) == case.shape
    assert direction.dtype == like.dtype
    ref = reference(g, case.modes, case.max_dim)
    assert_close(direction, ref, rtol=tolerance(dtype, cond=1e3, n=g.size), what=method)


@pytest.mark.parametrize("method", METHODS)
def test_precondition_rejects_bad_gradients(method, xp, to_xp):
    cls, _ = METHODS[method]
    block = cls((3, 4))
    state = block.init(to_xp(np.zeros(1)))
    with pytest.raises(ValueError, match="not ready"):
        block.precondition(state, to_xp(np.ones((3, 4))))
    g = to_xp(np.ones((3, 4)))
    state = block.refresh(block.fold(state, block.statistics(state, LayerBatch(grad=g))), damping=1)
    with pytest.raises(ValueError, match=r"grad must have shape \(3, 4\)"):
        block.precondition(state, to_xp(np.ones((4, 3))))
    with pytest.raises(ValueError, match="no bias"):
        block.precondition(state, g, to_xp(np.ones(3)))
    with pytest.raises(ValueError, match="needs grad"):
        block.statistics(state, LayerBatch())
    with pytest.raises(ValueError, match="grad must have shape"):
        block.statistics(state, LayerBatch(grad=to_xp(np.ones(5))))


def test_bad_options_name_themselves():
    with pytest.raises(ValueError, match="decay"):
        TNTBlock((3,), decay=1.0)
    with pytest.raises(ValueError, match="max_dim"):
        ShampooBlock((3,), max_dim=0)
    with pytest.raises(ValueError, match="modes"):
        TNTBlock((3, 4), (5, 2))
    with pytest.raises(ValueError, match="graft"):
        ShampooBlock((3,), graft="adagrad")
    with pytest.raises(ValueError, match="conv"):
        tensor_modes((2, 2, 2, 2), conv="im2col")


@pytest.mark.parametrize("decay", [0.9, None])
def test_ema_and_running_sum(decay, xp, to_xp, to_np, rng):
    """Spec test 6: ``C ← β C + (1 − β) C_batch`` after the first batch (taken as is);
    Shampoo's ``decay=None`` sums."""
    block = ShampooBlock((3, 2), decay=decay) if decay is None else TNTBlock((3, 2), decay=decay)
    state = block.init(to_xp(np.zeros(1)))
    grads = [rng.standard_normal((3, 2)) for _ in range(3)]
    for g in grads:
        state = block.fold(state, block.statistics(state, LayerBatch(grad=to_xp(g))))
    expected = _unfold_covs(grads[0])
    for g in grads[1:]:
        new = _unfold_covs(g)
        expected = [
            e + n if decay is None else decay * e + (1 - decay) * n for e, n in zip(expected, new)
        ]
    for f, e in zip(state.factors, expected):
        assert_close(f, e, rtol=1e-12)
    assert state.updates == 3


def test_conv_reshape_round_trip(xp, to_xp, to_np, rng):
    """Spec test 7: a 4-D kernel preconditioned in ``(c_out, c_in, k_h·k_w)`` is the 3-D
    tensor's direction, reshaped back."""
    g = rng.standard_normal((4, 3, 2, 2))
    four = TNTBlock(g.shape, tensor_modes(g.shape))
    three = TNTBlock((4, 3, 4))
    directions = []
    for block, grad in ((four, g), (three, g.reshape(4, 3, 4))):
        state = block.init(to_xp(np.zeros(1)))
        state = block.fold(state, block.statistics(state, LayerBatch(grad=to_xp(grad))))
        state = block.refresh(state, damping=EPS)
        directions.append(to_np(block.precondition(state, to_xp(grad))[0]))
    assert directions[0].shape == g.shape
    assert np.array_equal(directions[0].reshape(4, 3, 4), directions[1])


@pytest.mark.parametrize("graft", ["sgd", "adam"])
def test_grafting_takes_the_step_norm(graft, xp, to_xp, to_np, rng):
    block = ShampooBlock((4, 3), graft=graft)
    state = block.init(to_xp(np.zeros(1)))
    grads = [rng.standard_normal((4, 3)) for _ in range(2)]
    for g in grads:
        state = block.fold(state, block.statistics(state, LayerBatch(grad=to_xp(g))))
    state = block.refresh(state, damping=EPS)
    m = rng.standard_normal((4, 3))
    d = to_np(block.precondition(state, to_xp(m))[0])
    if graft == "sgd":
        target = np.linalg.norm(m)
    else:
        v = 0.999 * grads[0] ** 2 + 0.001 * grads[1] ** 2
        target = np.linalg.norm(m / (np.sqrt(v) + 1e-8))
        assert_close(state.graft, v, rtol=1e-12)
    assert math.isclose(np.linalg.norm(d), target, rel_tol=1e-10)
    plain = ShampooBlock((4, 3))
    ref = to_np(plain.precondition(plain.refresh(_fold(plain, state), damping=EPS), to_xp(m))[0])
    assert np.allclose(d / np.linalg.norm(d), ref / np.linalg.norm(ref))  # the same direction


def _fold(block, state):
    """A plain Shampoo state with ``state``'s factors."""
    return type(state)(state.factors, state.updates)


def test_a_large_mode_is_never_materialised(xp, to_xp):
    """A 50 000-row embedding keeps a (50 000,) diagonal, not a 50 000² matrix."""
    block = TNTBlock((50_000, 8))  # default max_dim 4096
    assert block.state_shapes() == {
        "f0": (50_000,),
        "inv0": (50_000,),
        "f1": (8, 8),
        "inv1": (8, 8),
    }
    state = block.init(to_xp(np.zeros(1), "float32"))
    g = to_xp(np.ones((50_000, 8)), "float32")
    state = block.refresh(block.fold(state, block.statistics(state, LayerBatch(grad=g))), damping=1)
    assert tuple(state.inverses[0].shape) == (50_000,)
    assert tuple(block.precondition(state, g)[0].shape) == (50_000, 8)


@pytest.mark.parametrize("method", METHODS)
def test_driver_runs_parameter_blocks_and_round_trips_their_state(method, xp, to_xp, to_np, rng):
    cls, _ = METHODS[method]
    blocks = {"w": cls((3, 4)), "b": cls((3,)), "k": cls((2, 2, 1, 3))}
    like = to_xp(np.zeros(1))
    states = {n: b.init(like) for n, b in blocks.items()}
    driver = Driver(blocks, states, schedule=Schedule(refresh_every=2), owner=method)
    for _ in range(3):
        grads = {n: to_xp(rng.standard_normal(b.shape)) for n, b in blocks.items()}
        stats = driver.statistics({n: LayerBatch(grad=g) for n, g in grads.items()})
        assert driver.all_finite([*grads.values(), *driver.probes(stats)])
        new = driver.fold_refresh(stats, damping=dict.fromkeys(blocks, EPS))
        out = driver.precondition(new, {n: (g, None) for n, g in grads.items()})
        assert {n: tuple(d.shape) for n, (d, _) in out.items()} == {
            n: b.shape for n, b in blocks.items()
        }
        driver.commit(new)
    saved = driver.state_dict()
    twin = Driver(blocks, {n: b.init(like) for n, b in blocks.items()}, schedule=Schedule())
    twin.load_state_dict(saved, lambda layer, key, value: value)
    for n in blocks:
        for key, a in driver.states[n].arrays().items():
            assert np.array_equal(to_np(twin.states[n].arrays()[key]), to_np(a)), (n, key)
    bad = driver.state_dict()
    bad["layers"]["w"]["arrays"]["f0"] = to_xp(np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"layer 'w': buffer 'f0' has shape"):
        twin.load_state_dict(bad, lambda layer, key, value: value)


def test_shampoo_with_relative_damping_ignores_the_gradient_scale(xp, to_xp, to_np, rng):
    block = ShampooBlock((4, 3, 2))
    g = rng.standard_normal((4, 3, 2))
    directions = []
    for s in (1.0, 1e-3):
        state = block.init(to_xp(np.zeros(1)))
        state = block.fold(state, block.statistics(state, LayerBatch(grad=to_xp(s * g))))
        state = block.refresh(state, damping=1e-2)
        directions.append(to_np(block.precondition(state, to_xp(s * g))[0]))
    assert_close(directions[1], directions[0], rtol=1e-9)


def test_tnt_statistics_are_per_example(xp, to_xp, to_np, rng):
    """``N · G̃_(i) G̃_(i)ᵀ``: the batch-mean gradient's covariance is ``F̄ / N``."""
    block = TNTBlock((3, 2))
    state = block.init(to_xp(np.zeros(1)))
    g = to_xp(rng.standard_normal((3, 2)))
    one = block.statistics(state, LayerBatch(grad=g))
    four = block.statistics(state, LayerBatch(grad=g, n_examples=4))
    for key in one:
        assert_close(four[key], 4.0 * to_np(one[key]), rtol=1e-14)
    with pytest.raises(ValueError, match="n_examples"):
        block.statistics(state, LayerBatch(grad=g, n_examples=0))
