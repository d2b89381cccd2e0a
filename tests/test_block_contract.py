"""The block contract: every curvature block, on every backend, keeps the protocol.

For each block of :data:`BLOCKS` (with and without bias, float64 and float32) and each backend
of the ``xp`` fixture: ``init`` gives the shapes ``state_shapes`` promises, in the requested
dtype; a statistics step (``statistics`` → ``fold`` → ``refresh``), a second pass and a check
where the block has them, keep shapes and dtypes; the state rebuilds from its arrays and
counters; ``precondition`` returns ``(dW, db)`` of the gradients' shapes and dtype; and the
first direction matches the method's dense float64 reference, computed here with NumPy from the
explicit matrices. A new block joins by being added to :data:`BLOCKS` with its reference.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pytest
from _helpers import dense_kron, reference_pi_dampings
from array_api_compat import array_namespace

from curvlin import tiled_blocks
from curvlin.blocks import (
    DiagonalFisherBlock,
    Driver,
    KBFGSBlock,
    KBFGSLBlock,
    KFACBlock,
    LayerBatch,
    LinearKernelBlock,
    MBFBlock,
    Schedule,
    ShampooBlock,
    TNTBlock,
    homogeneous_gram,
)

D_OUT, D_IN, ROWS, DAMPING = 3, 4, 16, 0.2


def _xbar(x, bias):
    return np.concatenate([x, np.ones((len(x), 1))], axis=1) if bias else x


def _kfac_reference(exact):
    def reference(x, delta, n, grad, bias):
        xb = _xbar(x, bias)
        a = xb.T @ xb / len(xb)
        g = delta.T @ delta / n
        if exact:
            big = dense_kron([g, a]) + DAMPING * np.eye(g.shape[0] * a.shape[0])
        else:
            gg, ga = reference_pi_dampings([g, a], DAMPING)
            big = dense_kron([g + gg * np.eye(len(g)), a + ga * np.eye(len(a))])
        return np.linalg.solve(big, grad.reshape(-1)).reshape(grad.shape)

    return reference


def _kbfgs_reference(x, delta, n, grad, bias):
    """First step: ``H_g = I`` and ``H_a = (A + √λ I)⁻¹`` with ``A = X̄ᵀX̄ / N``."""
    xb = _xbar(x, bias)
    h_a = np.linalg.inv(xb.T @ xb / n + math.sqrt(DAMPING) * np.eye(xb.shape[1]))
    return grad @ h_a


def _diagonal_reference(x, delta, n, grad, bias):
    """First step: ``F = (1/N) Σ_n (δ_n ā_nᵀ)²`` from explicit per-example gradients."""
    xb = _xbar(x, bias)
    fisher = sum(np.outer(d, a) ** 2 for d, a in zip(delta, xb)) / n
    return grad / (fisher + DAMPING)


def _mbf_reference(x, delta, n, grad, bias):
    """First step: the diagonal blocks (rows tiled by 2) of the dense empirical Fisher
    ``(1/N) Σ_n vec(δ_n ā_nᵀ) vec(δ_n ā_nᵀ)ᵀ``, each solved with ``+ λI``."""
    xb = _xbar(x, bias)
    grads = np.stack([np.outer(d, a).reshape(-1) for d, a in zip(delta, xb)])
    fisher = grads.T @ grads / n
    d_a = xb.shape[1]
    out = np.empty(grad.size)
    for o in range(grad.shape[0]):
        for lo in range(0, d_a, 2):
            idx = o * d_a + np.arange(lo, min(lo + 2, d_a))
            block = fisher[np.ix_(idx, idx)] + DAMPING * np.eye(len(idx))
            out[idx] = np.linalg.solve(block, grad.reshape(-1)[idx])
    return out.reshape(grad.shape)


@dataclass(frozen=True)
class Case:
    name: str
    make: object  # (d_out, d_in, bias) -> Block
    reference: object  # (x, delta, n, grad (d_out, d_a), bias) -> direction, float64

    def __str__(self):
        return self.name


BLOCKS = [
    Case("kfac", lambda o, i, b: KFACBlock(o, i, bias=b), _kfac_reference(False)),
    Case("kfac-exact", lambda o, i, b: KFACBlock(o, i, bias=b, exact=True), _kfac_reference(True)),
    Case("kbfgs", lambda o, i, b: KBFGSBlock(o, i, bias=b), _kbfgs_reference),
    Case(
        "kbfgs-minibatch",
        lambda o, i, b: KBFGSBlock(o, i, bias=b, a_update="minibatch"),
        _kbfgs_reference,
    ),
    Case("kbfgsl", lambda o, i, b: KBFGSLBlock(o, i, bias=b, memory=3), _kbfgs_reference),
    Case("diagonal", lambda o, i, b: DiagonalFisherBlock(o, i, bias=b), _diagonal_reference),
    Case(
        "mbf",
        lambda o, i, b: MBFBlock(o, i, bias=b, partition=tiled_blocks(o, i, bias=b, max_size=2)),
        _mbf_reference,
    ),
]


def _data(rng, n=ROWS):
    x = rng.standard_normal((n, D_IN)) + 0.3
    delta = rng.standard_normal((n, D_OUT))
    return x, delta, rng.standard_normal((D_OUT, D_IN)), rng.standard_normal(D_OUT)


def _batch(to_xp, dtype, x, delta, *, scale=1.0, outputs=None):
    return LayerBatch(
        inputs=to_xp(x, dtype),
        outputs=None if outputs is None else to_xp(outputs, dtype),
        output_grads=to_xp(delta / scale, dtype),
        n_examples=len(x),
        grad_scale=scale,
    )


def _check_state(block, state, xp, dtype):
    shapes = block.state_shapes()
    for key, value in state.arrays().items():
        assert key in shapes, key
        assert tuple(value.shape) == shapes[key], key
        if not xp.isdtype(value.dtype, "bool"):
            assert value.dtype == dtype, key
    for key, value in state.counters().items():
        assert isinstance(value, int), key
        assert value >= 0, key
    again = type(state).from_arrays(state.arrays(), state.counters())
    assert set(again.arrays()) == set(state.arrays())
    assert again.counters() == state.counters()
    for key, value in again.arrays().items():
        assert value is state.arrays()[key], key


@pytest.mark.parametrize("case", BLOCKS, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_block_contract(case, bias, dtype, xp, to_xp, to_np, rng):
    block = case.make(D_OUT, D_IN, bias)
    x, delta, gw, gb = _data(rng)
    work = getattr(xp, dtype)
    state = block.init(to_xp(np.zeros(1), dtype))
    _check_state(block, state, xp, work)
    assert block.needs <= {"inputs", "outputs", "output_grads", "second_pass"}
    # the per-example scale rides on the statistics: rows handed in at 1/N of their size
    batch = _batch(to_xp, dtype, x, delta, scale=float(ROWS), outputs=delta)
    state = block.fold(state, block.statistics(state, batch), damping=DAMPING)
    state = block.refresh(state, damping=DAMPING)
    _check_state(block, state, xp, work)
    assert block.ready(state)
    grad_b = to_xp(gb, dtype) if bias else None
    dw, db = block.precondition(state, to_xp(gw, dtype), grad_b)
    assert tuple(dw.shape) == (D_OUT, D_IN)
    assert dw.dtype == work
    assert (db is None) == (not bias)
    if bias:
        assert tuple(db.shape) == (D_OUT,)
        assert db.dtype == work
    grad = np.concatenate([gw, gb[:, None]], axis=1) if bias else gw
    expected = case.reference(x, delta, ROWS, grad, bias)
    got = np.concatenate([to_np(dw), to_np(db)[:, None]], axis=1) if bias else to_np(dw)
    rtol = 1e-9 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    if "second_pass" in block.needs:
        h_plus = delta - 0.1 * rng.standard_normal(delta.shape)
        plus = _batch(to_xp, dtype, x, delta * 0.8, scale=float(ROWS), outputs=h_plus)
        state = block.second_pass(state, batch, plus, damping=DAMPING)
        _check_state(block, state, xp, work)
    state, rebuilt = block.check(state, batch, damping=DAMPING)
    assert rebuilt == ()
    _check_state(block, state, xp, work)


_TENSOR_BLOCKS = {
    "tnt": lambda: TNTBlock((D_OUT, D_IN)),
    "shampoo-adam": lambda: ShampooBlock((D_OUT, D_IN), graft="adam"),
    "shampoo-sum": lambda: ShampooBlock((D_OUT, D_IN), decay=None),
}


@pytest.mark.parametrize("name", [c.name for c in BLOCKS] + list(_TENSOR_BLOCKS))
def test_fold_with_overwrite_equals_fold_and_leaves_the_statistics(name, xp, to_xp, to_np, rng):
    """What an installing driver calls: the same states, computed into the old arrays."""
    case = {c.name: c for c in BLOCKS}.get(name)
    block = case.make(D_OUT, D_IN, True) if case else _TENSOR_BLOCKS[name]()
    state = block.init(to_xp(np.zeros(1)))
    batches = []
    for _ in range(3):
        x, delta, gw, _ = _data(rng)
        batches.append(
            LayerBatch(grad=to_xp(gw), n_examples=ROWS)
            if case is None
            else _batch(to_xp, "float64", x, delta, scale=float(ROWS), outputs=delta)
        )
    plain = state
    for batch in batches:
        stats = block.statistics(state, batch)
        kept = {k: to_np(v).copy() for k, v in stats.items()}
        plain = block.fold(plain, stats, damping=DAMPING)
        state = block.fold(_copied(state), stats, damping=DAMPING, overwrite=True)
        for k, v in stats.items():
            np.testing.assert_array_equal(to_np(v), kept[k], err_msg=k)
    for key, value in plain.arrays().items():
        np.testing.assert_allclose(
            to_np(state.arrays()[key]), to_np(value), rtol=1e-12, err_msg=key
        )
    assert state.counters() == plain.counters()


def _copied(state):
    """The state on copies of its arrays (the two chains above must not share one)."""
    arrays = {k: array_namespace(v).asarray(v, copy=True) for k, v in state.arrays().items()}
    return type(state).from_arrays(arrays, state.counters())


@pytest.mark.parametrize("case", BLOCKS, ids=str)
def test_block_precondition_rejects_bad_gradients(case, xp, to_xp):
    block = case.make(D_OUT, D_IN, True)
    state = block.init(to_xp(np.zeros(1)))
    rng = np.random.default_rng(0)
    x, delta, gw, gb = _data(rng)
    batch = _batch(to_xp, "float64", x, delta, outputs=delta)
    state = block.refresh(
        block.fold(state, block.statistics(state, batch), damping=0.1), damping=0.1
    )
    with pytest.raises(ValueError, match="grad_w must have shape"):
        block.precondition(state, to_xp(gw.T), to_xp(gb))
    with pytest.raises(ValueError, match="grad_b must be"):
        block.precondition(state, to_xp(gw), None)


@pytest.mark.parametrize("case", BLOCKS, ids=str)
def test_driver_runs_every_block_and_round_trips_its_state(case, xp, to_xp, to_np):
    """The driver's schedule, commit and checkpoint on every block and backend."""
    blocks = {"a": case.make(D_OUT, D_IN, True), "b": case.make(2, D_OUT, False)}
    init = {k: b.init(to_xp(np.zeros(1))) for k, b in blocks.items()}
    driver = Driver(blocks, init, schedule=Schedule(stats_every=2, refresh_every=2))
    rng = np.random.default_rng(1)
    damping = {"a": DAMPING, "b": DAMPING}
    for _ in range(3):
        x, delta, gw, gb = _data(rng)
        x2, delta2 = rng.standard_normal((ROWS, D_OUT)), rng.standard_normal((ROWS, 2))
        batches = None
        if driver.stats_due():
            batches = {
                "a": _batch(to_xp, "float64", x, delta, outputs=delta),
                "b": _batch(to_xp, "float64", x2, delta2, outputs=delta2),
            }
        stats = driver.statistics(batches) if batches else None
        grads = {"a": (to_xp(gw), to_xp(gb)), "b": (to_xp(rng.standard_normal((2, D_OUT))), None)}
        assert driver.all_finite([*grads["a"], *driver.probes(stats)])
        states = driver.fold_refresh(stats, damping=damping)
        directions = driver.precondition(states, grads)
        assert set(directions) == {"a", "b"}
        if batches and "second_pass" in blocks["a"].needs:
            states = driver.second_pass(states, batches, batches, damping=damping)
        driver.commit(states)
    assert driver.step == 3
    saved = driver.state_dict()
    other = Driver(blocks, init, schedule=Schedule(stats_every=2, refresh_every=2))
    other.load_state_dict(saved, lambda layer, key, value: value)
    assert other.step == 3
    for name in blocks:
        for key, value in driver.states[name].arrays().items():
            np.testing.assert_array_equal(to_np(other.states[name].arrays()[key]), to_np(value))
    bad = driver.state_dict()
    bad["layers"]["a"]["arrays"] = dict(bad["layers"]["a"]["arrays"])
    first = next(iter(bad["layers"]["a"]["arrays"]))
    bad["layers"]["a"]["arrays"][first] = to_xp(np.zeros((7, 7)))
    with pytest.raises(ValueError, match=f"layer 'a': buffer '{first}' has shape"):
        other.load_state_dict(bad, lambda layer, key, value: value)
    assert other.step == 3  # nothing changed


def test_all_finite_is_one_verdict(xp, to_xp):
    ok = [to_xp(np.ones((2, 2))), to_xp(np.zeros(3))]
    assert Driver.all_finite(ok)
    assert Driver.all_finite([])
    assert not Driver.all_finite([*ok, to_xp(np.array([1.0, np.nan]))])
    assert not Driver.all_finite([*ok, to_xp(np.array([np.inf]))])


@pytest.mark.parametrize("case", [c for c in BLOCKS if c.name.startswith("kbfgs")], ids=str)
def test_before_second_pass_then_second_pass_equals_second_pass_alone(case, xp, to_xp, to_np):
    """The split the engine uses to free the input rows early changes no bit of the state."""
    block = case.make(D_OUT, D_IN, True)
    assert "second_pass" in block.needs
    rng = np.random.default_rng(3)
    x, delta, _, _ = _data(rng)
    batch = _batch(to_xp, "float64", x, delta, scale=float(ROWS), outputs=delta)
    state = block.init(to_xp(np.zeros(1)))
    state = block.fold(state, block.statistics(state, batch), damping=DAMPING)
    h_plus = delta - 0.1 * rng.standard_normal(delta.shape)
    plus = _batch(to_xp, "float64", x, delta * 0.8, scale=float(ROWS), outputs=h_plus)
    whole = block.second_pass(state, batch, plus, damping=DAMPING)
    early = block.before_second_pass(state, batch, damping=DAMPING)
    split = block.second_pass(early, dataclasses.replace(batch, inputs=None), plus, damping=DAMPING)
    for key, value in whole.arrays().items():
        np.testing.assert_array_equal(to_np(split.arrays()[key]), to_np(value), err_msg=key)
    assert split.counters() == whole.counters()


@pytest.mark.parametrize("bias", [True, False])
def test_homogeneous_gram_is_the_gram_of_the_concatenated_rows(bias, xp, to_xp, to_np, rng):
    x = rng.standard_normal((ROWS, D_IN))
    xb = _xbar(x, bias)
    got = to_np(homogeneous_gram(to_xp(x), bias=bias, scale=0.25))
    np.testing.assert_allclose(got, 0.25 * xb.T @ xb, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got, got.T)


_FORMULA_BLOCKS = {c.name: (lambda c=c: c.make(D_OUT, D_IN, True)) for c in BLOCKS}
_FORMULA_BLOCKS |= _TENSOR_BLOCKS | {"kernel": lambda: LinearKernelBlock(D_OUT, D_IN)}
#: Blocks whose statistics do not read the rows: a parameter's gradient, or (K-BFGS's
#: minibatch variant) no statistics after the first batch.
_ROW_FREE = {"tnt", "shampoo-adam", "shampoo-sum", "kbfgs-minibatch", "kbfgsl"}


@pytest.mark.parametrize("name", list(_FORMULA_BLOCKS))
def test_cost_formulas_are_flops_and_the_statistics_grow_with_the_rows(name):
    """What the bench and the distributor read: finite, non-negative float flops."""
    block = _FORMULA_BLOCKS[name]()
    small = block.statistics_flops(ROWS, ROWS)
    large = block.statistics_flops(2 * ROWS, 2 * ROWS)
    for value in (small, large, block.refresh_flops(), block.precondition_flops()):
        assert isinstance(value, float), value
        assert math.isfinite(value), value
        assert value >= 0, value
    assert (large > small) == (name not in _ROW_FREE), (small, large)
    if name == "kfac":
        d_a = D_IN + 1
        assert small == ROWS * (D_OUT**2 + d_a**2)
        assert block.refresh_flops() == D_OUT**3 + d_a**3
        assert block.precondition_flops() == 2 * D_OUT * d_a * (D_OUT + d_a)
