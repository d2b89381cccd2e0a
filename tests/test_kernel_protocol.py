"""The kernel protocol (SMW methods): per-layer kernels, J·v, Jᵀ·u and the one m×m solve.

Checked on every backend against dense float64 references built from explicit per-example
gradients ``∇_n W̄ = Σ_{t} δ_nt ā_ntᵀ`` (``T`` rows per example), with ``m`` below and above
the number of parameters, with and without bias, for one layer and for several.
"""

from __future__ import annotations

import numpy as np
import pytest

from curvlin.blocks import LayerBatch, LinearKernelBlock, kernel_solve


def _per_example_grads(a, d, m, bias):
    """Columns of ``U``: each example's flattened (row-major) gradient of ``W̄``."""
    if bias:
        a = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    t = len(a) // m
    a, d = a.reshape(m, t, -1), d.reshape(m, t, -1)
    return np.stack([(d[n].T @ a[n]).ravel() for n in range(m)], axis=1)


def _layer(rng, m, t, d_in, d_out, scale):
    a = rng.standard_normal((m * t, d_in))
    d = rng.standard_normal((m * t, d_out))
    return a, d, scale


@pytest.mark.parametrize(("m", "t"), [(3, 1), (40, 1), (4, 3)], ids=["m<P", "m>P", "rows"])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_jvp_vjp_and_solve_match_dense(xp, to_xp, to_np, rng, m, t, bias):
    dims = [(4, 3), (2, 5)]  # (d_in, d_out) of two layers
    layers, parts, us, gs = [], [], [], []
    for d_in, d_out in dims:
        a, d, scale = _layer(rng, m, t, d_in, d_out, scale=2.0)
        block = LinearKernelBlock(d_out, d_in, bias=bias)
        batch = LayerBatch(
            inputs=to_xp(a), output_grads=to_xp(d / scale), n_examples=m, grad_scale=scale
        )
        u = _per_example_grads(a, d, m, bias)
        g = rng.standard_normal((d_out, d_in + int(bias)))
        v = rng.standard_normal(g.shape)
        c = rng.standard_normal(m)
        np.testing.assert_allclose(to_np(block.kernel(batch)), u.T @ u, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(to_np(block.jvp(batch, to_xp(v))), u.T @ v.ravel(), rtol=1e-10)
        np.testing.assert_allclose(
            to_np(block.vjp(batch, to_xp(c))).ravel(), u @ c, rtol=1e-10, atol=1e-12
        )
        layers.append((block, batch))
        parts.append((block, batch, to_xp(g)))
        us.append(u)
        gs.append(g)
    lam = 0.3
    u_all = np.concatenate(us, axis=0)
    dense = np.linalg.solve(
        lam * np.eye(len(u_all)) + u_all @ u_all.T / m, np.concatenate([g.ravel() for g in gs])
    )
    got = np.concatenate([to_np(step).ravel() for step in kernel_solve(parts, damping=lam)])
    np.testing.assert_allclose(got, dense, rtol=1e-8, atol=1e-10 * np.abs(dense).max())


def test_kernel_solve_errors(to_xp):
    block = LinearKernelBlock(2, 3)
    batch = LayerBatch(
        inputs=to_xp(np.ones((4, 3))), output_grads=to_xp(np.ones((4, 2))), n_examples=4
    )
    g = to_xp(np.ones((2, 4)))
    with pytest.raises(ValueError, match="damping"):
        kernel_solve([(block, batch, g)], damping=0.0)
    with pytest.raises(ValueError, match="at least one"):
        kernel_solve([], damping=0.1)
    other = LayerBatch(inputs=batch.inputs, output_grads=batch.output_grads, n_examples=2)
    with pytest.raises(ValueError, match="same examples"):
        kernel_solve([(block, batch, g), (block, other, g)], damping=0.1)
    with pytest.raises(ValueError, match="multiple of n_examples"):
        block.kernel(LayerBatch(inputs=batch.inputs, output_grads=batch.output_grads, n_examples=3))


def test_driver_preconditions_coupled_layers_together(xp, to_xp, to_np, rng):
    """Driver.precondition: the kernel layers in one kernel_solve, the bias split back, a
    per-layer block beside them untouched, and a kernel layer without a batch gets ∇W̄/λ."""
    from curvlin.blocks import DiagonalFisherBlock, Driver, Schedule

    m, lam = 6, 0.2
    blocks = {
        "a": LinearKernelBlock(3, 4),
        "b": LinearKernelBlock(2, 3, bias=False),
        "lone": LinearKernelBlock(2, 2),
        "diag": DiagonalFisherBlock(2, 2),
    }
    like = to_xp(np.zeros(1))
    driver = Driver(blocks, {n: b.init(like) for n, b in blocks.items()}, schedule=Schedule())
    assert driver.coupled
    assert blocks["a"].init(like).arrays() == {}
    assert blocks["a"].state_shapes() == {}
    batches, grads, parts = {}, {}, []
    for name in ("a", "b"):
        block = blocks[name]
        a, d = rng.standard_normal((m, block.d_in)), rng.standard_normal((m, block.d_out))
        batches[name] = LayerBatch(inputs=to_xp(a), output_grads=to_xp(d), n_examples=m)
        gw = rng.standard_normal((block.d_out, block.d_in))
        gb = rng.standard_normal(block.d_out) if block.bias else None
        grads[name] = (to_xp(gw), None if gb is None else to_xp(gb))
        g = np.concatenate([gw, gb[:, None]], axis=1) if block.bias else gw
        parts.append((block, batches[name], to_xp(g)))
    grads["lone"] = (to_xp(np.ones((2, 2))), to_xp(np.ones(2)))
    stats = driver.statistics({"diag": LayerBatch(
        inputs=to_xp(rng.standard_normal((m, 2))), output_grads=to_xp(rng.standard_normal((m, 2))),
        n_examples=m)})  # fmt: skip
    states = driver.fold_refresh(stats, damping=dict.fromkeys(blocks, lam))
    grads["diag"] = (to_xp(np.ones((2, 2))), to_xp(np.ones(2)))
    out = driver.precondition(states, grads, batches=batches, damping=dict.fromkeys(blocks, lam))
    want = kernel_solve(parts, damping=lam)
    np.testing.assert_allclose(to_np(out["a"][0]), to_np(want[0])[:, :4], rtol=1e-12)
    np.testing.assert_allclose(to_np(out["a"][1]), to_np(want[0])[:, 4], rtol=1e-12)
    np.testing.assert_allclose(to_np(out["b"][0]), to_np(want[1]), rtol=1e-12)
    assert out["b"][1] is None
    np.testing.assert_allclose(to_np(out["lone"][0]), np.full((2, 2), 1 / lam), rtol=1e-12)
    diag = blocks["diag"].precondition(states["diag"], *grads["diag"])
    np.testing.assert_allclose(to_np(out["diag"][0]), to_np(diag[0]), rtol=1e-12)
    with pytest.raises(RuntimeError, match="couples all layers"):
        blocks["a"].precondition(states["a"], *grads["a"])


def test_gauss_newton_directions_in_the_block(xp, to_xp, to_np, rng):
    """output_grads (k, R, d_out): the kernel is m·k wide, sample-major, as linear_terms."""
    from curvlin import linear_terms

    m, k = 4, 3
    a, d = rng.standard_normal((m, 3)), rng.standard_normal((k, m, 2))
    block = LinearKernelBlock(2, 3)
    batch = LayerBatch(inputs=to_xp(a), output_grads=to_xp(d), n_examples=m, grad_scale=2.0)
    want = linear_terms(a, 2.0 * d).kernel()
    np.testing.assert_allclose(to_np(block.kernel(batch)), want, rtol=1e-12)
    assert block.output_directions
    assert block.coupled
