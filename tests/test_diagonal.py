"""The diagonal empirical Fisher: the block on every backend, the torch front, training.

The block is checked in float64 against dense references written out here: explicit
per-example gradients ``δ_n ā_nᵀ`` squared and averaged (one row per example), and, for
examples with several rows, the diagonal of the dense ``(1/N) Σ_r (δ_r δ_rᵀ) ⊗ (ā_r ā_rᵀ)``
(KFC's Fisher under spatially uncorrelated derivatives, the row-wise rule the block documents).
The front is checked against ``torch.func`` per-example gradients of a small MLP.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import assert_close
from _torch_models import conv_patches, curves_autoencoder, mlp, one_thread
from torch import nn
from torch.nn import functional as F

from curvlin.adapters.torch import DiagonalFisher, Preconditioner
from curvlin.blocks import DiagonalFisherBlock, DiagonalFisherState, LayerBatch
from curvlin.datasets import make_curves

TOL = {"float64": 1e-12, "float32": 1e-5}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _bar(a, bias):
    return np.concatenate([a, np.ones((a.shape[0], 1))], axis=1) if bias else a


def _per_example_fisher(a, delta, bias):
    """``(1/N) Σ_n (δ_n ā_nᵀ)²`` from explicit per-example gradients (one row each)."""
    grads = [np.outer(d, r) for d, r in zip(delta, _bar(a, bias))]
    return np.mean([g**2 for g in grads], axis=0)


def _rows(rng, r, d_in, d_out):
    return rng.standard_normal((r, d_in)), rng.standard_normal((r, d_out))


# -- the block on every backend ---------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_block_matches_per_example_gradients(bias, dtype, xp, to_xp, to_np, rng):
    n, d_in, d_out, lam, decay = 9, 4, 3, 0.05, 0.7
    block = DiagonalFisherBlock(d_out, d_in, bias=bias, decay=decay)
    state = block.init(to_xp(np.zeros(1), dtype))
    assert state.f.shape == (d_out, d_in + bias)
    assert state.f.dtype == to_xp(np.zeros(1), dtype).dtype
    assert not block.ready(state)
    ema = None
    for _ in range(3):
        a, delta = _rows(rng, n, d_in, d_out)
        # autograd's output gradient of a batch-mean loss is δ / N; grad_scale N undoes it
        batch = LayerBatch(
            inputs=to_xp(a, dtype),
            output_grads=to_xp(delta / n, dtype),
            n_examples=n,
            grad_scale=float(n),
        )
        stats = block.statistics(state, batch)
        ref = _per_example_fisher(a, delta, bias)
        assert_close(stats["f"], ref, rtol=TOL[dtype], what="batch F")
        state = block.refresh(block.fold(state, stats, damping=lam), damping=lam)
        ema = ref if ema is None else decay * ema + (1 - decay) * ref
        assert_close(state.f, ema, rtol=TOL[dtype], what="EMA of F")
    assert state.updates == 3
    assert block.ready(state)
    grad_w, grad_b = rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out)
    dw, db = block.precondition(state, to_xp(grad_w, dtype), to_xp(grad_b, dtype) if bias else None)
    want = np.concatenate([grad_w, grad_b[:, None]], axis=1) if bias else grad_w
    want = want / (ema + lam)
    assert dw.shape == (d_out, d_in)
    assert dw.dtype == state.f.dtype
    assert_close(dw, want[:, :d_in], rtol=TOL[dtype], what="direction")
    if bias:
        assert_close(db, want[:, d_in], rtol=TOL[dtype], what="bias direction")
    else:
        assert db is None


def test_block_several_rows_per_example_is_the_row_wise_diagonal(xp, to_xp, to_np, rng):
    """R = N·T rows: F is the diagonal of the dense (1/N) Σ_r (δ_r δ_rᵀ) ⊗ (ā_r ā_rᵀ), not the
    exact per-example square (which would also hold the cross terms between positions)."""
    n, t, d_in, d_out = 4, 5, 3, 2
    a, delta = _rows(rng, n * t, d_in, d_out)
    block = DiagonalFisherBlock(d_out, d_in, bias=True)
    batch = LayerBatch(inputs=to_xp(a), output_grads=to_xp(delta), n_examples=n)
    f = to_np(block.statistics(block.init(to_xp(np.zeros(1))), batch)["f"])
    abar = _bar(a, True)
    dense = sum(np.kron(np.outer(d, d), np.outer(r, r)) for d, r in zip(delta, abar)) / n
    assert_close(f, np.diagonal(dense).reshape(d_out, d_in + 1), rtol=1e-12, what="row-wise F")
    per_example = [
        (delta[i * t : (i + 1) * t].T @ abar[i * t : (i + 1) * t]) ** 2 for i in range(n)
    ]
    assert not np.allclose(f, np.mean(per_example, axis=0))  # the cross terms are left out


def test_statistics_are_means_ranks_can_average(xp, to_xp, to_np, rng):
    a, delta = _rows(rng, 12, 3, 4)
    block = DiagonalFisherBlock(4, 3)
    state = block.init(to_xp(np.zeros(1)))

    def f(lo, hi):
        batch = LayerBatch(
            inputs=to_xp(a[lo:hi]), output_grads=to_xp(delta[lo:hi]), n_examples=hi - lo
        )
        return to_np(block.statistics(state, batch)["f"])

    assert_close(f(0, 12), (f(0, 6) + f(6, 12)) / 2, rtol=1e-12, what="mean of halves")


def test_damping_limits_and_step_bound(xp, to_xp, to_np, rng):
    n, d_in, d_out = 16, 3, 2
    a, delta = _rows(rng, n, d_in, d_out)
    block = DiagonalFisherBlock(d_out, d_in, bias=False, decay=0.0)
    batch = LayerBatch(inputs=to_xp(a), output_grads=to_xp(delta), n_examples=n)
    state = block.init(to_xp(np.zeros(1)))
    state = block.fold(state, block.statistics(state, batch), damping=1.0)
    f = to_np(state.f)
    grad = delta.T @ a / n  # the batch's own mean gradient
    for lam in (1e6, 1e-9, 0.3):
        dw, _ = block.precondition(block.refresh(state, damping=lam), to_xp(grad))
        dw = to_np(dw)
        if lam == 1e6:  # λ → ∞: λ·Δ → ∇ (scaled gradient descent)
            assert_close(lam * dw, grad, rtol=1e-5, what="large damping")
        elif lam == 1e-9:  # λ → 0: Δ → ∇ / F
            assert_close(dw, grad / f, rtol=1e-7, what="small damping")
        assert np.all(np.abs(dw) <= 1 / (2 * math.sqrt(lam)) * (1 + 1e-12))  # Cauchy–Schwarz


def test_state_round_trip_and_shapes(xp, to_xp, rng):
    block = DiagonalFisherBlock(3, 2, bias=True)
    state = block.init(to_xp(np.zeros(1)))
    assert set(state.arrays()) == {"f"}
    assert state.counters() == {"updates": 0}
    assert block.refresh(state, damping=0.1) is state  # nothing to invert yet
    a, delta = _rows(rng, 5, 2, 3)
    batch = LayerBatch(inputs=to_xp(a), output_grads=to_xp(delta), n_examples=5)
    state = block.refresh(block.fold(state, block.statistics(state, batch)), damping=0.1)
    again = DiagonalFisherState.from_arrays(state.arrays(), state.counters())
    assert set(again.arrays()) == {"f", "inverse"}
    assert again.updates == 1
    shapes = block.state_shapes()
    assert all(tuple(v.shape) == shapes[k] for k, v in state.arrays().items())
    assert (block.refresh_flops(), block.precondition_flops()) == (9.0, 9.0)
    assert block.statistics_flops(4, 4) == 2.0 * 4 * 3 * 3


def test_block_refuses_bad_arguments(xp, to_xp):
    block = DiagonalFisherBlock(3, 2)
    state = block.init(to_xp(np.zeros(1)))
    good = to_xp(np.ones((4, 2))), to_xp(np.ones((4, 3)))
    with pytest.raises(ValueError, match="needs inputs and output_grads"):
        block.statistics(state, LayerBatch(inputs=good[0]))
    with pytest.raises(ValueError, match=r"expected inputs \(R, 2\).*\(4, 3\) and \(4, 2\)"):
        block.statistics(state, LayerBatch(inputs=good[1], output_grads=good[0]))
    with pytest.raises(ValueError, match="n_examples must be a positive int"):
        block.statistics(state, LayerBatch(*good[:1], output_grads=good[1], n_examples=0))
    with pytest.raises(ValueError, match="damping must be > 0"):
        block.refresh(state, damping=0.0)
    with pytest.raises(ValueError, match="damping"):
        block.refresh(state, damping=-1.0)
    with pytest.raises(ValueError, match="not ready"):
        block.precondition(state, to_xp(np.ones((3, 2))), to_xp(np.ones(3)))
    for kwargs, match in [({"decay": 1.0}, "decay"), ({"d_out": 0}, "d_out")]:
        with pytest.raises(ValueError, match=match):
            DiagonalFisherBlock(**{"d_out": 3, "d_in": 2, **kwargs})


# -- the torch front ------------------------------------------------------------------------


def _per_example_grads(model, x, t, reduction="mean"):
    """``{param name: (N, *shape)}`` per-example gradients of ``ℓ_n`` (torch.func)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_n(p, x_n, t_n):
        per = (functional_call(model, p, (x_n[None],))[0] - t_n) ** 2
        return per.mean() if reduction == "mean" else per.sum()

    return vmap(grad(loss_n), in_dims=(None, 0, 0))(params, x, t)


def _layer_fisher(per, name, bias, *, scale):
    g = per[f"{name}.weight"].flatten(2)
    if bias:
        g = torch.cat([g, per[f"{name}.bias"][..., None]], dim=-1)
    return (g**2).sum(0) * scale


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_front_matches_torch_func_per_example_gradients(bias, reduction):
    model = mlp(bias=bias)
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    per = _per_example_grads(model, x, t, reduction)
    lam, lr = 0.01, 0.5
    opt = DiagonalFisher(
        model, lr=lr, damping=lam, momentum=0.0, decay=0.0, loss_reduction=reduction
    )
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt.zero_grad()
    F.mse_loss(model(x), t, reduction=reduction).backward()
    grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    opt.step()
    for name in ("0", "2"):
        ref = _layer_fisher(per, name, bias, scale=1 / 16 if reduction == "mean" else 1.0)
        f = opt.curvature(name).f
        assert f.shape == ref.shape
        assert f.dtype == torch.float64
        torch.testing.assert_close(f, ref, rtol=1e-10, atol=1e-14)
        w = f"{name}.weight"
        want = before[w] - lr * grads[w] / (ref[:, : model[int(name)].in_features] + lam)
        torch.testing.assert_close(model.get_parameter(w), want, rtol=1e-10, atol=1e-14)
        if bias:
            b = f"{name}.bias"
            want_b = before[b] - lr * grads[b] / (ref[:, -1] + lam)
            torch.testing.assert_close(model.get_parameter(b), want_b, rtol=1e-10, atol=1e-14)


def test_front_on_a_convolution_uses_the_row_wise_rule():
    """Conv2d: F = (1/N) Σ_{n,t} δ_nt² ā_nt² over im2col patches, per-example δ from
    torch.func on the layer's output."""
    from torch.func import grad, vmap

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 4, 2)).double()
    x, t = torch.randn(6, 2, 5, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    s = conv(x).detach()
    tail = model[1:]

    def loss_n(s_n, t_n):
        return ((tail(s_n[None])[0] - t_n) ** 2).mean()

    delta = vmap(grad(loss_n))(s, t).flatten(2).transpose(1, 2)  # (N, T, c_out)
    rows = conv_patches(x, conv)  # (N, T, c_in·9)
    rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=-1)
    ref = torch.einsum("nti,ntj->ij", delta**2, rows**2) / 6
    opt = DiagonalFisher(model, lr=0.0, decay=0.0)
    opt.zero_grad()
    F.mse_loss(model(x), t).backward()
    opt.step()
    torch.testing.assert_close(opt.curvature("0").f, ref, rtol=1e-10, atol=1e-14)


def test_preconditioner_front_rewrites_gradients():
    model = mlp()
    precond = Preconditioner(model, DiagonalFisher, decay=0.0)
    assert precond.damping == DiagonalFisher.default_damping
    x, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    F.mse_loss(model(x), t).backward()
    g = model[0].weight.grad.clone()
    assert precond.step()
    f = precond.curvature("0").f[:, :3]
    torch.testing.assert_close(model[0].weight.grad, g / (f + precond.damping))


def test_front_refuses_a_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        DiagonalFisher(mlp(), decay=1.0)


# -- end to end -------------------------------------------------------------------------------


def test_loss_falls_on_a_small_autoencoder():
    """The 144-64-16-64-144 CURVES autoencoder of the training tests (500 images, batches of
    100), defaults as shipped: from 0.69 the full-data loss falls below the mean-image plateau
    (≈ 0.297) within 100 steps (0.198 when written)."""
    images = torch.from_numpy(make_curves(500, image_size=12, seed=0))
    model = curves_autoencoder()
    opt = DiagonalFisher(model)
    gen = torch.Generator().manual_seed(1)

    def full_loss():
        with torch.no_grad():
            return float(F.binary_cross_entropy_with_logits(model(images), images))

    first = full_loss()
    for _ in range(100):
        xb = images[torch.randint(0, 500, (100,), generator=gen)]
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(xb), xb).backward()
        opt.step()
    assert full_loss() < 0.25 < first, (first, full_loss())


@pytest.mark.parametrize("where", ["input", "target"])
def test_nonfinite_batch_is_skipped_when_f_is_square(where):
    """The driver probes only the diagonal of a square statistic; for ``F`` (d_out = d_a) a
    NaN or inf row still lands there, because it spoils a whole row or column of ``F``."""
    model = mlp(d_in=4, hidden=5)  # the first layer's F is 5 × (4 + 1)
    opt = DiagonalFisher(model)
    x, t = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    (x if where == "input" else t)[3, 1] = math.nan if where == "input" else math.inf
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.mse_loss(model(x), t).backward()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_badly_scaled_features_diagonal_beats_tuned_sgd():
    """Least squares on inputs whose scales span 0.01 to 10: ``F`` divides by ``ā_j²`` per
    column, so DiagonalFisher (defaults as shipped) is scale-free, while SGD's stable learning
    rate is set by the largest feature. Grid (100 steps, from a loss of 14.7): SGD lr in
    {1e-3, 3e-3, 0.01, 0.03} × momentum {0, 0.9} reaches 3.6 at best (lr 0.1 diverges), Adam
    lr in {0.01, 0.03, 0.1, 0.3} 0.98 at best, DiagonalFisher 0.15."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 1, 8, dtype=torch.float64)
    x = torch.randn(256, 8, generator=g, dtype=torch.float64) * scales
    y = x @ (torch.randn(8, 2, generator=g, dtype=torch.float64) / scales[:, None])

    def run(make):
        torch.manual_seed(0)
        model = nn.Linear(8, 2).double()
        opt = make(model)
        for _ in range(100):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            return float(F.mse_loss(model(x), y))

    diagonal = run(DiagonalFisher)
    sgd = min(
        run(lambda m, lr=lr, mu=mu: torch.optim.SGD(m.parameters(), lr=lr, momentum=mu))
        for lr in (1e-3, 3e-3, 0.01, 0.03)
        for mu in (0.0, 0.9)
    )
    assert diagonal < 0.5, diagonal
    assert diagonal < sgd / 10, (diagonal, sgd)
