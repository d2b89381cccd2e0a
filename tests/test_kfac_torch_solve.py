"""KFAC solves and updates of the torch adapter against dense Kronecker references.

``inverse_operator`` / ``curvature_operator`` on row-major ``vec([W, b])`` versus the dense
``(G + γ_G I) ⊗ (A + γ_A I)`` (π-split, with the π of M&G §6.3 written out here and checked
against curvlinops' heuristic damping), the exact ``(G ⊗ A + λI)⁻¹``, and the parameter update
of a step (momentum, weight decay, KL clipping, EMA, schedule).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from _helpers import needs_test_dep, require_test_dep
from _torch_models import cnn, dense_kron, layer_grad_vec, make_targets, mlp, one_thread
from torch import nn
from torch.nn import functional as F

import curvlin
from curvlin.adapters.torch import KFAC, KFACPreconditioner


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _setup(kind: str, *, n: int = 6, seed: int = 1):
    if kind == "mlp":
        model, shape = mlp(), (3,)
    elif kind == "mlp-nobias":
        model, shape = mlp(bias=False), (3,)
    else:
        model, shape = cnn(stride=2, padding=1, bias=kind == "cnn"), (2, 7, 6)
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    y = make_targets("cross_entropy", n, 4, generator=gen)
    return model, X, y


def _backward(model, X, y):
    F.cross_entropy(model(X), y).backward()


def _modules(model):
    return {name: m for name, m in model.named_children() if isinstance(m, nn.Linear | nn.Conv2d)}


def _pi_gammas(g, a, damping):
    """M&G (2015) §6.3: π = sqrt((tr A / dim A) / (tr G / dim G)), γ_A = π√λ, γ_G = √λ/π."""
    pi = math.sqrt((float(torch.trace(a)) / a.shape[0]) / (float(torch.trace(g)) / g.shape[0]))
    return math.sqrt(damping) / pi, pi * math.sqrt(damping)


def _one_step(model, X, y, **kwargs):
    kwargs = {"lr": 0.0, "momentum": 0.0, "decay": 0.0, "kl_clip": None, **kwargs}
    opt = KFAC(model, **kwargs)
    opt.zero_grad()
    _backward(model, X, y)
    opt.step()
    return opt


KINDS = ["mlp", "mlp-nobias", "cnn", "cnn-nobias"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damping", [1e-3, 0.3])
def test_inverse_operator_is_pi_damped_dense_solve(kind, damping):
    model, X, y = _setup(kind)
    opt = _one_step(model, X, y, damping=damping)
    for name, module in _modules(model).items():
        state = opt.curvature(name)
        g, a = state.g, state.a
        gamma_g, gamma_a = _pi_gammas(g, a, damping)
        lib = curvlin.pi_damping([g, a], damping)
        np.testing.assert_allclose([float(lib[0]), float(lib[1])], [gamma_g, gamma_a], rtol=1e-12)
        dense = dense_kron(
            g + gamma_g * torch.eye(g.shape[0], dtype=g.dtype),
            a + gamma_a * torch.eye(a.shape[0], dtype=a.dtype),
        )
        v = layer_grad_vec(module)
        expected = torch.linalg.solve(dense, v)
        got = opt.inverse_operator(name) @ v.numpy()
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-9, atol=1e-12)
        # the operator also takes several columns at once
        vs = torch.stack([v, 2 * v + 1], dim=1)
        got2 = opt.inverse_operator(name) @ vs.numpy()
        np.testing.assert_allclose(
            got2, torch.linalg.solve(dense, vs).numpy(), rtol=1e-9, atol=1e-12
        )


@needs_test_dep("curvlinops")
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_inverse_operator_matches_curvlinops_heuristic_damping(kind):
    curvlinops = require_test_dep("curvlinops")
    damping = 1e-2
    model, X, y = _setup(kind)
    opt = _one_step(model, X, y, damping=damping)
    params = list(model.parameters())
    op = curvlinops.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        params,
        [(X, y)],
        fisher_type="empirical",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    inv = curvlinops.KFACInverseLinearOperator(op, damping=damping, use_heuristic_damping=True)
    theirs = inv @ [p.grad.clone() for p in params]
    theirs = dict(zip([id(p) for p in params], theirs))
    for name, module in _modules(model).items():
        got = opt.inverse_operator(name) @ layer_grad_vec(module).numpy()
        ref = theirs[id(module.weight)].reshape(module.weight.shape[0], -1)
        ref = torch.cat([ref, theirs[id(module.bias)][:, None]], dim=1)
        np.testing.assert_allclose(got, ref.reshape(-1).numpy(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_damping_is_dense_damped_inverse(kind):
    damping = 0.05
    model, X, y = _setup(kind)
    opt = _one_step(model, X, y, damping=damping, exact_damping=True)
    for name, module in _modules(model).items():
        state = opt.curvature(name)
        dense = dense_kron(state.g, state.a)
        dense = dense + damping * torch.eye(dense.shape[0], dtype=dense.dtype)
        v = layer_grad_vec(module)
        got = opt.inverse_operator(name) @ v.numpy()
        np.testing.assert_allclose(got, torch.linalg.solve(dense, v).numpy(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_curvature_operator_is_dense_kron(kind):
    model, X, y = _setup(kind)
    opt = _one_step(model, X, y)
    for name in _modules(model):
        state = opt.curvature(name)
        dense = dense_kron(state.g, state.a).numpy()
        op = opt.curvature_operator(name)
        assert op.shape == dense.shape
        np.testing.assert_allclose(op @ np.eye(dense.shape[0]), dense, rtol=1e-12, atol=1e-14)
        v = np.arange(dense.shape[0], dtype=np.float64)
        np.testing.assert_allclose(op.rmatvec(v), dense.T @ v, rtol=1e-12, atol=1e-14)


def _layer_update(module, before):
    dw = module.weight.detach() - before[0]
    dw = dw.reshape(dw.shape[0], -1)
    if module.bias is not None:
        dw = torch.cat([dw, (module.bias.detach() - before[1])[:, None]], dim=1)
    return dw.reshape(-1)


def _snapshot(model):
    return {
        name: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
        for name, m in _modules(model).items()
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("exact", [False, True])
def test_step_update_is_minus_preconditioned_gradient(kind, exact):
    model, X, y = _setup(kind)
    before = _snapshot(model)
    opt = _one_step(model, X, y, lr=1.0, damping=0.1, exact_damping=exact)
    for name, module in _modules(model).items():
        direction = opt.inverse_operator(name) @ layer_grad_vec(module).numpy()
        np.testing.assert_allclose(
            _layer_update(module, before[name]).numpy(), -direction, rtol=1e-9, atol=1e-12
        )


def test_step_with_weight_decay_and_lr():
    lr, wd = 0.3, 0.01
    model, X, y = _setup("cnn")
    before = _snapshot(model)
    opt = _one_step(model, X, y, lr=lr, damping=0.1, weight_decay=wd)
    for name, module in _modules(model).items():
        w0, b0 = before[name]
        grad = module.weight.grad.reshape(w0.shape[0], -1) + wd * w0.reshape(w0.shape[0], -1)
        grad = torch.cat([grad, (module.bias.grad + wd * b0)[:, None]], dim=1).reshape(-1)
        direction = opt.inverse_operator(name) @ grad.numpy()
        np.testing.assert_allclose(
            _layer_update(module, before[name]).numpy(), -lr * direction, rtol=1e-9, atol=1e-12
        )


def _assert_clipped_step(model, before, opt, lr, bound, *, rtol):
    """Every layer moved by ``-lr ν Δ``, ``ν = min(1, √(bound / (lr² |Σ Δ·M|)))`` (on a first
    step without momentum ``M`` is the gradient); returns ``ν``."""
    directions, quad = {}, 0.0
    for name, module in _modules(model).items():
        v = layer_grad_vec(module).numpy()
        directions[name] = opt.inverse_operator(name) @ v
        quad += float(directions[name] @ v)
    nu = min(1.0, math.sqrt(bound / (lr**2 * abs(quad))))
    for name, module in _modules(model).items():
        np.testing.assert_allclose(
            _layer_update(module, before[name]).numpy(),
            -lr * nu * directions[name],
            rtol=rtol,
            atol=1e-14,
        )
    return nu


@pytest.mark.parametrize("kl_clip", [1e-6, 1e6])
def test_step_with_kl_clip(kl_clip):
    """``ν = min(1, sqrt(kl_clip / (lr² |Σ Δ·M|)))`` over all layers scales every update (on a
    first step without momentum ``M`` is the gradient)."""
    lr = 0.5
    model, X, y = _setup("mlp")
    before = _snapshot(model)
    opt = _one_step(model, X, y, lr=lr, damping=0.1, kl_clip=kl_clip)
    nu = _assert_clipped_step(model, before, opt, lr, kl_clip, rtol=1e-9)
    if kl_clip < 1:
        assert nu < 1e-2  # the clip is active


@pytest.mark.parametrize(
    ("kl_clip", "relative"), [(None, 1e-6), (None, 1e6), (1e-7, 1e-6), (1e-5, 1e-6)]
)
def test_step_with_relative_kl_clip(kl_clip, relative):
    """``relative_kl_clip`` bounds ``lr² |Σ Δ·M|`` by ``relative · |L|``, ``L`` the closure's
    loss, or by the smaller of that and ``kl_clip``; ``float(loss)`` is read here, the step
    reads it on the device."""
    lr = 0.5
    model, X, y = _setup("mlp")
    before = _snapshot(model)
    opt = KFAC(model, lr=lr, momentum=0.0, damping=0.1, decay=0.0, kl_clip=kl_clip,
               relative_kl_clip=relative)  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        return loss

    loss = float(opt.step(closure).detach())
    bound = relative * loss if kl_clip is None else min(kl_clip, relative * loss)
    nu = _assert_clipped_step(model, before, opt, lr, bound, rtol=1e-6)
    assert (nu < 1e-2) == (bound < 1)  # the clip is active exactly when the bound is small


def test_relative_kl_clip_without_a_closure_warns_once_and_falls_back_to_kl_clip():
    model, X, y = _setup("mlp")
    twin = copy.deepcopy(model)
    opt = KFAC(model, lr=0.5, momentum=0.0, damping=0.1, kl_clip=1e-6, relative_kl_clip=1.0)
    ref = KFAC(twin, lr=0.5, momentum=0.0, damping=0.1, kl_clip=1e-6)
    for m in (model, twin):
        _backward(m, X, y)
    with pytest.warns(UserWarning, match="relative_kl_clip bounds the step by the loss"):
        opt.step()
    ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        _backward(model, X, y)
        opt.step()  # once per optimizer


def test_relative_kl_clip_with_a_non_finite_loss_does_not_move():
    model, X, y = _setup("mlp")
    before = [p.detach().clone() for p in model.parameters()]
    opt = KFAC(model, lr=0.5, momentum=0.0, damping=0.1, kl_clip=None, relative_kl_clip=1.0)
    for bad in (math.nan, math.inf):

        def closure(bad=bad):
            opt.zero_grad()
            loss = F.cross_entropy(model(X), y)
            loss.backward()
            return loss * bad  # finite gradients, a NaN or infinite loss

        opt.step(closure)
        for p, q in zip(model.parameters(), before):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_kl_clip_reads_the_vector_that_was_preconditioned():
    """With momentum, ``ν`` comes from ``|Σ Δ·M|``, ``M = μ g₁ + g₂`` the buffer that ``Δ = P M``
    was made from (a norm of the step in the damped curvature's metric), not from ``Δ·g₂``."""
    lr, mu, clip = 0.2, 0.9, 1e-6
    model, X, y = _setup("mlp")
    X2 = torch.randn_like(X)
    opt = KFAC(model, lr=lr, momentum=mu, damping=0.1, decay=0.5, kl_clip=clip)
    mods = _modules(model)
    grads = []
    for batch in (X, X2):
        before = _snapshot(model)
        opt.zero_grad()
        _backward(model, batch, y)
        opt.step()
        grads.append({name: layer_grad_vec(m).numpy() for name, m in mods.items()})
    buffers = {name: mu * grads[0][name] + grads[1][name] for name in mods}
    directions = {name: opt.inverse_operator(name) @ buffers[name] for name in mods}
    quad = sum(float(directions[name] @ buffers[name]) for name in mods)
    nu = min(1.0, math.sqrt(clip / (lr**2 * quad)))
    assert nu < 1e-2  # the clip is active
    for name, m in mods.items():
        np.testing.assert_allclose(
            _layer_update(m, before[name]).numpy(), -lr * nu * directions[name], rtol=1e-9
        )


@pytest.mark.parametrize("form", ["gradient", "direction"])
def test_heavy_ball_momentum_over_two_steps(form):
    """``"gradient"``: Δ₂ = P₂(μ g₁ + g₂); ``"direction"``: Δ₂ = μ P₁ g₁ + P₂ g₂."""
    lr, mu = 0.2, 0.9
    model, X, y = _setup("mlp")
    X2 = torch.randn_like(X)
    opt = KFAC(model, lr=lr, momentum=mu, damping=0.1, decay=0.5, momentum_form=form, kl_clip=None)
    mods = _modules(model)
    grads, inverses = [], []
    for batch in (X, X2):
        before = _snapshot(model)
        opt.zero_grad()
        _backward(model, batch, y)
        opt.step()
        grads.append({name: layer_grad_vec(m).numpy() for name, m in mods.items()})
        inverses.append({name: opt.inverse_operator(name) for name in mods})
    for name, m in mods.items():
        (p1, p2), (g1, g2) = (inv[name] for inv in inverses), (g[name] for g in grads)
        if form == "gradient":
            expected = -lr * (p2 @ (mu * g1 + g2))
        else:
            expected = -lr * (mu * (p1 @ g1) + p2 @ g2)
        np.testing.assert_allclose(
            _layer_update(m, before[name]).numpy(), expected, rtol=1e-9, atol=1e-12
        )


def test_preconditioner_rewrites_grads():
    model, X, y = _setup("cnn")
    precond = KFACPreconditioner(model, damping=0.1, decay=0.0)
    _backward(model, X, y)
    raw = {name: layer_grad_vec(m) for name, m in _modules(model).items()}
    assert precond.step() is True
    for name, m in _modules(model).items():
        expected = precond.inverse_operator(name) @ raw[name].numpy()
        np.testing.assert_allclose(layer_grad_vec(m).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_preconditioner_then_sgd_equals_kfac_step():
    model, X, y = _setup("mlp")
    twin, _, _ = _setup("mlp")
    precond = KFACPreconditioner(model, damping=0.1, decay=0.0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.4)
    kfac = KFAC(twin, lr=0.4, momentum=0.0, damping=0.1, decay=0.0, kl_clip=None)
    for m, step in ((model, lambda: (precond.step(), sgd.step())), (twin, kfac.step)):
        _backward(m, X, y)
        step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_ema_of_factors():
    """``F ← ε F + (1 − ε) F_batch`` after the first batch, which is taken as is."""
    decay = 0.7
    model, X, y = _setup("cnn")
    X2 = torch.randn_like(X)
    opt = KFAC(model, lr=0.0, momentum=0.0, decay=decay)
    batches = []
    for batch in (X, X2, X):
        single = KFAC(model, lr=0.0, momentum=0.0, decay=0.0)
        model.zero_grad()
        _backward(model, batch, y)
        opt.step()  # both capture the same forward/backward
        single.step()
        batches.append({n: (single.curvature(n).g, single.curvature(n).a) for n in _modules(model)})
        single.remove_hooks()
    for name in _modules(model):
        g_ref, a_ref = batches[0][name]
        for b in batches[1:]:
            g_ref = decay * g_ref + (1 - decay) * b[name][0]
            a_ref = decay * a_ref + (1 - decay) * b[name][1]
        state = opt.curvature(name)
        assert state.updates == 3
        torch.testing.assert_close(state.g, g_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.a, a_ref, rtol=1e-12, atol=1e-14)


def test_stats_and_inverse_schedule():
    """stats_every=2, refresh_every=3: statistics on steps 0, 2, 4; inverses on 0 and 3."""
    model, X, y = _setup("mlp")
    opt = KFAC(model, lr=0.0, momentum=0.0, decay=0.5, stats_every=2, refresh_every=3)
    name = opt.layer_names[0]
    seen = []
    for step in range(6):
        opt.zero_grad()
        _backward(model, X * (1 + step), y)
        opt.step()
        seen.append(opt.curvature(name))
    assert [s.updates for s in seen] == [1, 1, 2, 2, 3, 3]
    inv = [s.inverse.inverses[1] for s in seen]
    assert torch.equal(inv[0], inv[1])
    assert torch.equal(inv[1], inv[2])
    assert not torch.equal(inv[2], inv[3])
    assert torch.equal(inv[3], inv[4])
    assert torch.equal(inv[4], inv[5])
    assert not torch.equal(seen[3].a, seen[4].a)  # new statistics at step 4, same inverse
    # the inverse of step 3 is that of the factors as they stood at step 3
    _, gamma_a = _pi_gammas(seen[3].g, seen[3].a, 1e-2)
    a_inv = torch.linalg.inv(seen[3].a + gamma_a * torch.eye(seen[3].a.shape[0], dtype=X.dtype))
    torch.testing.assert_close(inv[3], a_inv, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("exact", [False, True])
def test_summed_loss_step_equals_mean_loss_step(exact):
    """The same model and data, loss summed or averaged over the N examples: with the damping
    scaled by N (the curvature of a sum is N times that of the mean) the steps are equal.

    Fails while ``loss_reduction="sum"`` still divides ``G`` by N: the summed-loss step is
    then N times the averaged one (with a damping N times too small in relative terms).
    """
    n, damping = 6, 0.1
    model_mean, X, y = _setup("cnn", n=n)
    model_sum, _, _ = _setup("cnn", n=n)
    kw = {"lr": 1.0, "momentum": 0.0, "exact_damping": exact, "kl_clip": None}
    opt_mean = KFAC(model_mean, damping=damping, **kw)
    opt_sum = KFAC(model_sum, damping=n * damping, loss_reduction="sum", **kw)
    F.cross_entropy(model_mean(X), y).backward()
    F.cross_entropy(model_sum(X), y, reduction="sum").backward()
    opt_mean.step()
    opt_sum.step()
    for p, q in zip(model_sum.parameters(), model_mean.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
