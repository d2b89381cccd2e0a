"""Behaviour of the torch KFAC optimizer and preconditioner in a training loop.

Checkpoints (bit-exact continuation), NaN/inf steps, unsupported and frozen parameters, lr
schedulers, closures, capture only in training mode, hook removal, the factor dtype policy and
argument validation.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _methods import assert_same, roundtrip
from _torch_models import cnn, layer_grad_vec, mlp, one_thread
from torch import nn
from torch.nn import functional as F

from curvlin.adapters.torch import KFAC, KFACPreconditioner


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _model(kind: str, seed: int = 0):
    if kind == "mlp":
        return mlp(seed=seed), (3,)
    return cnn(stride=2, padding=1, seed=seed), (2, 7, 6)


def _batches(shape, count: int, *, n: int = 8, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, *shape, generator=gen, dtype=dtype),
            torch.randint(0, 4, (n,), generator=gen),
        )
        for _ in range(count)
    ]


def _step(model, opt, batch, *, mc: bool, sgd=None):
    """One training step; ``opt`` is a KFAC optimizer or (preconditioner, ``sgd``)."""
    x, y = batch
    (sgd or opt).zero_grad()
    out = model(x)
    if mc:
        opt.backward_fisher(out)
    F.cross_entropy(out, y).backward()
    if sgd is None:
        return opt.step()
    result = opt.step()
    sgd.step()
    return result


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# -- 5: checkpoints ---------------------------------------------------------------------------

HYPER = {
    "lr": 0.05,
    "damping": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-3,
    "stats_every": 2,
    "refresh_every": 3,
    "decay": 0.9,
}


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_preconditioner_checkpoint_round_trip_is_bit_exact(fisher):
    mc = fisher == "mc"
    extra = {"fisher": fisher, "loss": "cross_entropy" if mc else None}
    hyper = {"damping": 0.1, "stats_every": 2, "refresh_every": 3, "decay": 0.9}

    def make(seed, sampling_seed):
        model, _ = _model("cnn", seed=seed)
        precond = KFACPreconditioner(model, **hyper, **extra, seed=sampling_seed)
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, precond, sgd

    batches = _batches((2, 7, 6), 9)
    model, precond, sgd = make(0, 7)
    for batch in batches[:4]:
        _step(model, precond, batch, mc=mc, sgd=sgd)
    saved = roundtrip(
        {"p": precond.state_dict(), "sgd": sgd.state_dict(), "model": model.state_dict()}
    )
    for batch in batches[4:]:
        _step(model, precond, batch, mc=mc, sgd=sgd)

    fresh, precond2, sgd2 = make(123, 99)
    fresh.load_state_dict(saved["model"])
    precond2.load_state_dict(saved["p"])
    sgd2.load_state_dict(saved["sgd"])
    for batch in batches[4:]:
        _step(fresh, precond2, batch, mc=mc, sgd=sgd2)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


# -- 6: NaN / inf steps --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["nan-input", "nan-grad", "inf-grad"])
@pytest.mark.parametrize("fisher", ["empirical", "mc-mse"])
def test_nonfinite_step_is_skipped_with_state_intact(how, fisher):
    mc = fisher != "empirical"
    extra = {"fisher": "mc", "loss": "mse"} if mc else {}
    model, shape = _model("cnn")
    twin, _ = _model("cnn")
    opt = KFAC(model, lr=0.05, damping=0.1, momentum=0.9, **extra)
    opt_twin = KFAC(twin, lr=0.05, damping=0.1, momentum=0.9, **extra)
    batches = _batches(shape, 5)

    def step(m, o, batch):
        x, y = batch
        o.zero_grad()
        out = m(x)
        if mc:
            o.backward_fisher(out)
        F.mse_loss(out, F.one_hot(y, 4).to(out.dtype)).backward()
        return o.step()

    for batch in batches[:3]:
        step(model, opt, batch)
        step(twin, opt_twin, batch)
    before_params, before_state = _params(model), roundtrip(opt.state_dict())

    x, y = batches[3]
    if how == "nan-input":
        x = x.clone()
        x[2, 0, 3, 3] = float("nan")
    opt.zero_grad()
    out = model(x)
    if mc:
        opt.backward_fisher(out)
    F.mse_loss(out, F.one_hot(y, 4).to(out.dtype)).backward()
    if how != "nan-input":
        model[0].weight.grad[0, 0, 0, 0] = float("nan") if how == "nan-grad" else float("inf")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    for p, q in zip(before_params, model.parameters()):
        assert torch.equal(p, q)
    after = opt.state_dict()
    assert after["curvlin"]["driver"].pop("skipped") == 1
    before_state["curvlin"]["driver"].pop("skipped")
    if mc:  # the sampler drew labels for the skipped batch; nothing else may differ
        after["curvlin"].pop("generator")
        before_state["curvlin"].pop("generator")
    assert_same(before_state, after)

    # the next finite step proceeds as if the bad one had never happened
    step(model, opt, batches[4])
    step(twin, opt_twin, batches[4])
    assert opt.curvature(opt.layer_names[0]).updates == 4
    if not mc:
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    else:
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("loss", ["cross_entropy", "bce_with_logits"])
def test_nan_output_with_mc_fisher_is_skipped_not_raised(loss):
    """A NaN forward with ``fisher="mc"``: ``backward_fisher`` must not crash in the sampler.

    ``torch.multinomial``/``torch.bernoulli`` reject NaN probabilities, so the sampled labels
    have to be guarded; the step is then skipped like any other non-finite step.
    """
    model, shape = _model("mlp")
    opt = KFAC(model, lr=0.1, fisher="mc", loss=loss)
    x, y = _batches(shape, 1)[0]
    x = x.clone()
    x[0, 0] = float("nan")
    before = _params(model)
    opt.zero_grad()
    out = model(x)
    opt.backward_fisher(out)
    target = y if loss == "cross_entropy" else F.one_hot(y, 4).to(out.dtype)
    (F.cross_entropy if loss == "cross_entropy" else F.binary_cross_entropy_with_logits)(
        out, target
    ).backward()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_preconditioner_nonfinite_step_leaves_grads_and_state():
    model, shape = _model("mlp")
    precond = KFACPreconditioner(model, damping=0.1)
    batches = _batches(shape, 3)
    for x, y in batches[:2]:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert precond.step() is True
    state = roundtrip(precond.state_dict())
    model.zero_grad()
    x, y = batches[2]
    F.cross_entropy(model(x), y).backward()
    model[2].bias.grad[1] = float("nan")
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert precond.step() is False
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, equal_nan=True, rtol=0, atol=0)
    after = precond.state_dict()
    assert after["curvlin"]["driver"].pop("skipped") == 1
    state["curvlin"]["driver"].pop("skipped")
    assert_same(state, after)


# -- 7: unsupported and frozen parameters ------------------------------------------------------


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, idx):
        return self.out(torch.tanh(self.bn(self.fc(self.emb(idx)))))


@pytest.mark.parametrize("frontend", [KFAC, KFACPreconditioner])
def test_unsupported_trainable_parameters_raise_with_names(frontend):
    with pytest.raises(ValueError, match="unsupported") as info:
        frontend(_Mixed())
    for name in ("emb.weight", "bn.weight", "bn.bias"):
        assert name in str(info.value)
    for name in ("fc.weight", "out.weight"):
        assert name not in str(info.value)


def test_unsupported_sgd_updates_the_other_parameters():
    lr, wd = 0.1, 0.01
    model = _Mixed()
    opt = KFAC(model, lr=lr, momentum=0.0, weight_decay=wd, damping=0.1, unsupported="sgd")
    assert opt.layer_names == ["fc", "out"]
    idx, y = torch.randint(0, 10, (12,)), torch.randint(0, 3, (12,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(model(idx), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name in ("emb.weight", "bn.weight", "bn.bias"):
        p = dict(model.named_parameters())[name]
        expected = before[name] - lr * (grads[name] + wd * before[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p.detach(), before[name])
    for name in ("fc", "out"):
        module = getattr(model, name)
        assert not torch.equal(module.weight.detach(), before[f"{name}.weight"])


def test_preconditioner_unsupported_sgd_leaves_other_grads():
    model = _Mixed()
    precond = KFACPreconditioner(model, unsupported="sgd")
    idx, y = torch.randint(0, 10, (12,)), torch.randint(0, 3, (12,))
    F.cross_entropy(model(idx), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    precond.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p.grad, grads[name])
        assert changed == name.startswith(("fc.", "out.")), name


def test_unsupported_argument_is_validated():
    with pytest.raises(ValueError, match="unsupported"):
        KFAC(mlp(), unsupported="ignore")


def test_frozen_layer_is_left_alone():
    model = mlp()
    model[0].requires_grad_(False)
    opt = KFAC(model, lr=0.1, damping=0.1)
    assert opt.layer_names == ["2"]
    before = _params(model)
    x, y = _batches((3,), 1)[0]
    _step(model, opt, (x, y), mc=False)
    after = list(model.parameters())
    assert torch.equal(after[0], before[0])
    assert torch.equal(after[1], before[1])
    assert not torch.equal(after[2], before[2])


@pytest.mark.parametrize("frontend", ["KFAC", "KFACPreconditioner"])
def test_frozen_bias_with_trainable_weight(frontend):
    """A layer whose bias is frozen (``requires_grad=False``) still trains its weight."""
    model = mlp()
    model[0].bias.requires_grad_(False)
    before = _params(model)
    if frontend == "KFAC":
        _step(model, KFAC(model, lr=0.1, damping=0.1), _batches((3,), 1)[0], mc=False)
    else:
        precond = KFACPreconditioner(model, damping=0.1)
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        _step(model, precond, _batches((3,), 1)[0], mc=False, sgd=sgd)
    assert torch.equal(model[0].bias, before[1])
    assert not torch.equal(model[0].weight, before[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- 8: lr schedulers, closures, capture only in training, hooks ---------------------------------


def test_lr_scheduler_changes_the_step_size():
    model, shape = _model("mlp")
    opt = KFAC(model, lr=0.4, momentum=0.0, damping=0.1, stats_every=1000, refresh_every=1000)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    batches = _batches(shape, 3)
    _step(model, opt, batches[0], mc=False)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    for batch, lr in zip(batches[1:], (0.1, 0.025)):
        before = [model[0].weight.detach().clone(), model[0].bias.detach().clone()]
        opt.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        direction = opt.inverse_operator("0") @ layer_grad_vec(model[0]).numpy()
        opt.step()
        sched.step()
        update = torch.cat(
            [model[0].weight.detach() - before[0], (model[0].bias.detach() - before[1])[:, None]],
            dim=1,
        )
        torch.testing.assert_close(
            update.reshape(-1), torch.from_numpy(-lr * direction), rtol=1e-9, atol=1e-12
        )


def test_step_with_closure_returns_the_loss():
    model, shape = _model("cnn")
    opt = KFAC(model, lr=0.1, damping=0.1)
    x, y = _batches(shape, 1)[0]
    seen = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        seen.append(loss.detach())
        return loss

    before = _params(model)
    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    assert len(seen) == 1
    assert torch.equal(loss.detach(), seen[0])
    assert opt.curvature("0").updates == 1
    assert not torch.equal(before[0], model[0].weight)
    loss2 = opt.step(closure)
    assert float(loss2.detach()) < float(loss.detach())


@pytest.mark.parametrize("mode", ["eval", "no_grad", "eval+no_grad"])
def test_evaluation_forward_does_not_touch_statistics(mode):
    model, shape = _model("cnn")
    twin, _ = _model("cnn")
    opt = KFAC(model, lr=0.1, damping=0.1)
    opt_twin = KFAC(twin, lr=0.1, damping=0.1)
    (x, y), (x_eval, _) = _batches(shape, 2)
    for m in (model, twin):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
    # an evaluation pass between the training backward and the step, on the model only
    if "eval" in mode:
        model.eval()
    with torch.no_grad() if "no_grad" in mode else torch.enable_grad():
        model(x_eval)
    model.train()
    opt.step()
    opt_twin.step()
    for name in opt.layer_names:
        torch.testing.assert_close(
            opt.curvature(name).a, opt_twin.curvature(name).a, rtol=0, atol=0
        )
        torch.testing.assert_close(
            opt.curvature(name).g, opt_twin.curvature(name).g, rtol=0, atol=0
        )
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_statistics_step_without_training_forward_raises():
    model, shape = _model("mlp")
    opt = KFAC(model)
    x, y = _batches(shape, 1)[0]
    model.eval()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="training mode"):
        opt.step()


def test_mc_step_without_backward_fisher_raises():
    model, shape = _model("mlp")
    opt = KFAC(model, fisher="mc", loss="cross_entropy")
    x, y = _batches(shape, 1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="backward_fisher"):
        opt.step()


def test_remove_hooks_detaches_from_the_model():
    model, _ = _model("cnn")
    opt = KFAC(model, lr=0.1, damping=0.1)
    for name in opt.layer_names:
        module = dict(model.named_modules())[name]
        assert module._forward_pre_hooks
        assert module._forward_hooks
    opt.remove_hooks()
    for name in opt.layer_names:
        module = dict(model.named_modules())[name]
        assert not module._forward_pre_hooks
        assert not module._forward_hooks


def test_steps_after_remove_hooks_keep_the_last_curvature():
    """After ``remove_hooks()`` no statistics can be gathered; steps go on with the last inverse.

    (Currently the first step after removal works and the next statistics step raises
    "no layer input was captured", because ``arm()`` re-activates the removed capture.)
    """
    model, shape = _model("mlp")
    opt = KFAC(model, lr=0.1, damping=0.1)
    batches = _batches(shape, 4)
    _step(model, opt, batches[0], mc=False)
    state = opt.curvature("0")
    opt.remove_hooks()
    for batch in batches[1:]:
        before = _params(model)
        _step(model, opt, batch, mc=False)
        assert not torch.equal(before[0], model[0].weight)
    after = opt.curvature("0")
    assert after.updates == state.updates
    assert torch.equal(after.g, state.g)
    assert torch.equal(after.a, state.a)


def test_unknown_layer_name_raises_key_error():
    opt = KFAC(mlp())
    assert opt.layer_names == ["0", "2"]
    with pytest.raises(KeyError, match="not a layer"):
        opt.curvature("1")


# -- 9: factor dtype policy -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_gets_float32_factors(dtype):
    model, shape = _model("cnn")
    model = model.to(dtype)
    opt = KFAC(model, lr=0.1, damping=0.1)
    batches = _batches(shape, 3, dtype=dtype)
    before = _params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in batches:
            _step(model, opt, batch, mc=False)
    assert opt.skipped_steps == 0
    for name in opt.layer_names:
        state = opt.curvature(name)
        assert state.g.dtype == state.a.dtype == torch.float32
        assert state.inverse.inverses[0].dtype == torch.float32
    for p, q in zip(before, model.parameters()):
        assert q.dtype == dtype
        assert torch.isfinite(q).all()
        assert not torch.equal(p, q)


def test_factor_dtype_override_and_preconditioned_grad_dtype():
    model, shape = _model("mlp")
    model = model.to(torch.bfloat16)
    precond = KFACPreconditioner(model, damping=0.1, factor_dtype=torch.float64)
    x, y = _batches(shape, 1, dtype=torch.bfloat16)[0]
    F.cross_entropy(model(x), y).backward()
    assert precond.step() is True
    assert precond.curvature("0").g.dtype == torch.float64
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
    assert precond.curvature("0").updates == 1


def test_float32_model_keeps_float32_factors():
    model = mlp().float()
    opt = KFAC(model)
    x, y = _batches((3,), 1, dtype=torch.float32)[0]
    _step(model, opt, (x, y), mc=False)
    assert opt.curvature("0").g.dtype == torch.float32


# -- argument validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"damping": 0.0}, "damping"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"kl_clip": 0.0}, "kl_clip"),
        ({"fisher": "type-2"}, "fisher"),
        ({"fisher": "mc"}, "loss"),
        ({"fisher": "mc", "loss": "nll"}, "loss"),
        ({"loss_reduction": "none"}, "loss_reduction"),
        ({"decay": 1.0}, "decay"),
        ({"stats_every": 0}, "stats_every"),
        ({"refresh_every": 1.5}, "refresh_every"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFAC(mlp(), **kwargs)


def test_model_without_supported_layers_raises():
    with pytest.raises(ValueError, match="no supported layer"):
        KFAC(nn.Sequential(nn.Tanh()))
