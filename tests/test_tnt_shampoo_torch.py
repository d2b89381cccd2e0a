"""TNT and Shampoo on torch models: statistics against independent autograd references, the
engine's parameter units (groups, no hooks, the preconditioner), and training a transformer
block on random tokens without any ``unsupported=`` option."""

from __future__ import annotations

import warnings

import pytest
import torch
from _torch_models import cnn, mlp, one_thread
from torch import nn
from torch.nn import functional as F

from curvlin.adapters.torch import TNT, Preconditioner, Shampoo, sample_output_grad


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _unfold_covs(g):
    return [
        torch.movedim(g, i, 0).reshape(g.shape[i], -1)
        @ torch.movedim(g, i, 0).reshape(g.shape[i], -1).T
        for i in range(g.ndim)
    ]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_tnt_statistics_are_the_mode_covariances_of_the_sampled_gradient(reduction):
    """The sampled gradient is the batch-mean (or summed) loss's gradient at labels drawn by
    the optimizer's seeded generator; its first statistics, ``N · G̃_(i) G̃_(i)ᵀ``, are taken
    as they are."""
    model = cnn()
    x, t = torch.randn(5, 2, 7, 6, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    opt = TNT(model, loss="mse", loss_reduction=reduction, seed=3)
    out = model(x)
    opt.backward_fisher(out)
    F.mse_loss(out, t, reduction=reduction).backward(retain_graph=True)
    generator = torch.Generator().manual_seed(3)  # the optimizer's first draw, again
    delta = sample_output_grad(out.detach(), loss="mse", reduction=reduction, generator=generator)
    refs = torch.autograd.grad(out, list(model.parameters()), grad_outputs=delta)
    opt.step()
    n = 1 if reduction == "sum" else x.shape[0]
    for (name, p), ref in zip(model.named_parameters(), refs):
        state = opt.curvature(name)
        modes = (p.shape[0], p.shape[1], p.shape[2] * p.shape[3]) if p.ndim == 4 else p.shape
        for f, c in zip(state.factors, _unfold_covs((ref / n).reshape(modes))):
            c = c * n  # per-example scale: N · G̃G̃ᵀ estimates the mean per-example Fisher
            torch.testing.assert_close(f, c, rtol=1e-10, atol=1e-14)


def _tnt_step(opt, model, x, t, *, closure):
    def run():
        opt.zero_grad()
        out = model(x)
        opt.backward_fisher(out)
        loss = F.mse_loss(out, t)
        loss.backward()
        return loss

    if closure:
        return opt.step(run)
    run()
    return opt.step()


def test_tnt_default_relative_clip_bounds_closure_steps_and_is_silent_in_a_plain_loop():
    """TNT's default ``relative_kl_clip=1e-2`` clips a step given the closure's loss; a plain
    loop has no loss and runs unclipped without a warning, which a value set by the user
    does give."""
    x, t = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    runs = {}
    for name, options in {"default": {}, "off": {"relative_kl_clip": None}}.items():
        model = mlp()
        opt = TNT(model, lr=1.0, momentum=0.0, loss="mse", **options)
        _tnt_step(opt, model, x, t, closure=True)
        runs[name] = torch.cat([p.detach().ravel() for p in model.parameters()])
    start = torch.cat([p.detach().ravel() for p in mlp().parameters()])
    # lr 1 on a fresh model: the default bound shortens the step
    assert (runs["default"] - start).norm() < 0.5 * (runs["off"] - start).norm()
    assert TNT(mlp(), loss="mse").relative_kl_clip == TNT.default_relative_kl_clip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = mlp()
        _tnt_step(TNT(model, loss="mse"), model, x, t, closure=False)
    model = mlp()
    opt = TNT(model, loss="mse", relative_kl_clip=0.01)  # set by the user: warned about
    with pytest.warns(UserWarning, match="relative_kl_clip bounds the step by the loss"):
        _tnt_step(opt, model, x, t, closure=False)


def test_shampoo_statistics_are_the_gradients_own_and_need_no_hooks():
    model = mlp()
    opt = Shampoo(model.parameters(), decay=None)
    assert not opt._curv.capture._handles  # no hook on any module
    sums = None
    for _ in range(2):
        x, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
        opt.zero_grad()
        F.mse_loss(model(x), t).backward()
        covs = [_unfold_covs(p.grad) for p in model.parameters()]
        sums = covs if sums is None else [[a + b for a, b in zip(s, c)] for s, c in zip(sums, covs)]
        opt.step()
    for i, p_sums in enumerate(sums):
        for f, c in zip(opt.curvature(str(i)).factors, p_sums):
            torch.testing.assert_close(f, c)


def test_parameter_groups_keep_their_options():
    model = mlp()
    frozen = model[2].weight.detach().clone()
    opt = Shampoo(
        [
            {"params": [model[0].weight, model[0].bias], "lr": 0.1},
            {"params": [model[2].weight, model[2].bias], "lr": 0.0, "damping": 1e-2},
        ]
    )
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[1]["damping"] == 1e-2
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    first = model[0].weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(model(torch.randn(8, 3, dtype=torch.float64)), torch.zeros(8, 4)).backward()
        opt.step()
        sched.step()
    assert torch.equal(model[2].weight, frozen)
    assert not torch.equal(model[0].weight, first)
    assert opt.param_groups[0]["lr"] == 0.025


def test_named_parameters_name_the_units_and_duplicates_raise():
    model = mlp()
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert TNT(model.named_parameters(), loss="mse").layer_names == names
    with pytest.raises(ValueError, match="listed twice"):
        Shampoo([model[0].weight, model[0].weight])
    with pytest.raises(ValueError, match="no trainable parameter"):
        Shampoo([])
    with pytest.raises(ValueError, match="conv"):
        TNT(model, loss="mse", conv="im2col")
    with pytest.raises(ValueError, match="needs loss"):
        TNT(model)


def test_adam_grafting_with_amortised_statistics_raises():
    """Adam's second moment is folded with the statistics: stale, it divides a gradient that
    was zero at every statistics step by ``ε`` (on the demo's CURVES autoencoder one such step
    took a weight to 202 and the loss to 1e20). Both entry points refuse it."""
    model = mlp()
    for graft in (None, "sgd"):
        Shampoo(model, graft=graft, stats_every=2)
    with pytest.raises(ValueError, match="graft='adam' needs stats_every=1 \\(got 2\\)"):
        Shampoo(model, graft="adam", stats_every=2)
    with pytest.raises(ValueError, match="graft='adam' needs stats_every=1"):
        Preconditioner(model, Shampoo, graft="adam", stats_every=3)


def test_a_parameter_the_sampled_output_never_reaches_raises():
    model = mlp()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = TNT([*model.parameters(), extra], loss="mse")
    x, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    out = model(x)
    opt.backward_fisher(out)
    (F.mse_loss(out, t) + extra.square().sum()).backward()
    with pytest.raises(RuntimeError, match="parameter '4' has a gradient but no statistics"):
        opt.step()


@pytest.mark.parametrize("method", ["tnt", "shampoo"])
def test_preconditioner_in_front_of_sgd(method):
    model = mlp()
    cls, options = (TNT, {"loss": "mse"}) if method == "tnt" else (Shampoo, {})
    precond = Preconditioner(model, cls, **options)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    x, t = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    sgd.zero_grad()
    out = model(x)
    if method == "tnt":
        precond.backward_fisher(out)
    F.mse_loss(out, t).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert precond.step()
    assert all(not torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    sgd.step()


class _Classifier(nn.Module):
    """Embedding, one ``nn.TransformerEncoderLayer``, mean pooling, a linear head."""

    def __init__(self, vocab=50, d=16, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0,
                                                  batch_first=True)  # fmt: skip
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


@pytest.mark.parametrize("method", ["tnt", "shampoo"])
def test_a_transformer_block_trains_without_unsupported(method):
    """Attention projections (raw parameters), norms, an embedding whose vocabulary axis is
    diagonal (``max_dim=32`` < 50): every parameter gets curvature, the loss falls."""
    model = _Classifier()
    if method == "tnt":
        opt = TNT(model, lr=0.01, damping=0.1, loss="cross_entropy", max_dim=32)
    else:
        opt = Shampoo(model, lr=0.01, damping=1e-4, max_dim=32, graft="adam")
    assert opt.layer_names == [n for n, _ in model.named_parameters()]
    assert opt.curvature("embed.weight").factors[0].shape == (50,)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (64, 6), generator=g)
    labels = tokens[:, 0] % 5  # learnable from the tokens
    losses = []
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(40):

        def closure():
            opt.zero_grad()
            out = model(tokens)
            if method == "tnt":
                opt.backward_fisher(out)
            loss = F.cross_entropy(out, labels)
            loss.backward()
            return loss

        losses.append(opt.step(closure).item())
    assert opt.skipped_steps == 0
    assert losses[-1] < 0.5 * losses[0]
    assert all(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
