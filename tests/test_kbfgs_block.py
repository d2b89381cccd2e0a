"""The K-BFGS / K-BFGS(L) core blocks (``curvlin.blocks.kbfgs``): spec/kbfgs.md T12, T13, T15.

Every test here runs on every backend of the ``xp`` fixture; results are compared with a
float64 NumPy run of the same sequence.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from curvlin.blocks import KBFGSBlock, KBFGSLBlock, KBFGSState
from curvlin.quasi_newton import LBFGSState

LAM = 0.3


def _spd(rng, d, scale=1.0):
    q = rng.standard_normal((d, d))
    return scale * (q @ q.T / d + 0.5 * np.eye(d))


def _sequence(block, to_xp, to_np, data, like):
    """Run ``len(data)`` K-BFGS iterations on the block; return the states' arrays (NumPy)."""
    state = block.init(like)
    directions = []
    for x, grad_w, grad_b, h, h_plus, g, g_plus in data:
        x, h, h_plus, g, g_plus = (to_xp(v) for v in (x, h, h_plus, g, g_plus))
        state = block.update_a(state, x, n_examples=x.shape[0], damping=LAM)
        dw, db = block.precondition(state, to_xp(grad_w), to_xp(grad_b))
        directions.append((to_np(dw), to_np(db)))
        s, y = block.pair(h, h_plus, g, g_plus)
        state = block.update_g(state, s, y, g[0, :] * 0.0 + 1.0, damping=LAM)
        state = block.update_h_a(state, x, n_examples=x.shape[0], damping=LAM)
    return {k: to_np(v) for k, v in state.arrays().items()}, directions


def _data(rng, steps=4, m=12, d_in=4, d_out=3):
    out = []
    for _ in range(steps):
        x = rng.standard_normal((m, d_in)) + 0.5
        h = rng.standard_normal((m, d_out))
        g = rng.standard_normal((m, d_out))
        b = _spd(rng, d_out)  # g changes like a curvature times the change of h
        dh = 0.1 * rng.standard_normal((m, d_out))
        out.append(
            (
                x,
                rng.standard_normal((d_out, d_in)),
                rng.standard_normal(d_out),
                h,
                h - dh,
                g,
                g - dh @ b,
            )
        )
    return out


@pytest.mark.parametrize(
    "block",
    [
        KBFGSBlock(3, 4),
        KBFGSBlock(3, 4, variant="additive", a_update="minibatch"),
        KBFGSLBlock(3, 4, memory=3),
        KBFGSLBlock(3, 4, memory=3, a_update="ema", lbfgs_method="compact"),
    ],
    ids=["dense-ema", "dense-minibatch-additive", "lbfgs-minibatch", "lbfgs-ema-compact"],
)
def test_backend_parity_f64(block, xp, to_xp, to_np, rng):
    """T15: the same sequence on every backend matches NumPy float64 to rtol 1e-6."""
    data = _data(rng)
    ref, ref_dirs = _sequence(
        block, lambda v: np.asarray(v, np.float64), np.asarray, data, np.zeros(1)
    )
    got, dirs = _sequence(block, to_xp, to_np, data, to_xp(np.zeros(1)))
    assert set(got) == set(ref)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-12, err_msg=key)
    for (dw, db), (rw, rb) in zip(dirs, ref_dirs):
        np.testing.assert_allclose(dw, rw, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(db, rb, rtol=1e-6, atol=1e-12)
    # The sequence really updated H_g (not every pair skipped).
    if "h_g" in ref:
        assert not np.allclose(ref["h_g"], np.eye(3))
    else:
        assert ref["lbfgs_valid"].any()


def test_float32_close_to_float64(xp, to_xp, to_np, rng):
    """T15 (f32): the float32 run stays within 1e-3 of the float64 one."""
    block = KBFGSBlock(3, 4)
    data = _data(rng)
    ref, _ = _sequence(block, lambda v: np.asarray(v, np.float64), np.asarray, data, np.zeros(1))
    got, _ = _sequence(
        block, lambda v: to_xp(v, "float32"), to_np, data, to_xp(np.zeros(1), "float32")
    )
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-3, atol=1e-4, err_msg=key)


@pytest.mark.parametrize("bias", [True, False])
def test_descent_and_shape(bias, xp, to_xp, to_np, rng):
    """T13: ``P.shape == W̄.shape`` and ``⟨M, P⟩ > 0`` for SPD factors; identity factors: P = M."""
    block = KBFGSBlock(5, 4, bias=bias)
    state = block.init(to_xp(np.zeros(1)))
    grad_w = rng.standard_normal((5, 4))
    grad_b = rng.standard_normal(5) if bias else None
    dw, db = block.precondition(state, to_xp(grad_w), None if grad_b is None else to_xp(grad_b))
    np.testing.assert_array_equal(to_np(dw), grad_w)  # H_g = I, H_a = I: plain (momentum) SGD
    if bias:
        np.testing.assert_array_equal(to_np(db), grad_b)
    else:
        assert db is None
    d_a = 4 + int(bias)
    for _ in range(5):
        h_a, h_g = _spd(rng, d_a, 3.0), _spd(rng, 5, 0.2)
        st = KBFGSState(
            h_a=to_xp(h_a), h_g=to_xp(h_g), s_bar=to_xp(np.zeros(5)), y_bar=to_xp(np.zeros(5))
        )
        dw, db = block.precondition(st, to_xp(grad_w), None if grad_b is None else to_xp(grad_b))
        assert tuple(dw.shape) == (5, 4)
        m = grad_w if not bias else np.concatenate([grad_w, grad_b[:, None]], axis=1)
        p = to_np(dw) if not bias else np.concatenate([to_np(dw), to_np(db)[:, None]], axis=1)
        np.testing.assert_allclose(p, h_g @ m @ h_a, rtol=1e-10)
        assert float(np.sum(m * p)) > 0


def test_warm_start_and_conv_scale(xp, to_xp, to_np, rng):
    """T12: ``u`` ends in 1 and ``A`` is the spatial sum, ``|T|`` times the spatial mean."""
    m, t, d_in = 3, 5, 4
    patches = rng.standard_normal((m * t, d_in))
    block = KBFGSBlock(2, d_in)
    xb = to_np(block.homogeneous(to_xp(patches)))
    assert np.all(xb[:, -1] == 1.0)
    assert xb.mean(axis=0)[-1] == 1.0
    a_sum = xb.T @ xb / m
    a_mean = xb.T @ xb / (m * t)
    np.testing.assert_allclose(a_sum, t * a_mean, rtol=1e-12)
    state = block.update_a(
        block.init(to_xp(np.zeros(1))), to_xp(patches), n_examples=m, damping=LAM
    )
    np.testing.assert_allclose(to_np(state.a), a_sum, rtol=1e-10)
    np.testing.assert_allclose(
        to_np(state.h_a), np.linalg.inv(a_sum + math.sqrt(LAM) * np.eye(d_in + 1)), rtol=1e-8
    )
    # A fixed point: right after the warm start the Hessian-action update changes nothing.
    after = block.update_h_a(state, to_xp(patches), n_examples=m, damping=LAM)
    np.testing.assert_allclose(to_np(after.h_a), to_np(state.h_a), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("a_update", ["ema", "minibatch"])
def test_repair_rebuilds_indefinite_factors(a_update, xp, to_xp, to_np, rng):
    """§9.6: an ``H_a`` or dense ``H_g`` that lost positive definiteness is rebuilt."""
    m, d_in, d_out = 16, 3, 2
    x = rng.standard_normal((m, d_in)) + 0.5
    block = KBFGSBlock(d_out, d_in, a_update=a_update)
    state = block.update_a(block.init(to_xp(np.zeros(1))), to_xp(x), n_examples=m, damping=LAM)
    same, rebuilt = block.repair(state, to_xp(x), n_examples=m, damping=LAM)
    assert rebuilt == ()
    assert same is state
    x_bar = np.concatenate([x, np.ones((m, 1))], axis=1)
    fresh = np.linalg.inv(x_bar.T @ x_bar / m + math.sqrt(LAM) * np.eye(d_in + 1))
    broken = KBFGSState.from_arrays(
        {**state.arrays(), "h_a": to_xp(-np.eye(d_in + 1)), "h_g": to_xp(np.diag([1.0, -1.0]))},
        state.counters(),
    )
    new, rebuilt = block.repair(broken, to_xp(x), n_examples=m, damping=LAM)
    assert rebuilt == ("h_a", "h_g")
    np.testing.assert_allclose(to_np(new.h_a), fresh, rtol=1e-8)
    np.testing.assert_array_equal(to_np(new.h_g), np.eye(d_out))
    # The L-BFGS H_g is positive definite by construction: only H_a is tested.
    lblock = KBFGSLBlock(d_out, d_in, memory=3, a_update=a_update)
    lstate = lblock.update_a(lblock.init(to_xp(np.zeros(1))), to_xp(x), n_examples=m, damping=LAM)
    lbroken = KBFGSState.from_arrays(
        {**lstate.arrays(), "h_a": to_xp(-np.eye(d_in + 1))},
        lstate.counters(),
    )
    new, rebuilt = lblock.repair(lbroken, to_xp(x), n_examples=m, damping=LAM)
    assert rebuilt == ("h_a",)
    np.testing.assert_allclose(to_np(new.h_a), fresh, rtol=1e-8)
    with pytest.raises(ValueError, match="call update_a"):
        block.repair(block.init(to_xp(np.zeros(1))), to_xp(x), n_examples=m, damping=LAM)


def test_nonfinite_pair_leaves_state(xp, to_xp, to_np, rng):
    """A pair holding NaN leaves the EMAs and ``H_g`` (dense and L-BFGS) bit-identical."""
    for block in (KBFGSBlock(3, 2), KBFGSLBlock(3, 2, memory=4)):
        state = block.init(to_xp(np.zeros(1)))
        s = to_xp(np.array([1.0, np.nan, 0.0]))
        y = to_xp(np.array([1.0, 2.0, 0.0]))
        new = block.update_g(state, s, y, to_xp(np.ones(3)), damping=LAM)
        for key, value in state.arrays().items():
            np.testing.assert_array_equal(to_np(new.arrays()[key]), to_np(value), err_msg=key)
        assert new.g_updates == 1


def test_dead_pair_skipped(xp, to_xp, to_np):
    """``s = 0`` (a layer that did not move) does not change ``H_g``."""
    block = KBFGSBlock(3, 2)
    state = block.init(to_xp(np.zeros(1)))
    new = block.update_g(
        state, to_xp(np.zeros(3)), to_xp(np.ones(3)), to_xp(np.ones(3)), damping=LAM
    )
    np.testing.assert_array_equal(to_np(new.h_g), np.eye(3))


def test_state_round_trip():
    for block in (KBFGSBlock(3, 2), KBFGSLBlock(3, 2, memory=4)):
        state = block.init(np.zeros(1))
        again = KBFGSState.from_arrays(state.arrays(), {"a_updates": 2, "g_updates": 5})
        assert again.a_updates == 2
        assert again.g_updates == 5
        assert isinstance(again.h_g, LBFGSState) == isinstance(state.h_g, LBFGSState)
        assert set(again.arrays()) == set(state.arrays())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_out": 0, "d_in": 2}, "d_out"),
        ({"d_out": 2, "d_in": 2, "memory": 0}, "memory"),
        ({"d_out": 2, "d_in": 2, "a_update": "full"}, "a_update"),
        ({"d_out": 2, "d_in": 2, "variant": "v3"}, "variant"),
        ({"d_out": 2, "d_in": 2, "mu1": 1.0}, "mu1"),
        ({"d_out": 2, "d_in": 2, "pair_decay": 1.0}, "pair_decay"),
    ],
)
def test_block_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KBFGSBlock(**kwargs)


def test_argument_validation():
    block = KBFGSBlock(3, 2)
    state = block.init(np.zeros(1))
    with pytest.raises(ValueError, match="damping"):
        block.update_a(state, np.ones((4, 2)), n_examples=4, damping=0.0)
    with pytest.raises(ValueError, match=r"x must have shape \(R, 2\)"):
        block.update_a(state, np.ones((4, 3)), n_examples=4, damping=0.1)
    with pytest.raises(ValueError, match="grad_w"):
        block.precondition(state, np.ones((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match="grad_b"):
        block.precondition(state, np.ones((3, 2)), None)
    with pytest.raises(ValueError, match="h_plus"):
        block.pair(np.ones((4, 3)), np.ones((5, 3)), np.ones((4, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="update_a"):
        block.update_h_a(state, np.ones((4, 2)), n_examples=4, damping=0.1)
