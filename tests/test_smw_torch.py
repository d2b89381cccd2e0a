"""SMW-NG and SMW-GN on torch models against dense float64 references (spec §3 tests 3–6).

The dense references build ``U`` explicitly: per-example Jacobians of the outputs from
``torch.func.jacrev`` (Gauss–Newton: ``B = (1/m) Σ_n J_nᵀ H_n J_n``) or per-example gradients
from ``torch.func.vmap(grad)`` (empirical Fisher), then solve ``(B + λI) d = g`` with
``numpy.linalg.solve``. The engine's directions come from :class:`Preconditioner` (which writes
them into ``.grad``) and the optimizers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn import functional as F

from curvlin.adapters.torch import KFAC, SMWGN, SMWNG, Curvature, Preconditioner
from curvlin.losses import output_hessian

LOSS_FNS = {
    ("cross_entropy", "mean"): lambda out, y: F.cross_entropy(out, y),
    ("bce_with_logits", "mean"): lambda out, y: F.binary_cross_entropy_with_logits(out, y),
    ("mse", "mean"): lambda out, y: F.mse_loss(out, y),
    ("mse", "batchmean"): lambda out, y: F.mse_loss(out, y, reduction="sum") / len(out),
}


def _mlp(bias=True, d_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, d_out, bias=bias)
    ).double()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).double()


class _Twice(nn.Module):
    """One layer called twice in a forward pass: its per-example gradient sums both calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.mid(self.inp(x))))))


def _data(model, loss, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2, 6, 6) if isinstance(model[0], nn.Conv2d) else (n, 4)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    d_out = 3
    if loss == "cross_entropy":
        y = torch.randint(0, d_out, (n,), generator=g)
    elif loss == "bce_with_logits":
        y = torch.rand(n, d_out, generator=g, dtype=torch.float64)
    else:
        y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return x, y


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _dense_gn(model, x, loss, reduction, m):
    """B = (1/m) Σ_n J_nᵀ H_n J_n over the first m examples, as a (P, P) NumPy array."""
    params = _params(model)

    def out_one(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    jac = vmap(jacrev(out_one), in_dims=(None, 0))(params, x[:m])  # dict of (m, k, *shape)
    j = torch.cat([jac[k].reshape(m, jac[k].shape[1], -1) for k in params], dim=2).numpy()
    out = model(x[:m]).detach().numpy()
    h = output_hessian(out, loss=loss, reduction=reduction)
    return np.einsum("nap,nab,nbq->pq", j, h, j) / m


def _dense_ef(model, x, y, loss_fn, m, n):
    """The empirical Fisher (1/m) Σ_n u_n u_nᵀ, u_n = ∇ℓ_n (per-example, ℓ_n = N × share)."""
    params = _params(model)

    def loss_one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x[:m], y[:m])
    u = torch.cat([grads[k].reshape(m, -1) for k in params], dim=1).numpy()
    return u.T @ u / m


def _engine_direction(model, method, x, y, loss_fn, *, separate=False, **options):
    """The engine's direction and the gradient; ``separate``: the curvature's directions
    come from a forward pass of the subsample alone (``model(x[:subsample])``)."""
    precond = Preconditioner(model, method, **options)
    model.zero_grad()
    out = model(x)
    if method is SMWGN or options.get("fisher") == "mc":
        precond.backward_fisher(model(x[: options["subsample"]]) if separate else out)
    loss_fn(out, y).backward()
    # a forward pass for the curvature alone is not one of the gradient's examples
    assert precond._curv.capture.examples == len(x)
    g = _flat([p.grad for p in model.parameters()]).clone().numpy()
    assert precond.step()
    return g, _flat([p.grad for p in model.parameters()]).numpy()


@pytest.mark.parametrize(("loss", "reduction"), list(LOSS_FNS), ids=lambda v: str(v))
@pytest.mark.parametrize(
    ("kind", "n", "sub"),
    [("mlp", 5, None), ("mlp", 40, None), ("mlp", 8, 3), ("cnn", 4, None), ("cnn", 5, 2)],
    ids=["m<P", "m>P", "subsample", "conv", "conv-subsample"],
)
def test_gauss_newton_direction_matches_dense(loss, reduction, kind, n, sub):
    """§3 test 4: the engine's SMW-GN direction == (B + λI)⁻¹ g with B from jacrev. The
    multi-class cases (c = 3) catch a class-major/sample-major mix-up in the kernel."""
    model = _mlp() if kind == "mlp" else _cnn()
    x, y = _data(model, loss, n)
    fn = LOSS_FNS[(loss, reduction)]
    lam = 0.05
    g, d = _engine_direction(
        model, SMWGN, x, y, fn, damping=lam, loss=loss, loss_reduction=reduction, subsample=sub
    )
    b = _dense_gn(model, x, loss, reduction, sub or n)
    dense = np.linalg.solve(b + lam * np.eye(len(g)), g)
    np.testing.assert_allclose(d, dense, rtol=1e-8, atol=1e-10 * np.abs(dense).max())


@pytest.mark.parametrize(("loss", "reduction"), list(LOSS_FNS), ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_forward_pass_of_the_subsample_alone_gives_the_same_direction(loss, reduction, kind):
    """``backward_fisher(model(x[:m]))`` with ``subsample=m``: the directions' backward runs
    over the ``m`` examples only (one batched backward, not one per direction over the
    batch), and the step is the one of the batch's output: (B_m + λI)⁻¹ g with the whole
    batch's gradient."""
    model = _mlp() if kind == "mlp" else _cnn()
    x, y = _data(model, loss, 7)
    fn, lam = LOSS_FNS[(loss, reduction)], 0.05
    options = dict(damping=lam, loss=loss, loss_reduction=reduction, subsample=3)
    g, d = _engine_direction(model, SMWGN, x, y, fn, separate=True, **options)
    _, d_batch = _engine_direction(model, SMWGN, x, y, fn, **options)
    np.testing.assert_allclose(d, d_batch, rtol=1e-10, atol=1e-12 * np.abs(d).max())
    b = _dense_gn(model, x, loss, reduction, 3)
    dense = np.linalg.solve(b + lam * np.eye(len(g)), g)
    np.testing.assert_allclose(d, dense, rtol=1e-8, atol=1e-10 * np.abs(dense).max())


@pytest.mark.parametrize("bias", [True, False])
def test_gauss_newton_without_bias_and_a_layer_called_twice(bias):
    for model in (_mlp(bias=bias), _Twice().double()):
        x, y = _data(_mlp(), "cross_entropy", 6)
        fn = LOSS_FNS[("cross_entropy", "mean")]
        g, d = _engine_direction(model, SMWGN, x, y, fn, damping=0.1, loss="cross_entropy")
        b = _dense_gn(model, x, "cross_entropy", "mean", 6)
        np.testing.assert_allclose(d, np.linalg.solve(b + 0.1 * np.eye(len(g)), g), rtol=1e-8)


def test_class_major_kernel_would_be_caught():
    """The index-order pitfall of §3: the δ-Gram in class-major order against the activation
    Gram in sample-major order gives another matrix; the dense comparison above sees it."""
    from curvlin import linear_terms

    rng = np.random.default_rng(0)
    m, k = 4, 3
    a, d = rng.standard_normal((m, 5)), rng.standard_normal((k, m, 2))
    right = linear_terms(a, d).kernel()
    dd = d.reshape(k * m, 2) @ d.reshape(k * m, 2).T  # class-major rows (a, n)
    wrong = dd * np.kron(a @ a.T + 1, np.ones((k, k)))  # sample-major activation Gram
    assert not np.allclose(right, wrong)
    perm = np.arange(k * m).reshape(k, m).T.ravel()  # sample-major index n·k + a -> a·m + n
    consistent = dd[np.ix_(perm, perm)] * np.kron(a @ a.T + 1, np.ones((k, k)))
    np.testing.assert_allclose(right, consistent, rtol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("sub", [None, 3])
def test_empirical_natural_gradient_matches_dense(kind, sub):
    model = _mlp() if kind == "mlp" else _cnn()
    n = 6
    x, y = _data(model, "cross_entropy", n)
    fn = LOSS_FNS[("cross_entropy", "mean")]
    g, d = _engine_direction(model, SMWNG, x, y, fn, damping=0.1, fisher="empirical",
                             subsample=sub)  # fmt: skip
    f = _dense_ef(model, x, y, fn, sub or n, n)
    np.testing.assert_allclose(d, np.linalg.solve(f + 0.1 * np.eye(len(g)), g), rtol=1e-8)


def test_sampled_natural_gradient_is_the_fisher_of_the_sampled_labels():
    """With MSE the sampled δ are Gaussian draws; E[δδᵀ] = H, so averaging the engine's
    per-example kernels over many draws approaches the Gauss–Newton kernel."""
    model = _mlp()
    x, y = _data(model, "mse", 5)
    fn = LOSS_FNS[("mse", "batchmean")]
    # one draw: the direction solves (F̂ + λI) d = g with F̂ from the captured sampled δ
    precond = Preconditioner(model, SMWNG, damping=0.1, fisher="mc", fisher_samples=1,
                             loss="mse", loss_reduction="batchmean", seed=3)  # fmt: skip
    model.zero_grad()
    out = model(x)
    precond.backward_fisher(out)
    records = {n: r[0] for n, r in precond._curv.capture.records.items()}
    fn(out, y).backward()
    g = _flat([p.grad for p in model.parameters()]).clone().numpy()
    assert precond.step()
    d = _flat([p.grad for p in model.parameters()]).numpy()
    us = []
    for name in ("0", "2"):
        r = records[name]
        a = torch.cat([r.input, torch.ones(len(r.input), 1, dtype=r.input.dtype)], 1)
        us.append(torch.einsum("ni,nj->nij", r.grad, a).reshape(5, -1))
    u = torch.cat(us, 1).numpy()
    # parameter order: weight then bias per layer; the block's W̄ = [W, b] row-major
    order = []
    offset = 0
    for layer in (model[0], model[2]):
        d_out, d_in = layer.weight.shape
        idx = np.arange(d_out * (d_in + 1)).reshape(d_out, d_in + 1) + offset
        order += [idx[:, :d_in].ravel(), idx[:, d_in]]
        offset += d_out * (d_in + 1)
    u = u[:, np.concatenate(order)]
    dense = np.linalg.solve(u.T @ u / 5 + 0.1 * np.eye(len(g)), g)
    np.testing.assert_allclose(d, dense, rtol=1e-8)


def _records_u(records, model, n):
    """``U``'s rows from the captured records of ``_mlp``'s two layers: one per example and
    output direction (the records' leading axis), columns in parameter order."""
    us = []
    for name in ("0", "2"):
        r = records[name]
        a = torch.cat([r.input[:n], torch.ones(n, 1, dtype=r.input.dtype)], 1)
        grads = r.grad if r.grad.ndim == 3 else r.grad[None]
        us.append(torch.einsum("kni,nj->knij", grads[:, :n], a).reshape(len(grads) * n, -1))
    u = torch.cat(us, 1).numpy()
    order, offset = [], 0
    for layer in (model[0], model[2]):  # weight then bias per layer; W̄ = [W, b] row-major
        d_out, d_in = layer.weight.shape
        idx = np.arange(d_out * (d_in + 1)).reshape(d_out, d_in + 1) + offset
        order += [idx[:, :d_in].ravel(), idx[:, d_in]]
        offset += d_out * (d_in + 1)
    return u[:, np.concatenate(order)]


@pytest.mark.parametrize(
    ("sub", "separate"), [(None, False), (3, False), (3, True)],
    ids=["batch", "subsample", "subsample-forward"],
)  # fmt: skip
def test_several_sampled_labels_average_their_fishers(sub, separate):
    """``fisher_samples=s``: ``s`` draws of the sampled δ per example, each scaled by
    ``1/√s`` (the network output's records are exactly the draws of the sampling generator),
    and the direction solves ``(F̂ + λI) d = g`` with ``F̂ = (1/m) Σ_n (1/s) Σ_j u_nj u_njᵀ``."""
    from curvlin.adapters.torch import sample_output_grad

    model = _mlp()
    n, s = 5, 3
    m = n if sub is None else sub
    x, y = _data(model, "mse", n)
    fn = LOSS_FNS[("mse", "batchmean")]
    precond = Preconditioner(model, SMWNG, damping=0.1, fisher="mc", fisher_samples=s,
                             loss="mse", loss_reduction="batchmean", seed=3,
                             subsample=sub)  # fmt: skip
    model.zero_grad()
    out = model(x)
    curv_out = model(x[:m]) if separate else out  # the labels are drawn for its examples
    precond.backward_fisher(curv_out)
    records = {name: r[-1] for name, r in precond._curv.capture.records.items()}
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([
        sample_output_grad(curv_out.detach(), loss="mse", reduction="batchmean", generator=gen)
        for _ in range(s)
    ])  # fmt: skip
    assert records["2"].grad.shape == (s, m, 3)
    torch.testing.assert_close(records["2"].grad, draws[:, :m] / math.sqrt(s))
    fn(out, y).backward()
    g = _flat([p.grad for p in model.parameters()]).clone().numpy()
    assert precond.step()
    d = _flat([p.grad for p in model.parameters()]).numpy()
    u = _records_u(records, model, m)
    assert u.shape[0] == s * m
    dense = np.linalg.solve(u.T @ u / m + 0.1 * np.eye(len(g)), g)
    np.testing.assert_allclose(d, dense, rtol=1e-8)


def test_weight_decay_joins_the_damping():
    """§3 test 6 through the optimizer: one step of SMWGN with (λ, τ) moves θ by
    −lr (B + (λ + τ) I)⁻¹ (g + τ θ)."""
    model = _mlp()
    x, y = _data(model, "mse", 6)
    fn = LOSS_FNS[("mse", "mean")]
    theta = _flat(model.parameters()).detach().clone()
    b = _dense_gn(model, x, "mse", "mean", 6)
    opt = SMWGN(model, lr=0.5, damping=0.1, weight_decay=0.02, loss="mse", kl_clip=None)

    def closure():
        opt.zero_grad()
        out = model(x)
        opt.backward_fisher(out)
        loss = fn(out, y)
        loss.backward()
        return loss

    closure()
    g = _flat([p.grad for p in model.parameters()]).numpy() + 0.02 * theta.numpy()
    opt.step(closure)
    step = (theta - _flat(model.parameters()).detach()).numpy()
    dense = np.linalg.solve(b + 0.12 * np.eye(len(g)), g)
    np.testing.assert_allclose(step, 0.5 * dense, rtol=1e-8)


def _linear_least_squares(lam, lr):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, 2, generator=g, dtype=torch.float64)
    opt = SMWGN(model, lr=lr, damping=lam, loss="mse", adaptive_damping=True,
                momentum_form="gradient", kl_clip=None)  # the unclipped step  # fmt: skip

    def closure():
        opt.zero_grad()
        out = model(x)
        opt.backward_fisher(out)
        loss = F.mse_loss(out, y)
        loss.backward()
        return loss

    opt.step(closure)
    return opt


def test_lm_rule_on_a_quadratic():
    """§3 test 5: a linear model with MSE is a quadratic whose Hessian is exactly B. The
    damped step decreases f at least as much as its model predicts (ρ ≥ 1, → 1 as λ → 0),
    so λ shrinks; an overshooting step increases f (ρ < 0) and λ grows."""
    ratios = []
    for lam in (1.0, 0.1, 1e-4):
        opt = _linear_least_squares(lam, lr=1.0)
        assert opt.last_ratio >= 1.0 - 1e-12
        assert opt.param_groups[0]["damping"] == pytest.approx(lam * 0.95)
        ratios.append(opt.last_ratio)
    assert ratios[0] > ratios[1] > ratios[2]
    assert ratios[2] == pytest.approx(1.0, abs=1e-3)
    opt = _linear_least_squares(1e-4, lr=3.0)  # lr·Δ overshoots the minimum: f rises
    assert opt.last_ratio < 0
    assert opt.param_groups[0]["damping"] == pytest.approx(1e-4 / 0.95)


def test_options_are_checked():
    model = _mlp()
    with pytest.raises(ValueError, match="fisher='ggn' needs loss"):
        SMWGN(model)
    with pytest.raises(ValueError, match="fisher must be one of"):
        SMWNG(model, fisher="ggn", loss="mse")
    with pytest.raises(ValueError, match="subsample must be a positive int"):
        SMWNG(model, loss="mse", subsample=0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="fisher_samples must be a positive int"):
            SMWNG(model, loss="mse", fisher_samples=bad)
    with pytest.raises(ValueError, match="fisher_samples=2 draws labels for fisher='mc'"):
        SMWNG(model, fisher="empirical", fisher_samples=2)
    # blocks that take one output gradient per example cannot average several draws
    kfac_block = KFAC.block_factory()[0]
    with pytest.raises(ValueError, match="fisher_samples=2 needs blocks that take output"):
        Curvature(model, kfac_block, owner="KFAC", fisher="mc", loss="mse", fisher_samples=2)
    with pytest.raises(ValueError, match="loss_reduction must be 'mean' or 'batchmean'"):
        SMWGN(model, loss="mse", loss_reduction="sum")
    opt = SMWNG(model, fisher="empirical")
    with pytest.raises(RuntimeError, match="backward_fisher"):
        opt.backward_fisher(model(torch.zeros(2, 4, dtype=torch.float64)))


def test_one_damping_for_all_coupled_layers():
    model = _mlp()
    opt = SMWNG(model, fisher="empirical")
    x, y = _data(model, "mse", 4)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()  # one curvature group: fine
    assert math.isfinite(float(_flat(model.parameters()).detach().sum()))
    from curvlin.blocks import LayerBatch

    driver = opt._curv.driver
    batch = LayerBatch(inputs=x, output_grads=torch.ones(4, 6, dtype=x.dtype), n_examples=4)
    grads = {"0": (torch.ones(6, 4, dtype=x.dtype), torch.ones(6, dtype=x.dtype)),
             "2": (torch.ones(3, 6, dtype=x.dtype), torch.ones(3, dtype=x.dtype))}  # fmt: skip
    with pytest.raises(ValueError, match="one damping"):
        driver.precondition(driver.states, grads, batches={"0": batch},
                            damping={"0": 0.1, "2": 0.2})  # fmt: skip
    with pytest.raises(RuntimeError, match="need the step's batches"):
        driver.precondition(driver.states, grads)


@pytest.mark.parametrize("form", ["gradient", "direction"])
def test_an_overflowing_kernel_skips_the_step(form):
    """Finite rows whose products overflow float32 (inputs of 1e10: gradients near 1e20,
    kernel entries near 1e40) make the kernel inf: the step is skipped like a non-finite
    batch, and neither the parameters nor the momentum buffers change (in the gradient form
    the buffer is updated out of place until the solve has succeeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    opt = SMWNG(model, fisher="empirical", momentum_form=form, momentum=0.9, kl_clip=None)
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def closure(x=x):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="curvature kernel holds NaN or inf"):
        opt.step(lambda: closure(x * 1e10))
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(
        torch.equal(b, opt.state[p]["momentum_buffer"]) for b, p in zip(buffers, model.parameters())
    )
    opt.step(closure)  # and the next ordinary step trains on
    assert opt.skipped_steps == 1
